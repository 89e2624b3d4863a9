// Shared by the CPU and CUDA magnitude-threshold kernels: how |x| becomes a radix key,
// and the input checks every backend runs before touching data.
#pragma once

#include <cstdint>
#include <cstring>

#include <ATen/ATen.h>

#if defined(__CUDACC__)
#define SK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SK_HOST_DEVICE inline
#endif

namespace sparsekern {

// |x| as float32, reinterpreted as uint32 with the sign bit cleared. For non-negative
// floats the unsigned order of the bit patterns is the numeric order (subnormals and
// -0.0 included), so selecting on keys selects on |x|. Keys are < 2^31.
SK_HOST_DEVICE uint32_t abs_key(float x) {
  uint32_t bits;
#if defined(__CUDA_ARCH__)
  bits = __float_as_uint(x);
#else
  std::memcpy(&bits, &x, sizeof(bits));
#endif
  return bits & 0x7fffffffu;
}

SK_HOST_DEVICE float key_to_float(uint32_t key) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(key);
#else
  float x;
  std::memcpy(&x, &key, sizeof(x));
  return x;
#endif
}

// Keys at or above this are +Inf or NaN.
constexpr uint32_t kNonFiniteKey = 0x7f800000u;
constexpr int kKeyBits = 31;

// Checks the contract shared by magnitude_threshold and magnitude_masks; raises
// ValueError (TORCH_CHECK_VALUE) naming the argument. Returns the total element count.
inline int64_t check_threshold_inputs(at::TensorList tensors, int64_t n_prune) {
  TORCH_CHECK_VALUE(!tensors.empty(), "magnitude_threshold: `tensors` must not be empty");
  const auto device = tensors[0].device();
  int64_t total = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& t = tensors[i];
    TORCH_CHECK_VALUE(t.device() == device, "magnitude_threshold: all `tensors` must be on one device, got ",
                      device, " and ", t.device(), " (tensor ", i, ")");
    const auto dt = t.scalar_type();
    TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
                      "magnitude_threshold: `tensors` must be floating point (float32/float16/bfloat16/"
                      "float64), tensor ", i, " is ", dt);
    total += t.numel();
  }
  TORCH_CHECK_VALUE(n_prune >= 0 && n_prune <= total, "magnitude_threshold: `n_prune` must be in [0, ",
                    total, "], got ", n_prune);
  return total;
}

}  // namespace sparsekern
