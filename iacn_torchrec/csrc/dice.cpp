// Dice (DIN's activation, iacn_torchrec.models.layers.Dice) forward and backward, one kernel each.
//
//   s = (x - μ) / sqrt(σ² + eps)       batch statistics in training (running ones updated in place),
//                                      the running statistics in eval
//   p = sigmoid(s),   y = x · (α + (1 - α) · p)
//
// ATen runs this as BatchNorm plus ~6 elementwise ops each way, each a pass over [M, H] and an
// autograd record: ~0.2 ms forward+backward for DIN's [128, 200] tower layer, and at evaluation
// (2,048 rows) a third of the tower's time. Here each direction is two or three passes over the rows
// whose inner loop over the H channels the compiler vectorises (vec_math.h's float sigmoid). The
// autograd node is C++ (Dice), so the main backward runs it without the GIL.
#include <torch/extension.h>

#include "vec_math.h"

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace {

using at::Tensor;
using iacn_vec::sigmoid_of;

// Per-channel statistics of x [M, H] in training: the biased variance normalises, the unbiased one
// goes into the running variance (as nn.BatchNorm1d). Two passes (mean, then squared deviations),
// accumulated in double. Updates running_mean / running_var in place. Returns (mean [H], invstd [H]).
// Counts the batch in num_batches_tracked; momentum < 0 means BatchNorm's momentum=None (a cumulative
// average, factor 1 / batches counted).
std::pair<Tensor, Tensor> batch_statistics(const Tensor& x, Tensor& running_mean, Tensor& running_var,
                                           Tensor& num_batches_tracked, double momentum, double eps) {
  const int64_t M = x.size(0), H = x.size(1);
  TORCH_CHECK(M > 1, "Dice: expected more than 1 value per channel when training, got input of size ",
              x.sizes());
  TORCH_CHECK(num_batches_tracked.scalar_type() == at::kLong && num_batches_tracked.numel() == 1,
              "Dice kernel: num_batches_tracked must be one int64");
  const int64_t batches = ++num_batches_tracked.data_ptr<int64_t>()[0];
  if (momentum < 0) momentum = 1.0 / double(batches);
  Tensor mean = at::empty({H}, x.options()), invstd = at::empty({H}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dice_statistics", [&] {
    using T = scalar_t;
    const T* xp = x.data_ptr<T>();
    std::vector<double> sum(H, 0.0), sq(H, 0.0);
    for (int64_t m = 0; m < M; ++m) {
      const T* row = xp + m * H;
      _Pragma("omp simd") for (int64_t h = 0; h < H; ++h) sum[h] += double(row[h]);
    }
    for (int64_t h = 0; h < H; ++h) sum[h] /= double(M);
    for (int64_t m = 0; m < M; ++m) {
      const T* row = xp + m * H;
      _Pragma("omp simd") for (int64_t h = 0; h < H; ++h) {
        const double d = double(row[h]) - sum[h];
        sq[h] += d * d;
      }
    }
    T* mp = mean.data_ptr<T>();
    T* ip = invstd.data_ptr<T>();
    T* rm = running_mean.data_ptr<T>();
    T* rv = running_var.data_ptr<T>();
    for (int64_t h = 0; h < H; ++h) {
      mp[h] = T(sum[h]);
      ip[h] = T(1.0 / std::sqrt(sq[h] / double(M) + eps));
      rm[h] = T((1.0 - momentum) * double(rm[h]) + momentum * sum[h]);
      rv[h] = T((1.0 - momentum) * double(rv[h]) + momentum * sq[h] / double(M - 1));
    }
  });
  return {mean, invstd};
}

// (mean, invstd): the batch's in training (updating BatchNorm's buffers), else the running ones.
std::pair<Tensor, Tensor> statistics(const Tensor& x, Tensor& running_mean, Tensor& running_var,
                                     Tensor& num_batches_tracked, bool training, double momentum,
                                     double eps) {
  if (training) return batch_statistics(x, running_mean, running_var, num_batches_tracked, momentum, eps);
  return {running_mean.contiguous(), (running_var + eps).rsqrt()};
}

// y = x (α + (1 - α) sigmoid((x - mean) invstd)); writes p = sigmoid(·) too when p_out is defined.
Tensor activate(const Tensor& x, const Tensor& alpha, const Tensor& mean, const Tensor& invstd,
                const Tensor& p_out) {
  const int64_t M = x.size(0), H = x.size(1);
  Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dice_forward", [&] {
    using T = scalar_t;
    const T* xp = x.data_ptr<T>();
    const T* ap = alpha.data_ptr<T>();
    const T* mp = mean.data_ptr<T>();
    const T* ip = invstd.data_ptr<T>();
    T* yp = y.data_ptr<T>();
    T* pp = p_out.defined() ? p_out.data_ptr<T>() : nullptr;
    // one loop, instantiated with and without the store of p (no branch inside the simd loop)
    auto rows = [&](auto store_p) {
      for (int64_t m = 0; m < M; ++m) {
        const T* xr = xp + m * H;
        T* yr = yp + m * H;
        T* pr = decltype(store_p)::value ? pp + m * H : nullptr;
        _Pragma("omp simd") for (int64_t h = 0; h < H; ++h) {
          const T p = sigmoid_of((xr[h] - mp[h]) * ip[h]);
          if constexpr (decltype(store_p)::value) pr[h] = p;
          yr[h] = xr[h] * (ap[h] + (T(1) - ap[h]) * p);
        }
      }
    };
    if (pp)
      rows(std::true_type{});
    else
      rows(std::false_type{});
  });
  return y;
}

// Backward of y w.r.t. x and α given g = ∂L/∂y. With u = g·x·(1 - α)·p(1 - p) = ∂L/∂s:
//   ∂L/∂α = Σ_m g·x·(1 - p)
//   ∂L/∂x = g·(α + (1 - α)p) + invstd·(u - mean_m(u) - s·mean_m(u·s))   (batch statistics)
//   ∂L/∂x = g·(α + (1 - α)p) + invstd·u                                (running statistics)
std::vector<Tensor> dice_backward(const Tensor& g_in, const Tensor& x, const Tensor& alpha, const Tensor& p,
                                  const Tensor& mean, const Tensor& invstd, bool batch_stats) {
  const Tensor g = g_in.contiguous();
  const int64_t M = x.size(0), H = x.size(1);
  Tensor dx = at::empty_like(x), dalpha = at::empty_like(alpha);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dice_backward", [&] {
    using T = scalar_t;
    const T* gp = g.data_ptr<T>();
    const T* xp = x.data_ptr<T>();
    const T* ap = alpha.data_ptr<T>();
    const T* pp = p.data_ptr<T>();
    const T* mp = mean.data_ptr<T>();
    const T* ip = invstd.data_ptr<T>();
    T* dxp = dx.data_ptr<T>();
    std::vector<double> da(H, 0.0), su(H, 0.0), sus(H, 0.0);  // column sums, accumulated in double
    for (int64_t m = 0; m < M; ++m) {
      const T *gr = gp + m * H, *xr = xp + m * H, *pr = pp + m * H;
      _Pragma("omp simd") for (int64_t h = 0; h < H; ++h) {
        const T gx = gr[h] * xr[h];
        da[h] += double(gx * (T(1) - pr[h]));
        const T u = gx * (T(1) - ap[h]) * pr[h] * (T(1) - pr[h]);
        su[h] += double(u);
        sus[h] += double(u * (xr[h] - mp[h]) * ip[h]);
      }
    }
    if (batch_stats) {
      for (int64_t h = 0; h < H; ++h) {
        su[h] /= double(M);
        sus[h] /= double(M);
      }
    } else {
      std::fill(su.begin(), su.end(), 0.0);
      std::fill(sus.begin(), sus.end(), 0.0);
    }
    std::vector<T> mu(su.begin(), su.end()), mus(sus.begin(), sus.end());
    for (int64_t m = 0; m < M; ++m) {
      const T *gr = gp + m * H, *xr = xp + m * H, *pr = pp + m * H;
      T* dr = dxp + m * H;
      _Pragma("omp simd") for (int64_t h = 0; h < H; ++h) {
        const T s = (xr[h] - mp[h]) * ip[h];
        const T u = gr[h] * xr[h] * (T(1) - ap[h]) * pr[h] * (T(1) - pr[h]);
        dr[h] = gr[h] * (ap[h] + (T(1) - ap[h]) * pr[h]) + ip[h] * (u - mu[h] - s * mus[h]);
      }
    }
    T* dap = dalpha.data_ptr<T>();
    for (int64_t h = 0; h < H; ++h) dap[h] = T(da[h]);
  });
  return {dx, dalpha};
}

// The autograd node: inputs x [M, H], α [H], then BatchNorm's buffers (updated in place when
// training; no gradients) and its settings.
class Dice : public torch::autograd::Function<Dice> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& x,
                                                const Tensor& alpha, Tensor running_mean, Tensor running_var,
                                                Tensor num_batches_tracked, bool training, double momentum,
                                                double eps) {
    auto [mean, invstd] =
        statistics(x, running_mean, running_var, num_batches_tracked, training, momentum, eps);
    Tensor p = at::empty_like(x);
    Tensor y = activate(x, alpha, mean, invstd, p);
    ctx->save_for_backward({x, alpha, p, mean, invstd});
    ctx->saved_data["training"] = training;
    return {y};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "the fused Dice kernel has no double backward; set IACN_FUSED_KERNEL=0 to differentiate "
                "through its gradients");
    const std::vector<Tensor> s = ctx->get_saved_variables();
    std::vector<Tensor> d = dice_backward(grads[0], s[0], s[1], s[2], s[3], s[4],
                                          ctx->saved_data["training"].toBool());
    return {d[0], d[1], Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// y = Dice(x) for x [M, H] (contiguous). Without a gradient to record (evaluation), only y is
// allocated and nothing is saved.
Tensor apply(const Tensor& x, const Tensor& alpha, Tensor running_mean, Tensor running_var,
             Tensor num_batches_tracked, bool training, double momentum, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && alpha.is_contiguous() && alpha.numel() == x.size(1),
              "Dice kernel: x must be a contiguous [M, H] and alpha [H]");
  if (at::GradMode::is_enabled() && (x.requires_grad() || alpha.requires_grad()))
    return Dice::apply(x, alpha, running_mean, running_var, num_batches_tracked, training, momentum, eps)[0];
  at::NoGradGuard no_grad;
  auto [mean, invstd] =
      statistics(x, running_mean, running_var, num_batches_tracked, training, momentum, eps);
  return activate(x, alpha, mean, invstd, Tensor());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // no GIL needed: the kernels and the autograd node touch tensors only
  m.def("apply", &apply, "Dice with batch or running statistics, with its autograd node (CPU)",
        py::call_guard<py::gil_scoped_release>());
}
