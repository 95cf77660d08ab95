// DIEN's next-behaviour auxiliary loss (iacn_torchrec/models/dien.py, _next_behaviour_loss), forward,
// hand-written backward and the autograd node in C++.
//
// L_aux = (1/V) Σ_v [softplus(-f(h_v, e_v)) + softplus(f(h_v, ê_v))], f an MLP with sigmoid hidden
// layers on [h, e] (DIEN's code: 100 → 50 → 1). The first layer is split as W_h h + W_e e + b, so
// W_h h is computed once for the positive and the negative (no [h, e] concatenations); the matrix
// products go to ATen (MKL); the layers after the first are DIN's attention MLP's (sigmoid_mlp.h).
// The same function as the ATen ops to rounding. The node runs without the GIL.
#include <torch/extension.h>

#include "sigmoid_mlp.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

using at::Tensor;

// Forward. Returns [loss (0-dim), then what the backward needs: the hidden activations
// a_1 .. a_m [2V, H_l] (rows 0..V-1 the positives, V..2V-1 the negatives), the logits [2V]].
std::vector<Tensor> loss_forward(const Tensor& h, const Tensor& pos, const Tensor& neg,
                                 const std::vector<Tensor>& weights, const std::vector<Tensor>& biases) {
  const int64_t V = h.size(0), H = h.size(1), D = pos.size(1);
  const int64_t m = int64_t(weights.size()) - 1;  // hidden layers
  TORCH_CHECK(m >= 1 && weights[0].size(1) == H + D && weights[m].size(0) == 1,
              "next_behaviour_loss: needs Linear(H + D, ·) → ... → Linear(·, 1)");
  TORCH_CHECK(neg.sizes() == pos.sizes() && pos.size(0) == V, "next_behaviour_loss: h, pos, neg must have V rows");
  const Tensor& w1 = weights[0];
  const Tensor z_h = at::addmm(biases[0], h, w1.narrow(1, 0, H).t());  // [V, H1]: once for both halves
  const Tensor w_e = w1.narrow(1, H, D).t();
  Tensor a = at::empty({2 * V, w1.size(0)}, h.options());
  {
    Tensor top = a.narrow(0, 0, V), bottom = a.narrow(0, V, V);
    at::mm_out(top, pos, w_e);
    at::mm_out(bottom, neg, w_e);
  }
  a.view({2, V, a.size(1)}).add_(z_h);  // W_h h + b, once, into both halves
  std::vector<Tensor> acts;
  const Tensor logits = iacn_mlp::forward(a, weights, biases, acts).view({2 * V});
  Tensor loss = at::empty({}, h.options());
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "next_behaviour_loss_value", [&] {
    using T = scalar_t;
    const T* lp = logits.data_ptr<T>();
    double sum = 0;  // softplus(-l) for the positives, softplus(l) for the negatives
    for (int64_t i = 0; i < 2 * V; ++i) {
      const double x = i < V ? -double(lp[i]) : double(lp[i]);
      sum += std::max(x, 0.0) + std::log1p(std::exp(-std::abs(x)));
    }
    loss.fill_(T(sum / double(V)));
  });
  std::vector<Tensor> res = {loss};
  res.insert(res.end(), acts.begin(), acts.end());
  res.push_back(logits);
  return res;
}

// Backward of the loss (grad g, 0-dim). Returns [d h, d pos, d neg, d W_1 .. d W_{m+1}, d b_1 .. d b_{m+1}].
std::vector<Tensor> loss_backward(const Tensor& g, const Tensor& h, const Tensor& pos, const Tensor& neg,
                                  const std::vector<Tensor>& weights, const std::vector<Tensor>& acts,
                                  const Tensor& logits) {
  const int64_t V = h.size(0), H = h.size(1), D = pos.size(1);
  const int64_t m = int64_t(weights.size()) - 1;
  Tensor dx = at::empty({2 * V, 1}, h.options());  // ∂L/∂logit: g/V (σ(l) - y)
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "next_behaviour_loss_logits_backward", [&] {
    using T = scalar_t;
    const T scale = g.item<T>() / T(V);
    const T* lp = logits.data_ptr<T>();
    T* dp = dx.data_ptr<T>();
    for (int64_t i = 0; i < 2 * V; ++i) {
      const T s = T(1) / (T(1) + std::exp(-lp[i]));
      dp[i] = scale * (i < V ? s - T(1) : s);
    }
  });
  std::vector<Tensor> d_w(m + 1), d_b(m + 1);
  dx = iacn_mlp::backward(dx, weights, acts, d_w, d_b);  // ∂ first layer's output [2V, H1]
  // first layer: z = W_h h + W_e e + b for e = pos (rows < V) and e = neg (rows >= V)
  const Tensor& w1 = weights[0];
  const Tensor w_h = w1.narrow(1, 0, H), w_e = w1.narrow(1, H, D);
  const Tensor dz_pos = dx.narrow(0, 0, V), dz_neg = dx.narrow(0, V, V);
  const Tensor dz_h = dz_pos + dz_neg;  // h feeds both halves
  d_b[0] = dz_h.sum(0);
  Tensor d_w_e = at::mm(dz_pos.t(), pos);
  d_w_e.addmm_(dz_neg.t(), neg);
  d_w[0] = at::cat({at::mm(dz_h.t(), h), d_w_e}, 1);
  std::vector<Tensor> res = {at::mm(dz_h, w_h), at::mm(dz_pos, w_e), at::mm(dz_neg, w_e)};
  res.insert(res.end(), d_w.begin(), d_w.end());
  res.insert(res.end(), d_b.begin(), d_b.end());
  return res;
}

// The autograd node: inputs h, pos, neg, the MLP's weights W_1 .. W_{m+1}, then its biases; output
// the loss (0-dim).
class NextBehaviourLoss : public torch::autograd::Function<NextBehaviourLoss> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& h,
                                                const Tensor& pos, const Tensor& neg, at::TensorList weights,
                                                at::TensorList biases) {
    // TensorList, not std::vector: autograd gives each element of a TensorList an input edge
    std::vector<Tensor> res = loss_forward(h, pos, neg, weights.vec(), biases.vec());
    std::vector<Tensor> saved = {h, pos, neg};
    saved.insert(saved.end(), weights.begin(), weights.end());
    saved.insert(saved.end(), res.begin() + 1, res.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["layers"] = int64_t(weights.size());
    return {res[0]};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "DIEN's fused auxiliary-loss kernel has no double backward; set IACN_FUSED_KERNEL=0 to "
                "differentiate through its gradients");
    const std::vector<Tensor> saved = ctx->get_saved_variables();
    const int64_t layers = ctx->saved_data["layers"].toInt();
    const std::vector<Tensor> weights(saved.begin() + 3, saved.begin() + 3 + layers);
    const std::vector<Tensor> acts(saved.begin() + 3 + layers, saved.end() - 1);
    return loss_backward(grads[0], saved[0], saved[1], saved[2], weights, acts, saved.back());
  }
};

Tensor apply(const Tensor& h, const Tensor& pos, const Tensor& neg, const std::vector<Tensor>& weights,
             const std::vector<Tensor>& biases) {
  return NextBehaviourLoss::apply(h, pos, neg, at::TensorList(weights), at::TensorList(biases))[0];
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // no GIL needed: the kernels and the autograd node touch tensors only
  m.def("apply", &apply, "DIEN's next-behaviour auxiliary loss with its autograd node (CPU)",
        py::call_guard<py::gil_scoped_release>());
}
