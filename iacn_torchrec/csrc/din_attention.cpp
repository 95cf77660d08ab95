// DIN's attention unit on a jagged history, forward and hand-written backward, in one call each.
//
// The same function as AttentionUnit.forward_jagged (iacn_torchrec/models/layers.py) for its
// default configuration (sigmoid hidden activations, softmax-normalised scores, no query
// projection): first layer W·[q, k, q-k, q·k] + b split as (W_q + W_d)·q + (W_k - W_d)·k + W_p·(q·k),
// sigmoid MLP to a score per behaviour, a softmax over each row's behaviours, output Σ_t a_t k_t.
// The matrix products go to ATen (MKL runs them near peak); the ~60 elementwise / segment ops
// around them, and their autograd records, become loops. The autograd node is C++ too (DinAttention):
// the main backward then never needs the GIL for it, which the IaCN worker thread's Python holds.
// Without a gradient to record (evaluation), attention_inference computes the first layer's behaviour
// part as one product per behaviour with a per-row matrix (see there) and saves nothing.
#include <torch/extension.h>

#include "sigmoid_mlp.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

using at::Tensor;

std::pair<Tensor, Tensor> softmax_pool(const Tensor& scores, const Tensor& values, const Tensor& offsets);

// The first layer W·[q, k, q-k, q·k] + b regrouped as (W_q + W_d)·q + (W_k - W_d)·k + W_p·(q·k): the
// three [H1, D] matrices, which the forward, the evaluation path and the backward all use.
struct FirstLayer {
  Tensor wq_d, wk_d, wp;
};
FirstLayer split_first_layer(const Tensor& w1, int64_t D) {
  const Tensor wd = w1.narrow(1, 2 * D, D);
  return {w1.narrow(1, 0, D) + wd, w1.narrow(1, D, D) - wd, w1.narrow(1, 3 * D, D)};
}

// The offsets must cover values exactly: [0, ..., N], non-decreasing (the loops below index values
// and write every row's result through them, so a bad one reads out of bounds or leaves rows unset).
const int64_t* checked_offsets(const Tensor& offsets, int64_t B, int64_t N) {
  TORCH_CHECK(offsets.dim() == 1 && offsets.numel() == B + 1 && offsets.scalar_type() == at::kLong &&
                  offsets.is_contiguous(),
              "din_attention: offsets must be a contiguous int64 [B + 1]");
  const int64_t* off = offsets.data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0 && off[B] == N, "din_attention: offsets must run from 0 to the ", N,
              " behaviours, got ", off[0], " to ", off[B]);
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(off[b] <= off[b + 1], "din_attention: offsets must not decrease (row ", b, ")");
  return off;
}

// Forward. Returns [out [B, D], weights [N], then what the backward needs: 2 qv [N, D] (q · k of
//   each behaviour), 3..: the activations a_1 .. a_m [N, H_l] of the hidden layers (after the
//   sigmoid)].
std::vector<Tensor> attention_forward(const Tensor& query, const Tensor& values, const Tensor& offsets,
                                      const std::vector<Tensor>& weights, const std::vector<Tensor>& biases) {
  const int64_t B = query.size(0), D = query.size(1), N = values.size(0);
  const int64_t* off = checked_offsets(offsets, B, N);
  const FirstLayer first = split_first_layer(weights[0], D);
  const Tensor h_q = at::addmm(biases[0], query, first.wq_d.t());  // [B, H1]
  Tensor qv = at::empty({N, D}, values.options());
  Tensor h = at::empty({N, weights[0].size(0)}, values.options());
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "din_attention_gather", [&] {
    using T = scalar_t;
    const T* qp = query.data_ptr<T>();
    const T* vp = values.data_ptr<T>();
    const T* hq = h_q.data_ptr<T>();
    T* qvp = qv.data_ptr<T>();
    T* hp = h.data_ptr<T>();
    const int64_t H1 = h.size(1);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = off[b]; i < off[b + 1]; ++i) {
        for (int64_t k = 0; k < D; ++k) qvp[i * D + k] = qp[b * D + k] * vp[i * D + k];
        std::copy(hq + b * H1, hq + (b + 1) * H1, hp + i * H1);
      }
  });
  h.addmm_(values, first.wk_d.t());
  h.addmm_(qv, first.wp.t());
  std::vector<Tensor> acts;
  Tensor scores = iacn_mlp::forward(h, weights, biases, acts).view({N});  // one logit per behaviour
  auto [out, att] = softmax_pool(scores, values, offsets);
  std::vector<Tensor> res = {out, att, qv};
  res.insert(res.end(), acts.begin(), acts.end());
  return res;
}

// Each row's softmax over its behaviours' scores [N] and the weighted sum of its values [N, D]:
// returns (out [B, D], weights [N]).
std::pair<Tensor, Tensor> softmax_pool(const Tensor& scores, const Tensor& values, const Tensor& offsets) {
  const int64_t B = offsets.numel() - 1, D = values.size(1), N = values.size(0);
  const int64_t* off = offsets.data_ptr<int64_t>();
  Tensor att = at::empty({N}, values.options());
  Tensor out = at::zeros({B, D}, values.options());
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "din_attention_softmax", [&] {
    using T = scalar_t;
    const T* sp = scores.data_ptr<T>();
    const T* vp = values.data_ptr<T>();
    T* ap = att.data_ptr<T>();
    T* op = out.data_ptr<T>();
    for (int64_t b = 0; b < B; ++b) {
      if (off[b] == off[b + 1]) continue;
      T mx = -std::numeric_limits<T>::infinity();
      for (int64_t i = off[b]; i < off[b + 1]; ++i) mx = std::max(mx, sp[i]);
      T sum = 0;
      for (int64_t i = off[b]; i < off[b + 1]; ++i) sum += (ap[i] = std::exp(sp[i] - mx));
      for (int64_t i = off[b]; i < off[b + 1]; ++i) {
        ap[i] /= sum;
        for (int64_t k = 0; k < D; ++k) op[b * D + k] += ap[i] * vp[i * D + k];
      }
    }
  });
  return {out, att};
}

// out [H] = init [H] + x [D] · M [D, H] (M row-major): the merged first layer's product for one
// behaviour. The float version keeps the whole output row in AVX2 registers (up to 12 × 8 columns
// at once, so 80 outputs are one pass over M with 10 independent FMA chains); others are plain loops.
template <typename T>
inline void row_times_matrix(const T* x, const T* M, const T* init, T* out, int64_t D, int64_t H) {
  std::copy(init, init + H, out);
  for (int64_t k = 0; k < D; ++k) {
    const T xk = x[k];
    const T* mk = M + k * H;
    _Pragma("omp simd") for (int64_t j = 0; j < H; ++j) out[j] += xk * mk[j];
  }
}

#if defined(__AVX2__) && defined(__FMA__)
template <int A>  // A accumulators of 8 floats: columns [0, 8A) of out, M and init (already offset)
inline void row_block(const float* x, const float* M, const float* init, float* out, int64_t D, int64_t H) {
  __m256 acc[A];
  for (int a = 0; a < A; ++a) acc[a] = _mm256_loadu_ps(init + 8 * a);
  for (int64_t k = 0; k < D; ++k) {
    const __m256 xk = _mm256_set1_ps(x[k]);
    const float* mk = M + k * H;
    for (int a = 0; a < A; ++a) acc[a] = _mm256_fmadd_ps(xk, _mm256_loadu_ps(mk + 8 * a), acc[a]);
  }
  for (int a = 0; a < A; ++a) _mm256_storeu_ps(out + 8 * a, acc[a]);
}

template <>
inline void row_times_matrix<float>(const float* x, const float* M, const float* init, float* out, int64_t D,
                                    int64_t H) {
  int64_t j = 0;
  for (; H - j >= 8; ) {
    const int64_t blocks = std::min<int64_t>((H - j) / 8, 12);
    switch (blocks) {  // the accumulators must be compile-time registers
      case 12: row_block<12>(x, M + j, init + j, out + j, D, H); break;
      case 11: row_block<11>(x, M + j, init + j, out + j, D, H); break;
      case 10: row_block<10>(x, M + j, init + j, out + j, D, H); break;
      case 9: row_block<9>(x, M + j, init + j, out + j, D, H); break;
      case 8: row_block<8>(x, M + j, init + j, out + j, D, H); break;
      case 7: row_block<7>(x, M + j, init + j, out + j, D, H); break;
      case 6: row_block<6>(x, M + j, init + j, out + j, D, H); break;
      case 5: row_block<5>(x, M + j, init + j, out + j, D, H); break;
      case 4: row_block<4>(x, M + j, init + j, out + j, D, H); break;
      case 3: row_block<3>(x, M + j, init + j, out + j, D, H); break;
      case 2: row_block<2>(x, M + j, init + j, out + j, D, H); break;
      default: row_block<1>(x, M + j, init + j, out + j, D, H); break;
    }
    j += 8 * blocks;
  }
  for (; j < H; ++j) {  // H not a multiple of 8
    float acc = init[j];
    for (int64_t k = 0; k < D; ++k) acc += x[k] * M[k * H + j];
    out[j] = acc;
  }
}
#endif

// Forward without a backward to feed (evaluation): the first layer's behaviour part
// (W_k - W_d)·k + W_p·(q·k) = k·M_b with M_b = (W_k - W_d)ᵀ + diag(q_b) W_pᵀ [D, H1], formed once
// per row b: one D × H1 product per behaviour instead of two (on DIN's ~6.6 behaviours per row
// forming M_b costs about one behaviour's product), and nothing is saved. Returns [out, weights].
std::vector<Tensor> attention_inference(const Tensor& query, const Tensor& values, const Tensor& offsets,
                                        const std::vector<Tensor>& weights, const std::vector<Tensor>& biases) {
  const int64_t B = query.size(0), D = query.size(1), N = values.size(0);
  const int64_t* off = checked_offsets(offsets, B, N);
  const int64_t H1 = weights[0].size(0);
  const FirstLayer first = split_first_layer(weights[0], D);
  const Tensor h_q = at::addmm(biases[0], query, first.wq_d.t());  // [B, H1]
  const Tensor wkd_t = first.wk_d.t().contiguous(), wp_t = first.wp.t().contiguous();  // [D, H1]
  Tensor h = at::empty({N, H1}, values.options());
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "din_attention_merged_first_layer", [&] {
    using T = scalar_t;
    const T* qp = query.data_ptr<T>();
    const T* vp = values.data_ptr<T>();
    const T* hq = h_q.data_ptr<T>();
    const T* a = wkd_t.data_ptr<T>();
    const T* c = wp_t.data_ptr<T>();
    T* hp = h.data_ptr<T>();
    std::vector<T> M(D * H1);
    for (int64_t b = 0; b < B; ++b) {
      if (off[b] == off[b + 1]) continue;
      for (int64_t k = 0; k < D; ++k) {
        const T qk = qp[b * D + k];
        T* mk = M.data() + k * H1;
        _Pragma("omp simd") for (int64_t j = 0; j < H1; ++j) mk[j] = a[k * H1 + j] + qk * c[k * H1 + j];
      }
      for (int64_t i = off[b]; i < off[b + 1]; ++i)
        row_times_matrix<T>(vp + i * D, M.data(), hq + b * H1, hp + i * H1, D, H1);
    }
  });
  std::vector<Tensor> acts;
  Tensor scores = iacn_mlp::forward(h, weights, biases, acts).view({N});
  auto [out, att] = softmax_pool(scores, values, offsets);
  return {out, att};
}

// Backward. Returns [d query, d values, d W_1 .. d W_{m+1}, d b_1 .. d b_{m+1}].
std::vector<Tensor> attention_backward(const Tensor& grad_out, const Tensor& grad_att, const Tensor& query,
                                       const Tensor& values, const Tensor& offsets,
                                       const std::vector<Tensor>& weights, const std::vector<Tensor>& saved) {
  const int64_t B = query.size(0), D = query.size(1), N = values.size(0);
  const int64_t m = int64_t(weights.size()) - 1;
  const int64_t* off = offsets.data_ptr<int64_t>();
  const Tensor &att = saved[1], &qv = saved[2];
  Tensor d_values = at::empty_like(values);
  Tensor d_score = at::empty({N, 1}, values.options());
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "din_attention_softmax_backward", [&] {
    using T = scalar_t;
    const T* go = grad_out.data_ptr<T>();
    const T* ga = grad_att.defined() ? grad_att.data_ptr<T>() : nullptr;
    const T* vp = values.data_ptr<T>();
    const T* ap = att.data_ptr<T>();
    T* dv = d_values.data_ptr<T>();
    T* ds = d_score.data_ptr<T>();
    for (int64_t b = 0; b < B; ++b) {
      T mean = 0;
      for (int64_t i = off[b]; i < off[b + 1]; ++i) {
        T da = ga ? ga[i] : T(0);  // d weight_i: from the output Σ a_i k_i, and the weights' own
        for (int64_t k = 0; k < D; ++k) {
          da += go[b * D + k] * vp[i * D + k];
          dv[i * D + k] = ap[i] * go[b * D + k];
        }
        ds[i] = da;
        mean += ap[i] * da;
      }
      for (int64_t i = off[b]; i < off[b + 1]; ++i) ds[i] = ap[i] * (ds[i] - mean);
    }
  });
  std::vector<Tensor> d_w(m + 1), d_b(m + 1);
  const std::vector<Tensor> acts(saved.begin() + 3, saved.end());
  const Tensor dx = iacn_mlp::backward(d_score, weights, acts, d_w, d_b);  // ∂ first layer's output
  // first layer: h = h_q[row] + k (W_k - W_d)^T + (q·k) W_p^T, h_q = q (W_q + W_d)^T + b_1
  const FirstLayer first = split_first_layer(weights[0], D);
  Tensor d_hq = at::zeros({B, dx.size(1)}, values.options());
  Tensor d_qv = at::mm(dx, first.wp);  // [N, D]
  d_values.addmm_(dx, first.wk_d);
  Tensor d_query = at::zeros_like(query);
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "din_attention_first_backward", [&] {
    using T = scalar_t;
    const T* dxp = dx.data_ptr<T>();
    const T* dqv = d_qv.data_ptr<T>();
    const T* qp = query.data_ptr<T>();
    const T* vp = values.data_ptr<T>();
    T* dh = d_hq.data_ptr<T>();
    T* dv = d_values.data_ptr<T>();
    T* dq = d_query.data_ptr<T>();
    const int64_t H1 = dx.size(1);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = off[b]; i < off[b + 1]; ++i) {
        for (int64_t k = 0; k < H1; ++k) dh[b * H1 + k] += dxp[i * H1 + k];
        for (int64_t k = 0; k < D; ++k) {
          dv[i * D + k] += dqv[i * D + k] * qp[b * D + k];
          dq[b * D + k] += dqv[i * D + k] * vp[i * D + k];
        }
      }
  });
  d_query.addmm_(d_hq, first.wq_d);
  d_b[0] = d_hq.sum(0);
  const Tensor d_wq_d = at::mm(d_hq.t(), query), d_wk_d = at::mm(dx.t(), values), d_wp = at::mm(dx.t(), qv);
  d_w[0] = at::cat({d_wq_d, d_wk_d, d_wq_d - d_wk_d, d_wp}, 1);
  std::vector<Tensor> res = {d_query, d_values};
  res.insert(res.end(), d_w.begin(), d_w.end());
  res.insert(res.end(), d_b.begin(), d_b.end());
  return res;
}

// The autograd node: inputs query, values, offsets, the MLP's weights W_1 .. W_{m+1}, then its
// biases; outputs (out [B, D], weights [N]).
class DinAttention : public torch::autograd::Function<DinAttention> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& query,
                                                const Tensor& values, const Tensor& offsets,
                                                at::TensorList weights, at::TensorList biases) {
    // TensorList, not std::vector: autograd gives each element of a TensorList an input edge
    std::vector<Tensor> res = attention_forward(query, values, offsets, weights.vec(), biases.vec());
    std::vector<Tensor> saved = {query, values, offsets};
    saved.insert(saved.end(), weights.begin(), weights.end());
    saved.insert(saved.end(), res.begin(), res.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["layers"] = int64_t(weights.size());
    ctx->set_materialize_grads(false);
    return {res[0], res[1]};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "DIN's fused attention kernel has no double backward; set IACN_FUSED_KERNEL=0 to "
                "differentiate through its gradients");
    const std::vector<Tensor> saved = ctx->get_saved_variables();
    const int64_t layers = ctx->saved_data["layers"].toInt();
    const Tensor &query = saved[0], &values = saved[1], &offsets = saved[2];
    const std::vector<Tensor> weights(saved.begin() + 3, saved.begin() + 3 + layers);
    const std::vector<Tensor> res(saved.begin() + 3 + layers, saved.end());
    const Tensor grad_out = grads[0].defined() ? grads[0].contiguous() : at::zeros_like(query);
    const Tensor grad_att = grads[1].defined() ? grads[1].contiguous() : Tensor();
    std::vector<Tensor> g = attention_backward(grad_out, grad_att, query, values, offsets, weights, res);
    torch::autograd::variable_list out = {g[0], g[1], Tensor()};  // no gradient for the offsets
    out.insert(out.end(), g.begin() + 2, g.end());
    return out;
  }
};

std::vector<Tensor> apply(const Tensor& query, const Tensor& values, const Tensor& offsets,
                          const std::vector<Tensor>& weights, const std::vector<Tensor>& biases) {
  bool needs_grad = query.requires_grad() || values.requires_grad();
  for (const auto* list : {&weights, &biases})
    for (const Tensor& t : *list) needs_grad = needs_grad || t.requires_grad();
  if (at::GradMode::is_enabled() && needs_grad)
    return DinAttention::apply(query, values, offsets, at::TensorList(weights), at::TensorList(biases));
  at::NoGradGuard no_grad;
  return attention_inference(query, values, offsets, weights, biases);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // no GIL needed: the kernels and the autograd node touch tensors only
  m.def("apply", &apply, "DIN attention with its autograd node (CPU)", py::call_guard<py::gil_scoped_release>());
}
