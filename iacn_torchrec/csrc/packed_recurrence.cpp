// DIEN's GRU / AUGRU recurrence over packed steps (iacn_torchrec/models/dien.py, _PackedRecurrence),
// forward, hand-written backward and the autograd node in C++.
//
// At DIEN's sizes (~20 steps of <= 128 rows, H = 36) the work of a step is one small matrix
// product; the ~15 elementwise ops around it would each cost more to dispatch than to run. So each
// step is one ATen matrix product (MKL) and one loop over the step's rows for the gates, writing
// straight into packed [N, ·] buffers (no per-step tensors, no cat).
// The same function as the Python version; the sums are formed in another order, so equal to
// rounding. The node runs without the GIL, so the main backward does not wait for the IaCN worker
// thread's Python.
#include <torch/extension.h>

#include "vec_math.h"

#include <optional>
#include <vector>

namespace {

using iacn_vec::sigmoid_of;
using iacn_vec::tanh_of;

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// What the forward keeps for the backward, packed like the states ([N, ·], step-major).
struct Saved {
  Tensor prev;  // h_{t-1} [N, H] (zeros at step 0)
  Tensor rz;    // σ(r), σ(z) [N, 2H]
  Tensor n;     // tanh(gi_n + r ⊙ gh_n) [N, H]
  Tensor gh_n;  // (h_{t-1} W_hhᵀ + b_hh)_n [N, H]
};

std::vector<int64_t> offsets_of(const std::vector<int64_t>& sizes, int64_t N) {
  TORCH_CHECK(!sizes.empty(), "packed_recurrence: no steps");
  std::vector<int64_t> off(sizes.size() + 1, 0);
  for (size_t t = 0; t < sizes.size(); ++t) {
    TORCH_CHECK(sizes[t] > 0 && (t == 0 || sizes[t] <= sizes[t - 1]),
                "packed_recurrence: sizes must be positive and non-increasing");
    off[t + 1] = off[t] + sizes[t];
  }
  TORCH_CHECK(off.back() == N, "packed_recurrence: sizes sum to ", off.back(), ", inputs have ", N, " rows");
  return off;
}

// Every step's state [N, H] in packed order: h' = h + ũ ⊙ (n - h), ũ = a (1 - z) (a = 1 without att).
Tensor recurrence_forward(const Tensor& gi, const std::optional<Tensor>& att, const Tensor& w_hh,
                          const Tensor& b_hh, const std::vector<int64_t>& sizes, Saved& s) {
  const int64_t H = w_hh.size(1), N = gi.size(0), H3 = 3 * H;
  TORCH_CHECK(gi.dim() == 2 && gi.size(1) == H3 && gi.is_contiguous(),
              "packed_recurrence: gi must be a contiguous [N, 3H]");
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == H3, "packed_recurrence: w_hh must be [3H, H]");
  TORCH_CHECK(b_hh.dim() == 1 && b_hh.size(0) == H3 && b_hh.is_contiguous(),
              "packed_recurrence: b_hh must be a contiguous [3H]");
  TORCH_CHECK(!att.has_value() || (att->numel() == N && att->is_contiguous()),
              "packed_recurrence: att must be a contiguous [N] (one weight per packed row), got ",
              att.has_value() ? att->numel() : 0, " values for ", N, " rows");
  const std::vector<int64_t> off = offsets_of(sizes, N);
  const auto opts = gi.options();
  Tensor out = at::empty({N, H}, opts);
  s.prev = at::empty({N, H}, opts);
  s.rz = at::empty({N, 2 * H}, opts);
  s.n = at::empty({N, H}, opts);
  s.gh_n = at::empty({N, H}, opts);
  Tensor gh = at::empty({sizes[0], H3}, opts);  // one step's h W_hhᵀ + b_hh
  const Tensor w_t = w_hh.t();
  AT_DISPATCH_FLOATING_TYPES(gi.scalar_type(), "packed_recurrence_forward", [&] {
    using T = scalar_t;
    const T* gp = gi.data_ptr<T>();
    const T* ap = att.has_value() ? att->data_ptr<T>() : nullptr;
    const T* bp = b_hh.data_ptr<T>();
    T *op = out.data_ptr<T>(), *pp = s.prev.data_ptr<T>(), *rzp = s.rz.data_ptr<T>(), *np = s.n.data_ptr<T>(),
      *gnp = s.gh_n.data_ptr<T>(), *ghp = gh.data_ptr<T>();
    for (size_t t = 0; t < sizes.size(); ++t) {
      const int64_t rows = sizes[t], o = off[t];
      Tensor gh_t = gh.narrow(0, 0, rows);
      if (t == 0) {  // h_0 = 0
        for (int64_t i = 0; i < rows; ++i) std::copy(bp, bp + H3, ghp + i * H3);
        std::fill(pp, pp + rows * H, T(0));
      } else {
        const Tensor h = out.narrow(0, off[t - 1], rows);  // the first rows of the previous step
        at::addmm_out(gh_t, b_hh, h, w_t);
        std::copy(op + off[t - 1] * H, op + (off[t - 1] + rows) * H, pp + o * H);
      }
      for (int64_t i = 0; i < rows; ++i) {
        const T a = ap ? ap[o + i] : T(1);
        const T* g = gp + (o + i) * H3;
        const T* q = ghp + i * H3;
        const T* h = pp + (o + i) * H;
        T *r = rzp + (o + i) * 2 * H, *z = r + H, *n = np + (o + i) * H, *gn = gnp + (o + i) * H;
        T* y = op + (o + i) * H;
        _Pragma("omp simd")
        for (int64_t k = 0; k < H; ++k) {
          const T rk = sigmoid_of(g[k] + q[k]), zk = sigmoid_of(g[H + k] + q[H + k]);
          const T nk = tanh_of(g[2 * H + k] + rk * q[2 * H + k]);
          r[k] = rk;
          z[k] = zk;
          gn[k] = q[2 * H + k];
          n[k] = nk;
          y[k] = h[k] + a * (T(1) - zk) * (nk - h[k]);
        }
      }
    }
  });
  return out;
}

// Gradients [d gi [N, 3H], d att [N] (undefined unless want_att), d w_hh (undefined unless want_w),
// d b_hh (undefined unless want_b)].
std::vector<Tensor> recurrence_backward(const Tensor& grad, const std::optional<Tensor>& att, const Tensor& w_hh,
                                        const std::vector<int64_t>& sizes, const Saved& s, bool want_att,
                                        bool want_w, bool want_b) {
  const int64_t H = w_hh.size(1), N = grad.size(0), H3 = 3 * H;
  const std::vector<int64_t> off = offsets_of(sizes, N);
  const auto opts = grad.options();
  Tensor d_gh = at::empty({N, H3}, opts);  // ∂L/∂gh per entry (its r, z columns are also gi's)
  Tensor d_gi = at::empty({N, H3}, opts);
  Tensor d_att = want_att ? at::empty({N}, opts) : Tensor();
  Tensor keep = at::empty({sizes[0], H}, opts);    // ∂L/∂h_t, then dh ⊙ (1 - ũ)
  Tensor carry = at::empty({sizes[0], H}, opts);   // ∂L/∂h_t flowing back from step t + 1
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "packed_recurrence_backward", [&] {
    using T = scalar_t;
    const T* gp = grad.data_ptr<T>();
    const T* ap = att.has_value() ? att->data_ptr<T>() : nullptr;
    const T *pp = s.prev.data_ptr<T>(), *rzp = s.rz.data_ptr<T>(), *np = s.n.data_ptr<T>(),
            *gnp = s.gh_n.data_ptr<T>();
    T *dgh = d_gh.data_ptr<T>(), *dgi = d_gi.data_ptr<T>(), *kp = keep.data_ptr<T>(), *cp = carry.data_ptr<T>();
    T* dap = want_att ? d_att.data_ptr<T>() : nullptr;
    int64_t carry_rows = 0;
    for (int64_t t = int64_t(sizes.size()) - 1; t >= 0; --t) {
      const int64_t rows = sizes[t], o = off[t];
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t e = o + i;
        const T a = ap ? ap[e] : T(1);
        const T *r = rzp + e * 2 * H, *z = r + H, *n = np + e * H, *h = pp + e * H, *gn = gnp + e * H;
        const T* go = gp + e * H;
        T *dg = dgh + e * H3, *di = dgi + e * H3, *dh = kp + i * H;
        if (i < carry_rows) {  // ∂L/∂h_t: this step's output gradient plus what step t + 1 carries
          const T* c = cp + i * H;
        _Pragma("omp simd")
          for (int64_t k = 0; k < H; ++k) dh[k] = go[k] + c[k];
        } else {
          std::copy(go, go + H, dh);
        }
        T datt = 0;
        _Pragma("omp simd reduction(+ : datt)")
        for (int64_t k = 0; k < H; ++k) {
          const T one_minus_z = T(1) - z[k];
          const T dn = dh[k] * a * one_minus_z;
          const T d_u = dh[k] * (n[k] - h[k]);                   // ∂L/∂ũ
          const T dp_n = dn * (T(1) - n[k] * n[k]);                // through tanh
          datt += d_u * one_minus_z;
          const T dp_r = dp_n * gn[k] * r[k] * (T(1) - r[k]);    // through the sigmoids
          const T dp_z = -d_u * a * z[k] * one_minus_z;
          dg[k] = di[k] = dp_r;
          dg[H + k] = di[H + k] = dp_z;
          dg[2 * H + k] = dp_n * r[k];
          di[2 * H + k] = dp_n;
          dh[k] -= dn;  // dh (1 - ũ): the carry's own part
        }
        if (dap) dap[e] = datt;
      }
      // carry = dh (1 - ũ) + ∂gh_t W_hh, for step t - 1's first `rows` rows
      if (t > 0) {
        Tensor c = carry.narrow(0, 0, rows);
        at::addmm_out(c, keep.narrow(0, 0, rows), d_gh.narrow(0, o, rows), w_hh);
      }
      carry_rows = rows;
    }
  });
  Tensor d_w = want_w ? d_gh.t().mm(s.prev) : Tensor();  // Σ_t ∂gh_tᵀ h_{t-1}
  Tensor d_b = want_b ? d_gh.sum(0) : Tensor();
  return {d_gi, d_att, d_w, d_b};
}

class PackedRecurrence : public torch::autograd::Function<PackedRecurrence> {
 public:
  // Inputs gi [N, 3H], att [N] (absent: a plain GRU), w_hh [3H, H], b_hh [3H], sizes (the rows live
  // at each step, non-increasing).
  static variable_list forward(AutogradContext* ctx, const Tensor& gi, const std::optional<Tensor>& att,
                               const Tensor& w_hh, const Tensor& b_hh, const std::vector<int64_t>& sizes) {
    Saved s;
    Tensor out = recurrence_forward(gi, att, w_hh, b_hh, sizes, s);
    ctx->save_for_backward({att.has_value() ? *att : Tensor(), w_hh, s.prev, s.rz, s.n, s.gh_n});
    ctx->saved_data["sizes"] = sizes;
    ctx->saved_data["has_att"] = att.has_value();
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "DIEN's recurrence kernel has no double backward; set IACN_FUSED_KERNEL=0 to "
                "differentiate through its gradients");
    const std::vector<Tensor> v = ctx->get_saved_variables();
    const std::vector<int64_t> sizes = ctx->saved_data["sizes"].toIntVector();
    const bool has_att = ctx->saved_data["has_att"].toBool();
    const std::optional<Tensor> att = has_att ? std::optional<Tensor>(v[0]) : std::nullopt;
    const Saved s{v[2], v[3], v[4], v[5]};
    // the autograd edges are the variable inputs only: gi, [att,] w_hh, b_hh
    const size_t e_w = has_att ? 2 : 1;
    std::vector<Tensor> g = recurrence_backward(grad_outputs[0].contiguous(), att, v[1], sizes, s,
                                                has_att && ctx->needs_input_grad(1),
                                                ctx->needs_input_grad(e_w), ctx->needs_input_grad(e_w + 1));
    return {g[0], g[1], g[2], g[3], Tensor()};
  }
};

// states [N, H]; records the autograd node when an input requires grad.
Tensor apply(const Tensor& gi, const std::optional<Tensor>& att, const Tensor& w_hh, const Tensor& b_hh,
             const std::vector<int64_t>& sizes) {
  const std::optional<Tensor> a = att.has_value() ? std::optional<Tensor>(att->contiguous()) : std::nullopt;
  return PackedRecurrence::apply(gi.contiguous(), a, w_hh, b_hh.contiguous(), sizes)[0];
}

// states [N, H] without autograd (inference).
Tensor steps(const Tensor& gi, const std::optional<Tensor>& att, const Tensor& w_hh, const Tensor& b_hh,
             const std::vector<int64_t>& sizes) {
  Saved s;
  const std::optional<Tensor> a = att.has_value() ? std::optional<Tensor>(att->contiguous()) : std::nullopt;
  return recurrence_forward(gi.contiguous(), a, w_hh, b_hh.contiguous(), sizes, s);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // no GIL needed: ATen ops, loops and the autograd node only
  m.def("apply", &apply, "GRU / AUGRU packed recurrence with its autograd node (CPU)",
        py::call_guard<py::gil_scoped_release>());
  m.def("steps", &steps, "GRU / AUGRU packed recurrence, no autograd (CPU)",
        py::call_guard<py::gil_scoped_release>());
}
