// Philox4x32-10 uniform noise on the CPU, bit-identical to reference.philox_uniform and to
// the Triton kernels' tl.philox + tl.uint_to_uniform_float: word 0 of
// philox(counter = (index lo, index hi, offset lo, offset hi), key = (seed lo, seed hi)),
// mapped to [0, 1). The pure-torch reference costs ~0.2 s per million values (ten rounds of
// int64 tensor ops); this runs the rounds in registers. Used by the hard-concrete gates'
// CPU path, whose backward regenerates the noise from (seed, offset) instead of storing it.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>

namespace sparsekern {
namespace {

inline uint32_t philox_word0(uint64_t index, uint64_t offset, uint64_t seed) {
  uint32_t c0 = static_cast<uint32_t>(index), c1 = static_cast<uint32_t>(index >> 32);
  uint32_t c2 = static_cast<uint32_t>(offset), c3 = static_cast<uint32_t>(offset >> 32);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t pb = uint64_t{0xCD9E8D57u} * c2;
    const uint64_t pa = uint64_t{0xD2511F53u} * c0;
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

void philox_uniform_cpu(at::Tensor& out, int64_t seed, int64_t offset) {
  TORCH_CHECK_VALUE(out.scalar_type() == at::kFloat, "philox_uniform_: `out` must be float32, got ",
                    out.scalar_type());
  TORCH_CHECK_VALUE(out.is_contiguous(), "philox_uniform_: `out` must be contiguous");
  TORCH_CHECK_VALUE(seed >= 0 && offset >= 0, "philox_uniform_: `seed` and `offset` must be >= 0");
  float* p = out.data_ptr<float>();
  at::parallel_for(0, out.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const uint32_t word = philox_word0(static_cast<uint64_t>(i), static_cast<uint64_t>(offset),
                                         static_cast<uint64_t>(seed));
      // Triton reads the word as int32 x, maps x < 0 to ~x, and scales by just under 2^-31.
      const uint32_t x = word >= 0x80000000u ? 0xFFFFFFFFu - word : word;
      p[i] = static_cast<float>(x) * 4.6566127342e-10f;
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) { m.impl("philox_uniform_", &philox_uniform_cpu); }

}  // namespace sparsekern
