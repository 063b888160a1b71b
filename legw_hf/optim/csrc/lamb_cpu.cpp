// LAMB for fp32 tensors on the CPU in two passes over memory, without a scratch copy of the update.
//
// Pass 1 updates the Adam moments and returns, per tensor, ||p||^2 and ||u||^2 with
//     u = (m / bc1) / (sqrt(v / bc2) + eps) + decay * p        (or sqrt(v / bc2 + eps) with eps inside the root)
// Pass 2 recomputes u from the updated moments, with the same instructions, and applies p -= step[t] * u.
// Traffic: pass 1 reads g, m, v, p and writes m, v; pass 2 reads m, v, p and writes p: 10 tensor passes against
// fused AdamW's 7, where materialising u costs 14 (it must be written, then read twice).
//
// All scalars that vary per tensor (bias corrections, the step) arrive as CPU tensors and are read here, so the
// Python side never converts a tensor to a number.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kGrain = 1 << 15;  // elements per task: large enough to amortise the dispatch, ~128 KiB

struct Moments {
  float beta1, beta2, grad_weight, square_weight, grad_scale, l2_decay;
};

struct Direction {
  float inv_bc1, inv_bc2, eps, decay;
};

template <bool EpsInsideRoot>
inline float direction(float m, float v, float p, const Direction& d) {
  const float root = EpsInsideRoot ? std::sqrt(v * d.inv_bc2 + d.eps) : std::sqrt(v * d.inv_bc2) + d.eps;
  return (m * d.inv_bc1) / root + d.decay * p;
}

struct Squares {
  float param, update;
};

// The loops are bound by vector sqrt and division more than by memory, so each is built for AVX-512, AVX2 and a
// baseline, and the loader picks the widest the CPU has (GCC function multi-versioning).
#define LEGW_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))

// One contiguous run of one tensor; pointers are restrict so the loop vectorises.
template <bool EpsInsideRoot>
LEGW_VECTOR_CLONES Squares moments_and_squares(const float* __restrict__ g, float* __restrict__ m, float* __restrict__ v,
                            const float* __restrict__ p, int64_t count, Moments a, Direction d) {
  float param = 0.f, update = 0.f;
#pragma omp simd reduction(+ : param, update)
  for (int64_t i = 0; i < count; ++i) {
    const float grad = g[i] * a.grad_scale + a.l2_decay * p[i];
    const float mi = a.beta1 * m[i] + a.grad_weight * grad;
    const float vi = a.beta2 * v[i] + a.square_weight * grad * grad;
    m[i] = mi;
    v[i] = vi;
    const float u = direction<EpsInsideRoot>(mi, vi, p[i], d);
    param += p[i] * p[i];
    update += u * u;
  }
  return {param, update};
}

template <bool EpsInsideRoot>
LEGW_VECTOR_CLONES void apply_run(const float* __restrict__ m, const float* __restrict__ v, float* __restrict__ p, int64_t count,
               float step, Direction d) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) {
    p[i] -= step * direction<EpsInsideRoot>(m[i], v[i], p[i], d);
  }
}

void check_tensors(const std::vector<at::Tensor>& tensors, const char* what, int64_t count) {
  TORCH_CHECK(static_cast<int64_t>(tensors.size()) == count, what, ": expected ", count, " tensors");
  for (const auto& t : tensors) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), what,
                ": expected contiguous fp32 CPU tensors");
  }
}

const float* per_tensor(const at::Tensor& values, int64_t count, const char* what) {
  TORCH_CHECK(values.device().is_cpu() && values.scalar_type() == at::kFloat && values.is_contiguous() &&
                  values.numel() == count,
              what, ": expected ", count, " contiguous fp32 CPU values");
  return values.data_ptr<float>();
}

// Every tensor cut into runs of at most kGrain elements: one parallel loop over all runs of all tensors, so a
// step forks threads twice in all, not twice per tensor.
struct Run {
  int64_t tensor, begin, count;
};

std::vector<Run> runs_of(const std::vector<at::Tensor>& tensors) {
  std::vector<Run> runs;
  for (int64_t t = 0; t < static_cast<int64_t>(tensors.size()); ++t) {
    const int64_t size = tensors[t].numel();
    for (int64_t begin = 0; begin < size; begin += kGrain) {
      runs.push_back({t, begin, std::min(kGrain, size - begin)});
    }
  }
  return runs;
}

}  // namespace

// Returns a (n, 2) fp32 tensor: ||p||^2 and ||u||^2 per tensor. grad_divisor is a one-element tensor (LAMB's
// global pre-normalisation; 1 when off); bc1, bc2 hold one bias correction per tensor (1 when not inside).
at::Tensor moments_and_squared_norms(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                                     const std::vector<at::Tensor>& exp_avgs,
                                     const std::vector<at::Tensor>& exp_avg_sqs, const at::Tensor& bc1,
                                     const at::Tensor& bc2, const at::Tensor& grad_divisor, double beta1,
                                     double beta2, double grad_weight, double eps, double l2_decay,
                                     double decoupled_decay, bool eps_inside_root) {
  const int64_t n = static_cast<int64_t>(params.size());
  check_tensors(params, "params", n);
  check_tensors(grads, "grads", n);
  check_tensors(exp_avgs, "exp_avgs", n);
  check_tensors(exp_avg_sqs, "exp_avg_sqs", n);
  const float* bias1 = per_tensor(bc1, n, "bc1");
  const float* bias2 = per_tensor(bc2, n, "bc2");
  const float divisor = *per_tensor(grad_divisor, 1, "grad_divisor");
  const Moments moments{static_cast<float>(beta1), static_cast<float>(beta2), static_cast<float>(grad_weight),
                        static_cast<float>(1.0 - beta2), 1.f / divisor, static_cast<float>(l2_decay)};

  std::vector<Direction> directions;
  for (int64_t t = 0; t < n; ++t) {
    directions.push_back({1.f / bias1[t], 1.f / bias2[t], static_cast<float>(eps), static_cast<float>(decoupled_decay)});
  }
  const std::vector<Run> runs = runs_of(params);
  std::vector<Squares> parts(runs.size());
  at::parallel_for(0, static_cast<int64_t>(runs.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      const Run& run = runs[r];
      const int64_t t = run.tensor, b = run.begin;
      const float* g = grads[t].data_ptr<float>() + b;
      float* m = exp_avgs[t].data_ptr<float>() + b;
      float* v = exp_avg_sqs[t].data_ptr<float>() + b;
      const float* p = params[t].data_ptr<float>() + b;
      parts[r] = eps_inside_root ? moments_and_squares<true>(g, m, v, p, run.count, moments, directions[t])
                                 : moments_and_squares<false>(g, m, v, p, run.count, moments, directions[t]);
    }
  });
  std::vector<double> param_squares(n, 0.0), update_squares(n, 0.0);
  for (size_t r = 0; r < runs.size(); ++r) {
    param_squares[runs[r].tensor] += parts[r].param;
    update_squares[runs[r].tensor] += parts[r].update;
  }
  auto out = at::empty({n, 2}, at::kFloat);
  float* squares = out.data_ptr<float>();
  for (int64_t t = 0; t < n; ++t) {
    squares[2 * t] = static_cast<float>(param_squares[t]);
    squares[2 * t + 1] = static_cast<float>(update_squares[t]);
  }
  return out;
}

// p -= steps[t] * u for every tensor, u recomputed from the moments pass 1 left.
void apply_updates(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& exp_avgs,
                   const std::vector<at::Tensor>& exp_avg_sqs, const at::Tensor& bc1, const at::Tensor& bc2,
                   const at::Tensor& steps, double eps, double decoupled_decay, bool eps_inside_root) {
  const int64_t n = static_cast<int64_t>(params.size());
  check_tensors(params, "params", n);
  check_tensors(exp_avgs, "exp_avgs", n);
  check_tensors(exp_avg_sqs, "exp_avg_sqs", n);
  const float* bias1 = per_tensor(bc1, n, "bc1");
  const float* bias2 = per_tensor(bc2, n, "bc2");
  const float* step = per_tensor(steps, n, "steps");
  const std::vector<Run> runs = runs_of(params);
  at::parallel_for(0, static_cast<int64_t>(runs.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      const Run& run = runs[r];
      const int64_t t = run.tensor, b = run.begin;
      const Direction d{1.f / bias1[t], 1.f / bias2[t], static_cast<float>(eps), static_cast<float>(decoupled_decay)};
      const float* m = exp_avgs[t].data_ptr<float>() + b;
      const float* v = exp_avg_sqs[t].data_ptr<float>() + b;
      float* p = params[t].data_ptr<float>() + b;
      if (eps_inside_root) {
        apply_run<true>(m, v, p, run.count, step[t], d);
      } else {
        apply_run<false>(m, v, p, run.count, step[t], d);
      }
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("moments_and_squared_norms", &moments_and_squared_norms,
             "LAMB pass 1: Adam moments in place, per-tensor squared norms of p and u");
  module.def("apply_updates", &apply_updates, "LAMB pass 2: p -= step * u");
}
