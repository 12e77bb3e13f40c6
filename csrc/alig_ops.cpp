// The ops (alig_fused::alig_step_, alig_sums, alig_update_, alig_apply_): their schemas and
// their bodies, written once for every device: check the arguments (a ValueError naming the
// offending tensor, before anything is written), set the device guard, call the device's
// passes (DevicePasses: alig_cpu.cpp, cuda/alig_cuda.cu). Fake kernels: alig_fused/cpp_ops.py.
#include "alig_ops.h"

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <tuple>

namespace alig_fused {

namespace {

DType storage_dtype(const at::Tensor& t, size_t i) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kHalf:
      return DType::kFloat16;
    case at::kDouble:
      return DType::kFloat64;
    default:
      TORCH_CHECK_VALUE(false, "alig_fused: params[", i, "] has dtype ", t.scalar_type(),
                        "; the C++/CUDA kernels take float32, bfloat16, float16 or float64");
  }
  return DType::kFloat32;  // unreachable
}

void check_device(const at::Tensor& t, const at::Device& device, const char* name) {
  TORCH_CHECK_VALUE(t.device() == device, "alig_fused: ", name, " is on ", t.device(), ", expected ", device,
                    " (every tensor of the step must be on the parameters' device)");
}

// Contiguous, or dense with the same strides as the parameter (e.g. channels_last): the
// kernels walk the three tensors' memory element by element, which is then the same
// element-for-element walk.
void check_layout(const at::Tensor& t, const at::Tensor& param, const char* name, size_t i) {
  TORCH_CHECK_VALUE(t.sizes() == param.sizes(), "alig_fused: ", name, "[", i, "] has shape ", t.sizes(),
                    ", params[", i, "] has shape ", param.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == param.scalar_type(), "alig_fused: ", name, "[", i, "] has dtype ",
                    t.scalar_type(), ", params[", i, "] has dtype ", param.scalar_type());
  TORCH_CHECK_VALUE(t.is_non_overlapping_and_dense(), "alig_fused: ", name, "[", i, "] is not contiguous (strides ",
                    t.strides(), ": not one dense block of memory); backend='cpp' needs dense tensors: call "
                    ".contiguous() on it, or use backend='torch'");
  // The message names the tensor at fault and both layouts (FusedALIG checks the same rule
  // in Python, alig_fused/backends.py: layout_problem, before it creates any state).
  const char* fix =
      "; backend='cpp' needs a gradient and momentum buffer in their parameter's memory layout (make them all "
      "contiguous, or use backend='torch')";
  if (t.is_contiguous()) {
    TORCH_CHECK_VALUE(param.is_contiguous(), "alig_fused: ", name, "[", i, "] is contiguous (strides ", t.strides(),
                      ") but params[", i, "] is not (strides ", param.strides(), ")", fix);
  } else {
    TORCH_CHECK_VALUE(t.strides() == param.strides(), "alig_fused: ", name, "[", i, "] is not contiguous (strides ",
                      t.strides(), ") and params[", i, "] has other strides (", param.strides(), ")", fix);
  }
}

at::Tensor scalar_float(const std::optional<at::Tensor>& opt, const at::Device& device, const char* name) {
  if (!opt.has_value() || !opt->defined()) return {};
  const at::Tensor& t = *opt;
  TORCH_CHECK_VALUE(t.numel() == 1 && at::isFloatingType(t.scalar_type()), "alig_fused: ", name,
                    " must be a floating-point scalar tensor");
  check_device(t, device, name);
  return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat);
}

StepArgs check_tensor_lists(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                            c10::IntArrayRef group_index, const at::Tensor& table,
                            const std::optional<at::Tensor>& grad_scale, c10::DeviceType device_type);

// The tensor lists, hparams and grad_scale of any of the ops (ValueError, naming the
// offending index, otherwise). Every tensor must be on hparams' device, of `device_type`.
StepArgs check_tensor_args(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                           c10::IntArrayRef group_index, const at::Tensor& hparams,
                           const std::optional<at::Tensor>& grad_scale, c10::DeviceType device_type) {
  TORCH_CHECK_VALUE(hparams.dim() == 2 && hparams.size(1) == hparam::kCount && hparams.scalar_type() == at::kDouble &&
                        hparams.is_contiguous(),
                    "alig_fused: hparams must be a contiguous float64 tensor of shape [n_groups, ", hparam::kCount,
                    "] (functional.hparams_table), got ", hparams.scalar_type(), " of shape ", hparams.sizes());
  StepArgs args = check_tensor_lists(params, grads, momentum_buffers, group_index, hparams, grad_scale, device_type);
  args.hparams = hparams;
  return args;
}

// The same for a table other than hparams (alig_apply_'s coefs): n_groups = table.size(0),
// device = table's; args.hparams stays undefined.
StepArgs check_tensor_lists(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                            c10::IntArrayRef group_index, const at::Tensor& table,
                            const std::optional<at::Tensor>& grad_scale, c10::DeviceType device_type) {
  const size_t n = params.size();
  TORCH_CHECK_VALUE(grads.size() == n && momentum_buffers.size() == n && group_index.size() == n,
                    "alig_fused: params, grads, momentum_buffers and group_index must have one entry per "
                    "tensor; got ",
                    n, ", ", grads.size(), ", ", momentum_buffers.size(), " and ", group_index.size());
  TORCH_CHECK_VALUE(table.device().type() == device_type, "alig_fused: hparams/coefs is on ", table.device());
  const at::Device device = table.device();

  TORCH_CHECK_VALUE(table.dim() == 2, "alig_fused: hparams/coefs must be a 2-d [n_groups, columns] table, got shape ",
                    table.sizes());
  StepArgs args;
  args.device = device;
  args.n_groups = table.size(0);
  args.grad_scale = scalar_float(grad_scale, device, "grad_scale");
  args.tensors.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& param = params[i];
    const at::Tensor& grad = grads[i];
    const at::Tensor& buffer = momentum_buffers[i];
    TORCH_CHECK_VALUE(param.defined() && grad.defined() && buffer.defined(), "alig_fused: tensor ", i,
                      " is undefined (pass only parameters that have a gradient)");
    check_device(param, device, "a parameter");
    check_device(grad, device, "a gradient");
    TORCH_CHECK_VALUE(0 <= group_index[i] && group_index[i] < args.n_groups, "alig_fused: group_index[", i,
                      "] = ", group_index[i], " is not in [0, ", args.n_groups, ")");
    const DType dtype = storage_dtype(param, i);
    check_layout(param, param, "params", i);
    check_layout(grad, param, "grads", i);
    void* buffer_ptr = nullptr;
    if (buffer.numel() != 0) {
      check_device(buffer, device, "a momentum buffer");
      check_layout(buffer, param, "momentum_buffers", i);
      buffer_ptr = buffer.data_ptr();
    }
    args.tensors.push_back({param.data_ptr(), grad.data_ptr(), buffer_ptr, param.numel(), group_index[i], dtype});
  }
  return args;
}

// The scalars of a step (loss, outputs, found_inf), added to `args`.
void check_step_scalars(StepArgs& args, const at::Tensor& loss, const at::Tensor& step_size,
                        const at::Tensor& skipped_steps, const std::optional<at::Tensor>& found_inf) {
  const at::Device device = args.device;
  TORCH_CHECK_VALUE(loss.numel() == 1 && at::isFloatingType(loss.scalar_type()),
                    "alig_fused: loss must be a floating-point scalar tensor");
  check_device(loss, device, "loss");
  args.loss = loss.scalar_type() == at::kDouble ? loss : loss.to(at::kDouble);
  TORCH_CHECK_VALUE(step_size.scalar_type() == at::kFloat && step_size.numel() == args.n_groups &&
                        step_size.is_contiguous(),
                    "alig_fused: step_size must be a contiguous float32 tensor of n_groups = ", args.n_groups,
                    " elements, got ", step_size.scalar_type(), " of shape ", step_size.sizes());
  check_device(step_size, device, "step_size");
  TORCH_CHECK_VALUE(skipped_steps.scalar_type() == at::kLong && skipped_steps.numel() == 1,
                    "alig_fused: skipped_steps must be an int64 scalar tensor");
  check_device(skipped_steps, device, "skipped_steps");
  args.found_inf = scalar_float(found_inf, device, "found_inf");
}

// The pass-1 sums given to alig_update_: [n_groups, sum::kCount] float64, contiguous.
void check_sums(const StepArgs& args, const at::Tensor& sums) {
  TORCH_CHECK_VALUE(sums.dim() == 2 && sums.size(0) == args.n_groups && sums.size(1) == sum::kCount &&
                        sums.scalar_type() == at::kDouble && sums.is_contiguous(),
                    "alig_fused: sums must be a contiguous float64 tensor of shape [n_groups = ", args.n_groups,
                    ", ", sum::kCount, "] (alig_sums' result), got ", sums.scalar_type(), " of shape ",
                    sums.sizes());
  check_device(sums, args.device, "sums");
}

// alig_apply_'s coefs [n_groups, coef::kCount] float32 contiguous and skip (a bool scalar).
void check_apply_tables(const StepArgs& args, const at::Tensor& coefs, const at::Tensor& skip) {
  TORCH_CHECK_VALUE(coefs.dim() == 2 && coefs.size(1) == coef::kCount && coefs.scalar_type() == at::kFloat &&
                        coefs.is_contiguous(),
                    "alig_fused: coefs must be a contiguous float32 tensor of shape [n_groups, ", coef::kCount,
                    "], got ", coefs.scalar_type(), " of shape ", coefs.sizes());
  TORCH_CHECK_VALUE(skip.numel() == 1 && skip.scalar_type() == at::kBool, "alig_fused: skip must be a bool scalar tensor");
  check_device(skip, coefs.device(), "skip");
}

// ---- the ops: one body per op for every device -----------------------------------------

template <c10::DeviceType kDevice>
const DevicePasses& passes() {
#ifdef ALIG_WITH_CUDA
  if constexpr (kDevice == c10::DeviceType::CUDA) return cuda_passes();
#endif
  static_assert(kDevice == c10::DeviceType::CPU || kDevice == c10::DeviceType::CUDA);
  return cpu_passes();
}

template <c10::DeviceType kDevice>
void alig_step_op(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                  c10::IntArrayRef group_index, const at::Tensor& hparams, const at::Tensor& loss,
                  const at::Tensor& step_size, const at::Tensor& skipped_steps,
                  const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  StepArgs args = check_tensor_args(params, grads, momentum_buffers, group_index, hparams, grad_scale, kDevice);
  check_step_scalars(args, loss, step_size, skipped_steps, found_inf);
  const c10::DeviceGuard guard(args.device);
  passes<kDevice>().step(args, step_size, skipped_steps);
}

template <c10::DeviceType kDevice>
at::Tensor alig_sums_op(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                        c10::IntArrayRef group_index, const at::Tensor& hparams,
                        const std::optional<at::Tensor>& grad_scale) {
  const StepArgs args = check_tensor_args(params, grads, momentum_buffers, group_index, hparams, grad_scale, kDevice);
  const c10::DeviceGuard guard(args.device);
  return passes<kDevice>().sums(args);
}

template <c10::DeviceType kDevice>
void alig_update_op(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                    c10::IntArrayRef group_index, const at::Tensor& hparams, const at::Tensor& sums,
                    const at::Tensor& loss, const at::Tensor& step_size, const at::Tensor& skipped_steps,
                    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  StepArgs args = check_tensor_args(params, grads, momentum_buffers, group_index, hparams, grad_scale, kDevice);
  check_step_scalars(args, loss, step_size, skipped_steps, found_inf);
  check_sums(args, sums);
  const c10::DeviceGuard guard(args.device);
  passes<kDevice>().update(args, sums, step_size, skipped_steps);
}

template <c10::DeviceType kDevice>
void alig_apply_op(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                   c10::IntArrayRef group_index, const at::Tensor& coefs, const at::Tensor& skip,
                   const std::optional<at::Tensor>& grad_scale) {
  const StepArgs args = check_tensor_lists(params, grads, momentum_buffers, group_index, coefs, grad_scale, kDevice);
  check_apply_tables(args, coefs, skip);
  const c10::DeviceGuard guard(args.device);
  passes<kDevice>().apply(args, coefs, skip);
}

template <c10::DeviceType kDevice>
void register_ops(torch::Library& m) {
  m.impl("alig_step_", &alig_step_op<kDevice>);
  m.impl("alig_sums", &alig_sums_op<kDevice>);
  m.impl("alig_update_", &alig_update_op<kDevice>);
  m.impl("alig_apply_", &alig_apply_op<kDevice>);
}

}  // namespace
}  // namespace alig_fused

TORCH_LIBRARY(alig_fused, m) {
  m.set_python_module("alig_fused.cpp_ops");  // holds the fake kernels
  // One ALI-G step (docs/backends.md): pass-1 sums, finalize, pass 2. Writes the
  // parameters, the momentum buffers (an empty tensor = the group has no momentum),
  // step_size [n_groups] and skipped_steps; nothing else. No host sync on CUDA.
  m.def(
      "alig_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, int[] group_index, "
      "Tensor hparams, Tensor loss, Tensor(c!) step_size, Tensor(d!) skipped_steps, Tensor? grad_scale, "
      "Tensor? found_inf) -> ()");
  // The same step in two halves, for sharded parameters: the caller all-reduces the
  // pass-1 sums [n_groups, 6] (float64) between them.
  m.def(
      "alig_sums(Tensor[] params, Tensor[] grads, Tensor[] momentum_buffers, int[] group_index, Tensor hparams, "
      "Tensor? grad_scale) -> Tensor");
  m.def(
      "alig_update_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, int[] group_index, "
      "Tensor hparams, Tensor sums, Tensor loss, Tensor(c!) step_size, Tensor(d!) skipped_steps, "
      "Tensor? grad_scale, Tensor? found_inf) -> ()");
  // Pass 2 alone, given its coefficients [n_groups, 5] (float32, functional.Coef) and the
  // skip flag (bool): w' = (w + a*b - c*g) * scale, b' = mu*b - d*g; nothing written when
  // skip is set. FusedMoMo's finalize (alig_fused/momo.py) computes the coefficients.
  // CPU and CUDA; on CUDA coefs and skip are read on the device (no host sync, capturable).
  m.def(
      "alig_apply_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, int[] group_index, "
      "Tensor coefs, Tensor skip, Tensor? grad_scale) -> ()");
}

// ---------------------------------------------------------------------------------------
// alig_finalize: the finalize alone (CPU), for tests/test_finalize_conformance.py. The
// same alig_math.h functions the CPU and CUDA kernels call between their passes, fed the
// caller's per-group sums; returns (step_size [n] float64, coefs [n, 5] float32, skip bool).
// ---------------------------------------------------------------------------------------

namespace alig_fused {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> alig_finalize_cpu(const at::Tensor& sums, const at::Tensor& loss,
                                                                 const at::Tensor& hparams,
                                                                 const std::optional<at::Tensor>& found_inf) {
  TORCH_CHECK_VALUE(hparams.dim() == 2 && hparams.size(1) == hparam::kCount && hparams.scalar_type() == at::kDouble,
                    "alig_fused: hparams must be a float64 tensor of shape [n_groups, ", hparam::kCount, "]");
  const int64_t n_groups = hparams.size(0);
  TORCH_CHECK_VALUE(sums.dim() == 2 && sums.size(0) == n_groups && sums.size(1) == sum::kCount &&
                        sums.scalar_type() == at::kDouble,
                    "alig_fused: sums must be a float64 tensor of shape [n_groups = ", n_groups, ", ", sum::kCount,
                    "]");
  TORCH_CHECK_VALUE(loss.numel() == 1 && at::isFloatingType(loss.scalar_type()),
                    "alig_fused: loss must be a floating-point scalar tensor");
  const at::Tensor s = sums.contiguous();
  const at::Tensor hp = hparams.contiguous();
  const double loss_value = loss.to(at::kDouble).item<double>();
  // found_inf as the kernels read it: an fp32 scalar, > 0 means skip.
  const bool inf_found = found_inf.has_value() && found_inf->defined() && found_inf->to(at::kFloat).item<float>() > 0;
  const double grad_sq_norm = total_grad_sq_norm(s.data_ptr<double>(), n_groups);
  const bool skip = step_is_skipped(loss_value, grad_sq_norm, inf_found);
  at::Tensor step_size = at::empty({n_groups}, hparams.options());
  at::Tensor coefs = at::empty({n_groups, coef::kCount}, hparams.options().dtype(at::kFloat));
  for (int64_t k = 0; k < n_groups; ++k) {
    step_size.data_ptr<double>()[k] =
        finalize_group(hp.data_ptr<double>() + k * hparam::kCount, s.data_ptr<double>() + k * sum::kCount,
                       loss_value, grad_sq_norm, skip, coefs.data_ptr<float>() + k * coef::kCount);
  }
  return {step_size, coefs, at::scalar_tensor(skip, hparams.options().dtype(at::kBool))};
}

}  // namespace
}  // namespace alig_fused

TORCH_LIBRARY_FRAGMENT(alig_fused, m) {
  m.def("alig_finalize(Tensor sums, Tensor loss, Tensor hparams, Tensor? found_inf) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(alig_fused, CPU, m) {
  alig_fused::register_ops<c10::DeviceType::CPU>(m);
  m.impl("alig_finalize", &alig_fused::alig_finalize_cpu);
}

#ifdef ALIG_WITH_CUDA
TORCH_LIBRARY_IMPL(alig_fused, CUDA, m) { alig_fused::register_ops<c10::DeviceType::CUDA>(m); }
#endif
