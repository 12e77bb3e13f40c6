// CUDA passes of alig_fused::alig_step_ (cuda_passes(): the op bodies, argument checks and
// device guard are alig_ops.cpp's, for every device): three launches per step whatever the
// number of tensors (pass 1, finalize, pass 2), all on the current stream, no host sync,
// no atomics.
// Its halves for sharded parameters: alig_sums (pass 1, reduce) and alig_update_
// (finalize on the all-reduced sums, pass 2); and alig_apply_ (FusedMoMo: pass 2 alone,
// from the caller's coefs and skip flag, read on the device like the step's own).
//
// Device table: ONE int64 tensor per tensor list, built on the host, copied once through
// pinned memory and cached (TableCache, keyed by the list's pointers, sizes, groups and
// dtypes; a hit costs one hash of the list). A CUDA graph that captures a launch holds its
// own reference to the table (a CUDA user object, see TableCache::hold_for_graph), so the
// table lives exactly as long as some graph may replay it or the cache keeps it. Unlike
// apex's multi_tensor_apply, which packs pointers into kernel-argument structs (so a model
// needs one launch per ~100 tensors), the kernels read the table from global memory, so
// one launch covers any model.
//
//   word offset                 contents
//   0                           tensors: n_tensors rows of kTensorCols words:
//                                 [param ptr, grad ptr, buffer ptr (0 = no momentum), numel, group, dtype]
//   tensors_end                 chunks: n_chunks words, (tensor index << 32) | chunk index within the
//                                 tensor; chunk j of a tensor covers elements [j*kChunk, (j+1)*kChunk),
//                                 the last one shorter. Sorted by group, then by tensor order.
//   tensors_end + n_chunks      group_chunks: n_groups + 1 words; group k's chunks are
//                                 [group_chunks[k], group_chunks[k+1])
//
// Per-step scratch (caching allocator, so graph-capturable): partials float [kSums][n_chunks]
// (column-major, so finalize reads coalesced), sums double [n_groups][kSums], coefs float
// [n_groups][kCoefs], skip flag bool (the type of alig_apply_'s skip tensor).
//
// Launches (grid = one block per chunk for the passes):
//   pass1     each block: fp32 sums of its chunk (block tree reduction, fixed order) -> partials
//   finalize  one block: per group, partials summed in fp64 (fixed order) -> sums; then
//             functional.finalize (alig_math.h) -> coefs, step_size, skipped_steps, skip flag
//             (alig_sums stops after the sums; alig_update_ starts from given sums)
//   pass2     each block: returns at once when skip is set, else one read-modify-write of its chunk
//             (coefs and skip: the finalize's scratch, or alig_apply_'s arguments)
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <list>
#include <mutex>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "alig_math.h"
#include "alig_ops.h"

namespace alig_fused {
namespace {

// Elements per block of pass 1 / pass 2. On the GPU a chunk is one block's work: 8,192 =
// kThreads 256 x 32 elements, i.e. 8 vector loads (kVec 4) per thread and stream, and it
// sizes the grid: ResNet-50's 25.6M parameters are ~3,100 blocks (~24 per SM of sm_90's
// 132), and the one-block finalize sums [6][n_chunks] fp32 partials (75 KB there). The CPU
// (alig_cpu.cpp) and Triton (triton_kernels.py) use 16,384: on the CPU a chunk is the unit
// of partial sums and of work splitting between a few threads, with a per-chunk cost to
// amortize; Triton's program runs 8 warps x 64 elements per thread. Untimed here (no GPU):
// unifying would change the CUDA summation order, not the math (test_gpu_cpp.py compares the
// CUDA and CPU kernels to 2e-6, not bit for bit).
constexpr int64_t kChunk = 8192;
constexpr int kThreads = 256;  // threads per block of pass 1 / pass 2
// ptxas -v (CUDA 13.0, this file's flags -O3 --fmad=false; .ci/build_cuda_ext.sh prints it
// with every CI build and fails on any spill):
//   kernel           sm_80                         sm_90
//   pass1_kernel     48 registers, 768 B smem      46 registers, 768 B smem
//   finalize_kernel  40 registers, 1,545 B smem    40 registers, 1,545 B smem
//   pass2_kernel     40 registers                  40 registers
// every kernel: 0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads. With 256
// threads a block, 65,536 registers per SM hold 5 blocks of pass 1 (48 registers; sm_90's
// 46 round up to 48) and 6 of pass 2: 62% and 75% of the 2,048 threads an SM can run.
// __launch_bounds__(kThreads) asks for no minimum blocks, so ptxas is free not to spill.
constexpr int kFinalizeThreads = 512;
constexpr int kVec = 4;  // elements per vector load
constexpr int kTensorCols = 6;
enum TensorCol : int { kParam = 0, kGrad, kBuffer, kNumel, kGroup, kDType };
constexpr size_t kTableCacheSize = 8;

struct DeviceTable {
  const int64_t* tensors;
  const int64_t* chunks;
  const int64_t* group_chunks;
  int64_t n_chunks;
  int64_t n_groups;
};

struct Scratch {
  float* partials;  // [sum::kCount][n_chunks]
  double* sums;     // [n_groups][sum::kCount] (alig_step_; the halves use their own)
  float* coefs;     // [n_groups][coef::kCount]
  bool* skip;
};

struct StepScalars {
  const double* hparams;     // [n_groups][hparam::kCount]
  const double* loss;        // 0-dim
  const float* grad_scale;   // nullptr = none
  const float* found_inf;    // nullptr = none
  float* step_size;          // [n_groups]
  int64_t* skipped_steps;    // 0-dim
};

// ---- element access ---------------------------------------------------------------------

template <typename T>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

template <typename T>
__device__ __forceinline__ bool is_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % sizeof(Pack<T>) == 0;
}

struct ChunkRef {
  int64_t tensor, begin, size, group;
  DType dtype;
  const int64_t* row;
};

__device__ __forceinline__ ChunkRef chunk_ref(const DeviceTable& table, int64_t chunk) {
  const int64_t entry = table.chunks[chunk];
  ChunkRef ref;
  ref.tensor = entry >> 32;
  ref.row = table.tensors + ref.tensor * kTensorCols;
  ref.begin = (entry & 0xffffffffLL) * kChunk;
  const int64_t left = ref.row[kNumel] - ref.begin;
  ref.size = left < kChunk ? left : kChunk;
  ref.group = ref.row[kGroup];
  ref.dtype = static_cast<DType>(ref.row[kDType]);
  return ref;
}

template <typename F>
__device__ __forceinline__ void dispatch_dtype(DType dtype, F&& f) {
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

// ---- reductions (fixed order: results do not depend on timing) --------------------------

template <int kN, typename Acc>
__device__ __forceinline__ void block_reduce(Acc (&value)[kN], Acc* shared /* [kN][32] */) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
#pragma unroll
  for (int i = 0; i < kN; ++i) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) value[i] += __shfl_down_sync(0xffffffffu, value[i], offset);
    if (lane == 0) shared[i * 32 + warp] = value[i];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int i = 0; i < kN; ++i) {
      value[i] = lane < n_warps ? shared[i * 32 + lane] : Acc(0);
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) value[i] += __shfl_down_sync(0xffffffffu, value[i], offset);
    }
  }
  __syncthreads();  // shared may be reused
}

// ---- pass 1 -----------------------------------------------------------------------------

template <bool kProj, bool kHasBuffer>
__device__ __forceinline__ void accumulate(float w, float g, float b, float (&acc)[sum::kCount]) {
  acc[sum::kGG] += g * g;
  if (kProj) {
    acc[sum::kWW] += w * w;
    acc[sum::kWG] += w * g;
    if (kHasBuffer) {
      acc[sum::kBB] += b * b;
      acc[sum::kWB] += w * b;
      acc[sum::kBG] += b * g;
    }
  }
}

template <typename T, bool kProj, bool kHasBuffer>
__device__ void chunk_sums(const T* w, const T* g, const T* b, int64_t n, float inv_scale,
                           float (&acc)[sum::kCount]) {
  int64_t vector_end = 0;
  if (is_aligned(g) && (!kProj || is_aligned(w)) && (!kHasBuffer || is_aligned(b))) {
    vector_end = n / kVec * kVec;
    for (int64_t i = threadIdx.x * kVec; i < vector_end; i += kThreads * kVec) {
      const Pack<T> gp = *reinterpret_cast<const Pack<T>*>(g + i);
      Pack<T> wp, bp;
      if (kProj) wp = *reinterpret_cast<const Pack<T>*>(w + i);
      if (kHasBuffer) bp = *reinterpret_cast<const Pack<T>*>(b + i);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        accumulate<kProj, kHasBuffer>(kProj ? static_cast<float>(wp.v[j]) : 0.0f,
                                      static_cast<float>(gp.v[j]) * inv_scale,
                                      kHasBuffer ? static_cast<float>(bp.v[j]) : 0.0f, acc);
      }
    }
  }
  for (int64_t i = vector_end + threadIdx.x; i < n; i += kThreads) {
    accumulate<kProj, kHasBuffer>(kProj ? static_cast<float>(w[i]) : 0.0f, static_cast<float>(g[i]) * inv_scale,
                                  kHasBuffer ? static_cast<float>(b[i]) : 0.0f, acc);
  }
}

__global__ void __launch_bounds__(kThreads) pass1_kernel(DeviceTable table, Scratch scratch, StepScalars scalars) {
  __shared__ float shared[sum::kCount * 32];
  const int64_t chunk = blockIdx.x;
  const ChunkRef ref = chunk_ref(table, chunk);
  const bool project = is_finite(scalars.hparams[ref.group * hparam::kCount + hparam::kMaxNorm]);
  const bool has_buffer = ref.row[kBuffer] != 0;
  const float inv_scale = inverse_grad_scale(scalars.grad_scale);
  float acc[sum::kCount] = {};
  dispatch_dtype(ref.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* w = reinterpret_cast<const T*>(ref.row[kParam]) + ref.begin;
    const T* g = reinterpret_cast<const T*>(ref.row[kGrad]) + ref.begin;
    const T* b = has_buffer ? reinterpret_cast<const T*>(ref.row[kBuffer]) + ref.begin : nullptr;
    if (!project) {
      chunk_sums<T, false, false>(w, g, b, ref.size, inv_scale, acc);
    } else if (!has_buffer) {
      chunk_sums<T, true, false>(w, g, b, ref.size, inv_scale, acc);
    } else {
      chunk_sums<T, true, true>(w, g, b, ref.size, inv_scale, acc);
    }
  });
  block_reduce(acc, shared);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int col = 0; col < sum::kCount; ++col) scratch.partials[col * table.n_chunks + chunk] = acc[col];
  }
}

// ---- finalize (one block) ---------------------------------------------------------------

// reduce: partials -> sums (per group, fp64, fixed order). finalize: sums -> G, skip flag,
// coefs, step_size, skipped_steps (functional.finalize). alig_step_ does both in one
// launch; alig_sums only the first, alig_update_ only the second (on all-reduced sums).
__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_kernel(DeviceTable table, Scratch scratch, StepScalars scalars, double* sums, bool reduce,
                    bool finalize) {
  __shared__ double shared[sum::kCount * 32];
  __shared__ double grad_sq_norm;
  __shared__ bool skip;
  if (reduce) {
    for (int64_t k = 0; k < table.n_groups; ++k) {
      double acc[sum::kCount] = {};
      for (int64_t c = table.group_chunks[k] + threadIdx.x; c < table.group_chunks[k + 1]; c += blockDim.x) {
#pragma unroll
        for (int col = 0; col < sum::kCount; ++col) acc[col] += scratch.partials[col * table.n_chunks + c];
      }
      block_reduce(acc, shared);
      if (threadIdx.x == 0) {
#pragma unroll
        for (int col = 0; col < sum::kCount; ++col) sums[k * sum::kCount + col] = acc[col];
      }
    }
  }
  if (!finalize) return;
  __syncthreads();
  if (threadIdx.x == 0) {
    grad_sq_norm = total_grad_sq_norm(sums, table.n_groups);
    const bool found_inf = scalars.found_inf != nullptr && *scalars.found_inf > 0;
    skip = step_is_skipped(*scalars.loss, grad_sq_norm, found_inf);
    *scratch.skip = skip;
    if (skip) *scalars.skipped_steps += 1;
  }
  __syncthreads();
  for (int64_t k = threadIdx.x; k < table.n_groups; k += blockDim.x) {
    const double step_size = finalize_group(scalars.hparams + k * hparam::kCount, sums + k * sum::kCount,
                                            *scalars.loss, grad_sq_norm, skip, scratch.coefs + k * coef::kCount);
    scalars.step_size[k] = static_cast<float>(step_size);
  }
}

// ---- pass 2 -----------------------------------------------------------------------------

template <typename T, bool kHasBuffer>
__device__ __forceinline__ void update_at(T& w, const T& g, T* b, float inv_scale, const UpdateCoefs& k) {
  const float gv = static_cast<float>(g) * inv_scale;
  if (kHasBuffer) {
    float wv = static_cast<float>(w), bv = static_cast<float>(*b);
    update_element(wv, bv, gv, k);
    *b = static_cast<T>(bv);
    w = static_cast<T>(wv);
  } else {
    w = static_cast<T>(update_element(static_cast<float>(w), gv, k));
  }
}

template <typename T, bool kHasBuffer>
__device__ void chunk_update(T* w, const T* g, T* b, int64_t n, float inv_scale, const UpdateCoefs& k) {
  int64_t vector_end = 0;
  if (is_aligned(w) && is_aligned(g) && (!kHasBuffer || is_aligned(b))) {
    vector_end = n / kVec * kVec;
    for (int64_t i = threadIdx.x * kVec; i < vector_end; i += kThreads * kVec) {
      Pack<T> wp = *reinterpret_cast<const Pack<T>*>(w + i);
      const Pack<T> gp = *reinterpret_cast<const Pack<T>*>(g + i);
      Pack<T> bp;
      if (kHasBuffer) bp = *reinterpret_cast<const Pack<T>*>(b + i);
#pragma unroll
      for (int j = 0; j < kVec; ++j) update_at<T, kHasBuffer>(wp.v[j], gp.v[j], &bp.v[j], inv_scale, k);
      *reinterpret_cast<Pack<T>*>(w + i) = wp;
      if (kHasBuffer) *reinterpret_cast<Pack<T>*>(b + i) = bp;
    }
  }
  for (int64_t i = vector_end + threadIdx.x; i < n; i += kThreads) {
    update_at<T, kHasBuffer>(w[i], g[i], kHasBuffer ? b + i : nullptr, inv_scale, k);
  }
}

// coefs [n_groups][coef::kCount] and skip: finalize_kernel's (alig_step_, alig_update_) or
// the caller's (alig_apply_), both read here on the device.
__global__ void __launch_bounds__(kThreads)
    pass2_kernel(DeviceTable table, const float* coefs, const bool* skip, const float* grad_scale) {
  if (*skip) return;  // a skipped step writes nothing (0 * inf = nan)
  const ChunkRef ref = chunk_ref(table, blockIdx.x);
  const UpdateCoefs k = load_coefs(coefs + ref.group * coef::kCount);
  const float inv_scale = inverse_grad_scale(grad_scale);
  const bool has_buffer = ref.row[kBuffer] != 0;
  dispatch_dtype(ref.dtype, [&](auto tag) {
    using T = decltype(tag);
    T* w = reinterpret_cast<T*>(ref.row[kParam]) + ref.begin;
    const T* g = reinterpret_cast<const T*>(ref.row[kGrad]) + ref.begin;
    if (has_buffer) {
      chunk_update<T, true>(w, g, reinterpret_cast<T*>(ref.row[kBuffer]) + ref.begin, ref.size, inv_scale, k);
    } else {
      chunk_update<T, false>(w, g, nullptr, ref.size, inv_scale, k);
    }
  });
}

// ---- the device table cache -------------------------------------------------------------

struct CachedTable {
  std::vector<int64_t> key;  // device index, n_groups, then the tensors section
  uint64_t hash = 0;
  at::Tensor host;    // pinned; kept so an in-flight copy always reads live memory
  at::Tensor device;  // the table the kernels read
  int64_t n_chunks = 0;
  std::optional<unsigned long long> capture_id;  // the last capture that took a reference
  std::vector<cudaStream_t> streams;  // streams whose kernels read it (recorded with the allocator)
};

uint64_t hash_words(const std::vector<int64_t>& words) {
  uint64_t h = 0x9e3779b97f4a7c15ULL;
  for (int64_t w : words) {
    uint64_t x = static_cast<uint64_t>(w) + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    h ^= x ^ (x >> 31);
  }
  return h;
}

class TableCache {
 public:
  static TableCache& instance() {
    static TableCache* cache = new TableCache();  // never destroyed: no CUDA calls at exit
    return *cache;
  }

  // The device table for these tensors (and its chunk count); builds and uploads it
  // (non-blocking, from pinned memory) on a miss. An entry is dropped once kTableCacheSize
  // other lists have been used since; a graph that captured it keeps the table itself
  // alive (hold_for_graph). The returned tensor keeps the memory alive for this step.
  std::pair<at::Tensor, int64_t> get(const StepArgs& args, const at::Device& device,
                                     const c10::cuda::CUDAStream& stream) {
    std::vector<int64_t> key;
    key.reserve(2 + args.tensors.size() * kTensorCols);
    key.push_back(device.index());
    key.push_back(args.n_groups);
    for (const TensorEntry& t : args.tensors) {
      key.insert(key.end(), {static_cast<int64_t>(reinterpret_cast<uintptr_t>(t.param)),
                             static_cast<int64_t>(reinterpret_cast<uintptr_t>(t.grad)),
                             static_cast<int64_t>(reinterpret_cast<uintptr_t>(t.buffer)), t.numel, t.group,
                             static_cast<int64_t>(t.dtype)});
    }
    const uint64_t hash = hash_words(key);
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream.stream(), &capture));
    const bool capturing = capture != cudaStreamCaptureStatusNone;

    if (!capturing) free_released();
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      if (it->hash == hash && it->key == key) {
        entries_.splice(entries_.begin(), entries_, it);  // most recently used first
        CachedTable& entry = entries_.front();
        use_on(entry, stream);
        if (capturing) hold_for_graph(entry, stream);
        return {entry.device, entry.n_chunks};
      }
    }
    TORCH_CHECK(!capturing,
                "alig_step_: this list of tensors is new during a CUDA graph capture; run one optimizer step "
                "with the same parameters and gradients before capturing (warm-up), so that the kernels' "
                "tensor table is built outside the capture");
    entries_.push_front(build(std::move(key), hash, args, device));
    entries_.front().streams.push_back(stream.stream());  // allocated on it
    evict();
    return {entries_.front().device, entries_.front().n_chunks};
  }

 private:
  // Kernels on a stream other than the allocating one read the table: tell the caching
  // allocator, so that memory freed at eviction waits for them (bookkeeping only, no CUDA
  // call, so fine during a capture).
  static void use_on(CachedTable& entry, const c10::cuda::CUDAStream& stream) {
    if (std::find(entry.streams.begin(), entry.streams.end(), stream.stream()) != entry.streams.end()) return;
    c10::cuda::CUDACachingAllocator::recordStream(entry.device.storage().data_ptr(), stream);
    entry.streams.push_back(stream.stream());
  }

  // The graph being captured on `stream` takes one reference to the entry's table: a CUDA
  // user object owned by the graph, which CUDA releases (release_for_graph) once the graph
  // and every executable instantiated from it are destroyed. So a replay never reads a freed
  // table, whether or not the cache has evicted the entry since, and the memory held is
  // bounded by the live graphs: none is pinned forever, however many captures a run makes.
  // One reference per capture and table (a graph that captures several steps).
  void hold_for_graph(CachedTable& entry, const c10::cuda::CUDAStream& stream) {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    unsigned long long capture_id = 0;
    cudaGraph_t graph = nullptr;
    C10_CUDA_CHECK(cudaStreamGetCaptureInfo(stream.stream(), &status, &capture_id, &graph));
    if (status != cudaStreamCaptureStatusActive || entry.capture_id == capture_id) return;  // invalidated: fails anyway
    auto* held = new at::Tensor(entry.device);
    cudaUserObject_t object = nullptr;
    const cudaError_t created =
        cudaUserObjectCreate(&object, held, &release_for_graph, 1, cudaUserObjectNoDestructorSync);
    if (created != cudaSuccess) delete held;
    C10_CUDA_CHECK(created);
    const cudaError_t retained = cudaGraphRetainUserObject(graph, object, 1, cudaGraphUserObjectMove);
    if (retained != cudaSuccess) C10_CUDA_CHECK(cudaUserObjectRelease(object, 1));  // queues held
    C10_CUDA_CHECK(retained);
    entry.capture_id = capture_id;
  }

  // The user object's destructor, on a CUDA-internal thread where no CUDA call is allowed
  // (and freeing a tensor may make some: the caching allocator's stream events): it only
  // queues the reference; the next get() outside a capture frees it (free_released).
  static void CUDART_CB release_for_graph(void* held) {
    TableCache& cache = instance();
    std::lock_guard<std::mutex> lock(cache.released_mutex_);
    cache.released_.push_back(static_cast<at::Tensor*>(held));
  }

  void free_released() {
    std::vector<at::Tensor*> released;
    {
      std::lock_guard<std::mutex> lock(released_mutex_);
      released.swap(released_);
    }
    for (at::Tensor* table : released) delete table;
  }

  static CachedTable build(std::vector<int64_t> key, uint64_t hash, const StepArgs& args, const at::Device& device) {
    const int64_t n_tensors = static_cast<int64_t>(args.tensors.size());
    // Tensors bucketed by group (stable), then chunked: each group's chunks are contiguous.
    std::vector<std::vector<int64_t>> by_group(args.n_groups);
    int64_t n_chunks = 0;
    for (int64_t i = 0; i < n_tensors; ++i) {
      const TensorEntry& t = args.tensors[i];
      by_group[t.group].push_back(i);
      n_chunks += (t.numel + kChunk - 1) / kChunk;
    }
    TORCH_CHECK(n_chunks < (int64_t{1} << 31), "alig_step_: too many chunks for one launch (", n_chunks, ")");
    const int64_t words = n_tensors * kTensorCols + n_chunks + args.n_groups + 1;
    CachedTable entry;
    entry.host = at::empty({words}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    int64_t* out = entry.host.data_ptr<int64_t>();
    std::copy(key.begin() + 2, key.end(), out);  // the tensors section is the key's tail
    int64_t* chunks = out + n_tensors * kTensorCols;
    int64_t* group_chunks = chunks + n_chunks;
    int64_t c = 0;
    for (int64_t k = 0; k < args.n_groups; ++k) {
      group_chunks[k] = c;
      for (int64_t i : by_group[k]) {
        const int64_t pieces = (args.tensors[i].numel + kChunk - 1) / kChunk;
        TORCH_CHECK(pieces < (int64_t{1} << 32), "alig_step_: tensor ", i, " is too large");
        for (int64_t j = 0; j < pieces; ++j) chunks[c++] = (i << 32) | j;
      }
    }
    group_chunks[args.n_groups] = c;
    entry.device = at::empty({words}, at::TensorOptions().dtype(at::kLong).device(device));
    entry.device.copy_(entry.host, /*non_blocking=*/true);
    entry.key = std::move(key);
    entry.hash = hash;
    entry.n_chunks = n_chunks;
    return entry;
  }

  void evict() {
    size_t kept = 0;
    for (auto it = entries_.begin(); it != entries_.end();) {
      if (++kept <= kTableCacheSize) {
        ++it;
      } else {
        it = entries_.erase(it);
      }
    }
  }

  std::mutex mutex_;
  std::list<CachedTable> entries_;
  // Tables whose graphs are gone, to free; its own mutex, as release_for_graph runs on a
  // CUDA thread while get() may hold mutex_ across CUDA calls.
  std::mutex released_mutex_;
  std::vector<at::Tensor*> released_;
};

// ---- one op call's launches ------------------------------------------------------------

// What every launch of one op call needs; keeps the table and the scratch alive.
struct Launch {
  DeviceTable table;
  Scratch scratch;
  StepScalars scalars;
  cudaStream_t stream;
  at::Tensor table_tensor, scratch_tensor;
};

// with_scratch = false (alig_apply_: pass 2 reads the caller's coefs and skip): no scratch.
Launch prepare(const StepArgs& args, const at::Device& device, bool with_scratch = true) {
  Launch launch;
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(device.index());
  launch.stream = stream.stream();
  int64_t n_chunks = 0;
  std::tie(launch.table_tensor, n_chunks) = TableCache::instance().get(args, device, stream);
  const int64_t* base = launch.table_tensor.const_data_ptr<int64_t>();
  const int64_t n_tensors = static_cast<int64_t>(args.tensors.size());
  launch.table = {base, base + n_tensors * kTensorCols, base + n_tensors * kTensorCols + n_chunks, n_chunks,
                  args.n_groups};

  launch.scalars = {args.hparams.defined() ? args.hparams.const_data_ptr<double>() : nullptr,
                    args.loss.defined() ? args.loss.const_data_ptr<double>() : nullptr,
                    args.grad_scale.defined() ? args.grad_scale.const_data_ptr<float>() : nullptr,
                    args.found_inf.defined() ? args.found_inf.const_data_ptr<float>() : nullptr,
                    nullptr,
                    nullptr};
  launch.scratch = {};
  if (!with_scratch) return launch;

  // Scratch: [partials f32 | sums f64 | coefs f32 | skip bool], 8-byte aligned sections.
  const int64_t sums_offset = (sum::kCount * n_chunks * 4 + 7) / 8 * 8;
  const int64_t coefs_offset = sums_offset + args.n_groups * sum::kCount * 8;
  const int64_t skip_offset = (coefs_offset + args.n_groups * coef::kCount * 4 + 7) / 8 * 8;
  launch.scratch_tensor = at::empty({skip_offset + 8}, at::TensorOptions().dtype(at::kByte).device(device));
  uint8_t* raw = launch.scratch_tensor.data_ptr<uint8_t>();
  launch.scratch = {reinterpret_cast<float*>(raw), reinterpret_cast<double*>(raw + sums_offset),
                    reinterpret_cast<float*>(raw + coefs_offset), reinterpret_cast<bool*>(raw + skip_offset)};
  return launch;
}

void launch_pass1(const Launch& l) {
  if (l.table.n_chunks == 0) return;
  pass1_kernel<<<l.table.n_chunks, kThreads, 0, l.stream>>>(l.table, l.scratch, l.scalars);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_finalize(const Launch& l, double* sums, bool reduce, bool finalize) {
  finalize_kernel<<<1, kFinalizeThreads, 0, l.stream>>>(l.table, l.scratch, l.scalars, sums, reduce, finalize);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_pass2(const Launch& l, const float* coefs, const bool* skip) {
  if (l.table.n_chunks == 0) return;
  pass2_kernel<<<l.table.n_chunks, kThreads, 0, l.stream>>>(l.table, coefs, skip, l.scalars.grad_scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void set_outputs(Launch& l, const at::Tensor& step_size, const at::Tensor& skipped_steps) {
  l.scalars.step_size = step_size.data_ptr<float>();
  l.scalars.skipped_steps = skipped_steps.data_ptr<int64_t>();
}

// ---- the ops' CUDA passes (alig_ops.cpp validates the arguments, sets the device guard
// and calls these) ---------------------------------------------------------------------------

void step_cuda(const StepArgs& args, const at::Tensor& step_size, const at::Tensor& skipped_steps) {
  Launch launch = prepare(args, args.device);
  set_outputs(launch, step_size, skipped_steps);
  launch_pass1(launch);
  launch_finalize(launch, launch.scratch.sums, /*reduce=*/true, /*finalize=*/true);
  launch_pass2(launch, launch.scratch.coefs, launch.scratch.skip);
}

at::Tensor sums_cuda(const StepArgs& args) {
  const Launch launch = prepare(args, args.device);
  at::Tensor sums = at::empty({args.n_groups, sum::kCount}, args.hparams.options());
  launch_pass1(launch);
  launch_finalize(launch, sums.data_ptr<double>(), /*reduce=*/true, /*finalize=*/false);
  return sums;
}

void update_cuda(const StepArgs& args, const at::Tensor& sums, const at::Tensor& step_size,
                 const at::Tensor& skipped_steps) {
  Launch launch = prepare(args, args.device);
  set_outputs(launch, step_size, skipped_steps);
  // finalize_kernel only reads the sums when it does not reduce.
  launch_finalize(launch, const_cast<double*>(sums.const_data_ptr<double>()), /*reduce=*/false, /*finalize=*/true);
  launch_pass2(launch, launch.scratch.coefs, launch.scratch.skip);
}

// Pass 2 alone (FusedMoMo): one launch of the step's pass2_kernel, reading the caller's
// coefs and skip flag on the device (no host sync; capturable).
void apply_cuda(const StepArgs& args, const at::Tensor& coefs, const at::Tensor& skip) {
  const Launch launch = prepare(args, args.device, /*with_scratch=*/false);
  launch_pass2(launch, coefs.const_data_ptr<float>(), skip.const_data_ptr<bool>());
}

}  // namespace

const DevicePasses& cuda_passes() {
  static const DevicePasses passes{step_cuda, sums_cuda, update_cuda, apply_cuda};
  return passes;
}

}  // namespace alig_fused
