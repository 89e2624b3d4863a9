// w_eff = w ⊙ g(mask) and its backward on the CPU, one pass each, for every mask kind of
// sparsekern/ops/mask_math.py. This is the CPU kernel of masked_conv2d_weight and of the
// weight side of masked_linear (the CUDA side is Triton).
//
// Why C++: the torch expressions take several passes, and a float * bool product takes
// ATen's dynamic-cast loop, which does not vectorise: on a 512x512x3x3 weight (2.36M values,
// 2 threads) `w * m` took 1.68 ms against 0.37 ms for `w * m.float()`; here the bool is
// widened in the loop. The sigmoid kind was 5 passes forward and 9 backward.
//
// Layouts: float32 weight, non-overlapping and dense in any memory format (contiguous or
// channels_last), and a mask that is either elementwise (weight's sizes and strides: bool
// for binary/straight_through, float32 otherwise) or one float32 gate per output row
// (sizes [out, 1, ..., 1], hard-concrete channel gates) with weight.stride(0) the row size,
// so each row is one block of memory. Anything else runs the torch math (mask_math.py).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <algorithm>
#include <string_view>
#include <vector>

// Float compares may be if-converted into selects only when they cannot trap: without this
// the clamps in exp_f32 kept the sigmoid loops scalar (7.1 ms vs 0.6 ms on 2.36M values).
// It changes no result, only whether FP exception flags are observable.
#pragma GCC optimize("no-trapping-math")

namespace sparsekern {
namespace {

constexpr int64_t kGrain = int64_t{1} << 17;

enum class Kind { kBinary, kStraightThrough, kSigmoid, kRelaxed, kHardConcrete };

Kind parse_kind(std::string_view kind) {
  if (kind == "binary") return Kind::kBinary;
  if (kind == "straight_through") return Kind::kStraightThrough;
  if (kind == "sigmoid") return Kind::kSigmoid;
  if (kind == "relaxed") return Kind::kRelaxed;
  if (kind == "hard_concrete") return Kind::kHardConcrete;
  TORCH_CHECK_VALUE(false, "mask_apply: unknown `kind` '", kind, "'");
}

// exp(x) in float32 from float operations only, so `#pragma omp simd` loops vectorise
// (glibc declares its vector expf only under -ffast-math). Cody-Waite reduction x = n ln2 + r,
// |r| <= ln2/2, a degree-6 polynomial for e^r, 2^n from the exponent bits; relative error
// within 2 ulp. x is clamped to [-87, 88]: e^-87 = 1.6e-38 is the smallest normal range.
// always_inline: plain `inline` let GCC call it out of line from the target_clones loops
// below, which then stayed scalar (gate_sigmoid on 2.36M values, one thread: 19 ms).
__attribute__((always_inline)) inline float exp_f32(float x) {
  // Selects written out: std::min comes from a header compiled without the pragma above
  // and would not inline; fminf does not vectorise without -ffast-math. NaN stays NaN.
  x = x > 88.0f ? 88.0f : x;
  x = x < -87.0f ? -87.0f : x;
  // round(x / ln2) by the 1.5 * 2^23 trick: nearbyint does not vectorise without SSE4.1.
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n from the exponent bits (a union: std::bit_cast went through memory and blocked
  // vectorisation; GCC documents union type punning).
  union {
    int32_t i;
    float f;
  } two_n;
  two_n.i = (static_cast<int32_t>(n) + 127) << 23;
  return p * two_n.f;
}

// 0 below t = -88, where exp_f32's clamp would leave 1 / (1 + e^88) = 6e-39: a pruned
// sigmoid gate (CS at β = 200: 32,256 of 36,864 weights) was a subnormal, not the 0 of
// torch's sigmoid that the export and the compiled path use. A select: it vectorises.
__attribute__((always_inline)) inline float sigmoid_f32(float t) {
  const float s = 1.0f / (1.0f + exp_f32(-t));
  return t < -88.0f ? 0.0f : s;
}

struct Layout {
  bool per_row;   // one gate per output row (else elementwise)
  int64_t inner;  // elements per row
};

Layout check_layout(const at::Tensor& weight, const at::Tensor& mask, Kind kind) {
  TORCH_CHECK_TYPE(weight.scalar_type() == at::kFloat, "mask_apply: `weight` must be float32, got ",
                   weight.scalar_type());
  TORCH_CHECK_VALUE(weight.device().is_cpu() && mask.device().is_cpu(), "mask_apply: CPU tensors only");
  TORCH_CHECK_VALUE(weight.is_non_overlapping_and_dense(), "mask_apply: `weight` must be dense");
  const bool bool_kind = kind == Kind::kBinary || kind == Kind::kStraightThrough;
  TORCH_CHECK_TYPE(mask.scalar_type() == (bool_kind ? at::kBool : at::kFloat), "mask_apply: `mask` must be ",
                   bool_kind ? "bool" : "float32", " for this kind, got ", mask.scalar_type());
  if (mask.sizes() == weight.sizes()) {
    TORCH_CHECK_VALUE(mask.strides() == weight.strides(), "mask_apply: `mask` must have weight's strides");
    return {false, 1};
  }
  TORCH_CHECK_VALUE(kind == Kind::kHardConcrete && weight.dim() >= 1 && mask.dim() == weight.dim() &&
                        mask.size(0) == weight.size(0) && mask.numel() == weight.size(0) && mask.is_contiguous(),
                    "mask_apply: `mask` must have weight's shape or (hard_concrete) [out, 1, ..., 1]");
  const int64_t rows = weight.size(0);
  const int64_t inner = rows == 0 ? 0 : weight.numel() / rows;
  TORCH_CHECK_VALUE(rows <= 1 || weight.stride(0) == inner, "mask_apply: weight rows must be contiguous blocks");
  return {true, inner};
}

// The loops over one range [b, e). Free functions with restrict pointers and the
// constants as values: inside a by-reference lambda GCC reloaded beta and the pointers
// through the closure on every iteration (they might alias the output) and kept the
// sigmoid loop scalar.
using f32 = float;

// The sigmoid loops are compute-bound (exp_f32 is ~15 flops per value): GCC builds them
// once per listed ISA and picks the widest the CPU has when the library loads.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SK_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SK_SIMD_CLONES
#endif
using u8 = uint8_t;

void gate_bool(const f32* __restrict x, const u8* __restrict m, f32* __restrict out, int64_t b, int64_t e) {
#pragma omp simd
  for (int64_t i = b; i < e; ++i) out[i] = x[i] * static_cast<f32>(m[i]);
}

void gate_float(const f32* __restrict x, const f32* __restrict m, f32* __restrict out, int64_t b, int64_t e) {
#pragma omp simd
  for (int64_t i = b; i < e; ++i) out[i] = x[i] * m[i];
}

SK_SIMD_CLONES void gate_sigmoid(const f32* __restrict x, const f32* __restrict s, f32* __restrict out, int64_t b, int64_t e,
                  f32 beta, f32 scale) {
#pragma omp simd
  for (int64_t i = b; i < e; ++i) out[i] = x[i] * (scale * sigmoid_f32(beta * s[i]));
}

// grad_w = G ⊙ m and grad_m = G ⊙ w (relaxed, elementwise hard_concrete).
// `l1` below is the gradient reaching Σ g (mask_apply_l1's second output; 0 for
// mask_apply): every entry of g gets it besides G ⊙ w.
void backward_float(const f32* __restrict G, const f32* __restrict w, const f32* __restrict m, f32* __restrict gw,
                    f32* __restrict gm, int64_t b, int64_t e, f32 l1) {
#pragma omp simd
  for (int64_t i = b; i < e; ++i) {
    gw[i] = G[i] * m[i];
    gm[i] = G[i] * w[i] + l1;
  }
}

// grad_w = G ⊙ scale·σ(βs), grad_s = (G ⊙ w + l1) ⊙ scale·β·σ(βs)(1 − σ(βs)).
SK_SIMD_CLONES void backward_sigmoid(const f32* __restrict G, const f32* __restrict w, const f32* __restrict s, f32* __restrict gw,
                      f32* __restrict gs, int64_t b, int64_t e, f32 beta, f32 scale, f32 l1) {
  const f32 slope = scale * beta;
#pragma omp simd
  for (int64_t i = b; i < e; ++i) {
    const f32 sig = sigmoid_f32(beta * s[i]);
    gw[i] = G[i] * (scale * sig);
    gs[i] = (G[i] * w[i] + l1) * (slope * sig * (1.0f - sig));
  }
}

// Rows [r0, r1) of inner elements, one gate z[r] each: grad_w = G·z[r], and when gz is
// given, gz[r] = Σ_row G ⊙ w (float accumulators, like the reference's float32 sum).
void backward_rows(const f32* __restrict G, const f32* __restrict w, const f32* __restrict z, f32* __restrict gw,
                   f32* __restrict gz, int64_t r0, int64_t r1, int64_t inner) {
  for (int64_t r = r0; r < r1; ++r) {
    const f32 g = z[r];
    const int64_t b = r * inner, e = b + inner;
#pragma omp simd
    for (int64_t i = b; i < e; ++i) gw[i] = G[i] * g;
    if (gz != nullptr) {
      f32 acc = 0.0f;
#pragma omp simd reduction(+ : acc)
      for (int64_t i = b; i < e; ++i) acc += G[i] * w[i];
      gz[r] = acc;
    }
  }
}

void forward_rows(const f32* __restrict w, const f32* __restrict z, f32* __restrict out, int64_t r0, int64_t r1,
                  int64_t inner) {
  for (int64_t r = r0; r < r1; ++r) {
    const f32 g = z[r];
#pragma omp simd
    for (int64_t i = r * inner; i < (r + 1) * inner; ++i) out[i] = w[i] * g;
  }
}

// Runs f(r0, r1) over row ranges with about kGrain elements per task.
template <typename F>
void parallel_rows(int64_t rows, int64_t inner, F&& f) {
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, inner));
  at::parallel_for(0, rows, grain, f);
}

const u8* bool_data(const at::Tensor& m) {
  return reinterpret_cast<const u8*>(m.const_data_ptr<bool>());  // at::kBool stores 0 or 1
}

// grad_w and, when gm is given, grad_mask of the elementwise float kinds (sigmoid,
// relaxed, elementwise hard_concrete), with `l1` the gradient reaching Σ g.
void backward_elementwise(Kind kind, const f32* G, const f32* w, const f32* m, f32* gw, f32* gm, int64_t n,
                          f32 beta, f32 scale, f32 l1) {
  at::parallel_for(0, n, kGrain, [=](int64_t b, int64_t e) {
    if (kind == Kind::kSigmoid) {
      if (gm != nullptr) {
        backward_sigmoid(G, w, m, gw, gm, b, e, beta, scale, l1);
      } else {
        gate_sigmoid(G, m, gw, b, e, beta, scale);
      }
    } else if (gm != nullptr) {  // relaxed and elementwise hard_concrete: g = mask, dg/dmask = 1
      backward_float(G, w, m, gw, gm, b, e, l1);
    } else {
      gate_float(G, m, gw, b, e);
    }
  });
}

at::Tensor mask_apply_cpu(const at::Tensor& weight, const at::Tensor& mask, c10::string_view kind_name,
                          double beta_d, double scale_d) {
  const Kind kind = parse_kind(kind_name);
  const Layout layout = check_layout(weight, mask, kind);
  at::Tensor out = at::empty_like(weight);
  const f32* w = weight.const_data_ptr<f32>();
  f32* o = out.mutable_data_ptr<f32>();
  const int64_t n = weight.numel();
  const f32 beta = static_cast<f32>(beta_d), scale = static_cast<f32>(scale_d);
  if (layout.per_row) {
    const f32* z = mask.const_data_ptr<f32>();
    const int64_t inner = layout.inner;
    parallel_rows(mask.numel(), inner, [=](int64_t r0, int64_t r1) { forward_rows(w, z, o, r0, r1, inner); });
  } else if (mask.scalar_type() == at::kBool) {
    const u8* m = bool_data(mask);
    at::parallel_for(0, n, kGrain, [=](int64_t b, int64_t e) { gate_bool(w, m, o, b, e); });
  } else if (kind == Kind::kSigmoid) {
    const f32* m = mask.const_data_ptr<f32>();
    at::parallel_for(0, n, kGrain, [=](int64_t b, int64_t e) { gate_sigmoid(w, m, o, b, e, beta, scale); });
  } else {
    const f32* m = mask.const_data_ptr<f32>();
    at::parallel_for(0, n, kGrain, [=](int64_t b, int64_t e) { gate_float(w, m, o, b, e); });
  }
  return out;
}

// (grad_w, grad_mask): grad_w = G ⊙ g (G itself for straight_through), grad_mask =
// G ⊙ w ⊙ dg/dmask for the learnable kinds when mask_grad (summed over each row for
// per-row gates), else an empty tensor.
std::tuple<at::Tensor, at::Tensor> mask_apply_backward_cpu(const at::Tensor& grad, const at::Tensor& weight,
                                                           const at::Tensor& mask, c10::string_view kind_name,
                                                           double beta_d, double scale_d, bool mask_grad) {
  const Kind kind = parse_kind(kind_name);
  const Layout layout = check_layout(weight, mask, kind);
  TORCH_CHECK_TYPE(grad.scalar_type() == at::kFloat, "mask_apply_backward: `grad` must be float32");
  TORCH_CHECK_VALUE(grad.sizes() == weight.sizes() && grad.strides() == weight.strides(),
                    "mask_apply_backward: `grad` must have weight's sizes and strides");
  const bool learnable = kind == Kind::kSigmoid || kind == Kind::kRelaxed || kind == Kind::kHardConcrete;
  mask_grad = mask_grad && learnable;
  at::Tensor grad_w = at::empty_like(weight);
  at::Tensor grad_m = mask_grad ? at::empty_like(mask) : at::empty({0}, mask.options());
  if (kind == Kind::kStraightThrough) {
    grad_w.copy_(grad);
    return {grad_w, grad_m};
  }
  const f32* G = grad.const_data_ptr<f32>();
  const f32* w = weight.const_data_ptr<f32>();
  f32* gw = grad_w.mutable_data_ptr<f32>();
  f32* gm = mask_grad ? grad_m.mutable_data_ptr<f32>() : nullptr;
  const int64_t n = weight.numel();
  const f32 beta = static_cast<f32>(beta_d), scale = static_cast<f32>(scale_d);
  if (layout.per_row) {
    const f32* z = mask.const_data_ptr<f32>();
    const int64_t inner = layout.inner;
    parallel_rows(mask.numel(), inner, [=](int64_t r0, int64_t r1) { backward_rows(G, w, z, gw, gm, r0, r1, inner); });
  } else if (mask.scalar_type() == at::kBool) {
    const u8* m = bool_data(mask);
    at::parallel_for(0, n, kGrain, [=](int64_t b, int64_t e) { gate_bool(G, m, gw, b, e); });
  } else {
    backward_elementwise(kind, G, w, mask.const_data_ptr<f32>(), gw, gm, n, beta, scale, 0.0f);
  }
  return {grad_w, grad_m};
}

// Nonzero iff some weight that `m` prunes has a nonzero bit besides the sign (so ±0 pass).
// Integer ops only, one OR-reduction: the earlier float-compare loop with a per-chunk early
// exit stayed scalar and took 1.1 ms on 2.36M weights (2 threads), 6x mask_apply's time.
SK_SIMD_CLONES uint32_t pruned_bits(const uint32_t* __restrict w, const u8* __restrict m, int64_t b, int64_t e) {
  uint32_t acc = 0;
#pragma omp simd reduction(| : acc)
  for (int64_t i = b; i < e; ++i) acc |= (w[i] & 0x7fffffffu) & (static_cast<uint32_t>(m[i]) - 1u);
  return acc;
}

// 1 iff m[b, e) is all ones (nothing pruned there): an AND-reduction over the bytes.
SK_SIMD_CLONES uint8_t all_kept(const u8* __restrict m, int64_t b, int64_t e) {
  uint8_t acc = 1;
#pragma omp simd reduction(& : acc)
  for (int64_t i = b; i < e; ++i) acc &= m[i];
  return acc;
}

constexpr int64_t kPruneBlock = 4096;  // values per block: a block with nothing pruned skips w

// What w ⊙ keep is for a bool keep: 2 if keep prunes nothing (it is w, and its gradient is
// G), 1 if every pruned weight is ±0 (it is w bit for bit, gradient G ⊙ keep), else 0. One
// read of keep, and of w only in blocks that prune something; no write.
at::Tensor binary_prune_state_cpu(const at::Tensor& weight, const at::Tensor& keep) {
  check_layout(weight, keep, Kind::kBinary);
  TORCH_CHECK_VALUE(keep.sizes() == weight.sizes(), "binary_prune_state: `keep` must have weight's shape");
  const auto* w = static_cast<const uint32_t*>(weight.const_data_ptr());
  const u8* m = bool_data(keep);
  std::atomic<bool> pruned{false}, nonzero{false};
  at::parallel_for(0, weight.numel(), kGrain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e && !nonzero.load(std::memory_order_relaxed); i += kPruneBlock) {
      const int64_t j = std::min(e, i + kPruneBlock);
      if (all_kept(m, i, j)) continue;
      pruned.store(true, std::memory_order_relaxed);
      if (pruned_bits(w, m, i, j) != 0) nonzero.store(true, std::memory_order_relaxed);
    }
  });
  const int64_t state = nonzero.load() ? 0 : (pruned.load() ? 1 : 2);
  return at::scalar_tensor(state, weight.options().dtype(at::kLong));
}

// weights[i] *= keeps[i] in place (bool keep-masks, each of its weight's sizes and
// strides): what keeps binary-masked weights exactly zero after an optimiser step. Read
// first, write only a block that holds a nonzero pruned weight: after a step whose
// gradient was masked, usually none does, and the pass is then a read (ResNet-18's 11.2M
// weights: 45 MB not written back per step). One call for all the layers: the methods
// zeroed them one op call each, ~10 us of Python per layer and step.
void zero_masked_cpu(at::TensorList weights, at::TensorList keeps) {
  TORCH_CHECK_VALUE(weights.size() == keeps.size(), "zero_masked_: got ", weights.size(), " weights and ",
                    keeps.size(), " keep-masks");
  for (size_t t = 0; t < weights.size(); ++t) {
    check_layout(weights[t], keeps[t], Kind::kBinary);
    TORCH_CHECK_VALUE(keeps[t].sizes() == weights[t].sizes(), "zero_masked_: `keep` must have weight's shape");
  }
  for (size_t t = 0; t < weights.size(); ++t) {
    f32* w = weights[t].mutable_data_ptr<f32>();
    const auto* bits = reinterpret_cast<const uint32_t*>(w);
    const u8* m = bool_data(keeps[t]);
    at::parallel_for(0, weights[t].numel(), kGrain, [=](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; i += kPruneBlock) {
        const int64_t j = std::min(e, i + kPruneBlock);
        // Nothing pruned, or all pruned ±0: multiplying by keep would change no bit (±0 · 0
        // keeps the sign); a block with nothing pruned is not even read from w.
        if (all_kept(m, i, j) || pruned_bits(bits, m, i, j) == 0) continue;
#pragma omp simd
        for (int64_t k = i; k < j; ++k) w[k] *= static_cast<f32>(m[k]);  // as mul_: NaN/Inf pruned -> NaN
      }
    });
  }
}

// ---- Continuous Sparsification's L1 penalty: Σ scale·σ(β·s) -------------------------------
// Why here: the torch expression `scale * torch.sigmoid(beta * s).sum()` is three passes
// forward (two fresh weight-sized tensors, σ saved for backward) and two backward; over
// ResNet-18's 11.2M scores it took 29 ms forward and 11 ms backward on the 2-core machine,
// a third of CS's step overhead. These are one pass each, nothing saved but the scores.

constexpr int64_t kSumBlock = int64_t{1} << 14;  // values per partial sum

SK_SIMD_CLONES f32 sigmoid_block_sum(const f32* __restrict s, int64_t b, int64_t e, f32 beta) {
  f32 acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = b; i < e; ++i) acc += sigmoid_f32(beta * s[i]);
  return acc;
}

SK_SIMD_CLONES void sigmoid_l1_grad(const f32* __restrict s, f32* __restrict out, int64_t b, int64_t e, f32 beta,
                                    f32 slope) {
#pragma omp simd
  for (int64_t i = b; i < e; ++i) {
    const f32 sig = sigmoid_f32(beta * s[i]);
    out[i] = slope * sig * (1.0f - sig);
  }
}

void check_scores(const char* op, const at::Tensor& scores) {
  TORCH_CHECK_TYPE(scores.scalar_type() == at::kFloat, op, ": `scores` must be float32, got ",
                   scores.scalar_type());
  TORCH_CHECK_VALUE(scores.device().is_cpu(), op, ": `scores` must be a CPU tensor");
  TORCH_CHECK_VALUE(scores.is_non_overlapping_and_dense(), op, ": `scores` must be dense");
}

// Σ scale·σ(β·s) over the values in memory order (the sum does not depend on the layout):
// float partials per fixed block of kSumBlock values, added in block order in double, so
// the result does not depend on the thread count.
at::Tensor sigmoid_mask_l1_cpu(const at::Tensor& scores, double beta, double scale) {
  check_scores("sigmoid_mask_l1", scores);
  const int64_t n = scores.numel();
  const int64_t nblocks = (n + kSumBlock - 1) / kSumBlock;
  std::vector<f32> partials(nblocks);
  const f32* s = scores.const_data_ptr<f32>();
  const f32 b32 = static_cast<f32>(beta);
  f32* p = partials.data();
  at::parallel_for(0, nblocks, std::max<int64_t>(1, kGrain / kSumBlock), [=](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      p[blk] = sigmoid_block_sum(s, blk * kSumBlock, std::min(n, (blk + 1) * kSumBlock), b32);
    }
  });
  double total = 0.0;
  for (const f32 v : partials) total += v;
  return at::scalar_tensor(scale * total, scores.options());
}

// d/ds of the sum times grad: grad·scale·β·σ(βs)(1 − σ(βs)), in scores' layout.
at::Tensor sigmoid_mask_l1_backward_cpu(const at::Tensor& grad, const at::Tensor& scores, double beta,
                                        double scale) {
  check_scores("sigmoid_mask_l1_backward", scores);
  TORCH_CHECK_VALUE(grad.numel() == 1 && grad.device().is_cpu() && grad.is_floating_point(),
                    "sigmoid_mask_l1_backward: `grad` must be a one-element floating-point CPU tensor");
  at::Tensor out = at::empty_like(scores);
  const f32* s = scores.const_data_ptr<f32>();
  f32* o = out.mutable_data_ptr<f32>();
  const f32 b32 = static_cast<f32>(beta);
  const f32 slope = static_cast<f32>(grad.item<double>() * scale * beta);
  at::parallel_for(0, scores.numel(), kGrain, [=](int64_t b, int64_t e) { sigmoid_l1_grad(s, o, b, e, b32, slope); });
  return out;
}

// ---- w ⊙ g and the gate's L1 norm Σ g from one pass (sigmoid and relaxed kinds) ---------
// CS's penalty is λ·Σ scale·σ(β·s), the concave L1 penalty λ·Σ m: each read the mask again
// in its own op, with its own autograd node, per layer and step. Replacing the penalty by a
// constant (interleaved A/B, 100-120 rounds, ResNet-20 batch 32) took 1.6-1.9% off CS's
// CPU step and 1.2% off concave's. Here the forward's pass over the mask also sums the
// gate, and one backward pass gives both gradients (mask_apply_backward's loops, with the
// gradient of the sum added to G ⊙ w). The sum is blocked as sigmoid_mask_l1's is.

SK_SIMD_CLONES f32 gate_sigmoid_sum(const f32* __restrict w, const f32* __restrict s, f32* __restrict out, int64_t b,
                                    int64_t e, f32 beta, f32 scale) {
  f32 acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = b; i < e; ++i) {
    const f32 sig = sigmoid_f32(beta * s[i]);
    out[i] = w[i] * (scale * sig);
    acc += sig;
  }
  return acc;
}

f32 gate_float_sum(const f32* __restrict w, const f32* __restrict m, f32* __restrict out, int64_t b, int64_t e) {
  f32 acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = b; i < e; ++i) {
    out[i] = w[i] * m[i];
    acc += m[i];
  }
  return acc;
}

Kind check_l1_kind(const char* op, c10::string_view kind_name) {
  const Kind kind = parse_kind(kind_name);
  TORCH_CHECK_VALUE(kind == Kind::kSigmoid || kind == Kind::kRelaxed, op,
                    ": `kind` must be 'sigmoid' or 'relaxed', got '", kind_name, "'");
  return kind;
}

// (w ⊙ g, Σ g) with g = scale·σ(β·mask) (sigmoid) or mask (relaxed); Σ g is 0-dim float32,
// float partials per kSumBlock values added in double in block order (thread-count free).
std::tuple<at::Tensor, at::Tensor> mask_apply_l1_cpu(const at::Tensor& weight, const at::Tensor& mask,
                                                     c10::string_view kind_name, double beta_d, double scale_d) {
  const Kind kind = check_l1_kind("mask_apply_l1", kind_name);
  check_layout(weight, mask, kind);  // elementwise: per-row gates are hard_concrete's only
  at::Tensor out = at::empty_like(weight);
  const f32* w = weight.const_data_ptr<f32>();
  const f32* m = mask.const_data_ptr<f32>();
  f32* o = out.mutable_data_ptr<f32>();
  const int64_t n = weight.numel();
  const int64_t nblocks = (n + kSumBlock - 1) / kSumBlock;
  std::vector<f32> partials(nblocks);
  f32* p = partials.data();
  const f32 beta = static_cast<f32>(beta_d), scale = static_cast<f32>(scale_d);
  at::parallel_for(0, nblocks, std::max<int64_t>(1, kGrain / kSumBlock), [=](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t b = blk * kSumBlock, e = std::min(n, b + kSumBlock);
      p[blk] = kind == Kind::kSigmoid ? gate_sigmoid_sum(w, m, o, b, e, beta, scale) : gate_float_sum(w, m, o, b, e);
    }
  });
  double total = 0.0;
  for (const f32 v : partials) total += v;
  if (kind == Kind::kSigmoid) total *= scale_d;
  return {out, at::scalar_tensor(total, weight.options())};
}

// (grad_w, grad_mask) of mask_apply_l1 for the gradients `grad` of w ⊙ g and `grad_l1` of Σ g.
std::tuple<at::Tensor, at::Tensor> mask_apply_l1_backward_cpu(const at::Tensor& grad, const at::Tensor& grad_l1,
                                                              const at::Tensor& weight, const at::Tensor& mask,
                                                              c10::string_view kind_name, double beta,
                                                              double scale) {
  const Kind kind = check_l1_kind("mask_apply_l1_backward", kind_name);
  check_layout(weight, mask, kind);
  TORCH_CHECK_TYPE(grad.scalar_type() == at::kFloat, "mask_apply_l1_backward: `grad` must be float32");
  TORCH_CHECK_VALUE(grad.sizes() == weight.sizes() && grad.strides() == weight.strides(),
                    "mask_apply_l1_backward: `grad` must have weight's sizes and strides");
  TORCH_CHECK_VALUE(grad_l1.numel() == 1 && grad_l1.device().is_cpu() && grad_l1.is_floating_point(),
                    "mask_apply_l1_backward: `grad_l1` must be a one-element floating-point CPU tensor");
  at::Tensor grad_w = at::empty_like(weight);
  at::Tensor grad_m = at::empty_like(mask);
  backward_elementwise(kind, grad.const_data_ptr<f32>(), weight.const_data_ptr<f32>(), mask.const_data_ptr<f32>(),
                       grad_w.mutable_data_ptr<f32>(), grad_m.mutable_data_ptr<f32>(), weight.numel(),
                       static_cast<f32>(beta), static_cast<f32>(scale), static_cast<f32>(grad_l1.item<double>()));
  return {grad_w, grad_m};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("mask_apply", &mask_apply_cpu);
  m.impl("mask_apply_backward", &mask_apply_backward_cpu);
  m.impl("zero_masked_", &zero_masked_cpu);
  m.impl("binary_prune_state", &binary_prune_state_cpu);
  m.impl("sigmoid_mask_l1", &sigmoid_mask_l1_cpu);
  m.impl("sigmoid_mask_l1_backward", &sigmoid_mask_l1_backward_cpu);
  m.impl("mask_apply_l1", &mask_apply_l1_cpu);
  m.impl("mask_apply_l1_backward", &mask_apply_l1_backward_cpu);
}

}  // namespace sparsekern
