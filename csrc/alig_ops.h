// Host-side pieces shared by the CPU and CUDA implementations of alig_fused::alig_step_.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

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

// The arguments of the ops after validation.
struct StepArgs {
  std::vector<TensorEntry> tensors;
  int64_t n_groups = 0;
  at::Tensor hparams;     // [n_groups, hparam::kCount] float64, contiguous
  at::Tensor grad_scale;  // 0-dim float32, or undefined
  at::Tensor loss;        // 0-dim float64 (check_step_scalars)
  at::Tensor found_inf;   // 0-dim float32, or undefined (check_step_scalars)
};

// The tensor lists, hparams and grad_scale of any of the ops (ValueError, naming the
// offending index, otherwise). Every tensor must be on hparams' device, of `device_type`.
StepArgs check_tensor_args(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                           c10::IntArrayRef group_index, const at::Tensor& hparams,
                           const std::optional<at::Tensor>& grad_scale, c10::DeviceType device_type);

// The same for a table other than hparams (alig_apply_'s coefs): n_groups = table.size(0),
// device = table's; args.hparams stays undefined.
StepArgs check_tensor_lists(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                            c10::IntArrayRef group_index, const at::Tensor& table,
                            const std::optional<at::Tensor>& grad_scale, c10::DeviceType device_type);

// alig_apply_'s coefs [n_groups, coef::kCount] float32 contiguous and skip (a bool scalar).
void check_apply_tables(const StepArgs& args, const at::Tensor& coefs, const at::Tensor& skip);

// The scalars of a step (loss, outputs, found_inf), added to `args`.
void check_step_scalars(StepArgs& args, const at::Tensor& loss, const at::Tensor& step_size,
                        const at::Tensor& skipped_steps, const std::optional<at::Tensor>& found_inf);

// The pass-1 sums given to alig_update_: [n_groups, sum::kCount] float64, contiguous.
void check_sums(const StepArgs& args, const at::Tensor& sums);

}  // namespace alig_fused
