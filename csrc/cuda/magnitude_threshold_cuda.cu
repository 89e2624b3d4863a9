// Global magnitude threshold and keep-masks on CUDA: a three-pass radix select over the
// 31-bit keys of |x| (magnitude_threshold.h) across many tensors at once. Digits of
// 11, 10 and 10 bits keep each block's histogram in shared memory (8 KiB); a one-block
// select kernel after each pass narrows the prefix. Every intermediate value (prefix,
// remaining rank, count below, non-finite count) stays in a small device `state`
// tensor, so nothing waits on the host: the only host->device traffic is the pinned
// table of tensor pointers, copied asynchronously on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "magnitude_threshold.h"

namespace sparsekern {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kBlockElems = kThreads * 32;  // elements per block of the histogram grid
constexpr int kSelectThreads = 1024;
// The three digits, most significant first: bits 30..20, 19..10, 9..0.
constexpr int kDigitBits[3] = {11, 10, 10};
constexpr int kDigitShift[3] = {20, 10, 0};

// state[] slots (int64, on the device).
enum State { kPrefix = 0, kRank = 1, kBelow = 2, kNonFinite = 3, kStateSize = 4 };

enum DType : int64_t { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

// Per tensor: data pointer, numel, dtype code, mask output pointer. Per block: tensor
// index and first element. One int64 table, copied to the device once per call.
struct Table {
  const int64_t* tensors;  // 4 per tensor
  const int64_t* blocks;   // 2 per block
};
constexpr int kTensorFields = 4;

__device__ __forceinline__ uint32_t load_key(const int64_t* meta, int64_t i) {
  const void* p = reinterpret_cast<const void*>(meta[0]);
  switch (meta[2]) {
    case kF16:
      return abs_key(static_cast<float>(static_cast<const at::Half*>(p)[i]));
    case kBF16:
      return abs_key(static_cast<float>(static_cast<const at::BFloat16*>(p)[i]));
    case kF64:
      return abs_key(static_cast<float>(static_cast<const double*>(p)[i]));
    default:
      return abs_key(static_cast<const float*>(p)[i]);
  }
}

// Histogram of digit `pass` over the keys whose higher digits equal state[kPrefix].
template <int kBits>
__global__ void __launch_bounds__(kThreads)
    histogram_kernel(Table table, const int64_t* state, int shift, unsigned long long* hist) {
  __shared__ unsigned int local[1 << kBits];
  for (int b = threadIdx.x; b < (1 << kBits); b += blockDim.x) local[b] = 0;
  __syncthreads();

  const int64_t* meta = table.tensors + kTensorFields * table.blocks[2 * blockIdx.x];
  const int64_t begin = table.blocks[2 * blockIdx.x + 1];
  const int64_t end = min(meta[1], begin + kBlockElems);
  const int high = shift + kBits;  // <= 31
  const uint32_t want = static_cast<uint32_t>(state[kPrefix]) >> high;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const uint32_t key = load_key(meta, i);
    if ((key >> high) == want) atomicAdd(&local[(key >> shift) & ((1u << kBits) - 1)], 1u);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < (1 << kBits); b += blockDim.x) {
    if (local[b] != 0) atomicAdd(&hist[b], static_cast<unsigned long long>(local[b]));
  }
}

// One block: finds the bin holding rank state[kRank] (1-based) and narrows the state.
// On the first pass also counts the non-finite keys (bins at and above kNonFiniteKey).
// __launch_bounds__: without it nvcc gave this kernel 80-88 registers per thread, and a
// 1024-thread block needs <= 64 (65536 per SM), so every launch failed on an H200 with
// "too many resources requested for launch".
template <int kBits>
__global__ void __launch_bounds__(kSelectThreads)
    select_kernel(const unsigned long long* hist, int64_t* state, int shift, bool first_pass) {
  constexpr int kBins = 1 << kBits;
  constexpr int kPerThread = kBins / kSelectThreads;
  static_assert(kPerThread >= 1, "digit too small for the select block");
  using Scan = cub::BlockScan<unsigned long long, kSelectThreads>;
  __shared__ typename Scan::TempStorage scan_storage;

  const int64_t rank = state[kRank];
  unsigned long long counts[kPerThread];
  unsigned long long mine = 0;
  for (int j = 0; j < kPerThread; ++j) {
    counts[j] = hist[threadIdx.x * kPerThread + j];
    mine += counts[j];
  }
  unsigned long long before;
  Scan(scan_storage).ExclusiveSum(mine, before);
  __syncthreads();  // every thread has read state[kRank] before one of them writes it

  if (first_pass && threadIdx.x == 0) {
    unsigned long long nonfinite = 0;
    for (int b = kNonFiniteKey >> shift; b < kBins; ++b) nonfinite += hist[b];
    state[kNonFinite] = static_cast<int64_t>(nonfinite);
  }
  if (rank == 0) return;  // n_prune == 0: only the non-finite count was wanted
  for (int j = 0; j < kPerThread; ++j) {
    const int64_t lo = static_cast<int64_t>(before);
    if (lo < rank && rank <= lo + static_cast<int64_t>(counts[j])) {
      state[kPrefix] |= static_cast<int64_t>(threadIdx.x * kPerThread + j) << shift;
      state[kRank] = rank - lo;
      state[kBelow] += lo;
    }
    before += counts[j];
  }
}

__global__ void __launch_bounds__(1) finalize_kernel(const int64_t* state, float* out) {
  if (state[kNonFinite] > 0) {
    *out = __int_as_float(0x7fc00000);  // quiet NaN: flags non-finite inputs
  } else if (state[kRank] == 0) {
    *out = 0.0f;
  } else {
    *out = key_to_float(static_cast<uint32_t>(state[kPrefix]));
  }
}

// Ties at the threshold per block, in block order (= (tensor, flat index) order).
__global__ void __launch_bounds__(kThreads) count_ties_kernel(Table table, const int64_t* state, int64_t* ties) {
  using Reduce = cub::BlockReduce<int64_t, kThreads>;
  __shared__ typename Reduce::TempStorage storage;
  const int64_t* meta = table.tensors + kTensorFields * table.blocks[2 * blockIdx.x];
  const int64_t begin = table.blocks[2 * blockIdx.x + 1];
  const int64_t end = min(meta[1], begin + kBlockElems);
  const uint32_t thr = static_cast<uint32_t>(state[kPrefix]);
  int64_t n = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) n += load_key(meta, i) == thr;
  const int64_t total = Reduce(storage).Sum(n);
  if (threadIdx.x == 0) ties[blockIdx.x] = total;
}

// keep = |x| > t, or |x| == t with tie rank >= ties to prune (state[kRank] after the last
// select). Tiles of kThreads elements are scanned in order so ranks follow flat index.
__global__ void __launch_bounds__(kThreads)
    write_masks_kernel(Table table, const int64_t* state, const int64_t* ties_before) {
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage storage;
  const int64_t* meta = table.tensors + kTensorFields * table.blocks[2 * blockIdx.x];
  bool* mask = reinterpret_cast<bool*>(meta[3]);
  const int64_t begin = table.blocks[2 * blockIdx.x + 1];
  const int64_t end = min(meta[1], begin + kBlockElems);
  const bool keep_all = state[kNonFinite] > 0 || state[kRank] == 0;
  const uint32_t thr = static_cast<uint32_t>(state[kPrefix]);
  const int64_t ties_to_prune = state[kRank];
  int64_t rank = ties_before[blockIdx.x];
  for (int64_t tile = begin; tile < end; tile += kThreads) {
    const int64_t i = tile + threadIdx.x;
    const uint32_t key = i < end ? load_key(meta, i) : 0u;
    const int tie = (i < end && key == thr) ? 1 : 0;
    int local_rank, tile_ties;
    Scan(storage).ExclusiveSum(tie, local_rank, tile_ties);
    __syncthreads();  // storage is reused by the next tile's scan
    if (i < end) {
      mask[i] = keep_all || key > thr || (tie && rank + local_rank >= ties_to_prune);
    }
    rank += tile_ties;
  }
}

int64_t dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    case at::kDouble: return kF64;
    default: return kF32;
  }
}

// Inputs made contiguous (a copy only for non-contiguous views), the device table, and
// the number of histogram blocks.
struct Prepared {
  std::vector<at::Tensor> tensors;
  at::Tensor table;  // int64 on the device
  Table view;
  int64_t num_blocks;
};

Prepared prepare(at::TensorList tensors, const std::vector<at::Tensor>& masks) {
  Prepared p;
  std::vector<int64_t> meta, blocks;
  for (size_t i = 0; i < tensors.size(); ++i) {
    p.tensors.push_back(tensors[i].detach().contiguous());
    const at::Tensor& t = p.tensors.back();
    meta.push_back(reinterpret_cast<int64_t>(t.const_data_ptr()));
    meta.push_back(t.numel());
    meta.push_back(dtype_code(t.scalar_type()));
    meta.push_back(masks.empty() ? 0 : reinterpret_cast<int64_t>(masks[i].data_ptr<bool>()));
    for (int64_t b = 0; b < t.numel(); b += kBlockElems) {
      blocks.push_back(static_cast<int64_t>(i));
      blocks.push_back(b);
    }
  }
  p.num_blocks = static_cast<int64_t>(blocks.size() / 2);
  TORCH_CHECK(p.num_blocks < std::numeric_limits<int>::max(), "magnitude_threshold: too many elements");
  // Pinned host buffer + non_blocking copy: the caching host allocator keeps the buffer
  // alive until the copy on the current stream has finished, so no host sync is needed.
  auto host = at::empty({static_cast<int64_t>(meta.size() + blocks.size())},
                        at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::copy(meta.begin(), meta.end(), host.data_ptr<int64_t>());
  std::copy(blocks.begin(), blocks.end(), host.data_ptr<int64_t>() + meta.size());
  p.table = host.to(tensors[0].device(), /*non_blocking=*/true);
  p.view = {p.table.const_data_ptr<int64_t>(), p.table.const_data_ptr<int64_t>() + meta.size()};
  return p;
}

// Runs the three histogram + select passes; returns the device state and the threshold.
std::pair<at::Tensor, at::Tensor> select_threshold(const Prepared& p, int64_t n_prune,
                                                   const at::TensorOptions& device_opts) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor state = at::zeros({kStateSize}, device_opts.dtype(at::kLong));
  state[kRank].fill_(n_prune);
  at::Tensor out = at::empty({}, device_opts.dtype(at::kFloat));
  if (p.num_blocks == 0) {
    out.fill_(0.0f);
    return {state, out};
  }
  at::Tensor hist = at::empty({1 << kDigitBits[0]}, device_opts.dtype(at::kLong));
  auto* h = reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>());
  int64_t* s = state.data_ptr<int64_t>();
  const int passes = n_prune == 0 ? 1 : 3;  // pass 1 alone finds non-finite inputs
  for (int pass = 0; pass < passes; ++pass) {
    hist.zero_();
    const int shift = kDigitShift[pass];
    if (pass == 0) {
      histogram_kernel<11><<<p.num_blocks, kThreads, 0, stream>>>(p.view, s, shift, h);
      select_kernel<11><<<1, kSelectThreads, 0, stream>>>(h, s, shift, true);
    } else {
      histogram_kernel<10><<<p.num_blocks, kThreads, 0, stream>>>(p.view, s, shift, h);
      select_kernel<10><<<1, kSelectThreads, 0, stream>>>(h, s, shift, false);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  finalize_kernel<<<1, 1, 0, stream>>>(s, out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {state, out};
}

at::Tensor magnitude_threshold_cuda(at::TensorList tensors, int64_t n_prune) {
  check_threshold_inputs(tensors, n_prune);
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const Prepared p = prepare(tensors, {});
  return select_threshold(p, n_prune, tensors[0].options()).second;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> magnitude_masks_cuda(at::TensorList tensors, int64_t n_prune) {
  check_threshold_inputs(tensors, n_prune);
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  std::vector<at::Tensor> masks;
  for (const auto& t : tensors) masks.push_back(at::empty(t.sizes(), t.options().dtype(at::kBool)));
  const Prepared p = prepare(tensors, masks);
  auto [state, threshold] = select_threshold(p, n_prune, tensors[0].options());
  if (p.num_blocks == 0) return {masks, threshold};

  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor ties = at::zeros({p.num_blocks}, tensors[0].options().dtype(at::kLong));
  const int64_t* s = state.const_data_ptr<int64_t>();
  if (n_prune > 0) {
    count_ties_kernel<<<p.num_blocks, kThreads, 0, stream>>>(p.view, s, ties.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const at::Tensor ties_before = ties.cumsum(0) - ties;  // exclusive scan, on the device
  write_masks_kernel<<<p.num_blocks, kThreads, 0, stream>>>(p.view, s, ties_before.const_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {masks, threshold};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CUDA, m) {
  m.impl("magnitude_threshold", &magnitude_threshold_cuda);
  m.impl("magnitude_masks", &magnitude_masks_cuda);
}

}  // namespace sparsekern
