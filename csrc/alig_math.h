// ALI-G math shared by the CPU kernels (alig_cpu.cpp) and the CUDA kernels
// (cuda/alig_cuda.cu). The specification is alig_fused/functional.py: `finalize` for
// the between-passes arithmetic and `torch_alig` for the order of the pass-2 operations.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define ALIG_HOST_DEVICE __host__ __device__
#else
#define ALIG_HOST_DEVICE
#endif

namespace alig_fused {

// Columns of the tables, as in functional.HParam / Sum / Coef.
namespace hparam {
enum : int { kLr = 0, kMomentum, kAdjusted, kMaxNorm, kEps, kFStar, kScaling, kCount };
}
namespace sum {
enum : int { kGG = 0, kWW, kBB, kWB, kWG, kBG, kCount };
}
namespace coef {
enum : int { kA = 0, kC, kD, kMu, kScale, kCount };
}

// Storage dtypes the kernels read and write (math is fp32 whatever the storage).
enum class DType : int64_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3 };

ALIG_HOST_DEVICE inline bool is_finite(double x) {
#if defined(__CUDA_ARCH__)
  return isfinite(x);
#else
  return std::isfinite(x);
#endif
}

// Pass-2 coefficients of one group, in fp32 as pass 2 uses them:
//   w' = (w - c*g + a*b) * scale,   b' = mu*b - d*g.
struct UpdateCoefs {
  float a, c, d, mu, scale;
};

ALIG_HOST_DEVICE inline UpdateCoefs load_coefs(const float* coefs_row) {
  return {coefs_row[coef::kA], coefs_row[coef::kC], coefs_row[coef::kD], coefs_row[coef::kMu],
          coefs_row[coef::kScale]};
}

// One element of pass 2 for a tensor with a momentum buffer. The operations and their
// order are the foreach path's (w -= c*g; w += a*b; b = b*mu - d*g; w *= scale), each
// rounded to fp32 with no fused multiply-add (builds use -ffp-contract=off / --fmad=false),
// so with the same coefficients every backend writes the same bits.
ALIG_HOST_DEVICE inline void update_element(float& w, float& b, float g, const UpdateCoefs& k) {
  float w_new = w - k.c * g;
  w_new = w_new + k.a * b;
  b = b * k.mu - k.d * g;
  w = w_new * k.scale;
}

// One element of pass 2 for a group without momentum (no buffer).
ALIG_HOST_DEVICE inline float update_element(float w, float g, const UpdateCoefs& k) {
  return (w - k.c * g) * k.scale;
}

// G = sum over groups of ||g||^2 (fixed order), from sums [n_groups][sum::kCount].
ALIG_HOST_DEVICE inline double total_grad_sq_norm(const double* sums, int64_t n_groups) {
  double total = 0.0;
  for (int64_t k = 0; k < n_groups; ++k) total += sums[k * sum::kCount + sum::kGG];
  return total;
}

// The skip rule of functional.finalize: a non-finite loss, or G = ||g||^2 not below FLT_MAX
// (nan and inf included), or found_inf. FLT_MAX and not "G finite" because the kernels add
// fp32 partial sums: one that overflows makes G inf only when G >= FLT_MAX anyway (up to
// the fp32 rounding of that partial sum), so with this bound every backend skips the same
// steps however it sums (the torch path's float64 sums of 1e40 would otherwise step).
ALIG_HOST_DEVICE inline bool step_is_skipped(double loss, double grad_sq_norm, bool found_inf) {
  return !(is_finite(loss) && grad_sq_norm < static_cast<double>(FLT_MAX)) || found_inf;
}

// min(1, R / ||w'||) from ||w'||^2: functional.projection_scale.
ALIG_HOST_DEVICE inline double projection_scale(double norm_sq, double max_norm) {
  const double norm = sqrt(norm_sq);
  return norm > max_norm ? max_norm / norm : 1.0;
}

// Step size and pass-2 coefficients of one group: functional.finalize, operation for
// operation in fp64. hp: the group's row of the hparams table; s: its row of the sums.
// Writes coefs[coef::kCount] (fp32) and returns the step size.
ALIG_HOST_DEVICE inline double finalize_group(const double* hp, const double* s, double loss,
                                              double grad_sq_norm, bool skip, float* coefs) {
  if (skip) {  // identity coefficients, step size 0
    coefs[coef::kA] = 0.0f;
    coefs[coef::kC] = 0.0f;
    coefs[coef::kD] = 0.0f;
    coefs[coef::kMu] = 1.0f;
    coefs[coef::kScale] = 1.0f;
    return 0.0;
  }
  const double lr = hp[hparam::kLr], momentum = hp[hparam::kMomentum];
  const bool adjusted = hp[hparam::kAdjusted] > 0;
  const double max_norm = hp[hparam::kMaxNorm], eps = hp[hparam::kEps];
  const double f_star = hp[hparam::kFStar], scaling = hp[hparam::kScaling];

  // gamma = min(lr, max(loss - f_star, 0) / (c * G + eps)); lr = inf means no cap.
  double excess = loss - f_star;
  excess = excess < 0.0 ? 0.0 : excess;
  const double polyak_step = excess / (scaling * grad_sq_norm + eps);
  const double step_size = polyak_step < lr ? polyak_step : lr;

  const double a = adjusted ? step_size * momentum * momentum : momentum * momentum;
  const double c = step_size * (1 + momentum);
  const double d = momentum > 0 ? (adjusted ? 1.0 : step_size) : 0.0;

  // ||w + a b - c g||^2 from the pass-1 sums, clamped at 0 (rounding).
  double new_norm_sq = s[sum::kWW] + a * a * s[sum::kBB] + c * c * s[sum::kGG] + 2 * a * s[sum::kWB] -
                       2 * c * s[sum::kWG] - 2 * a * c * s[sum::kBG];
  new_norm_sq = new_norm_sq < 0.0 ? 0.0 : new_norm_sq;
  const double scale = projection_scale(new_norm_sq, max_norm);

  coefs[coef::kA] = static_cast<float>(a);
  coefs[coef::kC] = static_cast<float>(c);
  coefs[coef::kD] = static_cast<float>(d);
  coefs[coef::kMu] = static_cast<float>(momentum);
  coefs[coef::kScale] = static_cast<float>(scale);
  return step_size;
}

// 1 / grad_scale as the foreach path computes it: an fp32 reciprocal.
ALIG_HOST_DEVICE inline float inverse_grad_scale(const float* grad_scale) {
  return grad_scale == nullptr ? 1.0f : 1.0f / *grad_scale;
}

}  // namespace alig_fused
