// Global magnitude threshold and keep-masks on the CPU: a two-pass radix select over
// the 31-bit keys of |x| (magnitude_threshold.h), with one histogram per thread and no
// concatenation or sort.
//
// Pass 1 histograms the top 15 key bits (32768 bins, 256 KiB of int64 per thread: fits
// the 2 MiB per-core L2); pass 2 histograms the low 16 bits of the keys whose top bits
// equal the selected bin. The masks add two passes: one writes |x| > t and counts ties
// per chunk, one flips the first ties to "pruned" in (tensor, flat index) order.
#include <algorithm>
#include <atomic>
#include <limits>
#include <numeric>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "magnitude_threshold.h"

namespace sparsekern {
namespace {

constexpr int kHighBits = 15;                 // pass 1 digit: key bits 30..16
constexpr int kLowBits = 16;                  // pass 2 digit: key bits 15..0
constexpr int64_t kChunk = int64_t{1} << 16;  // elements per parallel work item

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// Contiguous views of the inputs (a copy only for non-contiguous ones: flat index order
// is preserved) and the chunks that split them into parallel work.
struct Inputs {
  std::vector<at::Tensor> tensors;
  std::vector<Chunk> chunks;
};

Inputs prepare(at::TensorList tensors) {
  Inputs in;
  in.tensors.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    in.tensors.push_back(tensors[i].detach().contiguous());
    const int64_t n = tensors[i].numel();
    for (int64_t b = 0; b < n; b += kChunk) {
      in.chunks.push_back({static_cast<int64_t>(i), b, std::min(n, b + kChunk)});
    }
  }
  return in;
}

// Calls f(flat_index, key) for every element of the chunk, dispatching on dtype once.
template <typename F>
void for_each_key(const Inputs& in, const Chunk& c, F&& f) {
  const at::Tensor& t = in.tensors[c.tensor];
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "magnitude_threshold_cpu", [&] {
    const scalar_t* p = t.const_data_ptr<scalar_t>();
    for (int64_t i = c.begin; i < c.end; ++i) {
      f(i, abs_key(static_cast<float>(p[i])));
    }
  });
}

// Adds the chunk's digits (key >> kShift) & (2^kBits - 1) to h.
// kAll (the first pass): every key counts. Four interleaved sub-histograms ("lanes"): a
// run of equal digits would otherwise serialise on store-to-load forwarding of one
// counter (pass 1 on ResNet-50: 22 -> 11 ms with two threads).
// Otherwise only keys whose bits above kShift + kBits equal `want` count; those are rare
// (about 1 in 600 on ResNet-50 weights), so blocks of 16 keys are first tested with a
// vectorisable any-match, and the histogram is touched only for blocks that hit.
template <typename scalar_t, int kShift, int kBits, bool kAll>
void histogram_chunk(const scalar_t* p, int64_t begin, int64_t end, uint32_t want, uint32_t* h) {
  constexpr int64_t kBins = int64_t{1} << kBits;
  constexpr uint32_t kMask = static_cast<uint32_t>(kBins - 1);
  constexpr int kHigh = kShift + kBits;
  int64_t i = begin;
  if constexpr (kAll) {
    for (; i + 4 <= end; i += 4) {
      for (int lane = 0; lane < 4; ++lane) {
        ++h[lane * kBins + ((abs_key(static_cast<float>(p[i + lane])) >> kShift) & kMask)];
      }
    }
  } else {
    // Equality of the shifted key (SSE2's pcmpeqd) OR-reduced over the block; `omp simd`
    // because GCC otherwise unrolls this loop without vectorising it (pass 2 on ResNet-50
    // cost more than the histogram pass: 28 ms vs 23 ms on one thread).
    constexpr int kBlock = 16;
    for (; i + kBlock <= end; i += kBlock) {
      uint32_t hits = 0;
#pragma omp simd reduction(| : hits)
      for (int j = 0; j < kBlock; ++j) {
        hits |= static_cast<uint32_t>((abs_key(static_cast<float>(p[i + j])) >> kHigh) == want);
      }
      if (hits == 0) continue;
      for (int j = 0; j < kBlock; ++j) {
        const uint32_t key = abs_key(static_cast<float>(p[i + j]));
        if ((key >> kHigh) == want) ++h[(key >> kShift) & kMask];
      }
    }
  }
  for (; i < end; ++i) {
    const uint32_t key = abs_key(static_cast<float>(p[i]));
    if (kAll || (key >> kHigh) == want) ++h[(key >> kShift) & kMask];
  }
}

// Runs body(claim) once on every thread; claim() returns the next chunk no thread has
// taken yet, or -1. Threads claim chunks rather than taking fixed halves, so a thread
// slowed by anything else on its core no longer holds the whole pass up (ResNet-50
// threshold, 2 threads: 23.4 -> 20.6 ms median).
template <typename Body>
void for_each_chunk_claimed(int64_t nchunks, Body&& body) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    body([&]() -> int64_t {
      const int64_t c = next.fetch_add(1, std::memory_order_relaxed);
      return c < nchunks ? c : -1;
    });
  });
}

// Adds the 4 lanes of uint32 counters into the thread's int64 histogram and clears them.
void flush_lanes(std::vector<uint32_t>& lanes, int64_t* total, int64_t bins) {
  for (int64_t i = 0; i < bins; ++i) {
    total[i] += int64_t{lanes[i]} + lanes[bins + i] + lanes[2 * bins + i] + lanes[3 * bins + i];
  }
  std::fill(lanes.begin(), lanes.end(), 0u);
}

// Histogram of one digit over all chunks: per thread, 4 lanes of uint32 counters (a chunk
// holds < 2^32 elements; lanes are flushed to int64 every 60000 chunks and at the end).
template <int kShift, int kBits, bool kAll>
std::vector<int64_t> histogram(const Inputs& in, uint32_t prefix) {
  constexpr int64_t kBins = int64_t{1} << kBits;
  const uint32_t want = kAll ? 0u : prefix >> (kShift + kBits);
  const int nthreads = at::get_num_threads();
  std::vector<int64_t> per_thread(static_cast<size_t>(nthreads) * kBins, 0);
  for_each_chunk_claimed(static_cast<int64_t>(in.chunks.size()), [&](auto claim) {
    std::vector<uint32_t> lanes(4 * kBins, 0);
    int64_t* total = per_thread.data() + static_cast<int64_t>(at::get_thread_num()) * kBins;
    int64_t since_flush = 0;
    for (int64_t c = claim(); c >= 0; c = claim()) {
      const Chunk& ch = in.chunks[c];
      const at::Tensor& t = in.tensors[ch.tensor];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "magnitude_threshold_cpu", [&] {
        histogram_chunk<scalar_t, kShift, kBits, kAll>(t.const_data_ptr<scalar_t>(), ch.begin, ch.end, want,
                                                       lanes.data());
      });
      // uint32 lanes cannot overflow within 2^16 chunks of 2^16 elements; flush sooner.
      if (++since_flush == 60000) {
        flush_lanes(lanes, total, kBins);
        since_flush = 0;
      }
    }
    flush_lanes(lanes, total, kBins);
  });
  std::vector<int64_t> hist(per_thread.begin(), per_thread.begin() + kBins);
  for (int t = 1; t < nthreads; ++t) {
    const int64_t* h = per_thread.data() + static_cast<int64_t>(t) * kBins;
    for (int64_t i = 0; i < kBins; ++i) hist[i] += h[i];
  }
  return hist;
}

// Where the k-th smallest key (1-based) lies: the bin, and how many keys precede it.
struct Selected {
  uint32_t bin;
  int64_t before;
};

Selected select_bin(const std::vector<int64_t>& hist, int64_t k) {
  int64_t before = 0;
  for (size_t b = 0; b < hist.size(); ++b) {
    if (before + hist[b] >= k) return {static_cast<uint32_t>(b), before};
    before += hist[b];
  }
  TORCH_INTERNAL_ASSERT(false, "magnitude_threshold: rank ", k, " exceeds the histogram total ", before);
}

struct Threshold {
  float value;            // NaN when any input is NaN/Inf
  uint32_t key;           // key of value (valid when k > 0 and all finite)
  int64_t ties_to_prune;  // how many keys equal to `key` are pruned
  bool finite;
};

Threshold select_threshold(const Inputs& in, int64_t k) {
  const auto high = histogram<kLowBits, kHighBits, true>(in, 0);
  const int64_t nonfinite =
      std::accumulate(high.begin() + (kNonFiniteKey >> kLowBits), high.end(), int64_t{0});
  if (nonfinite > 0) {
    return {std::numeric_limits<float>::quiet_NaN(), 0, 0, false};
  }
  if (k == 0) return {0.0f, 0, 0, true};
  const Selected s1 = select_bin(high, k);
  const uint32_t prefix = s1.bin << kLowBits;
  const auto low = histogram<0, kLowBits, false>(in, prefix);
  const Selected s2 = select_bin(low, k - s1.before);
  const uint32_t key = prefix | s2.bin;
  return {key_to_float(key), key, k - s1.before - s2.before, true};
}

at::Tensor scalar_result(float value) {
  return at::scalar_tensor(value, at::TensorOptions().dtype(at::kFloat));
}

at::Tensor magnitude_threshold_cpu(at::TensorList tensors, int64_t n_prune) {
  check_threshold_inputs(tensors, n_prune);
  const Inputs in = prepare(tensors);
  return scalar_result(select_threshold(in, n_prune).value);
}

std::tuple<std::vector<at::Tensor>, at::Tensor> magnitude_masks_cpu(at::TensorList tensors, int64_t n_prune) {
  check_threshold_inputs(tensors, n_prune);
  const Inputs in = prepare(tensors);
  const Threshold thr = select_threshold(in, n_prune);

  std::vector<at::Tensor> masks;
  masks.reserve(tensors.size());
  for (const auto& t : tensors) masks.push_back(at::empty(t.sizes(), t.options().dtype(at::kBool)));
  if (n_prune == 0 || !thr.finite) {
    // Nothing pruned (or no threshold exists): keep everything.
    for (auto& m : masks) m.fill_(true);
    return {masks, scalar_result(thr.value)};
  }

  // Pass 3: keep |x| > t, count the ties at t per chunk.
  const int64_t nchunks = static_cast<int64_t>(in.chunks.size());
  std::vector<int64_t> ties(nchunks, 0);
  for_each_chunk_claimed(nchunks, [&](auto claim) {
    for (int64_t c = claim(); c >= 0; c = claim()) {
      bool* m = masks[in.chunks[c].tensor].data_ptr<bool>();
      int64_t n_ties = 0;
      for_each_key(in, in.chunks[c], [&](int64_t i, uint32_t key) {
        m[i] = key > thr.key;
        n_ties += key == thr.key;
      });
      ties[c] = n_ties;
    }
  });
  // Ties before each chunk, in (tensor, flat index) order.
  std::vector<int64_t> offset(nchunks, 0);
  std::exclusive_scan(ties.begin(), ties.end(), offset.begin(), int64_t{0});

  // Pass 4: ties of rank >= ties_to_prune are kept; only chunks holding such ties run.
  for_each_chunk_claimed(nchunks, [&](auto claim) {
    for (int64_t c = claim(); c >= 0; c = claim()) {
      if (ties[c] == 0 || offset[c] + ties[c] <= thr.ties_to_prune) continue;
      bool* m = masks[in.chunks[c].tensor].data_ptr<bool>();
      int64_t rank = offset[c];
      for_each_key(in, in.chunks[c], [&](int64_t i, uint32_t key) {
        if (key == thr.key) m[i] = rank++ >= thr.ties_to_prune;
      });
    }
  });
  return {masks, scalar_result(thr.value)};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("magnitude_threshold", &magnitude_threshold_cpu);
  m.impl("magnitude_masks", &magnitude_masks_cpu);
}

}  // namespace sparsekern
