// CPU passes of alig_fused::alig_step_ (and of its halves alig_sums / alig_update_, and of
// alig_apply_), for the op bodies of alig_ops.cpp (DevicePasses, cpu_passes()):
// pass 1, finalize, pass 2 (and the projection's pass 3) over ONE list of fixed-size
// chunks of all tensors, split
// between the intra-op threads by one at::parallel_for per pass (the per-tensor cost is a
// list entry, not a loop or a fork).
//
// Determinism whatever the thread count: a chunk's sums (pass 1, and pass 2's ||w'||^2)
// are computed alone, in a fixed order (kLanes fp32 lanes, folded into fp64 every kBlock
// elements), and the per-chunk fp64 partials are added per group in chunk order
// (sum_by_group). How chunks are split
// between threads changes nothing.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "alig_math.h"
#include "alig_ops.h"

namespace alig_fused {
namespace {

// Elements per chunk: the unit of partial sums (one fp64 row per chunk) and of splitting
// work between threads. 16,384 fp32 = 64 KB per stream, so pass 1's three streams (w, g, b)
// of one chunk stay in a core's L2; a chunk's fixed cost (kChunkCost 512, ~3%) is paid per
// 16,384 elements; ResNet-50's 25.6M parameters are ~1,600 chunks, so a split between 2-16
// threads is uneven by at most one chunk each (<1%). CUDA uses 8,192 (cuda/alig_cuda.cu:
// there a chunk is one block of 256 threads); Triton 16,384 (triton_kernels.py).
constexpr int64_t kChunk = 16384;
constexpr int64_t kBlock = 1024;          // fp32 lane sums go to fp64 every kBlock elements
constexpr int kLanes = 8;                 // independent fp32 accumulators (one SIMD-friendly row)
constexpr int64_t kChunkCost = 512;       // a chunk's fixed cost, in elements, for splitting work
constexpr int64_t kSerialBelow = 1 << 15;  // fewer elements than this: one thread, no fork

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t size;
};

// The fp32 block kernels below are built twice on x86-64: generic (SSE2) and AVX2, picked
// at load time (GCC/clang target_clones). No FMA in either (and -ffp-contract=off), so both
// give the same bits. Written with 8-lane vector types: GCC's auto-vectorizer left the
// pass-1 projection sums (6 accumulators x 8 lanes) scalar, which made pass 1 with max_norm
// take ~19 ms for ResNet-50's 25.6M fp32 parameters instead of ~5.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__INTEL_COMPILER)
#define ALIG_MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define ALIG_MULTIVERSION
#endif

typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));
// Lanes is returned by value from internal helpers only (inlined): no ABI to keep stable.
#pragma GCC diagnostic ignored "-Wpsabi"

inline Lanes load_lanes(const float* p) {
  Lanes v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store_lanes(float* p, Lanes v) { std::memcpy(p, &v, sizeof(v)); }

inline float load_one(const float* p) { return *p; }
inline void store_one(float* p, float v) { *p = v; }

// bf16 converted in registers (no block buffers): bf16 -> fp32 is a 16-bit left shift;
// fp32 -> bf16 rounds to nearest even with nan -> 0x7FC0, as c10::BFloat16(float).
typedef uint16_t U16Lanes __attribute__((vector_size(kLanes * sizeof(uint16_t))));
typedef uint32_t U32Lanes __attribute__((vector_size(kLanes * sizeof(uint32_t))));
typedef int32_t I32Lanes __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline float load_one(const c10::BFloat16* p) {
  const uint32_t bits = static_cast<uint32_t>(p->x) << 16;
  float v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

inline uint16_t bf16_bits(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const uint32_t rounded = (bits + UINT32_C(0x7FFF) + ((bits >> 16) & 1)) >> 16;
  const bool is_nan = (bits & UINT32_C(0x7FFFFFFF)) > UINT32_C(0x7F800000);
  return static_cast<uint16_t>(is_nan ? UINT32_C(0x7FC0) : rounded);
}

inline void store_one(c10::BFloat16* p, float v) { p->x = bf16_bits(v); }

inline Lanes load_lanes(const c10::BFloat16* p) {
  U16Lanes h;
  std::memcpy(&h, p, sizeof(h));
  const U32Lanes bits = __builtin_convertvector(h, U32Lanes) << 16;
  Lanes v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

inline void store_lanes(c10::BFloat16* p, Lanes v) {
  I32Lanes bits;
  std::memcpy(&bits, &v, sizeof(bits));
  // Same arithmetic as bf16_bits (wrap-around add done unsigned); |bits| compares signed,
  // being below 2^31.
  const U32Lanes u = reinterpret_cast<U32Lanes>(bits);
  const I32Lanes rounded = reinterpret_cast<I32Lanes>((u + UINT32_C(0x7FFF) + ((u >> 16) & 1)) >> 16);
  const I32Lanes is_nan = (bits & INT32_C(0x7FFFFFFF)) > INT32_C(0x7F800000);
  const I32Lanes out = (rounded & ~is_nan) | (INT32_C(0x7FC0) & is_nan);
  const U16Lanes h = __builtin_convertvector(out, U16Lanes);
  std::memcpy(p, &h, sizeof(h));
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ALIG_HAVE_AVX2_BF16_PATH 1
// bf16 with AVX2 integer intrinsics, used only by the AVX2 kernels below (picked at run
// time). From the portable vector code GCC made pass 2 ~62 instructions per 8 elements
// (each load two 4-lane widenings, an insert and a shift; each store 12), and a bf16 step
// was compute-bound: slower than fp32 for half the bytes. With these and 16 elements per
// iteration it is ~27: pass 2 alone went from 1.43 to 1.02 ns per element on the project's
// 2-core EPYC (16M elements, 1 thread, CPU time; fp32 1.20, fp16 with F16C 0.91).
// Bf16Avx2 is c10::BFloat16's storage under another name, so that overload resolution
// picks these helpers inside the AVX2 kernels. Same rounding bits as bf16_bits.
struct Bf16Avx2 {
  uint16_t x;
};
static_assert(sizeof(Bf16Avx2) == sizeof(c10::BFloat16), "Bf16Avx2 must alias bf16 storage");

inline float load_one(const Bf16Avx2* p) {
  uint16_t h;
  std::memcpy(&h, p, sizeof(h));
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

inline void store_one(Bf16Avx2* p, float v) {
  const uint16_t h = bf16_bits(v);
  std::memcpy(p, &h, sizeof(h));
}

// 8 fp32 -> their bf16 bits in the low halves of the 32-bit lanes: (bits + 0x7FFF + lsb) >> 16,
// wrapping as bf16_bits does, a nan (unordered with itself) -> 0x7FC0. The results fit 16
// bits, so _mm256_packus_epi32 does not saturate them.
__attribute__((target("avx2"))) inline __m256i bf16_bits_avx2(__m256 x) {
  const __m256i bits = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), lsb);
  const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  return _mm256_srli_epi32(_mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC00000), is_nan), 16);
}

__attribute__((target("avx2"))) inline __m256 load8_bf16_avx2(const void* p) {
  const __m128i h = _mm_loadu_si128(static_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// packus packs per 128-bit half; the permute puts the quads back in element order.
__attribute__((target("avx2"))) inline void store8_bf16_avx2(void* p, __m256 x) {
  const __m256i h = bf16_bits_avx2(x);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(h, h), 0x08);
  _mm_storeu_si128(static_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

// 16 elements in two vectors, lo = elements 0-3 and 8-11, hi = 4-7 and 12-15: one load and
// two unpacks (each bf16 goes to the high half of a 32-bit lane), and the store packs them
// back in order without a permute. For element-wise work only; sums need the element order.
__attribute__((target("avx2"))) inline void load16_bf16_avx2(const void* p, __m256& lo, __m256& hi) {
  const __m256i h = _mm256_loadu_si256(static_cast<const __m256i*>(p));
  lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), h));
  hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), h));
}

__attribute__((target("avx2"))) inline void store16_bf16_avx2(void* p, __m256 lo, __m256 hi) {
  _mm256_storeu_si256(static_cast<__m256i*>(p), _mm256_packus_epi32(bf16_bits_avx2(lo), bf16_bits_avx2(hi)));
}

__attribute__((target("avx2"))) inline Lanes load_lanes(const Bf16Avx2* p) {
  const __m256 x = load8_bf16_avx2(p);
  Lanes v;
  std::memcpy(&v, &x, sizeof(v));
  return v;
}

__attribute__((target("avx2"))) inline void store_lanes(Bf16Avx2* p, Lanes v) {
  __m256 x;
  std::memcpy(&x, &v, sizeof(x));
  store8_bf16_avx2(p, x);
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}

#define ALIG_HAVE_F16C_PATH 1
// fp16 in registers with F16C, used only by the AVX2 + F16C kernels below (picked at run
// time); without them, fp16 goes through fp32 block buffers.
__attribute__((target("avx,f16c"))) inline Lanes load_lanes(const c10::Half* p) {
  Lanes v;
  const __m256 x = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  std::memcpy(&v, &x, sizeof(v));
  return v;
}

__attribute__((target("avx,f16c"))) inline void store_lanes(c10::Half* p, Lanes v) {
  __m256 x;
  std::memcpy(&x, &v, sizeof(x));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
}

__attribute__((target("avx,f16c"))) inline float load_one(const c10::Half* p) { return _cvtsh_ss(p->x); }

__attribute__((target("avx,f16c"))) inline void store_one(c10::Half* p, float v) {
  p->x = static_cast<uint16_t>(_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT));
}

#endif

// Pass 1 on one block of n <= kBlock elements: kLanes fp32 accumulators per sum (lane
// j takes elements j, j + kLanes, ...; the tail goes to lanes 0, 1, ...), folded into the
// fp64 totals in lane order. Sums: g*g (g unscaled) and, for a group with max_norm, w*w,
// w*g and with a buffer b*b, w*b, b*g. T: float, or bf16 converted in registers.
template <typename T>
inline void block_sums_impl(const T* __restrict__ w, const T* __restrict__ g,
                                                           const T* __restrict__ b, int64_t n, float inv_scale,
                                                           bool project, bool has_buffer, double* __restrict__ total) {
  Lanes gg = {}, ww = {}, bb = {}, wb = {}, wg = {}, bg = {};
  const Lanes inv = Lanes{} + inv_scale;
  const int64_t n_full = n / kLanes * kLanes;
  if (!project) {
    for (int64_t i = 0; i < n_full; i += kLanes) {
      const Lanes gv = load_lanes(g + i) * inv;
      gg += gv * gv;
    }
  } else if (!has_buffer) {
    for (int64_t i = 0; i < n_full; i += kLanes) {
      const Lanes gv = load_lanes(g + i) * inv, wv = load_lanes(w + i);
      gg += gv * gv;
      ww += wv * wv;
      wg += wv * gv;
    }
  } else {
    for (int64_t i = 0; i < n_full; i += kLanes) {
      const Lanes gv = load_lanes(g + i) * inv, wv = load_lanes(w + i), bv = load_lanes(b + i);
      gg += gv * gv;
      ww += wv * wv;
      wg += wv * gv;
      bb += bv * bv;
      wb += wv * bv;
      bg += bv * gv;
    }
  }
  for (int64_t i = n_full, lane = 0; i < n; ++i, ++lane) {
    const float gv = load_one(g + i) * inv_scale;
    gg[lane] += gv * gv;
    if (project) {
      const float wv = load_one(w + i);
      ww[lane] += wv * wv;
      wg[lane] += wv * gv;
      if (has_buffer) {
        const float bv = load_one(b + i);
        bb[lane] += bv * bv;
        wb[lane] += wv * bv;
        bg[lane] += bv * gv;
      }
    }
  }
  for (int lane = 0; lane < kLanes; ++lane) {
    total[sum::kGG] += gg[lane];
    total[sum::kWW] += ww[lane];
    total[sum::kBB] += bb[lane];
    total[sum::kWB] += wb[lane];
    total[sum::kWG] += wg[lane];
    total[sum::kBG] += bg[lane];
  }
}

// Pass 2 on one block of n <= kBlock elements, in place: alig_math.h's update_element,
// lane-wise. With norm_sq, also adds ||w'||^2 (of the fp32 values, before rounding to
// storage) to *norm_sq, in the lane order of block_sums_impl.
template <typename T>
inline void block_update_impl(T* __restrict__ w, const T* __restrict__ g, T* __restrict__ b, int64_t n,
                              float inv_scale, UpdateCoefs k, double* __restrict__ norm_sq) {
  const Lanes inv = Lanes{} + inv_scale, a = Lanes{} + k.a, c = Lanes{} + k.c, d = Lanes{} + k.d,
              mu = Lanes{} + k.mu, scale = Lanes{} + k.scale;
  const bool measure = norm_sq != nullptr;
  Lanes ww = {};
  const int64_t n_full = n / kLanes * kLanes;
  if (b != nullptr) {
    for (int64_t i = 0; i < n_full; i += kLanes) {
      const Lanes gv = load_lanes(g + i) * inv, bv = load_lanes(b + i);
      Lanes wv = load_lanes(w + i) - c * gv;  // the order of update_element
      wv = wv + a * bv;
      store_lanes(b + i, bv * mu - d * gv);
      wv = wv * scale;
      if (measure) ww += wv * wv;
      store_lanes(w + i, wv);
    }
    for (int64_t i = n_full, lane = 0; i < n; ++i, ++lane) {
      float wv = load_one(w + i), bv = load_one(b + i);
      update_element(wv, bv, load_one(g + i) * inv_scale, k);
      if (measure) ww[lane] += wv * wv;
      store_one(w + i, wv);
      store_one(b + i, bv);
    }
  } else {
    for (int64_t i = 0; i < n_full; i += kLanes) {
      const Lanes gv = load_lanes(g + i) * inv;
      const Lanes wv = (load_lanes(w + i) - c * gv) * scale;
      if (measure) ww += wv * wv;
      store_lanes(w + i, wv);
    }
    for (int64_t i = n_full, lane = 0; i < n; ++i, ++lane) {
      const float wv = update_element(load_one(w + i), load_one(g + i) * inv_scale, k);
      if (measure) ww[lane] += wv * wv;
      store_one(w + i, wv);
    }
  }
  if (measure) {
    for (int lane = 0; lane < kLanes; ++lane) *norm_sq += ww[lane];
  }
}

// The projection pass on n elements, in place: w = w * scale in fp32.
template <typename T>
inline void block_scale_impl(T* __restrict__ w, int64_t n, float scale) {
  const Lanes s = Lanes{} + scale;
  const int64_t n_full = n / kLanes * kLanes;
  for (int64_t i = 0; i < n_full; i += kLanes) store_lanes(w + i, load_lanes(w + i) * s);
  for (int64_t i = n_full; i < n; ++i) store_one(w + i, load_one(w + i) * scale);
}

ALIG_MULTIVERSION __attribute__((flatten)) void block_sums_f32(const float* __restrict__ w, const float* __restrict__ g,
                                      const float* __restrict__ b, int64_t n, float inv_scale, bool project,
                                      bool has_buffer, double* __restrict__ total) {
  block_sums_impl(w, g, b, n, inv_scale, project, has_buffer, total);
}

// bf16 kernels: AVX2 intrinsics where the CPU has them, else the portable conversion
// (generic x86-64 / other architectures). Both round alike (tests/test_cpp.py).
#ifdef ALIG_HAVE_AVX2_BF16_PATH
inline const Bf16Avx2* as_avx2(const c10::BFloat16* p) { return reinterpret_cast<const Bf16Avx2*>(p); }
inline Bf16Avx2* as_avx2(c10::BFloat16* p) { return reinterpret_cast<Bf16Avx2*>(p); }

__attribute__((target("avx2"), flatten)) void block_sums_bf16_avx2(const c10::BFloat16* __restrict__ w,
                                                                    const c10::BFloat16* __restrict__ g,
                                                                    const c10::BFloat16* __restrict__ b, int64_t n,
                                                                    float inv_scale, bool project, bool has_buffer,
                                                                    double* __restrict__ total) {
  block_sums_impl(as_avx2(w), as_avx2(g), as_avx2(b), n, inv_scale, project, has_buffer, total);
}

// Pass 2 and the projection pass for bf16 with AVX2: block_update_impl / block_scale_impl's
// operations in the same order (same bits), 16 elements per iteration in load16's lane
// order. This is compute-bound on the project's 2-core EPYC (~1 instruction per ns; the
// rounding to bf16 is 7 instructions per 8 values), so every instruction counts: the
// lane order saves the conversions' shifts and permutes, and 1/grad_scale = 1 (no
// GradScaler) skips that multiply (g * 1 is g). With norm_sq, ||w'||^2 goes to the 8 lanes
// in block_update_impl's order (elements 0-7, then 8-15), after two lane permutes.
template <bool kScaled>
__attribute__((target("avx2"), always_inline)) inline void update_bf16_avx2(__m256& w, const __m256 g_raw, __m256* b,
                                                                           const __m256 (&k)[6], __m256* b_new) {
  enum { kInv, kA, kC, kD, kMu, kScale };
  const __m256 gv = kScaled ? _mm256_mul_ps(g_raw, k[kInv]) : g_raw;
  __m256 wv = _mm256_sub_ps(w, _mm256_mul_ps(k[kC], gv));
  if (b != nullptr) {
    wv = _mm256_add_ps(wv, _mm256_mul_ps(k[kA], *b));
    *b_new = _mm256_sub_ps(_mm256_mul_ps(*b, k[kMu]), _mm256_mul_ps(k[kD], gv));
  }
  w = _mm256_mul_ps(wv, k[kScale]);
}

template <bool kScaled, bool kBuffer>
__attribute__((target("avx2"), flatten)) void block_update_bf16_avx2_impl(c10::BFloat16* __restrict__ w,
                                                                           const c10::BFloat16* __restrict__ g,
                                                                           c10::BFloat16* __restrict__ b, int64_t n,
                                                                           float inv_scale, UpdateCoefs k,
                                                                           double* norm_sq) {
  const __m256 coefs[6] = {_mm256_set1_ps(inv_scale), _mm256_set1_ps(k.a),  _mm256_set1_ps(k.c),
                           _mm256_set1_ps(k.d),       _mm256_set1_ps(k.mu), _mm256_set1_ps(k.scale)};
  const bool measure = norm_sq != nullptr;
  __m256 ww = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256 w0, w1, g0, g1, b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps(), bn0, bn1;
    load16_bf16_avx2(w + i, w0, w1);
    load16_bf16_avx2(g + i, g0, g1);
    if (kBuffer) load16_bf16_avx2(b + i, b0, b1);
    update_bf16_avx2<kScaled>(w0, g0, kBuffer ? &b0 : nullptr, coefs, &bn0);
    update_bf16_avx2<kScaled>(w1, g1, kBuffer ? &b1 : nullptr, coefs, &bn1);
    if (measure) {
      const __m256 first = _mm256_permute2f128_ps(w0, w1, 0x20), second = _mm256_permute2f128_ps(w0, w1, 0x31);
      ww = _mm256_add_ps(_mm256_add_ps(ww, _mm256_mul_ps(first, first)), _mm256_mul_ps(second, second));
    }
    if (kBuffer) store16_bf16_avx2(b + i, bn0, bn1);
    store16_bf16_avx2(w + i, w0, w1);
  }
  for (; i + 8 <= n; i += 8) {
    __m256 w0 = load8_bf16_avx2(w + i), b0 = kBuffer ? load8_bf16_avx2(b + i) : _mm256_setzero_ps(), bn0;
    update_bf16_avx2<kScaled>(w0, load8_bf16_avx2(g + i), kBuffer ? &b0 : nullptr, coefs, &bn0);
    if (measure) ww = _mm256_add_ps(ww, _mm256_mul_ps(w0, w0));
    if (kBuffer) store8_bf16_avx2(b + i, bn0);
    store8_bf16_avx2(w + i, w0);
  }
  alignas(32) float lanes[kLanes];
  _mm256_store_ps(lanes, ww);
  for (int64_t lane = 0; i < n; ++i, ++lane) {  // the tail, as block_update_impl's
    float wv = load_one(as_avx2(w) + i);
    if (kBuffer) {
      float bv = load_one(as_avx2(b) + i);
      update_element(wv, bv, load_one(as_avx2(g) + i) * inv_scale, k);
      store_one(as_avx2(b) + i, bv);
    } else {
      wv = update_element(wv, load_one(as_avx2(g) + i) * inv_scale, k);
    }
    if (measure) lanes[lane] += wv * wv;
    store_one(as_avx2(w) + i, wv);
  }
  if (measure) {
    for (int lane = 0; lane < kLanes; ++lane) *norm_sq += lanes[lane];
  }
}

__attribute__((target("avx2"))) void block_update_bf16_avx2(c10::BFloat16* w, const c10::BFloat16* g,
                                                             c10::BFloat16* b, int64_t n, float inv_scale,
                                                             UpdateCoefs k, double* norm_sq) {
  if (inv_scale == 1.0f) {
    if (b != nullptr) return block_update_bf16_avx2_impl<false, true>(w, g, b, n, inv_scale, k, norm_sq);
    return block_update_bf16_avx2_impl<false, false>(w, g, b, n, inv_scale, k, norm_sq);
  }
  if (b != nullptr) return block_update_bf16_avx2_impl<true, true>(w, g, b, n, inv_scale, k, norm_sq);
  block_update_bf16_avx2_impl<true, false>(w, g, b, n, inv_scale, k, norm_sq);
}

__attribute__((target("avx2"), flatten)) void block_scale_bf16_avx2(c10::BFloat16* __restrict__ w, int64_t n,
                                                                     float scale) {
  const __m256 s = _mm256_set1_ps(scale);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256 lo, hi;
    load16_bf16_avx2(w + i, lo, hi);
    store16_bf16_avx2(w + i, _mm256_mul_ps(lo, s), _mm256_mul_ps(hi, s));
  }
  for (; i + 8 <= n; i += 8) store8_bf16_avx2(w + i, _mm256_mul_ps(load8_bf16_avx2(w + i), s));
  for (; i < n; ++i) store_one(as_avx2(w) + i, load_one(as_avx2(w) + i) * scale);
}
#endif

__attribute__((flatten)) void block_sums_bf16_portable(const c10::BFloat16* __restrict__ w,
                                                       const c10::BFloat16* __restrict__ g,
                                                       const c10::BFloat16* __restrict__ b, int64_t n,
                                                       float inv_scale, bool project, bool has_buffer,
                                                       double* __restrict__ total) {
  block_sums_impl(w, g, b, n, inv_scale, project, has_buffer, total);
}

__attribute__((flatten)) void block_update_bf16_portable(c10::BFloat16* __restrict__ w,
                                                         const c10::BFloat16* __restrict__ g,
                                                         c10::BFloat16* __restrict__ b, int64_t n, float inv_scale,
                                                         UpdateCoefs k, double* norm_sq) {
  block_update_impl(w, g, b, n, inv_scale, k, norm_sq);
}

__attribute__((flatten)) void block_scale_bf16_portable(c10::BFloat16* __restrict__ w, int64_t n, float scale) {
  block_scale_impl(w, n, scale);
}

void block_sums_bf16(const c10::BFloat16* w, const c10::BFloat16* g, const c10::BFloat16* b, int64_t n,
                     float inv_scale, bool project, bool has_buffer, double* total) {
#ifdef ALIG_HAVE_AVX2_BF16_PATH
  if (cpu_has_avx2()) return block_sums_bf16_avx2(w, g, b, n, inv_scale, project, has_buffer, total);
#endif
  block_sums_bf16_portable(w, g, b, n, inv_scale, project, has_buffer, total);
}

ALIG_MULTIVERSION __attribute__((flatten)) void block_update_f32(float* __restrict__ w, const float* __restrict__ g, float* __restrict__ b,
                                        int64_t n, float inv_scale, UpdateCoefs k, double* norm_sq) {
  block_update_impl(w, g, b, n, inv_scale, k, norm_sq);
}

void block_update_bf16(c10::BFloat16* w, const c10::BFloat16* g, c10::BFloat16* b, int64_t n, float inv_scale,
                       UpdateCoefs k, double* norm_sq) {
#ifdef ALIG_HAVE_AVX2_BF16_PATH
  if (cpu_has_avx2()) return block_update_bf16_avx2(w, g, b, n, inv_scale, k, norm_sq);
#endif
  block_update_bf16_portable(w, g, b, n, inv_scale, k, norm_sq);
}

ALIG_MULTIVERSION __attribute__((flatten)) void block_scale_f32(float* __restrict__ w, int64_t n, float scale) {
  block_scale_impl(w, n, scale);
}

void block_scale_bf16(c10::BFloat16* w, int64_t n, float scale) {
#ifdef ALIG_HAVE_AVX2_BF16_PATH
  if (cpu_has_avx2()) return block_scale_bf16_avx2(w, n, scale);
#endif
  block_scale_bf16_portable(w, n, scale);
}

// ---- storage <-> fp32 for one block, for fp16 and fp64 (bf16 converts in registers) ------

void to_float(const double* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

void from_float(const float* src, double* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
}

// fp16: c10::Half converts one value at a time in portable code (no F16C in a generic
// x86-64 build), which made fp16 ~7x slower than bf16 (504 vs 76 ms for ResNet-50's 25.6M
// parameters); F16C, chosen at run time, converts 8 at once with the same round-to-nearest-even.
#ifdef ALIG_HAVE_F16C_PATH
__attribute__((target("avx,f16c"))) void half_to_float_f16c(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i].x);
}

__attribute__((target("avx,f16c"))) void float_to_half_f16c(const float* src, c10::Half* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
  for (; i < n; ++i) dst[i].x = static_cast<uint16_t>(_cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT));
}

bool cpu_has_f16c() {
  static const bool has = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  return has;
}

bool cpu_has_avx2_f16c() {
  static const bool has = cpu_has_f16c() && __builtin_cpu_supports("avx2");
  return has;
}

__attribute__((target("avx2,f16c"), flatten)) void block_sums_f16(const c10::Half* __restrict__ w,
                                                                   const c10::Half* __restrict__ g,
                                                                   const c10::Half* __restrict__ b, int64_t n,
                                                                   float inv_scale, bool project, bool has_buffer,
                                                                   double* __restrict__ total) {
  block_sums_impl(w, g, b, n, inv_scale, project, has_buffer, total);
}

__attribute__((target("avx2,f16c"), flatten)) void block_update_f16(c10::Half* __restrict__ w,
                                                                     const c10::Half* __restrict__ g,
                                                                     c10::Half* __restrict__ b, int64_t n,
                                                                     float inv_scale, UpdateCoefs k, double* norm_sq) {
  block_update_impl(w, g, b, n, inv_scale, k, norm_sq);
}

__attribute__((target("avx2,f16c"), flatten)) void block_scale_f16(c10::Half* __restrict__ w, int64_t n, float scale) {
  block_scale_impl(w, n, scale);
}
#endif

void to_float(const c10::Half* src, float* dst, int64_t n) {
#ifdef ALIG_HAVE_F16C_PATH
  if (cpu_has_f16c()) return half_to_float_f16c(src, dst, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

void from_float(const float* src, c10::Half* dst, int64_t n) {
#ifdef ALIG_HAVE_F16C_PATH
  if (cpu_has_f16c()) return float_to_half_f16c(src, dst, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i]);
}

// ---- one chunk: fp32 and bf16 in place, fp16 / fp64 through fp32 block buffers ----------

// Pass 1 on one chunk: out[sum::kCount] = the chunk's fp64 sums, block after block.
template <typename T>
void chunk_sums(const T* w, const T* g, const T* b, int64_t n, float inv_scale, bool project, double* out) {
  double total[sum::kCount] = {};
  const bool has_buffer = b != nullptr;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t size = std::min(kBlock, n - start);
    if constexpr (std::is_same_v<T, float>) {
      block_sums_f32(w + start, g + start, has_buffer ? b + start : nullptr, size, inv_scale, project, has_buffer,
                     total);
    } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
      block_sums_bf16(w + start, g + start, has_buffer ? b + start : nullptr, size, inv_scale, project, has_buffer,
                      total);
    } else {
#ifdef ALIG_HAVE_F16C_PATH
      if constexpr (std::is_same_v<T, c10::Half>) {
        if (cpu_has_avx2_f16c()) {
          block_sums_f16(w + start, g + start, has_buffer ? b + start : nullptr, size, inv_scale, project,
                         has_buffer, total);
          continue;
        }
      }
#endif
      float w32[kBlock], g32[kBlock], b32[kBlock];
      to_float(g + start, g32, size);
      if (project) to_float(w + start, w32, size);
      if (project && has_buffer) to_float(b + start, b32, size);
      block_sums_f32(w32, g32, b32, size, inv_scale, project, has_buffer, total);
    }
  }
  std::copy(total, total + sum::kCount, out);
}

// Pass 2 on one chunk, block after block. With norm_sq (a group whose projection is
// measured), *norm_sq = the chunk's ||w'||^2, folded into fp64 every kBlock elements.
template <typename T>
void chunk_update(T* w, const T* g, T* b, int64_t n, float inv_scale, UpdateCoefs k, double* norm_sq) {
  double total = 0.0;
  double* block_norm = norm_sq != nullptr ? &total : nullptr;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t size = std::min(kBlock, n - start);
    T* bs = b != nullptr ? b + start : nullptr;
    if constexpr (std::is_same_v<T, float>) {
      block_update_f32(w + start, g + start, bs, size, inv_scale, k, block_norm);
    } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
      block_update_bf16(w + start, g + start, bs, size, inv_scale, k, block_norm);
    } else {
#ifdef ALIG_HAVE_F16C_PATH
      if constexpr (std::is_same_v<T, c10::Half>) {
        if (cpu_has_avx2_f16c()) {
          block_update_f16(w + start, g + start, bs, size, inv_scale, k, block_norm);
          continue;
        }
      }
#endif
      float w32[kBlock], g32[kBlock], b32[kBlock];
      to_float(w + start, w32, size);
      to_float(g + start, g32, size);
      if (bs != nullptr) to_float(bs, b32, size);
      block_update_f32(w32, g32, bs != nullptr ? b32 : nullptr, size, inv_scale, k, block_norm);
      from_float(w32, w + start, size);
      if (bs != nullptr) from_float(b32, bs, size);
    }
  }
  if (norm_sq != nullptr) *norm_sq = total;
}

// The projection pass on one chunk: w *= scale.
template <typename T>
void chunk_scale(T* w, int64_t n, float scale) {
  if constexpr (std::is_same_v<T, float>) {
    block_scale_f32(w, n, scale);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    block_scale_bf16(w, n, scale);
  } else {
#ifdef ALIG_HAVE_F16C_PATH
    if constexpr (std::is_same_v<T, c10::Half>) {
      if (cpu_has_avx2_f16c()) return block_scale_f16(w, n, scale);
    }
#endif
    for (int64_t start = 0; start < n; start += kBlock) {
      const int64_t size = std::min(kBlock, n - start);
      float w32[kBlock];
      to_float(w + start, w32, size);
      block_scale_f32(w32, size, scale);
      from_float(w32, w + start, size);
    }
  }
}

template <typename F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(float{});
    case DType::kBFloat16:
      return f(c10::BFloat16{});
    case DType::kFloat16:
      return f(c10::Half{});
    case DType::kFloat64:
      return f(double{});
  }
}

// Calls fn(c) for every chunk c, splitting the list into one contiguous range of about
// equal work per thread (work_prefix: cumulative cost, size n_chunks + 1).
template <typename F>
void for_each_chunk(const std::vector<int64_t>& work_prefix, int64_t total_elements, const F& fn) {
  const int64_t n_chunks = static_cast<int64_t>(work_prefix.size()) - 1;
  const int64_t parts = std::min<int64_t>(at::get_num_threads(), n_chunks);
  if (parts <= 1 || total_elements < kSerialBelow || at::in_parallel_region()) {
    for (int64_t c = 0; c < n_chunks; ++c) fn(c);
    return;
  }
  const int64_t total = work_prefix.back();
  auto first_chunk = [&](int64_t part) -> int64_t {
    if (part >= parts) return n_chunks;
    const int64_t target = total / parts * part + total % parts * part / parts;
    return std::lower_bound(work_prefix.begin(), work_prefix.end() - 1, target) - work_prefix.begin();
  };
  at::parallel_for(0, parts, 1, [&](int64_t part_begin, int64_t part_end) {
    for (int64_t part = part_begin; part < part_end; ++part) {
      const int64_t end = first_chunk(part + 1);
      for (int64_t c = first_chunk(part); c < end; ++c) fn(c);
    }
  });
}

// Every chunk of every tensor, in tensor order, with the cumulative work for splitting.
struct ChunkPlan {
  std::vector<Chunk> chunks;
  std::vector<int64_t> work_prefix{0};
  int64_t total_elements = 0;
};

ChunkPlan plan_chunks(const StepArgs& args) {
  // Without hparams (alig_apply_) a tensor's buffer, or its absence, is taken as given.
  const double* hp = args.hparams.defined() ? args.hparams.const_data_ptr<double>() : nullptr;
  ChunkPlan plan;
  for (size_t i = 0; i < args.tensors.size(); ++i) {
    const TensorEntry& t = args.tensors[i];
    if (t.numel == 0) continue;
    const double momentum = hp ? hp[t.group * hparam::kCount + hparam::kMomentum] : (t.buffer ? 1.0 : 0.0);
    TORCH_CHECK_VALUE((momentum > 0) == (t.buffer != nullptr), "alig_fused: momentum_buffers[", i, "] is ",
                      t.buffer ? "a buffer" : "empty", " but group ", t.group, " has momentum ", momentum,
                      " (a group without momentum passes an empty tensor, one with momentum a buffer)");
    for (int64_t begin = 0; begin < t.numel; begin += kChunk) {
      const int64_t size = std::min(kChunk, t.numel - begin);
      plan.chunks.push_back({static_cast<int64_t>(i), begin, size});
      plan.work_prefix.push_back(plan.work_prefix.back() + size + kChunkCost);
    }
    plan.total_elements += t.numel;
  }
  return plan;
}

float inv_scale_of(const StepArgs& args) {
  return inverse_grad_scale(args.grad_scale.defined() ? args.grad_scale.const_data_ptr<float>() : nullptr);
}

// Per-chunk partials [n_chunks][width] added per group in chunk order: [n_groups][width].
std::vector<double> sum_by_group(const StepArgs& args, const ChunkPlan& plan, const std::vector<double>& partials,
                                 int width) {
  std::vector<double> sums(args.n_groups * width, 0.0);
  for (size_t c = 0; c < plan.chunks.size(); ++c) {
    double* row = sums.data() + args.tensors[plan.chunks[c].tensor].group * width;
    for (int col = 0; col < width; ++col) row[col] += partials[c * width + col];
  }
  return sums;
}

// How a group's l2-ball projection gets ||w'||:
// - kFromSums: the analytic form of docs/design.md §1, from the pass-1 Gram sums (pass 1 also reads w
//   and b). alig_sums / alig_update_ use it: the sums are what sharded ranks all-reduce.
// - kMeasured: pass 2 measures ||w'|| of the values it writes and a third pass scales w,
//   only for groups the ball binds (as the torch path does). On a CPU reading is what
//   costs (a read-modify-write stream moves its writes almost for free), so this reads
//   5N instead of 6N with momentum, 4N when the ball does not bind. alig_step_ uses it.
enum class Projection { kFromSums, kMeasured };

// Pass 1: per-chunk partial sums, then per group in chunk order: [n_groups][sum::kCount].
std::vector<double> pass1_sums(const StepArgs& args, const ChunkPlan& plan, Projection projection) {
  const double* hp = args.hparams.const_data_ptr<double>();
  const float inv_scale = inv_scale_of(args);
  const int64_t n_chunks = static_cast<int64_t>(plan.chunks.size());
  std::vector<double> partials(n_chunks * sum::kCount);
  for_each_chunk(plan.work_prefix, plan.total_elements, [&](int64_t c) {
    const Chunk& chunk = plan.chunks[c];
    const TensorEntry& t = args.tensors[chunk.tensor];
    const bool project =
        projection == Projection::kFromSums && is_finite(hp[t.group * hparam::kCount + hparam::kMaxNorm]);
    dispatch_dtype(t.dtype, [&](auto tag) {
      using T = decltype(tag);
      chunk_sums<T>(static_cast<const T*>(t.param) + chunk.begin, static_cast<const T*>(t.grad) + chunk.begin,
                    t.buffer ? static_cast<const T*>(t.buffer) + chunk.begin : nullptr, chunk.size, inv_scale,
                    project, partials.data() + c * sum::kCount);
    });
  });
  return sum_by_group(args, plan, partials, sum::kCount);
}

// Pass 2: one read-modify-write of parameters and buffers, with coefs [n_groups][coef::kCount].
// With measure_group (per group, 1 = measure), also ||w'||^2 of each chunk of those groups
// into norm_partials[chunk].
void pass2_update(const StepArgs& args, const ChunkPlan& plan, const float* coefs, const char* measure_group,
                  double* norm_partials) {
  const float inv_scale = inv_scale_of(args);
  for_each_chunk(plan.work_prefix, plan.total_elements, [&](int64_t c) {
    const Chunk& chunk = plan.chunks[c];
    const TensorEntry& t = args.tensors[chunk.tensor];
    const UpdateCoefs k = load_coefs(coefs + t.group * coef::kCount);
    double* norm_sq = measure_group != nullptr && measure_group[t.group] ? norm_partials + c : nullptr;
    dispatch_dtype(t.dtype, [&](auto tag) {
      using T = decltype(tag);
      chunk_update<T>(static_cast<T*>(t.param) + chunk.begin, static_cast<const T*>(t.grad) + chunk.begin,
                      t.buffer ? static_cast<T*>(t.buffer) + chunk.begin : nullptr, chunk.size, inv_scale, k,
                      norm_sq);
    });
  });
}

// Finalize (functional.finalize, alig_math.h) from the sums, then pass 2 (and, measuring
// the projection, pass 3) unless the step is skipped.
void finalize_and_update(const StepArgs& args, const ChunkPlan& plan, const double* sums, const at::Tensor& step_size,
                         const at::Tensor& skipped_steps, Projection projection) {
  const int64_t n_groups = args.n_groups;
  const double* hp = args.hparams.const_data_ptr<double>();
  const double loss_value = *args.loss.const_data_ptr<double>();
  const bool found_inf_set = args.found_inf.defined() && *args.found_inf.const_data_ptr<float>() > 0;
  const double grad_sq_norm = total_grad_sq_norm(sums, n_groups);
  const bool skip = step_is_skipped(loss_value, grad_sq_norm, found_inf_set);
  const bool measured = projection == Projection::kMeasured;
  std::vector<float> coefs(n_groups * coef::kCount);
  std::vector<char> measure_group(n_groups, 0);
  float* step_size_out = step_size.data_ptr<float>();
  for (int64_t k = 0; k < n_groups; ++k) {
    double row[hparam::kCount];
    std::copy(hp + k * hparam::kCount, hp + (k + 1) * hparam::kCount, row);
    if (measured && is_finite(row[hparam::kMaxNorm])) {
      measure_group[k] = 1;
      row[hparam::kMaxNorm] = std::numeric_limits<double>::infinity();  // pass 2 writes w' unscaled; pass 3 scales it
    }
    step_size_out[k] = static_cast<float>(
        finalize_group(row, sums + k * sum::kCount, loss_value, grad_sq_norm, skip, coefs.data() + k * coef::kCount));
  }
  if (skip) {  // nothing is written: a non-finite g must not reach memory (0 * inf = nan)
    *skipped_steps.data_ptr<int64_t>() += 1;
    return;
  }

  std::vector<double> norm_partials(measured ? plan.chunks.size() : 0, 0.0);
  pass2_update(args, plan, coefs.data(), measured ? measure_group.data() : nullptr, norm_partials.data());
  if (!measured) return;

  // Pass 3, for the groups the ball binds: w *= min(1, R / ||w'||).
  const std::vector<double> norm_sq = sum_by_group(args, plan, norm_partials, 1);
  std::vector<float> scale(n_groups, 1.0f);
  bool any_binds = false;
  for (int64_t k = 0; k < n_groups; ++k) {
    if (!measure_group[k]) continue;
    scale[k] = static_cast<float>(projection_scale(norm_sq[k], hp[k * hparam::kCount + hparam::kMaxNorm]));
    any_binds = any_binds || scale[k] != 1.0f;
  }
  if (!any_binds) return;
  for_each_chunk(plan.work_prefix, plan.total_elements, [&](int64_t c) {
    const Chunk& chunk = plan.chunks[c];
    const TensorEntry& t = args.tensors[chunk.tensor];
    if (scale[t.group] == 1.0f) return;
    dispatch_dtype(t.dtype, [&](auto tag) {
      using T = decltype(tag);
      chunk_scale<T>(static_cast<T*>(t.param) + chunk.begin, chunk.size, scale[t.group]);
    });
  });
}

// ---- the ops' CPU passes (alig_ops.cpp validates the arguments and calls these) -------------

void step_cpu(const StepArgs& args, const at::Tensor& step_size, const at::Tensor& skipped_steps) {
  const ChunkPlan plan = plan_chunks(args);
  const std::vector<double> sums = pass1_sums(args, plan, Projection::kMeasured);
  finalize_and_update(args, plan, sums.data(), step_size, skipped_steps, Projection::kMeasured);
}

at::Tensor sums_cpu(const StepArgs& args) {
  const std::vector<double> sums = pass1_sums(args, plan_chunks(args), Projection::kFromSums);
  at::Tensor out = at::empty({args.n_groups, sum::kCount}, args.hparams.options());
  std::copy(sums.begin(), sums.end(), out.data_ptr<double>());
  return out;
}

void update_cpu(const StepArgs& args, const at::Tensor& sums, const at::Tensor& step_size,
                const at::Tensor& skipped_steps) {
  finalize_and_update(args, plan_chunks(args), sums.const_data_ptr<double>(), step_size, skipped_steps,
                      Projection::kFromSums);
}

// Pass 2 alone, from given coefficients (FusedMoMo): finalize_and_update's pass 2.
void apply_cpu(const StepArgs& args, const at::Tensor& coefs, const at::Tensor& skip) {
  if (*skip.const_data_ptr<bool>()) return;  // a non-finite g must not reach memory
  pass2_update(args, plan_chunks(args), coefs.const_data_ptr<float>(), nullptr, nullptr);
}

}  // namespace

const DevicePasses& cpu_passes() {
  static const DevicePasses passes{step_cpu, sums_cpu, update_cpu, apply_cpu};
  return passes;
}

}  // namespace alig_fused
