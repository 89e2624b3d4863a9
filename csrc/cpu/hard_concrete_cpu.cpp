// Hard-concrete gates on the CPU, fused: one pass over log alpha draws the Philox noise,
// writes the gates z and sums the expected L0 (hard_concrete_sample_fused); one pass
// regenerates the noise from (seed, offset) and writes the gradient
// (hard_concrete_sample_fused_backward). The masked pair (hard_concrete_masked_weight_fused
// and its backward) does the same for a weight under unstructured gates: it writes w z
// and, backward, grad_w and grad log alpha, so z is never stored nor saved for backward;
// in float32 that backward reads z back from w z (backward_recovered_body) instead of
// regenerating it. Also the Philox stream itself (philox_uniform_): this file is the only
// CPU Philox.
//
// Why: the torch path (sparsekern/ops/hard_concrete.py, _sample_torch / _backward_torch)
// runs ~10 elementwise passes plus a Philox fill, each reading and writing (and, for a
// large tensor, page-faulting in) the full tensor, and it dominated the unstructured L0
// training step. Measured on the 2-core development machine (Xeon, AVX-512, 2 threads),
// float32, the previous commit's torch path (its Philox: scalar C++) -> these kernels.
// The machine's speed drifted by +-20% between runs, so: 8 back-to-back pairs of runs,
// each the median of 5 calls; the median over the pairs, then the range.
//   one tensor of 11,169,152 values (ResNet-18's weight count):
//     forward   266 -> 38 ms (7.2x; 240-319 -> 34-45 ms, 6.3-8.4x per pair),
//     backward  418 -> 38 ms (11.6x; 378-481 -> 31-45 ms, 9.2-13.4x),
//     forward + backward through autograd 684 -> 74 ms (9.4x; 7.2-10.4x);
//   ResNet-18's 21 weight tensors one by one, interleaved (9 calls):
//     forward 192 -> 32 ms (6.1x), backward 311 -> 26 ms (11.9x).
// (The torch path loses less to page faults on small tensors, whose temporaries reuse
// freed heap memory. On the single tensor ~10 ms of the fused forward are the page faults
// of its fresh 45 MB output: allocating and filling such a tensor alone takes 12 ms.)
// One thread, preallocated buffers, 11.2M values, by instruction set (the wrappers below):
//   Philox 88 / 38 / 15 ms, forward 196 / 80 / 41 ms, backward 192 / 76 / 40 ms for the
//   baseline x86-64 / AVX2+FMA / AVX-512 builds of the same code, with one Philox call per
//   value. Four values per call since: the Philox fill of 11.2M values, 2 threads, went
//   34 -> 14.5 / 18 -> 7 / 9.0 -> 4.4 ms, the training forward 33.7 -> 30.2 ms (AVX-512;
//   medians of runs alternating the two builds).
//
// How it is fast:
//  - Work goes in blocks of kBlock values, block-aligned in the flat index; threads claim
//    chunks of blocks from a counter. Per block, the Philox noise u is drawn into a buffer
//    in L1, then one loop computes everything else from log alpha and u.
//  - Philox4x32-10 needs 32x32 -> 64-bit products. The auto-vectoriser widens them to
//    full 64-bit multiplies (vpmullq on AVX-512, shift-and-add on AVX2), so the AVX2 /
//    AVX-512 streams are written with intrinsics around vpmuludq (philox_avx512). 11.2M
//    values on one thread: 88 ms auto-vectorised for baseline x86-64, 47 ms
//    auto-vectorised for AVX-512, 15 ms with the intrinsics.
//  - The loops are plain scalar code vectorised by `omp simd`, compiled three times (the
//    ISA wrappers below: baseline x86-64, AVX2+FMA, AVX-512) and picked at run time by
//    ATen's CPU capability (at::get_cpu_capability(), so ATEN_CPU_CAPABILITY=default or
//    avx2 selects the lower ones too). ATen's at::vec::Vectorized is no help in an
//    extension: without ATen's CPU_CAPABILITY defines it compiles to its scalar fallback.
//  - log and exp are the Cephes single-precision polynomials with bit-level range
//    reduction, written out here: glibc's vector logf/expf (libmvec) are declared only
//    under -ffast-math, and a call to scalar logf stops vectorisation (it may set errno).
//    log u - log(1 - u) is one log of u / (1 - u) (1 - u is exact in float); every
//    sigmoid is e = exp(-|t|), d = 1 / (1 + e): sigmoid(t) = d or e d, and
//    sigmoid(t) (1 - sigmoid(t)) = e d^2 without cancellation.
//  - Selects are bit blends (select()), not float ?: (see there), or GCC's if-conversion
//    gives up and the loops do not vectorise. No -ffast-math: results are IEEE float ops.
//
// Noise is bit-identical to reference.philox_uniform / hard_concrete_uniform: the Philox
// words exactly, and u = eps + (1 - 2 eps) r rounded twice, as torch computes it; the
// functions that compute u are compiled with floating-point contraction off, so no FMA
// fuses the two (test_ops_hard_concrete.py checks the u at elements where one ulp shows).
// Everything after u differs from the torch path by float32 rounding only (a few ulp of
// log/exp, and the FMAs of the AVX2/AVX-512 loops). The expected L0 is a float partial
// per block, added in block order in double, so it does not depend on the thread count.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// First, before any header pulls it in: GCC 12 warns that its own AVX-512 intrinsics read
// an uninitialised value (_mm512_undefined_*, GCC bug 105593), and the warning takes the
// diagnostic state at the header's lines.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SK_X86_DISPATCH 1
#else
#define SK_X86_DISPATCH 0
#endif

// The per-value helpers must inline into the loops, or the loops do not vectorise (GCC's
// size limits otherwise keep sigmoid out of the backward loop).
#define SK_INLINE inline __attribute__((always_inline))

// Floating-point contraction off for the functions that compute u: an FMA would round
// eps + (1 - 2 eps) r once, torch rounds it twice.
#if defined(__clang__)
#define SK_NO_CONTRACT
#define SK_NO_CONTRACT_BODY _Pragma("clang fp contract(off)")
#else
#define SK_NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#define SK_NO_CONTRACT_BODY
#endif

#define SK_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define SK_TARGET_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")))

namespace sparsekern {
namespace {

// Values per block. A power of two (dividing 2^32), so a block never crosses a multiple of
// 2^32 and the high word of the Philox counter (flat index / 4) is constant inside it; a
// multiple of 128 (the AVX-512 Philox's step), so the Philox functions may fill whole
// steps past m, and each block starts at a multiple of 4 (a whole Philox call).
constexpr int64_t kBlock = 512;
static_assert(kBlock % 128 == 0 && (kBlock & (kBlock - 1)) == 0);
constexpr int64_t kChunkBlocks = 8;  // blocks per claimed chunk: 4K values

constexpr double kEps = 1e-6;  // reference.HARD_CONCRETE_EPS

// ---- Philox4x32-10 ----------------------------------------------------------------------

// Key (seed lo, seed hi) and the counter's offset words (offset lo, offset hi).
struct Stream {
  uint32_t k0, k1, c2, c3;
  Stream(int64_t seed, int64_t offset)
      : k0(static_cast<uint32_t>(seed)),
        k1(static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32)),
        c2(static_cast<uint32_t>(offset)),
        c3(static_cast<uint32_t>(static_cast<uint64_t>(offset) >> 32)) {}
};

constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;  // multipliers
constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;      // key increments
// Triton's uint_to_uniform_float: the word read as int32 x, x < 0 mapped to ~x (so
// 0 <= x < 2^31), times just under 2^-31.
constexpr float kUnitScale = 4.6566127342e-10f;

// The four words of philox(counter = (c0, c1, offset lo, offset hi), key).
SK_INLINE void philox_words(const Stream& st, uint32_t c0, uint32_t c1, uint32_t (&out)[4]) {
  uint32_t c2 = st.c2, c3 = st.c3, k0 = st.k0, k1 = st.k1;
#pragma GCC unroll 10
  for (int round = 0; round < 10; ++round) {
    const uint64_t pb = uint64_t{kRoundB} * c2;
    const uint64_t pa = uint64_t{kRoundA} * c0;
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    c0 = n0;
    c2 = n2;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// r in [0, 1) from a Philox word, as Triton's uint_to_uniform_float.
SK_INLINE float unit_float(uint32_t word) {
  const uint32_t x = word ^ static_cast<uint32_t>(static_cast<int32_t>(word) >> 31);  // < 2^31
  return static_cast<float>(static_cast<int32_t>(x)) * kUnitScale;
}

// The Philox functions fill out[j] = shift + scale r_j for flat indices first + j, over
// j < m rounded up to their step (out holds kBlock floats; first is a block start, so a
// multiple of 4). Index i takes word i % 4 of the call at counter i / 4: one call serves
// four values (a call per value, keeping word 0, spent 4x the Philox work: on an H200 it
// held gate sampling to 32% of copy bandwidth). shift + scale r is rounded twice (no
// FMA): scale = 1 - 2 eps, shift = eps gives hard_concrete_uniform's u, scale = 1,
// shift = 0 gives r itself.
using PhiloxFn = void (*)(const Stream&, uint64_t first, int64_t m, float scale, float shift, float* out);

SK_NO_CONTRACT __attribute__((noinline)) void philox_generic(const Stream& st, uint64_t first, int64_t m,
                                                             float scale, float shift, float* out) {
  SK_NO_CONTRACT_BODY
  const uint64_t q0 = first / 4;
  const uint32_t c0 = static_cast<uint32_t>(q0), c1 = static_cast<uint32_t>(q0 >> 32);
  const int64_t calls = (m + 3) / 4;
#pragma omp simd
  for (int64_t g = 0; g < calls; ++g) {
    uint32_t words[4];
    philox_words(st, c0 + static_cast<uint32_t>(g), c1, words);
    for (int w = 0; w < 4; ++w) {
      const float scaled = scale * unit_float(words[w]);
      out[4 * g + w] = shift + scaled;
    }
  }
}

#if SK_X86_DISPATCH
// The vector Philox keeps one counter per 64-bit lane, its word in the low half (the high
// halves carry junk that nothing reads). vpmuludq then gives each lane's full 64-bit
// product: the low half is the next round's c1 / c3 as it stands, and a dword shuffle
// (swap the halves) brings the high half down for c0 / c2. Per round and 8 values: 2
// multiplies, 2 shuffles, 2 three-way xors; the shuffles run on another port than the
// multiplies (32-bit lanes, with shifts and blends to split and rejoin the products, took
// a third longer: 23 vs 17 ms on AVX-512). Several vectors go through each round together
// (4 on AVX-512: 32 calls, 128 values; 2 on AVX2, which has 16 registers: 8 calls, 32
// values) to hide the latency.

// Target avx2 without fma: nothing here can become an FMA.
__attribute__((target("avx2"))) SK_NO_CONTRACT __attribute__((noinline)) void philox_avx2(
    const Stream& st, uint64_t first, int64_t m, float scale, float shift, float* out) {
  SK_NO_CONTRACT_BODY
  const __m256i ka = _mm256_set1_epi64x(kRoundA), kb = _mm256_set1_epi64x(kRoundB);
  const __m256i c1_init = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(first >> 34)));
  const __m256i c2_init = _mm256_set1_epi32(static_cast<int>(st.c2));
  const __m256i c3_init = _mm256_set1_epi32(static_cast<int>(st.c3));
  const __m256i lanes = _mm256_setr_epi64x(0, 1, 2, 3);
  const __m256 unit = _mm256_set1_ps(kUnitScale), vscale = _mm256_set1_ps(scale), vshift = _mm256_set1_ps(shift);
  for (int64_t j = 0; j < m; j += 32) {
    // Calls q..q+3 in vector a, q+4..q+7 in b (q + 7 stays below the next 2^32).
    const uint32_t q = static_cast<uint32_t>((first + j) >> 2);
    __m256i a0 = _mm256_add_epi64(_mm256_set1_epi64x(q), lanes);
    __m256i b0 = _mm256_add_epi64(_mm256_set1_epi64x(q + 4u), lanes);
    __m256i a1 = c1_init, b1 = c1_init, a2 = c2_init, b2 = c2_init, a3 = c3_init, b3 = c3_init;
    uint32_t k0 = st.k0, k1 = st.k1;
#pragma GCC unroll 10
    for (int round = 0; round < 10; ++round) {
      const __m256i key0 = _mm256_set1_epi32(static_cast<int>(k0)), key1 = _mm256_set1_epi32(static_cast<int>(k1));
      const __m256i pb_a = _mm256_mul_epu32(a2, kb), pa_a = _mm256_mul_epu32(a0, ka);
      const __m256i pb_b = _mm256_mul_epu32(b2, kb), pa_b = _mm256_mul_epu32(b0, ka);
      a0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_shuffle_epi32(pb_a, 0xB1), a1), key0);
      a2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_shuffle_epi32(pa_a, 0xB1), a3), key1);
      b0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_shuffle_epi32(pb_b, 0xB1), b1), key0);
      b2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_shuffle_epi32(pa_b, 0xB1), b3), key1);
      a1 = pb_a;
      a3 = pa_a;
      b1 = pb_b;
      b3 = pa_b;
      k0 += kKeyA;
      k1 += kKeyB;
    }
    const __m256i c[2][4] = {{a0, a1, a2, a3}, {b0, b1, b2, b3}};
#pragma GCC unroll 2
    for (int v = 0; v < 2; ++v) {
      // Each call's words are the low dwords of its lane in c[v][0..3]: pair them per lane
      // ((w0, w1) and (w2, w3)), then gather each call's four into 128 bits, in call order.
      const __m256i w01 = _mm256_blend_epi32(c[v][0], _mm256_slli_epi64(c[v][1], 32), 0xAA);
      const __m256i w23 = _mm256_blend_epi32(c[v][2], _mm256_slli_epi64(c[v][3], 32), 0xAA);
      const __m256i even = _mm256_unpacklo_epi64(w01, w23), odd = _mm256_unpackhi_epi64(w01, w23);
      const __m256i words[2] = {_mm256_permute2x128_si256(even, odd, 0x20),
                                _mm256_permute2x128_si256(even, odd, 0x31)};
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const __m256i x = _mm256_xor_si256(words[h], _mm256_srai_epi32(words[h], 31));
        const __m256 scaled = _mm256_mul_ps(vscale, _mm256_mul_ps(_mm256_cvtepi32_ps(x), unit));
        _mm256_store_ps(out + j + 16 * v + 8 * h, _mm256_add_ps(vshift, scaled));
      }
    }
  }
}

// AVX-512F has FMA for zmm regardless of the fma flag: SK_NO_CONTRACT keeps it out.
SK_TARGET_AVX512 SK_NO_CONTRACT __attribute__((noinline)) void philox_avx512(const Stream& st, uint64_t first,
                                                                             int64_t m, float scale, float shift,
                                                                             float* out) {
  SK_NO_CONTRACT_BODY
  constexpr int kV = 4;  // vectors of 8 calls per step (2 took 14% longer): 128 values
  const __m512i ka = _mm512_set1_epi64(kRoundA), kb = _mm512_set1_epi64(kRoundB);
  const __m512i c1_init = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(first >> 34)));
  const __m512i c2_init = _mm512_set1_epi32(static_cast<int>(st.c2));
  const __m512i c3_init = _mm512_set1_epi32(static_cast<int>(st.c3));
  const __m512i lanes = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  // 128-bit pieces (calls) of the even / odd vectors below, back in call order.
  const __m512i calls_0to3 = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11);
  const __m512i calls_4to7 = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
  const __m512 unit = _mm512_set1_ps(kUnitScale), vscale = _mm512_set1_ps(scale), vshift = _mm512_set1_ps(shift);
  for (int64_t j = 0; j < m; j += 32 * kV) {
    const uint32_t q = static_cast<uint32_t>((first + j) >> 2);
    __m512i c0[kV], c1[kV], c2[kV], c3[kV];
#pragma GCC unroll 8
    for (int v = 0; v < kV; ++v) {
      c0[v] = _mm512_add_epi64(_mm512_set1_epi64(q + 8u * v), lanes);  // below the next 2^32
      c1[v] = c1_init;
      c2[v] = c2_init;
      c3[v] = c3_init;
    }
    uint32_t k0 = st.k0, k1 = st.k1;
#pragma GCC unroll 10
    for (int round = 0; round < 10; ++round) {
      const __m512i key0 = _mm512_set1_epi32(static_cast<int>(k0)), key1 = _mm512_set1_epi32(static_cast<int>(k1));
#pragma GCC unroll 8
      for (int v = 0; v < kV; ++v) {
        const __m512i pb = _mm512_mul_epu32(c2[v], kb), pa = _mm512_mul_epu32(c0[v], ka);
        c0[v] = _mm512_ternarylogic_epi32(_mm512_shuffle_epi32(pb, _MM_PERM_CDAB), c1[v], key0, 0x96);
        c2[v] = _mm512_ternarylogic_epi32(_mm512_shuffle_epi32(pa, _MM_PERM_CDAB), c3[v], key1, 0x96);
        c1[v] = pb;
        c3[v] = pa;
      }
      k0 += kKeyA;
      k1 += kKeyB;
    }
#pragma GCC unroll 4
    for (int v = 0; v < kV; ++v) {
      // Each call's words are the low dwords of its lane in c0..c3: pair them per lane
      // ((w0, w1) and (w2, w3)), gather each call's four into 128 bits (calls 0 2 4 6 in
      // `even`, 1 3 5 7 in `odd`), then put the calls back in order.
      const __m512i w01 = _mm512_mask_blend_epi32(0xAAAA, c0[v], _mm512_slli_epi64(c1[v], 32));
      const __m512i w23 = _mm512_mask_blend_epi32(0xAAAA, c2[v], _mm512_slli_epi64(c3[v], 32));
      const __m512i even = _mm512_unpacklo_epi64(w01, w23), odd = _mm512_unpackhi_epi64(w01, w23);
      const __m512i words[2] = {_mm512_permutex2var_epi64(even, calls_0to3, odd),
                                _mm512_permutex2var_epi64(even, calls_4to7, odd)};
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const __m512i x = _mm512_xor_si512(words[h], _mm512_srai_epi32(words[h], 31));
        const __m512 scaled = _mm512_mul_ps(vscale, _mm512_mul_ps(_mm512_cvtepi32_ps(x), unit));
        _mm512_store_ps(out + j + 32 * v + 16 * h, _mm512_add_ps(vshift, scaled));
      }
    }
  }
}
#endif  // SK_X86_DISPATCH

// ---- log, exp, sigmoid (vectorisable) -----------------------------------------------------

SK_INLINE float as_float(uint32_t bits) { return std::bit_cast<float>(bits); }
SK_INLINE uint32_t as_bits(float x) { return std::bit_cast<uint32_t>(x); }

// c ? a : b, blended on the bit patterns. The loops select with this, not with ?: on
// floats: GCC turns a float ?: into a branch and moves float ops (multiplies, loads) into
// its arms, then refuses to if-convert them back (a float op under a condition could
// trap, and -ftrapping-math is the default), and a loop with a branch does not vectorise.
SK_INLINE float select(bool c, float a, float b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(c);
  return as_float((as_bits(a) & mask) | (as_bits(b) & ~mask));
}

// log(x) for normal x > 0 (Cephes logf): x = m 2^e with m in [sqrt(1/2), sqrt(2)),
// log(1 + f) by a degree-9 polynomial, e log 2 in two parts.
SK_INLINE float log_positive(float x) {
  const uint32_t bits = as_bits(x);
  // x = m 2^e with m in [1/2, 1); where m < sqrt(1/2), 2m and e - 1 instead (chosen on
  // the integer bits, see select()).
  const uint32_t mantissa = bits & 0x007FFFFFu;
  const bool low = mantissa < 0x3504F3u;  // 1 + mantissa 2^-23 < sqrt(2)
  const int32_t e = static_cast<int32_t>(bits >> 23) - (low ? 127 : 126);
  const float f = as_float(mantissa | (low ? 0x3F800000u : 0x3F000000u)) - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  const float fe = static_cast<float>(e);
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  return (f + y) + 0.693359375f * fe;
}

// exp(a) for a <= 0 (Cephes expf): a = n log 2 + r, |r| <= log(2) / 2, then 2^n applied
// as two normal factors so that results down to the subnormals come out right. a below
// -104 (-inf included) is taken as -104, whose exp rounds to 0 in float; NaN stays NaN.
SK_INLINE float exp_nonpositive(float a) {
  a = select(a < -104.0f, -104.0f, a);
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float shifted = a * 1.44269504088896341f + kRound;
  const int32_t n = static_cast<int32_t>(as_bits(shifted)) - static_cast<int32_t>(as_bits(kRound));
  const float fn = shifted - kRound;
  float r = a - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t n1 = n >> 1, n2 = n - n1;  // n in [-150, 0]: both halves >= -75
  return p * as_float(static_cast<uint32_t>(n1 + 127) << 23) * as_float(static_cast<uint32_t>(n2 + 127) << 23);
}

// sigmoid(t) and sigmoid(t) (1 - sigmoid(t)), from e = exp(-|t|) and d = 1 / (1 + e);
// NaN for NaN t (e is NaN then).
struct Sigmoid {
  float s, ds;
};
SK_INLINE Sigmoid sigmoid(float t) {
  const float e = exp_nonpositive(-std::fabs(t));
  const float d = 1.0f / (1.0f + e);
  return {select(t >= 0.0f, d, e * d), e * d * d};
}

// sigmoid(t1) and sigmoid(t2) with one division: r = 1 / ((1 + e1)(1 + e2)) gives
// d1 = r (1 + e2) and d2 = r (1 + e1) (a division costs as much as the rest of a sigmoid;
// the product is in [1, 4]). The gate and its P(z != 0) share it.
struct SigmoidPair {
  Sigmoid first, second;
};
SK_INLINE SigmoidPair sigmoid_pair(float t1, float t2) {
  const float e1 = exp_nonpositive(-std::fabs(t1)), e2 = exp_nonpositive(-std::fabs(t2));
  const float a1 = 1.0f + e1, a2 = 1.0f + e2;
  const float r = 1.0f / (a1 * a2);
  const float d1 = r * a2, d2 = r * a1;
  return {{select(t1 >= 0.0f, d1, e1 * d1), e1 * d1 * d1}, {select(t2 >= 0.0f, d2, e2 * d2), e2 * d2 * d2}};
}

// ---- the gate ----------------------------------------------------------------------------

// 2^e for the float32 exponent of x > 0 (its leading bit); the spacing of floats in x's
// binade is 2^(e - 23).
inline int exponent_of(float x) { return std::ilogb(x); }

// The least positive gate y = s stretch + gamma can take in float32 (FMA or not): y > 0
// needs s > -gamma / stretch, so s is a multiple of its binade's spacing there, stretch and
// gamma multiples of theirs; the exact sum is then a multiple of the smaller of
// spacing(s) spacing(stretch) and spacing(gamma), and so at least that power of two.
// |w| >= 2^-126 / that keeps every nonzero w z normal (backward_recovered_body). Returns
// inf (recover nothing) when that bound exceeds 2^-20: gamma or stretch far from 1.
inline float recover_floor(float gamma, float stretch) {
  const float s_lo = (-gamma / stretch) * (1.0f - 1.0f / 1024.0f);  // below the rounded bound
  const int e_gate = std::min(exponent_of(s_lo) - 23 + exponent_of(stretch) - 23, exponent_of(-gamma) - 23);
  const int e_w = -126 - e_gate;
  return e_w > -20 ? std::numeric_limits<float>::infinity() : std::ldexp(1.0f, e_w);
}

// The constants in float32, each rounded once from double (as the torch path's scalars).
struct Consts {
  Stream stream;
  float eps, unit_scale;  // u = eps + (1 - 2 eps) r
  float inv_beta;         // t = (log alpha + log u - log(1 - u)) / beta
  float stretch, gamma;   // y = s (zeta - gamma) + gamma
  float inv_stretch;      // 1 / (zeta - gamma): s from a recovered z
  float dz_scale;         // (zeta - gamma) / beta
  float l0_shift;         // P(z != 0) = sigmoid(log alpha - beta log(-gamma / zeta))
  float recover_w_min;    // the least |w| whose w_eff gives z back (inf: none)
  Consts(int64_t seed, int64_t offset, double beta, double gamma, double zeta)
      : stream(seed, offset),
        eps(static_cast<float>(kEps)),
        unit_scale(static_cast<float>(1.0 - 2.0 * kEps)),
        inv_beta(static_cast<float>(1.0 / beta)),
        stretch(static_cast<float>(zeta - gamma)),
        gamma(static_cast<float>(gamma)),
        inv_stretch(static_cast<float>(1.0 / (zeta - gamma))),
        dz_scale(static_cast<float>((zeta - gamma) / beta)),
        l0_shift(static_cast<float>(beta * std::log(-gamma / zeta))),
        recover_w_min(recover_floor(static_cast<float>(gamma), static_cast<float>(zeta - gamma))) {}
};

// (log alpha + logistic noise) / beta; the noise log u - log(1 - u) in training only.
template <bool kTraining>
SK_INLINE float gate_logit(const Consts& k, float x, float u) {
  if constexpr (kTraining) x = x + log_positive(u / (1.0f - u));
  return x * k.inv_beta;
}

// z for la[0, m) given their u (unused in eval), or with kMasked w z (the masked weight:
// z itself is never stored); returns the block's sum of P(z != 0).
template <bool kMasked, bool kTraining>
SK_INLINE float forward_body(const Consts& k, const float* __restrict la, const float* __restrict u,
                             const float* __restrict w, float* __restrict out, int64_t m) {
  const float stretch = k.stretch, gamma = k.gamma, l0_shift = k.l0_shift;
  float l0 = 0.0f;
#pragma omp simd reduction(+ : l0)
  for (int64_t j = 0; j < m; ++j) {
    const float x = la[j];
    const SigmoidPair g = sigmoid_pair(gate_logit<kTraining>(k, x, kTraining ? u[j] : 0.0f), x - l0_shift);
    const float y = g.first.s * stretch + gamma;
    const float z = std::min(std::max(y, 0.0f), 1.0f);
    out[j] = kMasked ? w[j] * z : z;
    l0 += g.second.s;
  }
  return l0;
}


// d loss / d log alpha = grad_z dz/dlog alpha + grad_l0 group_size p (1 - p), with
// dz/dlog alpha = (zeta - gamma) / beta s (1 - s) where 0 < y < 1, else 0.
// kMasked: gz is the gradient of the masked weight w z, so grad_z = gz w, and the weight's
// gradient gz z goes to grad_w. kL0: grad_l0 != 0. The gate's sigmoid comes from
// sigmoid_pair with P's, as in the forward, even when grad_l0 = 0: the shared division
// rounds the gate differently from a lone sigmoid, and the regenerated z then differed
// from the forward's by 1 ulp (256,066 of 2,097,152 gates; at gamma = -0.001, 3 clamp
// decisions flipped). The second sigmoid costs that backward ~16% (4.8 vs 5.6 ms on 2M
// gates, one thread).
template <bool kMasked, bool kTraining, bool kL0>
SK_INLINE void backward_body(const Consts& k, const float* __restrict la, const float* __restrict u,
                             const float* __restrict gz, const float* __restrict w, float gl0,
                             float* __restrict grad, float* __restrict grad_w, int64_t m) {
  const float stretch = k.stretch, gamma = k.gamma, l0_shift = k.l0_shift, dz_scale = k.dz_scale;
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) {
    const float x = la[j];
    const SigmoidPair g = sigmoid_pair(gate_logit<kTraining>(k, x, kTraining ? u[j] : 0.0f), x - l0_shift);
    const float y = g.first.s * stretch + gamma;
    const float dz = select((y > 0.0f) & (y < 1.0f), dz_scale * g.first.ds, 0.0f);
    float out = (kMasked ? gz[j] * w[j] : gz[j]) * dz;
    if constexpr (kL0) out += gl0 * g.second.ds;
    grad[j] = out;
    if constexpr (kMasked) grad_w[j] = gz[j] * std::min(std::max(y, 0.0f), 1.0f);
  }
}

// The masked backward with z read back from the forward's output w_eff = w z (which the
// conv saved for its own backward anyway) instead of regenerated: z = w_eff / w, then
// s = (z - gamma) / (zeta - gamma), dz/dlog alpha = (zeta - gamma) / beta s (1 - s) where
// 0 < z < 1. No Philox, no log, one sigmoid fewer. float32 only, and only on blocks whose
// weights all have |w| in [Consts::recover_w_min, FLT_MAX] (recoverable(); the others
// regenerate): a gate z > 0 is at least the granularity of y = s (zeta - gamma) + gamma
// (recover_floor(); 2^-50 for the defaults), so w z is normal, rounded once, and
// w_eff / w is z within 2 ulp; w_eff = 0 exactly when z = 0, and z = 1 gives w / w = 1.
// The cost of the 2 ulp: where y lies within ~2 ulp of 1, z may read as 1 (dz = 0) where
// float32 y was just below 1 (dz = 0.076 dz_scale): the band in which the float32 kernels
// and the float64 reference already decide the clamp differently, there ~1 ulp wide.
template <bool kL0>
SK_INLINE void backward_recovered_body(const Consts& k, const float* __restrict la, const float* __restrict gz,
                                       const float* __restrict w, const float* __restrict w_eff, float gl0,
                                       float* __restrict grad, float* __restrict grad_w, int64_t m) {
  const float gamma = k.gamma, inv_stretch = k.inv_stretch, dz_scale = k.dz_scale, l0_shift = k.l0_shift;
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) {
    const float z = w_eff[j] / w[j];
    const float s = (z - gamma) * inv_stretch;
    const float dz = select((z > 0.0f) & (z < 1.0f), dz_scale * (s * (1.0f - s)), 0.0f);
    float out = gz[j] * w[j] * dz;
    if constexpr (kL0) out += gl0 * sigmoid(la[j] - l0_shift).ds;
    grad[j] = out;
    grad_w[j] = gz[j] * z;
  }
}

// Whether every weight of the block has |w| in [recover_w_min, FLT_MAX] (compared as bit
// patterns; inf and NaN fail), see backward_recovered_body.
SK_INLINE bool recoverable(const Consts& k, const float* __restrict w, int64_t m) {
  const uint32_t lo = as_bits(k.recover_w_min);
  int bad = 0;
#pragma omp simd reduction(| : bad)
  for (int64_t j = 0; j < m; ++j) {
    const uint32_t magnitude = as_bits(w[j]) & 0x7FFFFFFFu;
    bad |= static_cast<int>((magnitude < lo) | (magnitude >= 0x7F800000u));
  }
  return bad == 0;
}

// ---- one instruction set's kernels -------------------------------------------------------

using ForwardFn = float (*)(const Consts&, const float*, const float*, const float*, float*, int64_t);
using BackwardFn = void (*)(const Consts&, const float*, const float*, const float*, const float*, float, float*,
                            float*, int64_t);
using RecoveredFn = void (*)(const Consts&, const float*, const float*, const float*, const float*, float, float*,
                             float*, int64_t);

struct Kernels {
  PhiloxFn philox;
  ForwardFn forward[2][2];       // [masked][training]
  BackwardFn backward[2][2][2];  // [masked][training][grad_l0 != 0]
  RecoveredFn recovered[2];      // [grad_l0 != 0]
};

// The bodies above inline into these, compiled for each target (a callee with the default
// target may inline into one with a wider target).
#define SK_DEFINE_KERNELS(NAME, TARGET, PHILOX)                                                               \
  template <bool kMasked, bool kTraining>                                                                      \
  TARGET float forward_##NAME(const Consts& k, const float* la, const float* u, const float* w, float* out,     \
                              int64_t m) {                                                                     \
    return forward_body<kMasked, kTraining>(k, la, u, w, out, m);                                              \
  }                                                                                                            \
  template <bool kMasked, bool kTraining, bool kL0>                                                            \
  TARGET void backward_##NAME(const Consts& k, const float* la, const float* u, const float* gz, const float* w, \
                              float gl0, float* grad, float* grad_w, int64_t m) {                              \
    backward_body<kMasked, kTraining, kL0>(k, la, u, gz, w, gl0, grad, grad_w, m);                             \
  }                                                                                                            \
  template <bool kL0>                                                                                          \
  TARGET void recovered_##NAME(const Consts& k, const float* la, const float* gz, const float* w,               \
                               const float* w_eff, float gl0, float* grad, float* grad_w, int64_t m) {          \
    backward_recovered_body<kL0>(k, la, gz, w, w_eff, gl0, grad, grad_w, m);                                   \
  }                                                                                                            \
  constexpr Kernels kKernels_##NAME = {                                                                        \
      PHILOX,                                                                                                  \
      {{forward_##NAME<false, false>, forward_##NAME<false, true>},                                            \
       {forward_##NAME<true, false>, forward_##NAME<true, true>}},                                             \
      {{{backward_##NAME<false, false, false>, backward_##NAME<false, false, true>},                           \
        {backward_##NAME<false, true, false>, backward_##NAME<false, true, true>}},                            \
       {{backward_##NAME<true, false, false>, backward_##NAME<true, false, true>},                             \
        {backward_##NAME<true, true, false>, backward_##NAME<true, true, true>}}},                             \
      {recovered_##NAME<false>, recovered_##NAME<true>}};

SK_DEFINE_KERNELS(generic, , philox_generic)
#if SK_X86_DISPATCH
SK_DEFINE_KERNELS(avx2, SK_TARGET_AVX2, philox_avx2)
SK_DEFINE_KERNELS(avx512, SK_TARGET_AVX512, philox_avx512)
#endif

// ATen's choice (its CPU capability: what the CPU has, capped by ATEN_CPU_CAPABILITY),
// checked against the CPU's own flags.
const Kernels& kernels() {
  static const Kernels* chosen = [] {
#if SK_X86_DISPATCH
    const std::string cap = at::get_cpu_capability();
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (cap == "AVX512" && avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")) {
      return &kKernels_avx512;
    }
    if ((cap == "AVX512" || cap == "AVX2") && avx2) return &kKernels_avx2;
#endif
    return &kKernels_generic;
  }();
  return *chosen;
}

// ---- drivers -----------------------------------------------------------------------------

// Runs f(block, first, m) for the blocks of [0, n): first = block * kBlock, m values. On
// all threads, which claim chunks of kChunkBlocks blocks from a counter (a thread slowed by
// other work on its core then holds up no fixed half).
template <typename F>
void for_each_block(int64_t n, F&& f) {
  const int64_t nblocks = (n + kBlock - 1) / kBlock;
  const int64_t nchunks = (nblocks + kChunkBlocks - 1) / kChunkBlocks;
  auto run_chunk = [&](int64_t c) {
    const int64_t end = std::min(nblocks, (c + 1) * kChunkBlocks);
    for (int64_t b = c * kChunkBlocks; b < end; ++b) {
      const int64_t first = b * kBlock;
      f(b, first, std::min(kBlock, n - first));
    }
  };
  if (nchunks <= 1) {
    if (nchunks == 1) run_chunk(0);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), nchunks), 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1, std::memory_order_relaxed); c < nchunks;
         c = next.fetch_add(1, std::memory_order_relaxed)) {
      run_chunk(c);
    }
  });
}

// f(scalar_t{}) for the three dtypes the kernels take.
template <typename F>
void dispatch_dtype(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat:
      return f(float{});
    case at::kHalf:
      return f(c10::Half{});
    case at::kBFloat16:
      return f(c10::BFloat16{});
    default:
      TORCH_CHECK_VALUE(false, "hard_concrete: unsupported dtype ", t);
  }
}

// The block's values as float: the tensor's own memory for float32, else converted into buf.
template <typename scalar_t>
const float* load_block(const scalar_t* src, float* buf, int64_t m) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return src;
  } else {
    for (int64_t j = 0; j < m; ++j) buf[j] = static_cast<float>(src[j]);
    return buf;
  }
}

// Where the loop writes: dst itself for float32, else buf (then store_block converts).
template <typename scalar_t>
float* out_block(scalar_t* dst, float* buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return dst;
  } else {
    return buf;
  }
}

template <typename scalar_t>
void store_block(const float* buf, scalar_t* dst, int64_t m) {
  if constexpr (!std::is_same_v<scalar_t, float>) {
    for (int64_t j = 0; j < m; ++j) dst[j] = static_cast<scalar_t>(buf[j]);
  }
}

void check_log_alpha(const char* op, const at::Tensor& log_alpha) {
  TORCH_CHECK_VALUE(log_alpha.device().is_cpu(), op, ": `log_alpha` must be a CPU tensor, got ",
                    log_alpha.device());
  const auto t = log_alpha.scalar_type();
  TORCH_CHECK_VALUE(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, op,
                    ": `log_alpha` must be float32, float16 or bfloat16 (float64 runs the torch path), got ", t);
}

void check_params(const char* op, int64_t seed, int64_t offset, int64_t group_size, double beta, double gamma,
                  double zeta) {
  TORCH_CHECK_VALUE(seed >= 0, op, ": `seed` must be >= 0, got ", seed);
  TORCH_CHECK_VALUE(offset >= 0, op, ": `offset` must be >= 0, got ", offset);
  TORCH_CHECK_VALUE(group_size >= 1, op, ": `group_size` must be >= 1, got ", group_size);
  TORCH_CHECK_VALUE(std::isfinite(beta) && beta > 0, op, ": `beta` must be finite and > 0, got ", beta);
  TORCH_CHECK_VALUE(std::isfinite(gamma) && gamma < 0, op, ": `gamma` must be finite and < 0, got ", gamma);
  TORCH_CHECK_VALUE(std::isfinite(zeta) && zeta > 1, op, ": `zeta` must be finite and > 1, got ", zeta);
}

// The noise offset arrives as a one-element int64 CPU tensor, not an int: the masks step
// it every training forward, and torch.compile specialises on ints (one recompile per
// step) but traces a tensor as a graph input.
int64_t offset_value(const char* op, const at::Tensor& offset) {
  TORCH_CHECK_VALUE(offset.defined() && offset.numel() == 1 && offset.device().is_cpu() &&
                        offset.scalar_type() == at::kLong,
                    op, ": `offset` must be a one-element int64 CPU tensor");
  return offset.item<int64_t>();
}

// A tensor the kernels read: the log alpha (or weight, for the masked ops) of the op's
// dtype, on the CPU, of log alpha's shape.
void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& log_alpha) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": `", name, "` must be a CPU tensor, got ", t.device());
  TORCH_CHECK_VALUE(t.sizes() == log_alpha.sizes(), op, ": `", name, "` must have log_alpha's shape ",
                    log_alpha.sizes(), ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == log_alpha.scalar_type(), op, ": `", name, "` must have log_alpha's dtype ",
                    log_alpha.scalar_type(), ", got ", t.scalar_type());
}

// z (weight undefined) or the masked weight w z, and the expected L0: one pass.
std::tuple<at::Tensor, at::Tensor> sample_impl(const char* op, const at::Tensor& log_alpha_in,
                                               const at::Tensor& weight_in, int64_t seed, int64_t offset,
                                               int64_t group_size, double beta, double gamma, double zeta,
                                               bool training) {
  check_log_alpha(op, log_alpha_in);
  check_params(op, seed, offset, group_size, beta, gamma, zeta);
  const bool masked = weight_in.defined();
  if (masked) check_like(op, "weight", weight_in, log_alpha_in);
  const at::Tensor log_alpha = log_alpha_in.contiguous();
  const at::Tensor weight = masked ? weight_in.contiguous() : at::Tensor();
  const int64_t n = log_alpha.numel();
  at::Tensor out_t = at::empty(log_alpha.sizes(), log_alpha.options());
  const Consts k(seed, offset, beta, gamma, zeta);
  const Kernels& kern = kernels();
  const ForwardFn forward = kern.forward[masked][training];
  std::vector<float> partials((n + kBlock - 1) / kBlock);
  dispatch_dtype(log_alpha.scalar_type(), [&](auto dtype_tag) {
    using scalar_t = decltype(dtype_tag);
    const scalar_t* la = log_alpha.const_data_ptr<scalar_t>();
    const scalar_t* wp = masked ? weight.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out = out_t.mutable_data_ptr<scalar_t>();
    for_each_block(n, [&](int64_t b, int64_t first, int64_t m) {
      alignas(64) float u[kBlock], x_buf[kBlock], w_buf[kBlock], z_buf[kBlock];
      if (training) kern.philox(k.stream, first, m, k.unit_scale, k.eps, u);
      const float* x = load_block(la + first, x_buf, m);
      const float* w = masked ? load_block(wp + first, w_buf, m) : nullptr;
      partials[b] = forward(k, x, u, w, out_block(out + first, z_buf), m);
      store_block(z_buf, out + first, m);
    });
  });
  double l0 = 0.0;
  for (const float p : partials) l0 += p;
  return {out_t, at::scalar_tensor(static_cast<double>(group_size) * l0, log_alpha.options().dtype(at::kFloat))};
}

// (grad log alpha, grad weight): grad is z's gradient, or with weight defined the masked
// weight's (then grad weight = grad z, else undefined). One pass; the noise is regenerated,
// except that with w_eff (the masked forward's output) defined and float32, z is read back
// from it on the blocks recoverable() accepts (backward_recovered_body).
std::tuple<at::Tensor, at::Tensor> backward_impl(const char* op, const at::Tensor& grad_in,
                                                 const at::Tensor& grad_l0, const at::Tensor& log_alpha_in,
                                                 const at::Tensor& weight_in, const at::Tensor& w_eff_in,
                                                 int64_t seed, int64_t offset, int64_t group_size, double beta,
                                                 double gamma, double zeta, bool training) {
  check_log_alpha(op, log_alpha_in);
  check_params(op, seed, offset, group_size, beta, gamma, zeta);
  const bool masked = weight_in.defined();
  check_like(op, masked ? "grad" : "grad_z", grad_in, log_alpha_in);
  if (masked) check_like(op, "weight", weight_in, log_alpha_in);
  if (w_eff_in.defined()) check_like(op, "w_eff", w_eff_in, log_alpha_in);
  TORCH_CHECK_VALUE(grad_l0.numel() == 1 && grad_l0.device().is_cpu() && grad_l0.is_floating_point(), op,
                    ": `grad_l0` must be a one-element floating-point CPU tensor");
  const at::Tensor log_alpha = log_alpha_in.contiguous();
  const at::Tensor grad_z = grad_in.contiguous();
  const at::Tensor weight = masked ? weight_in.contiguous() : at::Tensor();
  // Read back only in float32: w z rounded to 16 bits would lose z's precision.
  const bool recover = masked && w_eff_in.defined() && log_alpha.scalar_type() == at::kFloat;
  const at::Tensor w_eff = recover ? w_eff_in.contiguous() : at::Tensor();
  const int64_t n = log_alpha.numel();
  at::Tensor grad = at::empty(log_alpha.sizes(), log_alpha.options());
  at::Tensor grad_w = masked ? at::empty(log_alpha.sizes(), log_alpha.options()) : at::Tensor();
  const Consts k(seed, offset, beta, gamma, zeta);
  // group_size folded into the L0 gradient, rounded to float32 like the torch path's.
  const float gl0 = static_cast<float>(grad_l0.item<double>() * static_cast<double>(group_size));
  const Kernels& kern = kernels();
  const bool l0 = gl0 != 0.0f;  // NaN counts as nonzero
  const BackwardFn backward = kern.backward[masked][training][l0];
  const RecoveredFn recovered = kern.recovered[l0];
  dispatch_dtype(log_alpha.scalar_type(), [&](auto dtype_tag) {
    using scalar_t = decltype(dtype_tag);
    const scalar_t* la = log_alpha.const_data_ptr<scalar_t>();
    const scalar_t* gz = grad_z.const_data_ptr<scalar_t>();
    const scalar_t* wp = masked ? weight.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* we = recover ? w_eff.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out = grad.mutable_data_ptr<scalar_t>();
    scalar_t* out_w = masked ? grad_w.mutable_data_ptr<scalar_t>() : nullptr;
    for_each_block(n, [&](int64_t, int64_t first, int64_t m) {
      alignas(64) float u[kBlock], x_buf[kBlock], g_buf[kBlock], w_buf[kBlock], out_buf[kBlock], gw_buf[kBlock];
      const float* x = load_block(la + first, x_buf, m);
      const float* g = load_block(gz + first, g_buf, m);
      const float* w = masked ? load_block(wp + first, w_buf, m) : nullptr;
      float* gw = masked ? out_block(out_w + first, gw_buf) : nullptr;
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (recover && recoverable(k, w, m)) {
          recovered(k, x, g, w, we + first, gl0, out + first, gw, m);
          return;
        }
      }
      if (training) kern.philox(k.stream, first, m, k.unit_scale, k.eps, u);
      backward(k, x, u, g, w, gl0, out_block(out + first, out_buf), gw, m);
      store_block(out_buf, out + first, m);
      if (masked) store_block(gw_buf, out_w + first, m);
    });
  });
  return {grad, grad_w};
}

std::tuple<at::Tensor, at::Tensor> hard_concrete_sample_fused_cpu(const at::Tensor& log_alpha, int64_t seed,
                                                                   const at::Tensor& offset, int64_t group_size, double beta,
                                                                   double gamma, double zeta, bool training) {
  const char* op = "hard_concrete_sample_fused";
  return sample_impl(op, log_alpha, at::Tensor(), seed, offset_value(op, offset), group_size, beta, gamma,
                     zeta, training);
}

at::Tensor hard_concrete_sample_fused_backward_cpu(const at::Tensor& grad_z, const at::Tensor& grad_l0,
                                                   const at::Tensor& log_alpha, int64_t seed,
                                                   const at::Tensor& offset, int64_t group_size, double beta,
                                                   double gamma, double zeta, bool training) {
  const char* op = "hard_concrete_sample_fused_backward";
  return std::get<0>(backward_impl(op, grad_z, grad_l0, log_alpha, at::Tensor(), at::Tensor(), seed,
                                   offset_value(op, offset), group_size, beta, gamma, zeta, training));
}

std::tuple<at::Tensor, at::Tensor> hard_concrete_masked_weight_fused_cpu(const at::Tensor& weight,
                                                                          const at::Tensor& log_alpha, int64_t seed,
                                                                          const at::Tensor& offset, double beta,
                                                                          double gamma, double zeta, bool training) {
  const char* op = "hard_concrete_masked_weight_fused";
  TORCH_CHECK_VALUE(weight.defined(), op, ": `weight` is undefined");
  return sample_impl(op, log_alpha, weight, seed, offset_value(op, offset), 1, beta, gamma, zeta,
                     training);
}

std::tuple<at::Tensor, at::Tensor> hard_concrete_masked_weight_fused_backward_cpu(
    const at::Tensor& grad, const at::Tensor& grad_l0, const at::Tensor& weight, const at::Tensor& log_alpha,
    int64_t seed, const at::Tensor& offset, double beta, double gamma, double zeta, bool training,
    const std::optional<at::Tensor>& w_eff) {
  const char* op = "hard_concrete_masked_weight_fused_backward";
  TORCH_CHECK_VALUE(weight.defined(), op, ": `weight` is undefined");
  auto [grad_la, grad_w] = backward_impl(op, grad, grad_l0, log_alpha, weight, w_eff.value_or(at::Tensor()), seed,
                                         offset_value(op, offset), 1, beta, gamma, zeta,
                                         training);
  return {grad_w, grad_la};
}

void philox_uniform_cpu(at::Tensor& out, int64_t seed, const at::Tensor& offset_t) {
  const int64_t offset = offset_value("philox_uniform_", offset_t);
  TORCH_CHECK_VALUE(out.scalar_type() == at::kFloat, "philox_uniform_: `out` must be float32, got ",
                    out.scalar_type());
  TORCH_CHECK_VALUE(out.is_contiguous(), "philox_uniform_: `out` must be contiguous");
  TORCH_CHECK_VALUE(seed >= 0 && offset >= 0, "philox_uniform_: `seed` and `offset` must be >= 0");
  float* p = out.mutable_data_ptr<float>();
  const Stream st(seed, offset);
  const PhiloxFn philox = kernels().philox;
  for_each_block(out.numel(), [&](int64_t, int64_t first, int64_t m) {
    alignas(64) float r[kBlock];
    philox(st, first, m, 1.0f, 0.0f, r);  // 0 + 1 r = r exactly
    std::memcpy(p + first, r, static_cast<size_t>(m) * sizeof(float));
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("philox_uniform_", &philox_uniform_cpu);
  m.impl("hard_concrete_sample_fused", &hard_concrete_sample_fused_cpu);
  m.impl("hard_concrete_sample_fused_backward", &hard_concrete_sample_fused_backward_cpu);
  m.impl("hard_concrete_masked_weight_fused", &hard_concrete_masked_weight_fused_cpu);
  m.impl("hard_concrete_masked_weight_fused_backward", &hard_concrete_masked_weight_fused_backward_cpu);
}

}  // namespace sparsekern
