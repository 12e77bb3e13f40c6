// What the ops (alig_ops.cpp) hand the CPU and CUDA implementations of their passes.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <optional>
#include <vector>

#include "alig_math.h"

namespace alig_fused {

// One parameter tensor as the kernels see it: contiguous (or dense with the parameter's
// strides) memory of `numel` elements of `dtype` for the parameter, its gradient and its
// momentum buffer (nullptr when the group has no momentum: the empty-buffer convention).
struct TensorEntry {
  void* param;
  const void* grad;
  void* buffer;
  int64_t numel;
  int64_t group;
  DType dtype;
};

// The arguments of the ops after validation (alig_ops.cpp).
struct StepArgs {
  std::vector<TensorEntry> tensors;
  int64_t n_groups = 0;
  at::Device device{at::kCPU};  // every tensor's
  at::Tensor hparams;     // [n_groups, hparam::kCount] float64, contiguous (undefined for alig_apply_)
  at::Tensor grad_scale;  // 0-dim float32, or undefined
  at::Tensor loss;        // 0-dim float64 (alig_step_, alig_update_)
  at::Tensor found_inf;   // 0-dim float32, or undefined (alig_step_, alig_update_)
};

// One device's implementation of the ops: the passes. The op bodies (alig_ops.cpp) are
// written once for every device: they validate the arguments, set the device guard and
// call these, so a device's file (alig_cpu.cpp, cuda/alig_cuda.cu) holds only its passes.
// Outputs (step_size [n_groups] float32, skipped_steps int64, sums) are on the device.
struct DevicePasses {
  // alig_step_: pass 1, finalize, pass 2. Its own entry, not sums + update, because each
  // device fuses across that boundary: CUDA reduces the per-chunk partials and finalizes in
  // one launch (3 launches a step, not 4); the CPU measures ||w'|| in pass 2 rather than
  // computing it from the Gram sums (reads 5N instead of 6N with momentum).
  void (*step)(const StepArgs& args, const at::Tensor& step_size, const at::Tensor& skipped_steps);
  // alig_sums: pass 1, reduced per group: [n_groups, sum::kCount] float64.
  at::Tensor (*sums)(const StepArgs& args);
  // alig_update_: finalize on the given sums [n_groups, sum::kCount] float64, then pass 2.
  void (*update)(const StepArgs& args, const at::Tensor& sums, const at::Tensor& step_size,
                 const at::Tensor& skipped_steps);
  // alig_apply_: pass 2 alone, from coefs [n_groups, coef::kCount] float32 and skip (a bool
  // scalar), read where they are (on CUDA: on the device, no host sync).
  void (*apply)(const StepArgs& args, const at::Tensor& coefs, const at::Tensor& skip);
};

const DevicePasses& cpu_passes();  // alig_cpu.cpp
// The instruction set the CPU kernels run: "avx512", "avx2" or "generic" (the best the CPU
// has, capped by ALIG_FUSED_CPU_ISA; an unknown value there throws c10::ValueError).
const char* cpu_isa_name();  // alig_cpu.cpp
#ifdef ALIG_WITH_CUDA
const DevicePasses& cuda_passes();  // cuda/alig_cuda.cu
#endif

}  // namespace alig_fused
