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
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
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
// Independent fp32 accumulators: one AVX-512 register, two AVX2 ones. Each lane's sum is a
// chain of dependent adds: bf16 pass 1 over 124M elements took 20.0 ms with 8 lanes, 14.9 ms
// with 16 and 19.5 ms with 32 (2-core Xeon with AVX-512, two threads; fp32: 24 ms).
constexpr int kLanes = 16;
constexpr int64_t kChunkCost = 512;       // a chunk's fixed cost, in elements, for splitting work
constexpr int64_t kSerialBelow = 1 << 15;  // fewer elements than this: one thread, no fork
// Each kernel loop prefetches its streams this far ahead. A core's hardware prefetchers
// alone left the streams short of memory speed: on a 2-core Xeon (AVX-512), bf16 pass 2 of
// 124M elements went from 40.2 to 31.6 ms with 1 KiB (two threads; 256 B: 33.7, 4 KiB: 32.5),
// against 39.3 ms for torch's fused SGD on the same data.
constexpr int64_t kPrefetchBytes = 1024;

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t size;
};

// The block kernels below are built for three instruction sets on x86-64 (generic SSE2,
// AVX2 + F16C, AVX-512 F/BW/VL/DQ) and picked once at run time: the best the CPU has, capped
// by the environment variable ALIG_FUSED_CPU_ISA (generic, avx2 or avx512), which the tests
// use to run every path on one machine. No FMA in any (and -ffp-contract=off), and sums in
// the same lane order, so all give the same bits (tests/test_cpp_bf16.py).
// The fp32 kernels are written with 8-lane vector types: GCC's auto-vectorizer left the
// pass-1 projection sums (6 accumulators x 8 lanes) scalar, which made pass 1 with max_norm
// take ~19 ms for ResNet-50's 25.6M fp32 parameters instead of ~5.
enum class Isa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ALIG_X86_PATHS 1
#define ALIG_AVX2 __attribute__((target("avx2,f16c")))
#define ALIG_AVX512 __attribute__((target("avx2,f16c,avx512f,avx512bw,avx512vl,avx512dq")))
#endif

Isa detect_isa() {
#ifdef ALIG_X86_PATHS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) return Isa::kAvx2;
#endif
  return Isa::kGeneric;
}

Isa cpu_isa() {
  static const Isa isa = [] {
    const Isa best = detect_isa();
    const char* cap = std::getenv("ALIG_FUSED_CPU_ISA");
    if (cap == nullptr || *cap == '\0') return best;
    const std::string name(cap);
    const Isa wanted = name == "generic" ? Isa::kGeneric : name == "avx2" ? Isa::kAvx2 : Isa::kAvx512;
    TORCH_CHECK_VALUE(name == "generic" || name == "avx2" || name == "avx512",
                      "alig_fused: ALIG_FUSED_CPU_ISA=", name, " is not one of generic, avx2, avx512");
    return std::min(best, wanted);
  }();
  return isa;
}

// The fp32 vectors of the block kernels: 8 lanes (a ymm register; generic and AVX2 code) or
// 16 (a zmm register; AVX-512). Which one a kernel uses follows from the storage type its
// pointers have (load_lanes overloads): float, bf16 and fp16 load 8 lanes; F32Avx512 and
// Bf16Avx512, the same storage under other names, 16. (16-lane generic vectors in AVX2 code
// made GCC 12 keep them in memory: 3x slower.)
typedef float Lanes __attribute__((vector_size(8 * sizeof(float))));
typedef float Lanes16 __attribute__((vector_size(16 * sizeof(float))));
static_assert(kLanes % 16 == 0, "kLanes: whole vectors of 8 and of 16 lanes");
// Lanes are returned by value from internal helpers only (inlined): no ABI to keep stable.
#pragma GCC diagnostic ignored "-Wpsabi"
// GCC 12's AVX-512 shift intrinsics pass _mm512_undefined_epi32(), which it then reports as
// "may be used uninitialized" (a false positive inside its own header).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

inline Lanes load_lanes(const float* p) {
  Lanes v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store_lanes(float* p, Lanes v) { std::memcpy(p, &v, sizeof(v)); }

// bf16 converted in registers (no block buffers): bf16 -> fp32 is a 16-bit left shift;
// fp32 -> bf16 rounds to nearest even with nan -> 0x7FC0, as c10::BFloat16(float).
typedef uint16_t U16Lanes __attribute__((vector_size(8 * sizeof(uint16_t))));
typedef uint32_t U32Lanes __attribute__((vector_size(8 * sizeof(uint32_t))));
typedef int32_t I32Lanes __attribute__((vector_size(8 * sizeof(int32_t))));

inline uint16_t bf16_bits(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const uint32_t rounded = (bits + UINT32_C(0x7FFF) + ((bits >> 16) & 1)) >> 16;
  const bool is_nan = (bits & UINT32_C(0x7FFFFFFF)) > UINT32_C(0x7F800000);
  return static_cast<uint16_t>(is_nan ? UINT32_C(0x7FC0) : rounded);
}

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

#ifdef ALIG_X86_PATHS
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
ALIG_AVX2 inline __m256i bf16_bits_avx2(__m256 x) {
  const __m256i bits = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), lsb);
  const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  return _mm256_srli_epi32(_mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC00000), is_nan), 16);
}

ALIG_AVX2 inline __m256 load8_bf16_avx2(const void* p) {
  const __m128i h = _mm_loadu_si128(static_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// packus packs per 128-bit half; the permute puts the quads back in element order.
ALIG_AVX2 inline void store8_bf16_avx2(void* p, __m256 x) {
  const __m256i h = bf16_bits_avx2(x);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(h, h), 0x08);
  _mm_storeu_si128(static_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

// 16 elements in two vectors, lo = elements 0-3 and 8-11, hi = 4-7 and 12-15: one load and
// two unpacks (each bf16 goes to the high half of a 32-bit lane), and the store packs them
// back in order without a permute. For element-wise work only; sums need the element order.
ALIG_AVX2 inline void load16_bf16_avx2(const void* p, __m256& lo, __m256& hi) {
  const __m256i h = _mm256_loadu_si256(static_cast<const __m256i*>(p));
  lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), h));
  hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), h));
}

ALIG_AVX2 inline void store16_bf16_avx2(void* p, __m256 lo, __m256 hi) {
  _mm256_storeu_si256(static_cast<__m256i*>(p), _mm256_packus_epi32(bf16_bits_avx2(lo), bf16_bits_avx2(hi)));
}

ALIG_AVX2 inline Lanes load_lanes(const Bf16Avx2* p) {
  const __m256 x = load8_bf16_avx2(p);
  Lanes v;
  std::memcpy(&v, &x, sizeof(v));
  return v;
}

ALIG_AVX2 inline void store_lanes(Bf16Avx2* p, Lanes v) {
  __m256 x;
  std::memcpy(&x, &v, sizeof(x));
  store8_bf16_avx2(p, x);
}

// Bf16Avx512: the same storage for the AVX-512 kernels (16 lanes: one register).
struct Bf16Avx512 {
  uint16_t x;
};
static_assert(sizeof(Bf16Avx512) == sizeof(c10::BFloat16), "Bf16Avx512 must alias bf16 storage");

ALIG_AVX512 inline Lanes16 load_lanes(const Bf16Avx512* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m512 x = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  Lanes16 v;
  std::memcpy(&v, &x, sizeof(v));
  return v;
}

// F32Avx512: fp32 storage for the AVX-512 kernels.
struct F32Avx512 {
  float x;
};
static_assert(sizeof(F32Avx512) == sizeof(float), "F32Avx512 must alias fp32 storage");

ALIG_AVX512 inline Lanes16 load_lanes(const F32Avx512* p) {
  Lanes16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

ALIG_AVX512 inline void store_lanes(F32Avx512* p, Lanes16 v) { std::memcpy(p, &v, sizeof(v)); }


// fp16 in registers with F16C, used only by the AVX2 + F16C kernels below (picked at run
// time); without them, fp16 goes through fp32 block buffers.
ALIG_AVX2 inline Lanes load_lanes(const c10::Half* p) {
  Lanes v;
  const __m256 x = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  std::memcpy(&v, &x, sizeof(v));
  return v;
}

ALIG_AVX2 inline void store_lanes(c10::Half* p, Lanes v) {
  __m256 x;
  std::memcpy(&x, &v, sizeof(x));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
}

#endif

// Prefetches (for reading) kPrefetchBytes ahead of each non-null pointer. A prefetch never
// faults, also past the end of a tensor; the address is computed as an integer, since a
// pointer that far past the end of an object is undefined (GCC's -Warray-bounds said so).
template <typename... P>
inline void prefetch_ahead(const P*... p) {
  ((p != nullptr ? __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(p) + kPrefetchBytes))
                 : void()),
   ...);
}

// A block's last n % kLanes elements, zero-padded to kLanes, so that the tail runs the
// vector loop body once: the padding lanes add 0 to every sum. (Indexing the accumulators
// lane by lane instead kept them in memory for the whole loop: 16-lane sums under AVX2
// ran 3x slower.)
template <typename T>
struct PaddedTail {
  T v[kLanes] = {};
  PaddedTail(const T* p, int64_t n) {
    if (p != nullptr) std::copy(p, p + n, v);
  }
};

// The vector type load_lanes gives for storage T, and its lane count.
template <typename T>
using VecOf = decltype(load_lanes(static_cast<const T*>(nullptr)));
template <typename T>
constexpr int kWidth = sizeof(VecOf<T>) / sizeof(float);

// Pass 1 on one block of n <= kBlock elements: kLanes fp32 accumulators per sum (lane
// j takes elements j, j + kLanes, ...), folded into the fp64 totals in lane order. Sums:
// g*g (g unscaled) and, for a group with max_norm, w*w, w*g and with a buffer b*b, w*b,
// b*g. T: float, or bf16 / fp16 converted in registers.
template <typename T>
inline void block_sums_impl(const T* __restrict__ w, const T* __restrict__ g, const T* __restrict__ b, int64_t n,
                            float inv_scale, bool project, bool has_buffer, double* __restrict__ total) {
  using V = VecOf<T>;
  constexpr int W = kWidth<T>, kVecs = kLanes / W;  // lane j of the sums is lane j % W of vector j / W
  V gg[kVecs] = {}, ww[kVecs] = {}, bb[kVecs] = {}, wb[kVecs] = {}, wg[kVecs] = {}, bg[kVecs] = {};
  const V inv = V{} + inv_scale;
  const int64_t n_full = n / kLanes * kLanes;
  auto sums = [&](const T* wp, const T* gp, const T* bp, int64_t count) {
    for (int64_t i = 0; i < count; i += kLanes) {
#pragma GCC unroll 2
      for (int h = 0; h < kVecs; ++h) {
        const int64_t at = i + h * W;
        prefetch_ahead(gp + at, project ? wp + at : nullptr, project && has_buffer ? bp + at : nullptr);
        const V gv = load_lanes(gp + at) * inv;
        gg[h] += gv * gv;
        if (!project) continue;
        const V wv = load_lanes(wp + at);
        ww[h] += wv * wv;
        wg[h] += wv * gv;
        if (!has_buffer) continue;
        const V bv = load_lanes(bp + at);
        bb[h] += bv * bv;
        wb[h] += wv * bv;
        bg[h] += bv * gv;
      }
    }
  };
  sums(w, g, b, n_full);
  if (n_full < n) {
    const int64_t rest = n - n_full;
    const PaddedTail<T> wt(project ? w + n_full : nullptr, rest), gt(g + n_full, rest),
        bt(project && has_buffer ? b + n_full : nullptr, rest);
    sums(wt.v, gt.v, bt.v, kLanes);
  }
  // Only the sums this block has (the others stay 0): the fold is 16 dependent fp64 adds per
  // sum, and folding all six made bf16 pass 1 21% slower (one thread, 124M elements: 36.8
  // against 30.3 ms).
  auto fold = [&](int col, const V (&acc)[kVecs]) {
    for (int lane = 0; lane < kLanes; ++lane) total[col] += acc[lane / W][lane % W];
  };
  fold(sum::kGG, gg);
  if (project) {
    fold(sum::kWW, ww);
    fold(sum::kWG, wg);
    if (has_buffer) {
      fold(sum::kBB, bb);
      fold(sum::kWB, wb);
      fold(sum::kBG, bg);
    }
  }
}

// Pass 2 on one block of n <= kBlock elements, in place: alig_math.h's update_element,
// lane-wise. With norm_sq, also adds ||w'||^2 (of the fp32 values, before rounding to
// storage) to *norm_sq, in the lane order of block_sums_impl (the tail's padding lanes
// compute w' = 0 from zeros: finite coefficients on a step that is not skipped).
template <typename T>
inline void block_update_impl(T* __restrict__ w, const T* __restrict__ g, T* __restrict__ b, int64_t n,
                              float inv_scale, UpdateCoefs k, double* __restrict__ norm_sq) {
  using V = VecOf<T>;
  constexpr int W = kWidth<T>, kVecs = kLanes / W;
  const V inv = V{} + inv_scale, a = V{} + k.a, c = V{} + k.c, d = V{} + k.d, mu = V{} + k.mu,
          scale = V{} + k.scale;
  const bool measure = norm_sq != nullptr;
  V ww[kVecs] = {};
  auto update = [&](T* wp, const T* gp, T* bp, int64_t count) {
    for (int64_t i = 0; i < count; i += kLanes) {
#pragma GCC unroll 2
      for (int h = 0; h < kVecs; ++h) {
        const int64_t at = i + h * W;
        prefetch_ahead(wp + at, gp + at, bp != nullptr ? bp + at : nullptr);
        const V gv = load_lanes(gp + at) * inv;
        V wv = load_lanes(wp + at) - c * gv;  // the order of update_element
        if (bp != nullptr) {
          const V bv = load_lanes(bp + at);
          wv = wv + a * bv;
          store_lanes(bp + at, bv * mu - d * gv);
        }
        wv = wv * scale;
        if (measure) ww[h] += wv * wv;
        store_lanes(wp + at, wv);
      }
    }
  };
  const int64_t n_full = n / kLanes * kLanes;
  update(w, g, b, n_full);
  if (n_full < n) {
    const int64_t rest = n - n_full;
    PaddedTail<T> wt(w + n_full, rest), bt(b != nullptr ? b + n_full : nullptr, rest);
    const PaddedTail<T> gt(g + n_full, rest);
    update(wt.v, gt.v, b != nullptr ? bt.v : nullptr, kLanes);
    std::copy(wt.v, wt.v + rest, w + n_full);
    if (b != nullptr) std::copy(bt.v, bt.v + rest, b + n_full);
  }
  if (measure) {
    for (int lane = 0; lane < kLanes; ++lane) *norm_sq += ww[lane / W][lane % W];
  }
}

// The projection pass on n elements, in place: w = w * scale in fp32.
template <typename T>
inline void block_scale_impl(T* __restrict__ w, int64_t n, float scale) {
  using V = VecOf<T>;
  constexpr int W = kWidth<T>;
  const V s = V{} + scale;
  const int64_t n_full = n / W * W;
  for (int64_t i = 0; i < n_full; i += W) {
    prefetch_ahead(w + i);
    store_lanes(w + i, load_lanes(w + i) * s);
  }
  if (n_full < n) {
    PaddedTail<T> wt(w + n_full, n - n_full);
    store_lanes(wt.v, load_lanes(wt.v) * s);
    std::copy(wt.v, wt.v + (n - n_full), w + n_full);
  }
}

// fp32: block_*_impl built generic, with AVX2 and with AVX-512 (16 lanes: one zmm register).
// S: the storage name whose load_lanes sets the width (float: 8 lanes, F32Avx512: 16).
#define ALIG_F32_KERNELS(isa, attrs, S)                                                                      \
  attrs __attribute__((flatten)) void block_sums_f32_##isa(const float* w, const float* g, const float* b,    \
                                                           int64_t n, float inv_scale, bool project,         \
                                                           bool has_buffer, double* total) {                 \
    block_sums_impl(reinterpret_cast<const S*>(w), reinterpret_cast<const S*>(g), reinterpret_cast<const S*>(b), \
                    n, inv_scale, project, has_buffer, total);                                                \
  }                                                                                                           \
  attrs __attribute__((flatten)) void block_update_f32_##isa(float* w, const float* g, float* b, int64_t n,   \
                                                             float inv_scale, UpdateCoefs k, double* norm_sq) { \
    block_update_impl(reinterpret_cast<S*>(w), reinterpret_cast<const S*>(g), reinterpret_cast<S*>(b), n,    \
                      inv_scale, k, norm_sq);                                                                 \
  }                                                                                                           \
  attrs __attribute__((flatten)) void block_scale_f32_##isa(float* w, int64_t n, float scale) {              \
    block_scale_impl(reinterpret_cast<S*>(w), n, scale);                                                      \
  }
ALIG_F32_KERNELS(generic, , float)
#ifdef ALIG_X86_PATHS
ALIG_F32_KERNELS(avx2, ALIG_AVX2, float)
ALIG_F32_KERNELS(avx512, ALIG_AVX512, F32Avx512)
#endif
#undef ALIG_F32_KERNELS

void block_sums_f32(const float* w, const float* g, const float* b, int64_t n, float inv_scale, bool project,
                    bool has_buffer, double* total) {
#ifdef ALIG_X86_PATHS
  if (cpu_isa() >= Isa::kAvx512) return block_sums_f32_avx512(w, g, b, n, inv_scale, project, has_buffer, total);
  if (cpu_isa() >= Isa::kAvx2) return block_sums_f32_avx2(w, g, b, n, inv_scale, project, has_buffer, total);
#endif
  block_sums_f32_generic(w, g, b, n, inv_scale, project, has_buffer, total);
}

void block_update_f32(float* w, const float* g, float* b, int64_t n, float inv_scale, UpdateCoefs k,
                      double* norm_sq) {
#ifdef ALIG_X86_PATHS
  if (cpu_isa() >= Isa::kAvx512) return block_update_f32_avx512(w, g, b, n, inv_scale, k, norm_sq);
  if (cpu_isa() >= Isa::kAvx2) return block_update_f32_avx2(w, g, b, n, inv_scale, k, norm_sq);
#endif
  block_update_f32_generic(w, g, b, n, inv_scale, k, norm_sq);
}

void block_scale_f32(float* w, int64_t n, float scale) {
#ifdef ALIG_X86_PATHS
  if (cpu_isa() >= Isa::kAvx512) return block_scale_f32_avx512(w, n, scale);
  if (cpu_isa() >= Isa::kAvx2) return block_scale_f32_avx2(w, n, scale);
#endif
  block_scale_f32_generic(w, n, scale);
}

// bf16 kernels: AVX-512 or AVX2 intrinsics where the CPU has them, else the portable
// conversion (generic x86-64 / other architectures). All round alike (tests/test_cpp_bf16.py,
// tests/test_cpu_isa.py).
#ifdef ALIG_X86_PATHS
inline const Bf16Avx2* as_avx2(const c10::BFloat16* p) { return reinterpret_cast<const Bf16Avx2*>(p); }
inline Bf16Avx2* as_avx2(c10::BFloat16* p) { return reinterpret_cast<Bf16Avx2*>(p); }

ALIG_AVX2 __attribute__((flatten)) void block_sums_bf16_avx2(const c10::BFloat16* __restrict__ w,
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
// GradScaler) skips that multiply (g * 1 is g). With norm_sq, ||w'||^2 goes to the 16 lanes
// in block_update_impl's order (elements 0-7 to lanes 0-7, 8-15 to 8-15), after two lane permutes.
template <bool kScaled>
ALIG_AVX2 __attribute__((always_inline)) inline void update_bf16_avx2(__m256& w, const __m256 g_raw, __m256* b,
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
ALIG_AVX2 __attribute__((flatten)) void block_update_bf16_avx2_impl(c10::BFloat16* __restrict__ w,
                                                                           const c10::BFloat16* __restrict__ g,
                                                                           c10::BFloat16* __restrict__ b, int64_t n,
                                                                           float inv_scale, UpdateCoefs k,
                                                                           double* norm_sq) {
  const __m256 coefs[6] = {_mm256_set1_ps(inv_scale), _mm256_set1_ps(k.a),  _mm256_set1_ps(k.c),
                           _mm256_set1_ps(k.d),       _mm256_set1_ps(k.mu), _mm256_set1_ps(k.scale)};
  const bool measure = norm_sq != nullptr;
  __m256 ww[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};  // lanes 0-7 and 8-15
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256 w0, w1, g0, g1, b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps(), bn0, bn1;
    prefetch_ahead(w + i, g + i, kBuffer ? b + i : nullptr);
    load16_bf16_avx2(w + i, w0, w1);
    load16_bf16_avx2(g + i, g0, g1);
    if (kBuffer) load16_bf16_avx2(b + i, b0, b1);
    update_bf16_avx2<kScaled>(w0, g0, kBuffer ? &b0 : nullptr, coefs, &bn0);
    update_bf16_avx2<kScaled>(w1, g1, kBuffer ? &b1 : nullptr, coefs, &bn1);
    if (measure) {
      const __m256 first = _mm256_permute2f128_ps(w0, w1, 0x20), second = _mm256_permute2f128_ps(w0, w1, 0x31);
      ww[0] = _mm256_add_ps(ww[0], _mm256_mul_ps(first, first));
      ww[1] = _mm256_add_ps(ww[1], _mm256_mul_ps(second, second));
    }
    if (kBuffer) store16_bf16_avx2(b + i, bn0, bn1);
    store16_bf16_avx2(w + i, w0, w1);
  }
  for (; i + 8 <= n; i += 8) {
    __m256 w0 = load8_bf16_avx2(w + i), b0 = kBuffer ? load8_bf16_avx2(b + i) : _mm256_setzero_ps(), bn0;
    update_bf16_avx2<kScaled>(w0, load8_bf16_avx2(g + i), kBuffer ? &b0 : nullptr, coefs, &bn0);
    if (measure) ww[0] = _mm256_add_ps(ww[0], _mm256_mul_ps(w0, w0));  // i is a multiple of 16 here
    if (kBuffer) store8_bf16_avx2(b + i, bn0);
    store8_bf16_avx2(w + i, w0);
  }
  alignas(32) float lanes[kLanes];
  _mm256_store_ps(lanes, ww[0]);
  _mm256_store_ps(lanes + 8, ww[1]);
  for (int64_t lane = i % kLanes; i < n; ++i, ++lane) {  // the tail, as block_update_impl's
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

ALIG_AVX2 void block_update_bf16_avx2(c10::BFloat16* w, const c10::BFloat16* g,
                                                             c10::BFloat16* b, int64_t n, float inv_scale,
                                                             UpdateCoefs k, double* norm_sq) {
  if (inv_scale == 1.0f) {
    if (b != nullptr) return block_update_bf16_avx2_impl<false, true>(w, g, b, n, inv_scale, k, norm_sq);
    return block_update_bf16_avx2_impl<false, false>(w, g, b, n, inv_scale, k, norm_sq);
  }
  if (b != nullptr) return block_update_bf16_avx2_impl<true, true>(w, g, b, n, inv_scale, k, norm_sq);
  block_update_bf16_avx2_impl<true, false>(w, g, b, n, inv_scale, k, norm_sq);
}

ALIG_AVX2 __attribute__((flatten)) void block_scale_bf16_avx2(c10::BFloat16* __restrict__ w, int64_t n,
                                                                     float scale) {
  const __m256 s = _mm256_set1_ps(scale);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256 lo, hi;
    prefetch_ahead(w + i);
    load16_bf16_avx2(w + i, lo, hi);
    store16_bf16_avx2(w + i, _mm256_mul_ps(lo, s), _mm256_mul_ps(hi, s));
  }
  for (; i + 8 <= n; i += 8) store8_bf16_avx2(w + i, _mm256_mul_ps(load8_bf16_avx2(w + i), s));
  for (; i < n; ++i) store_one(as_avx2(w) + i, load_one(as_avx2(w) + i) * scale);
}
#endif

#ifdef ALIG_X86_PATHS
// Pass 2 and the projection pass for bf16 with AVX-512: the AVX2 kernels' operations 32
// elements at a time (load16's lane order per 128-bit lane), the tail by masked loads and
// stores. Half the AVX2 kernels' instructions per element: on an AVX2-only CPU the bf16
// step was compute-bound (~27 instructions per 8 elements, 7 of them per rounding).
ALIG_AVX512 inline __m512i bf16_bits_avx512(__m512 x) {  // bf16_bits_avx2, 16 wide
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), lsb);
  const __mmask16 is_nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  return _mm512_srli_epi32(_mm512_mask_mov_epi32(rounded, is_nan, _mm512_set1_epi32(0x7FC00000)), 16);
}

// 32 elements (those of mask m; the others read as 0): lo = elements 0-3, 8-11, 16-19,
// 24-27, hi = 4-7, 12-15, 20-23, 28-31.
template <bool kMasked>
ALIG_AVX512 __attribute__((always_inline)) inline void load32_bf16_avx512(const void* p, __mmask32 m, __m512& lo,
                                                                           __m512& hi) {
  const __m512i h = kMasked ? _mm512_maskz_loadu_epi16(m, p) : _mm512_loadu_si512(p);
  lo = _mm512_castsi512_ps(_mm512_unpacklo_epi16(_mm512_setzero_si512(), h));
  hi = _mm512_castsi512_ps(_mm512_unpackhi_epi16(_mm512_setzero_si512(), h));
}

template <bool kMasked>
ALIG_AVX512 __attribute__((always_inline)) inline void store32_bf16_avx512(void* p, __mmask32 m, __m512 lo,
                                                                            __m512 hi) {
  const __m512i h = _mm512_packus_epi32(bf16_bits_avx512(lo), bf16_bits_avx512(hi));
  if (kMasked) {
    _mm512_mask_storeu_epi16(p, m, h);
  } else {
    _mm512_storeu_si512(p, h);
  }
}

// ww (16 lanes) += the squares of 32 values in load32's order, in block_update_impl's order:
// lane j takes elements j, then j + 16.
ALIG_AVX512 __attribute__((always_inline)) inline __m512 add_squares_in_order(__m512 ww, __m512 lo, __m512 hi) {
  const __m512 lo2 = _mm512_mul_ps(lo, lo), hi2 = _mm512_mul_ps(hi, hi);
  const __m512 e0_15 =
      _mm512_permutex2var_ps(lo2, _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23), hi2);
  const __m512 e16_31 =
      _mm512_permutex2var_ps(lo2, _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31), hi2);
  return _mm512_add_ps(_mm512_add_ps(ww, e0_15), e16_31);
}

// Elements 0 .. n - 1 of 32 (n <= 32) as masks: of the bf16 words, and of load32's lo and hi.
struct TailMasks {
  __mmask32 words;
  __mmask16 lo, hi;
};

ALIG_AVX512 inline TailMasks tail_masks(int64_t n) {
  const __m512i count = _mm512_set1_epi32(static_cast<int>(n));
  const __m512i lo_index = _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27);
  return {static_cast<__mmask32>((UINT64_C(1) << n) - 1), _mm512_cmplt_epi32_mask(lo_index, count),
          _mm512_cmplt_epi32_mask(_mm512_add_epi32(lo_index, _mm512_set1_epi32(4)), count)};
}

template <bool kScaled, bool kBuffer, bool kMeasure, bool kMasked>
ALIG_AVX512 __attribute__((always_inline)) inline void update32_bf16_avx512(c10::BFloat16* w, const c10::BFloat16* g,
                                                                             c10::BFloat16* b, TailMasks tail,
                                                                             const __m512 (&k)[6], __m512& ww) {
  const __mmask32 m = tail.words;
  enum { kInv, kA, kC, kD, kMu, kScale };
  __m512 w_v[2], g_v[2], b_v[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
  load32_bf16_avx512<kMasked>(w, m, w_v[0], w_v[1]);
  load32_bf16_avx512<kMasked>(g, m, g_v[0], g_v[1]);
  if (kBuffer) load32_bf16_avx512<kMasked>(b, m, b_v[0], b_v[1]);
  for (int h = 0; h < 2; ++h) {  // update_element's order, as update_bf16_avx2
    const __m512 gv = kScaled ? _mm512_mul_ps(g_v[h], k[kInv]) : g_v[h];
    __m512 wv = _mm512_sub_ps(w_v[h], _mm512_mul_ps(k[kC], gv));
    if (kBuffer) {
      wv = _mm512_add_ps(wv, _mm512_mul_ps(k[kA], b_v[h]));
      b_v[h] = _mm512_sub_ps(_mm512_mul_ps(b_v[h], k[kMu]), _mm512_mul_ps(k[kD], gv));
    }
    w_v[h] = _mm512_mul_ps(wv, k[kScale]);
  }
  if (kMeasure) {
    // the masked-off lanes (read as 0) are updated too; their squares must add nothing
    ww = kMasked ? add_squares_in_order(ww, _mm512_maskz_mov_ps(tail.lo, w_v[0]), _mm512_maskz_mov_ps(tail.hi, w_v[1]))
                 : add_squares_in_order(ww, w_v[0], w_v[1]);
  }
  if (kBuffer) store32_bf16_avx512<kMasked>(b, m, b_v[0], b_v[1]);
  store32_bf16_avx512<kMasked>(w, m, w_v[0], w_v[1]);
}

template <bool kScaled, bool kBuffer, bool kMeasure>
ALIG_AVX512 __attribute__((flatten)) void block_update_bf16_avx512_impl(c10::BFloat16* __restrict__ w,
                                                                         const c10::BFloat16* __restrict__ g,
                                                                         c10::BFloat16* __restrict__ b, int64_t n,
                                                                         float inv_scale, UpdateCoefs k,
                                                                         double* norm_sq) {
  const __m512 coefs[6] = {_mm512_set1_ps(inv_scale), _mm512_set1_ps(k.a),  _mm512_set1_ps(k.c),
                           _mm512_set1_ps(k.d),       _mm512_set1_ps(k.mu), _mm512_set1_ps(k.scale)};
  __m512 ww = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    prefetch_ahead(w + i, g + i, kBuffer ? b + i : nullptr);
    update32_bf16_avx512<kScaled, kBuffer, kMeasure, false>(w + i, g + i, kBuffer ? b + i : nullptr, {}, coefs, ww);
  }
  if (i < n) {
    update32_bf16_avx512<kScaled, kBuffer, kMeasure, true>(w + i, g + i, kBuffer ? b + i : nullptr, tail_masks(n - i),
                                                           coefs, ww);
  }
  if (kMeasure) {
    alignas(64) float lanes[kLanes];
    _mm512_store_ps(lanes, ww);
    for (int lane = 0; lane < kLanes; ++lane) *norm_sq += lanes[lane];
  }
}

ALIG_AVX512 __attribute__((flatten)) void block_sums_bf16_avx512(const c10::BFloat16* __restrict__ w,
                                                                  const c10::BFloat16* __restrict__ g,
                                                                  const c10::BFloat16* __restrict__ b, int64_t n,
                                                                  float inv_scale, bool project, bool has_buffer,
                                                                  double* __restrict__ total) {
  using T = const Bf16Avx512*;
  block_sums_impl(reinterpret_cast<T>(w), reinterpret_cast<T>(g), reinterpret_cast<T>(b), n, inv_scale, project,
                  has_buffer, total);
}

ALIG_AVX512 void block_update_bf16_avx512(c10::BFloat16* w, const c10::BFloat16* g, c10::BFloat16* b, int64_t n,
                                          float inv_scale, UpdateCoefs k, double* norm_sq) {
  // 1/grad_scale = 1 (no GradScaler) skips that multiply, as in the AVX2 kernel
  const bool scaled = inv_scale != 1.0f, buffer = b != nullptr, measure = norm_sq != nullptr;
  using Kernel = void (*)(c10::BFloat16*, const c10::BFloat16*, c10::BFloat16*, int64_t, float, UpdateCoefs, double*);
  static constexpr Kernel kernels[8] = {
      block_update_bf16_avx512_impl<false, false, false>, block_update_bf16_avx512_impl<false, false, true>,
      block_update_bf16_avx512_impl<false, true, false>,  block_update_bf16_avx512_impl<false, true, true>,
      block_update_bf16_avx512_impl<true, false, false>,  block_update_bf16_avx512_impl<true, false, true>,
      block_update_bf16_avx512_impl<true, true, false>,   block_update_bf16_avx512_impl<true, true, true>};
  kernels[scaled * 4 + buffer * 2 + measure](w, g, b, n, inv_scale, k, norm_sq);
}

ALIG_AVX512 __attribute__((flatten)) void block_scale_bf16_avx512(c10::BFloat16* __restrict__ w, int64_t n,
                                                                   float scale) {
  const __m512 s = _mm512_set1_ps(scale);
  int64_t i = 0;
  __m512 lo, hi;
  for (; i + 32 <= n; i += 32) {
    prefetch_ahead(w + i);
    load32_bf16_avx512<false>(w + i, ~0u, lo, hi);
    store32_bf16_avx512<false>(w + i, ~0u, _mm512_mul_ps(lo, s), _mm512_mul_ps(hi, s));
  }
  if (i < n) {
    const __mmask32 m = tail_masks(n - i).words;
    load32_bf16_avx512<true>(w + i, m, lo, hi);
    store32_bf16_avx512<true>(w + i, m, _mm512_mul_ps(lo, s), _mm512_mul_ps(hi, s));
  }
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
#ifdef ALIG_X86_PATHS
  if (cpu_isa() >= Isa::kAvx512) return block_sums_bf16_avx512(w, g, b, n, inv_scale, project, has_buffer, total);
  if (cpu_isa() >= Isa::kAvx2) return block_sums_bf16_avx2(w, g, b, n, inv_scale, project, has_buffer, total);
#endif
  block_sums_bf16_portable(w, g, b, n, inv_scale, project, has_buffer, total);
}

void block_update_bf16(c10::BFloat16* w, const c10::BFloat16* g, c10::BFloat16* b, int64_t n, float inv_scale,
                       UpdateCoefs k, double* norm_sq) {
#ifdef ALIG_X86_PATHS
  if (cpu_isa() >= Isa::kAvx512) return block_update_bf16_avx512(w, g, b, n, inv_scale, k, norm_sq);
  if (cpu_isa() >= Isa::kAvx2) return block_update_bf16_avx2(w, g, b, n, inv_scale, k, norm_sq);
#endif
  block_update_bf16_portable(w, g, b, n, inv_scale, k, norm_sq);
}

void block_scale_bf16(c10::BFloat16* w, int64_t n, float scale) {
#ifdef ALIG_X86_PATHS
  if (cpu_isa() >= Isa::kAvx512) return block_scale_bf16_avx512(w, n, scale);
  if (cpu_isa() >= Isa::kAvx2) return block_scale_bf16_avx2(w, n, scale);
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
// parameters); the AVX2 + F16C kernels convert 8 at once in registers with the same
// round-to-nearest-even. The generic build (and fp64) go through fp32 block buffers.
#ifdef ALIG_X86_PATHS
ALIG_AVX2 __attribute__((flatten)) void block_sums_f16(const c10::Half* __restrict__ w,
                                                                   const c10::Half* __restrict__ g,
                                                                   const c10::Half* __restrict__ b, int64_t n,
                                                                   float inv_scale, bool project, bool has_buffer,
                                                                   double* __restrict__ total) {
  block_sums_impl(w, g, b, n, inv_scale, project, has_buffer, total);
}

ALIG_AVX2 __attribute__((flatten)) void block_update_f16(c10::Half* __restrict__ w,
                                                                     const c10::Half* __restrict__ g,
                                                                     c10::Half* __restrict__ b, int64_t n,
                                                                     float inv_scale, UpdateCoefs k, double* norm_sq) {
  block_update_impl(w, g, b, n, inv_scale, k, norm_sq);
}

ALIG_AVX2 __attribute__((flatten)) void block_scale_f16(c10::Half* __restrict__ w, int64_t n, float scale) {
  block_scale_impl(w, n, scale);
}
#endif

void to_float(const c10::Half* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

void from_float(const float* src, c10::Half* dst, int64_t n) {
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
#ifdef ALIG_X86_PATHS
      if constexpr (std::is_same_v<T, c10::Half>) {
        if (cpu_isa() >= Isa::kAvx2) {
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
  // Without a norm to fold every kBlock, the kernels that work in place take the whole chunk
  // in one call: the per-call setup made bf16 pass 2 2% slower.
  bool in_place = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>;
#ifdef ALIG_X86_PATHS
  in_place = in_place || (std::is_same_v<T, c10::Half> && cpu_isa() >= Isa::kAvx2);
#endif
  const int64_t block = norm_sq == nullptr && in_place ? n : kBlock;
  for (int64_t start = 0; start < n; start += block) {
    const int64_t size = std::min(block, n - start);
    T* bs = b != nullptr ? b + start : nullptr;
    if constexpr (std::is_same_v<T, float>) {
      block_update_f32(w + start, g + start, bs, size, inv_scale, k, block_norm);
    } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
      block_update_bf16(w + start, g + start, bs, size, inv_scale, k, block_norm);
    } else {
#ifdef ALIG_X86_PATHS
      if constexpr (std::is_same_v<T, c10::Half>) {
        if (cpu_isa() >= Isa::kAvx2) {
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
#ifdef ALIG_X86_PATHS
    if constexpr (std::is_same_v<T, c10::Half>) {
      if (cpu_isa() >= Isa::kAvx2) return block_scale_f16(w, n, scale);
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

const char* cpu_isa_name() {
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kGeneric:
      break;
  }
  return "generic";
}

const DevicePasses& cpu_passes() {
  static const DevicePasses passes{step_cpu, sums_cpu, update_cpu, apply_cpu};
  return passes;
}

}  // namespace alig_fused
