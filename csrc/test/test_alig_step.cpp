// alig_fused::alig_step_ on CPU tensors, called through the dispatcher, against a plain
// per-tensor ALI-G loop in double precision (the reference order of operations:
// w -= gamma g; b = mu b - gamma g (adjusted: mu b - g); w += mu b (adjusted: gamma mu b);
// then the group's joint l2 projection). Plus: a non-finite loss changes no bit, and the
// result does not depend on the thread count. Exit status 0 = all passed.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <optional>
#include <string>
#include <vector>

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

struct Group {
  double lr, momentum;
  bool adjusted;
  double max_norm, eps, f_star, scaling;
};

const std::vector<Group> kGroups = {
    {kInf, 0.9, false, 6.0, 1e-5, 0.0, 1.0},  // standard momentum, projection active
    {2e-5, 0.5, true, kInf, 1e-5, 0.0, 1.0},  // adjusted momentum, max_lr binding (Polyak ~1e-4)
    {kInf, 0.0, false, kInf, 1e-3, 0.1, 2.0},  // no momentum, f_star and scaling
};
// (group, numel): odd sizes, one tensor of several chunks (16384 elements each).
const std::vector<std::pair<int64_t, int64_t>> kTensors = {{0, 1}, {0, 7}, {0, 40003}, {1, 1000}, {1, 3},
                                                           {2, 129}, {2, 1}, {0, 64}};

using StepFn = void(at::TensorList, at::TensorList, at::TensorList, c10::IntArrayRef, const at::Tensor&,
                    const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                    const std::optional<at::Tensor>&);

c10::TypedOperatorHandle<StepFn> step_op() {
  return c10::Dispatcher::singleton().findSchemaOrThrow("alig_fused::alig_step_", "").typed<StepFn>();
}

at::Tensor hparams_table() {
  at::Tensor table = at::empty({static_cast<int64_t>(kGroups.size()), 7}, at::kDouble);
  for (size_t k = 0; k < kGroups.size(); ++k) {
    const Group& g = kGroups[k];
    const double row[7] = {g.lr, g.momentum, g.adjusted ? 1.0 : 0.0, g.max_norm, g.eps, g.f_star, g.scaling};
    for (int j = 0; j < 7; ++j) table[k][j] = row[j];
  }
  return table;
}

// The state of one run: parameters and buffers in `dtype`.
struct State {
  std::vector<at::Tensor> params, buffers;
};

State initial_state(at::ScalarType dtype) {
  at::manual_seed(0);
  State s;
  for (const auto& [group, numel] : kTensors) {
    s.params.push_back(at::randn({numel}, at::kDouble).to(dtype));
    s.buffers.push_back(kGroups[group].momentum > 0 ? at::zeros({numel}, dtype) : at::empty({0}, dtype));
  }
  return s;
}

// Gradients and loss of step `step`: random, the same for every run.
std::vector<at::Tensor> grads_at(int step) {
  at::manual_seed(1000 + step);
  std::vector<at::Tensor> grads;
  for (const auto& [group, numel] : kTensors) grads.push_back(at::randn({numel}, at::kDouble) * 0.3);
  return grads;
}

double loss_at(int step) { return 2.0 / (1.0 + step); }

void op_step(State& s, const std::vector<at::Tensor>& grads, double loss, at::Tensor& step_size,
             at::Tensor& skipped) {
  std::vector<at::Tensor> g;
  for (size_t i = 0; i < grads.size(); ++i) g.push_back(grads[i].to(s.params[i].scalar_type()));
  std::vector<int64_t> group_index;
  for (const auto& t : kTensors) group_index.push_back(t.first);
  step_op().call(s.params, g, s.buffers, group_index, hparams_table(), at::scalar_tensor(loss, at::kDouble),
                 step_size, skipped, std::nullopt, std::nullopt);
}

void reference_step(State& s, const std::vector<at::Tensor>& grads, double loss) {
  double grad_sq_norm = 0.0;
  for (const auto& g : grads) grad_sq_norm += g.pow(2).sum().item<double>();
  for (size_t k = 0; k < kGroups.size(); ++k) {
    const Group& hp = kGroups[k];
    const double step_size =
        std::min(hp.lr, std::max(loss - hp.f_star, 0.0) / (hp.scaling * grad_sq_norm + hp.eps));
    double norm_sq = 0.0;
    for (size_t i = 0; i < kTensors.size(); ++i) {
      if (kTensors[i].first != static_cast<int64_t>(k)) continue;
      at::Tensor& w = s.params[i];
      w.sub_(grads[i] * step_size);
      if (hp.momentum > 0) {
        at::Tensor& b = s.buffers[i];
        if (hp.adjusted) {
          b.mul_(hp.momentum).sub_(grads[i]);
          w.add_(b * (step_size * hp.momentum));
        } else {
          b.mul_(hp.momentum).sub_(grads[i] * step_size);
          w.add_(b * hp.momentum);
        }
      }
      norm_sq += w.pow(2).sum().item<double>();
    }
    if (std::sqrt(norm_sq) > hp.max_norm) {
      for (size_t i = 0; i < kTensors.size(); ++i) {
        if (kTensors[i].first == static_cast<int64_t>(k)) s.params[i].mul_(hp.max_norm / std::sqrt(norm_sq));
      }
    }
  }
}

int failures = 0, passes = 0;

void check(bool ok, const std::string& what) {
  std::printf("%s: %s\n", ok ? "PASS" : "FAIL", what.c_str());
  (ok ? passes : failures)++;
}

double max_diff(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  double worst = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].numel() == 0) continue;
    worst = std::max(worst, (a[i].to(at::kDouble) - b[i].to(at::kDouble)).abs().max().item<double>());
  }
  return worst;
}

bool bitwise_equal(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  for (size_t i = 0; i < a.size(); ++i) {
    if (!at::equal(a[i].view(at::kByte), b[i].view(at::kByte))) return false;
  }
  return true;
}

std::vector<at::Tensor> clone_all(const std::vector<at::Tensor>& tensors) {
  std::vector<at::Tensor> copies;
  for (const auto& t : tensors) copies.push_back(t.clone());
  return copies;
}

State run_op(at::ScalarType dtype, int steps, at::Tensor* step_size_out = nullptr) {
  State s = initial_state(dtype);
  at::Tensor step_size = at::zeros({static_cast<int64_t>(kGroups.size())}, at::kFloat);
  at::Tensor skipped = at::zeros({}, at::kLong);
  for (int step = 0; step < steps; ++step) op_step(s, grads_at(step), loss_at(step), step_size, skipped);
  if (step_size_out) *step_size_out = step_size;
  return s;
}

void test_matches_reference(at::ScalarType dtype, double tolerance) {
  constexpr int kSteps = 6;
  at::Tensor step_size;
  const State fused = run_op(dtype, kSteps, &step_size);
  State exact = initial_state(at::kDouble);
  for (int step = 0; step < kSteps; ++step) reference_step(exact, grads_at(step), loss_at(step));
  const double params_diff = max_diff(fused.params, exact.params);
  const double buffers_diff = max_diff(fused.buffers, exact.buffers);
  check(params_diff <= tolerance && buffers_diff <= tolerance,
        std::string("matches the plain loop in ") + c10::toString(dtype) + " (params " + std::to_string(params_diff) +
            ", buffers " + std::to_string(buffers_diff) + ", tolerance " + std::to_string(tolerance) + ")");
  check(step_size[1].item<float>() == 2e-5f && step_size[0].item<float>() > 2e-5f, "max_lr caps group 1's step size");
}

void test_non_finite_loss_changes_nothing() {
  State s = run_op(at::kFloat, 2);
  const State before{clone_all(s.params), clone_all(s.buffers)};
  at::Tensor step_size = at::zeros({static_cast<int64_t>(kGroups.size())}, at::kFloat);
  at::Tensor skipped = at::zeros({}, at::kLong);
  op_step(s, grads_at(5), std::nan(""), step_size, skipped);
  check(bitwise_equal(s.params, before.params) && bitwise_equal(s.buffers, before.buffers),
        "a nan loss changes no bit");
  check(skipped.item<int64_t>() == 1 && step_size.abs().sum().item<float>() == 0.0f,
        "the skipped step is counted, step sizes are 0");
}

void test_thread_count_does_not_matter() {
  const int before = at::get_num_threads();
  at::set_num_threads(1);
  const State one = run_op(at::kFloat, 4);
  at::set_num_threads(2);
  const State two = run_op(at::kFloat, 4);
  at::set_num_threads(before);
  check(bitwise_equal(one.params, two.params) && bitwise_equal(one.buffers, two.buffers),
        "1 and 2 threads give the same bits");
}

}  // namespace

int main() {
  try {
    test_matches_reference(at::kFloat, 2e-5);
    test_matches_reference(at::kBFloat16, 6e-2);
    test_matches_reference(at::kHalf, 8e-3);
    test_non_finite_loss_changes_nothing();
    test_thread_count_does_not_matter();
  } catch (const std::exception& e) {
    std::printf("FAIL: exception: %s\n", e.what());
    ++failures;
  }
  std::printf("%d passed, %d failed\n", passes, failures);
  return failures == 0 ? 0 : 1;
}
