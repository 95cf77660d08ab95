// DIEN's GRU / AUGRU recurrence over packed steps (iacn_torchrec/models/dien.py, _PackedRecurrence),
// forward, hand-written backward and the autograd node in C++.
//
// The same ATen ops in the same order as the Python version (so the same numbers): at DIEN's sizes
// (~20 steps of <= 128 rows, H = 36) each op is tiny and a step costs what its ops cost to dispatch;
// from C++ that is a fraction of the Python dispatch. The node runs without the GIL, so the main
// backward does not wait for the IaCN worker thread's Python.
#include <torch/extension.h>

#include <algorithm>
#include <optional>
#include <vector>

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kSavedPerStep = 7;  // h_{t-1}, n, ũ, 1 - z, r, gh_n, σ'(rz)

// Every step's state [N, H] in packed order (h' = h + ũ ⊙ (n - h), ũ = a (1 - z)); with `keep`,
// the kSavedPerStep packed tensors the backward needs.
std::pair<Tensor, std::vector<Tensor>> recurrence_steps(const Tensor& gi, const std::optional<Tensor>& att,
                                                        const Tensor& w_hh, const Tensor& b_hh,
                                                        const std::vector<int64_t>& sizes, bool keep) {
  const int64_t H = w_hh.size(1);
  const Tensor w_t = w_hh.t();
  const std::vector<Tensor> gi_parts = gi.split_with_sizes({2 * H, H}, 1);
  const std::vector<Tensor> gi_rz = gi_parts[0].split_with_sizes(sizes), gi_n = gi_parts[1].split_with_sizes(sizes);
  std::vector<Tensor> a;
  if (att.has_value()) a = att->unsqueeze(1).split_with_sizes(sizes);
  Tensor h = gi.new_zeros({sizes[0], H});
  std::vector<std::vector<Tensor>> kept(kSavedPerStep);
  std::vector<Tensor> outs;
  outs.reserve(sizes.size());
  for (size_t t = 0; t < sizes.size(); ++t) {
    if (sizes[t] < h.size(0)) h = h.slice(0, 0, sizes[t]);
    const std::vector<Tensor> gh = at::addmm(b_hh, h, w_t).split_with_sizes({2 * H, H}, 1);
    const Tensor rz = at::sigmoid(gi_rz[t] + gh[0]);
    const std::vector<Tensor> r_z = rz.split(H, 1);
    const Tensor n = at::tanh(at::addcmul(gi_n[t], r_z[0], gh[1]));
    const Tensor one_minus_z = at::rsub(r_z[1], 1.0);
    const Tensor u = a.empty() ? one_minus_z : a[t] * one_minus_z;
    Tensor h_next = at::lerp(h, n, u);
    if (keep) {
      const Tensor step[kSavedPerStep] = {h, n, u, one_minus_z, r_z[0], gh[1], at::addcmul(rz, rz, rz, -1.0)};
      for (int64_t k = 0; k < kSavedPerStep; ++k) kept[k].push_back(step[k]);
    }
    outs.push_back(h_next);
    h = h_next;
  }
  std::vector<Tensor> saved;
  if (keep)
    for (auto& x : kept) saved.push_back(at::cat(x));
  return {at::cat(outs), saved};
}

class PackedRecurrence : public torch::autograd::Function<PackedRecurrence> {
 public:
  // Inputs gi [N, 3H], att [N] (absent: a plain GRU), w_hh [3H, H], b_hh [3H], sizes (the rows live
  // at each step, non-increasing).
  static variable_list forward(AutogradContext* ctx, const Tensor& gi, const std::optional<Tensor>& att,
                               const Tensor& w_hh, const Tensor& b_hh, const std::vector<int64_t>& sizes) {
    auto [out, saved] = recurrence_steps(gi, att, w_hh, b_hh, sizes, true);
    std::vector<Tensor> to_save = {att.has_value() ? *att : Tensor(), w_hh};
    to_save.insert(to_save.end(), saved.begin(), saved.end());
    ctx->save_for_backward(to_save);
    ctx->saved_data["sizes"] = sizes;
    ctx->saved_data["has_att"] = att.has_value();
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "DIEN's recurrence kernel has no double backward; set IACN_FUSED_KERNEL=0 to "
                "differentiate through its gradients");
    const std::vector<Tensor> saved_all = ctx->get_saved_variables();
    const std::vector<int64_t> sizes = ctx->saved_data["sizes"].toIntVector();
    const bool has_att = ctx->saved_data["has_att"].toBool();
    const Tensor &att = saved_all[0], &w_hh = saved_all[1];
    const int64_t H = w_hh.size(1);
    const Tensor& prev = saved_all[2];
    std::vector<std::vector<Tensor>> steps;  // [kSavedPerStep][T]
    for (int64_t k = 0; k < kSavedPerStep; ++k) steps.push_back(saved_all[2 + k].split_with_sizes(sizes));
    std::vector<Tensor> a;
    if (has_att) a = att.unsqueeze(1).split_with_sizes(sizes);
    const std::vector<Tensor> grads = grad_outputs[0].split_with_sizes(sizes);
    // the autograd edges are the variable inputs only: gi, [att,] w_hh, b_hh
    const size_t e_w = has_att ? 2 : 1;
    const bool want_att = has_att && ctx->needs_input_grad(1);
    std::vector<Tensor> d_gh, d_pre_n, d_att;
    Tensor carry;  // ∂L/∂h_t flowing back from step t + 1 (its live rows: the first ones)
    for (int64_t t = int64_t(sizes.size()) - 1; t >= 0; --t) {
      const Tensor &h = steps[0][t], &n = steps[1][t], &u = steps[2][t], &one_minus_z = steps[3][t],
                   &r = steps[4][t], &gh_n = steps[5][t], &ds = steps[6][t];
      Tensor dh;
      if (!carry.defined()) {
        dh = grads[t];
      } else if (carry.size(0) == sizes[t]) {
        dh = grads[t] + carry;
      } else {
        dh = grads[t].clone();
        dh.slice(0, 0, carry.size(0)).add_(carry);
      }
      const Tensor dn = dh * u;
      const Tensor d_u = dh * (n - h);
      const Tensor dp_n = at::addcmul(dn, dn, n * n, -1.0);  // through tanh: dn (1 - n²)
      const Tensor d_z = a.empty() ? -d_u : d_u * -a[t];      // ũ = a (1 - z)
      if (want_att) d_att.push_back(at::linalg_vecdot(d_u, one_minus_z));
      const Tensor dp_rz = at::cat({dp_n * gh_n, d_z}, 1) * ds;  // through the sigmoids
      const Tensor d_gh_t = at::cat({dp_rz, dp_n * r}, 1);
      d_gh.push_back(d_gh_t);
      d_pre_n.push_back(dp_n);
      carry = at::addmm(dh - dn, d_gh_t, w_hh);  // dh (1 - ũ) + ∂gh W_hh
    }
    std::reverse(d_gh.begin(), d_gh.end());
    std::reverse(d_pre_n.begin(), d_pre_n.end());
    std::reverse(d_att.begin(), d_att.end());
    const Tensor d_gh_all = at::cat(d_gh);
    const Tensor d_gi = at::cat({d_gh_all.slice(1, 0, 2 * H), at::cat(d_pre_n)}, 1);
    const Tensor d_w = ctx->needs_input_grad(e_w) ? d_gh_all.t().mm(prev) : Tensor();  // Σ_t ∂gh_tᵀ h_{t-1}
    const Tensor d_b = ctx->needs_input_grad(e_w + 1) ? d_gh_all.sum(0) : Tensor();
    const Tensor d_a = want_att ? at::cat(d_att) : Tensor();
    return {d_gi, d_a, d_w, d_b, Tensor()};
  }
};

// states [N, H]; records the autograd node when an input requires grad.
Tensor apply(const Tensor& gi, const std::optional<Tensor>& att, const Tensor& w_hh, const Tensor& b_hh,
             const std::vector<int64_t>& sizes) {
  return PackedRecurrence::apply(gi, att, w_hh, b_hh, sizes)[0];
}

// states [N, H] without autograd (inference).
Tensor steps(const Tensor& gi, const std::optional<Tensor>& att, const Tensor& w_hh, const Tensor& b_hh,
             const std::vector<int64_t>& sizes) {
  return recurrence_steps(gi, att, w_hh, b_hh, sizes, false).first;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // no GIL needed: ATen ops and the autograd node only
  m.def("apply", &apply, "GRU / AUGRU packed recurrence with its autograd node (CPU)",
        py::call_guard<py::gil_scoped_release>());
  m.def("steps", &steps, "GRU / AUGRU packed recurrence, no autograd (CPU)",
        py::call_guard<py::gil_scoped_release>());
}
