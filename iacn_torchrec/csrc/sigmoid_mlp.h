// The layers after the first of a sigmoid MLP that ends in one logit, forward and backward: DIN's
// attention unit (csrc/din_attention.cpp) and DIEN's auxiliary-loss net (csrc/next_behaviour_loss.cpp)
// build their first layer each in their own way and share the rest. Matrix products go to ATen (MKL).
#pragma once

#include <torch/extension.h>

#include <vector>

namespace iacn_mlp {

// From the first layer's pre-activation h [R, H_1] (turned into σ(h) in place): appends the hidden
// activations a_1 .. a_m (m = weights.size() - 1) to `acts` and returns layer m + 1's logits [R, 1].
inline at::Tensor forward(at::Tensor h, const std::vector<at::Tensor>& weights,
                          const std::vector<at::Tensor>& biases, std::vector<at::Tensor>& acts) {
  const int64_t m = int64_t(weights.size()) - 1;
  at::Tensor x = h;
  for (int64_t l = 0; l <= m; ++l) {
    if (l > 0) x = at::addmm(biases[l], acts.back(), weights[l].t());
    if (l == m) break;
    acts.push_back(x.sigmoid_());  // ATen's vectorised exp: faster than a loop of std::exp
  }
  return x;
}

// From the logits' gradient dx [R, 1] back through layers m + 1 .. 2 (acts = a_1 .. a_m from
// `forward`): sets d_w[l] and d_b[l] for l >= 1 and returns the gradient of the first layer's
// pre-activation [R, H_1].
inline at::Tensor backward(at::Tensor dx, const std::vector<at::Tensor>& weights,
                           const std::vector<at::Tensor>& acts, std::vector<at::Tensor>& d_w,
                           std::vector<at::Tensor>& d_b) {
  for (int64_t l = int64_t(weights.size()) - 1; l > 0; --l) {
    const at::Tensor& a = acts[l - 1];  // the input of layer l
    d_b[l] = dx.sum(0);
    d_w[l] = at::mm(dx.t(), a);
    at::Tensor da = at::mm(dx, weights[l]);
    AT_DISPATCH_FLOATING_TYPES(da.scalar_type(), "sigmoid_mlp_backward", [&] {
      using T = scalar_t;
      T* p = da.data_ptr<T>();
      const T* s = a.data_ptr<T>();
      for (int64_t k = 0, n = da.numel(); k < n; ++k) p[k] *= s[k] * (T(1) - s[k]);
    });
    dx = da;
  }
  return dx;
}

}  // namespace iacn_mlp
