// The IaCN loss in one CPU kernel: B2I routing -> user-profile layer -> label-aware attention ->
// sampled softmax, forward and hand-written backward.
//
// Same function as the ATen reference in iacn_torchrec/modules/{capsule,attention,
// sampled_softmax,iacn}.py, for the positive rows of a batch (the only rows L_IaCN scores). At
// IaCN's sizes (h = 36, n_u <= 20, K <= 5, S = 10) the reference's cost is the number of ops it
// dispatches (~300 per step, forward and backward); here the per-row maths are plain loops and
// only the four matrix products (S c_i, the user-profile layer's two Linear layers, their
// backward) go to ATen. Shapes and symbols follow the reference's docstrings.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

using at::Tensor;

// `omp simd` (compiled with -fopenmp-simd: no OpenMP runtime) lets the reduction vectorise
// without -ffast-math, which would also break the -inf / NaN handling below.
template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < n; ++k) s += a[k] * b[k];
  return s;
}

template <typename T>
inline void axpy(T a, const T* x, T* y, int64_t n) {  // y += a x
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) y[k] += a * x[k];
}

// K_u = clamp(ceil(log2 n), 1, K_max) = #{j < K_max : n > 2^j}, at least 1.
inline int64_t num_interests(int64_t n, int64_t k_max) {
  int64_t k = 0;
  for (int64_t j = 0; j < k_max && j < 62; ++j)
    if (n > (int64_t(1) << j)) ++k;
  return std::max<int64_t>(k, 1);
}

// sign(s)|s|^p with |s| clamped as the reference's signed_pow, and its derivative (0 where the
// clamp is active or s = 0, as autograd gives through abs / clamp). A row whose leading score is
// clamped takes one-hot weights instead (label_aware_attention_weights' hard rows).
template <typename T>
inline void signed_pow(T s, double p, double cap, double eps, T& g, T& dg) {
  if (p == 1.0) {
    g = s;
    dg = 1;
    return;
  }
  T mag = std::abs(s);
  bool pass = s != 0;
  if (p < 1.0 && mag < T(eps)) {
    mag = T(eps);
    pass = false;
  } else if (p > 1.0 && mag > T(cap)) {
    mag = T(cap);
    pass = false;
  }
  const T sign = T((s > 0) - (s < 0));
  g = sign * std::pow(mag, T(p));
  dg = pass ? T(p) * std::pow(mag, T(p - 1.0)) : T(0);
}

struct Rows {
  std::vector<int64_t> row, start, len, kept, cstart;  // per positive row b
  int64_t total = 0;                                   // Σ len over positive rows
};

Rows positive_rows(const Tensor& offsets, const Tensor& rows, int64_t max_len, int64_t k_max) {
  Rows r;
  const int64_t P = rows.numel();
  const int64_t B = offsets.numel() - 1;
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* rp = rows.data_ptr<int64_t>();
  r.row.resize(P), r.start.resize(P), r.len.resize(P), r.kept.resize(P), r.cstart.resize(P);
  for (int64_t b = 0; b < P; ++b) {
    const int64_t row = rp[b];
    TORCH_CHECK(row >= 0 && row < B, "iacn_fused: positive row ", row, " outside the batch of ", B);
    const int64_t n = off[row + 1] - off[row];
    TORCH_CHECK(n >= 0 && n <= max_len, "iacn_fused: a history of length ", n, " exceeds max_len=",
                max_len, "; truncate it first");
    r.row[b] = row, r.start[b] = off[row], r.len[b] = n, r.kept[b] = num_interests(n, k_max);
    r.cstart[b] = r.total;
    r.total += n;
  }
  return r;
}

Tensor rows_tensor(const std::vector<int64_t>& v) {
  return torch::from_blob(const_cast<int64_t*>(v.data()), {int64_t(v.size())}, torch::kInt64).clone();
}

// Returns [loss, then what the backward needs]:
//   0 loss [], 1 C [Np, h] (the positive rows' c_i), 2 mapped [Np, h] (S c_i), 3 weights [P, K, L]
//   (last iteration's w_ij), 4 z [P, K, h], 5 u [P, K, h] (squash(z)), 6 hidden [P, K, 2h] (or
//   empty), 7 act [P, K, 2h] (relu(hidden), or empty), 8 V [P, K, h] (the capsules attended over),
//   9 alpha [P, K], 10 dpow [P, K] (d signed_pow / d score), 11 v [P, h], 12 pi [P, 1 + S] (the
//   candidates' softmax), 13 index [Np] (positions of C in values), 14 meta [P, 3] (row, K_u, start
//   in C).
std::vector<Tensor> forward(const Tensor& values, const Tensor& offsets, const Tensor& rows,
                            const Tensor& init_logits, const Tensor& bilinear,
                            const c10::optional<Tensor>& w1, const c10::optional<Tensor>& b1,
                            const c10::optional<Tensor>& w2, const c10::optional<Tensor>& b2,
                            const c10::optional<Tensor>& user, const Tensor& target,
                            const Tensor& negatives, bool negatives_by_position,
                            const c10::optional<Tensor>& neg_log_q,
                            const c10::optional<Tensor>& target_log_q,
                            const c10::optional<Tensor>& target_ids,
                            const c10::optional<Tensor>& negative_ids, double p, int64_t k_max,
                            int64_t max_len, int64_t iters) {
  TORCH_CHECK(values.dim() == 2 && values.is_contiguous(), "iacn_fused: values must be a contiguous [N, h]");
  const int64_t h = values.size(1);
  const int64_t P = rows.numel();
  const int64_t S = negatives.size(1);
  const int64_t K = k_max, L = max_len;
  const bool profile = w1.has_value();
  const Rows r = positive_rows(offsets, rows, L, K);
  const auto opts = values.options();

  std::vector<int64_t> index(r.total);
  for (int64_t b = 0; b < P; ++b)
    for (int64_t i = 0; i < r.len[b]; ++i) index[r.cstart[b] + i] = r.start[b] + i;
  const Tensor index_t = rows_tensor(index);
  const Tensor C = values.index_select(0, index_t);
  const Tensor mapped = at::mm(C, bilinear.t());  // S c_i: [Np, h]
  // only the live capsules' (j < K_u) and real items' (i < n_u) entries are written and read;
  // u (dead capsules enter the user-profile layer's matrix products) and v (accumulated) start at 0
  Tensor weights = at::empty({P, K, L}, opts);
  Tensor z = at::empty({P, K, h}, opts);
  Tensor u = at::zeros({P, K, h}, opts);
  Tensor alpha = at::empty({P, K}, opts);
  Tensor dpow = at::empty({P, K}, opts);
  Tensor v = at::zeros({P, h}, opts);
  Tensor pi = at::empty({P, 1 + S}, opts);
  Tensor loss = at::zeros({}, opts);
  Tensor meta = at::empty({P, 3}, offsets.options());
  Tensor hidden, act, V;

  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "iacn_fused_forward", [&] {
    using T = scalar_t;
    const T* mp = mapped.data_ptr<T>();
    const T* init = init_logits.data_ptr<T>();
    const bool per_row_init = init_logits.dim() == 3;
    const int64_t init_L = init_logits.size(-1);
    T* wp = weights.data_ptr<T>();
    T* zp = z.data_ptr<T>();
    T* up = u.data_ptr<T>();
    int64_t* mt = meta.data_ptr<int64_t>();
    std::vector<T> logit(K * L), wcol(K);
    for (int64_t b = 0; b < P; ++b) {
      const int64_t n = r.len[b], ku = r.kept[b];
      mt[3 * b] = r.row[b], mt[3 * b + 1] = ku, mt[3 * b + 2] = r.cstart[b];
      const T* c = mp + r.cstart[b] * h;  // this row's S c_i, [n, h]
      const T* b0 = init + (per_row_init ? r.row[b] * K * init_L : 0);
      for (int64_t j = 0; j < ku; ++j)
        for (int64_t i = 0; i < n; ++i) logit[j * L + i] = b0[j * init_L + i];
      T* w = wp + b * K * L;
      T* zb = zp + b * K * h;
      T* ub = up + b * K * h;
      for (int64_t it = 0; it < iters; ++it) {
        for (int64_t i = 0; i < n; ++i) {  // w_ij = softmax over the live capsules j
          T m = -std::numeric_limits<T>::infinity();
          for (int64_t j = 0; j < ku; ++j) m = std::max(m, logit[j * L + i]);
          T sum = 0;
          for (int64_t j = 0; j < ku; ++j) sum += (wcol[j] = std::exp(logit[j * L + i] - m));
          for (int64_t j = 0; j < ku; ++j) w[j * L + i] = wcol[j] / sum;
        }
        for (int64_t j = 0; j < ku; ++j) {  // u_j = squash(Σ_i w_ij S c_i)
          T* zj = zb + j * h;
          std::fill(zj, zj + h, T(0));
          for (int64_t i = 0; i < n; ++i) axpy(w[j * L + i], c + i * h, zj, h);
          const T norm = std::sqrt(dot(zj, zj, h));
          const T q = norm / (T(1) + norm * norm);
          for (int64_t k = 0; k < h; ++k) ub[j * h + k] = zj[k] * q;
        }
        if (it + 1 < iters)  // b_ij += u_j · S c_i (no gradient: MIND's stop-gradient)
          for (int64_t j = 0; j < ku; ++j)
            for (int64_t i = 0; i < n; ++i) logit[j * L + i] += dot(ub + j * h, c + i * h, h);
      }
    }
  });

  if (profile) {  // MIND's H-layer: W1 [2h, h + Du], b1 [2h], W2 [h, 2h], b2 [h]
    const Tensor per_user = at::addmm(*b1, user->index_select(0, rows_tensor(r.row)),
                                      w1->narrow(1, h, w1->size(1) - h).t());  // [P, 2h]
    hidden = at::mm(u.view({P * K, h}), w1->narrow(1, 0, h).t()).view({P, K, -1}) + per_user.unsqueeze(1);
    act = at::relu(hidden);
    V = at::addmm(*b2, act.view({P * K, -1}), w2->t()).view({P, K, h});
  } else {
    hidden = act = at::empty({0}, opts);
    V = u.clone();
  }

  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "iacn_fused_loss", [&] {
    using T = scalar_t;
    const double big = double(std::numeric_limits<T>::max());
    const double cap = std::pow(big / (2.0 * p), 1.0 / p);
    const double eps = std::max(1e-12, double(std::numeric_limits<T>::min()));
    const T ninf = -std::numeric_limits<T>::infinity();
    T* Vp = V.data_ptr<T>();
    T* ap = alpha.data_ptr<T>();
    T* dgp = dpow.data_ptr<T>();
    T* vp = v.data_ptr<T>();
    T* pp = pi.data_ptr<T>();
    const T* tp = target.data_ptr<T>();
    const T* np = negatives.data_ptr<T>();
    const T* nlq = neg_log_q ? neg_log_q->data_ptr<T>() : nullptr;
    const T* tlq = target_log_q ? target_log_q->data_ptr<T>() : nullptr;
    const int64_t* tid = target_ids ? target_ids->data_ptr<int64_t>() : nullptr;
    const int64_t* nid = negative_ids ? negative_ids->data_ptr<int64_t>() : nullptr;
    std::vector<T> g(K), o(1 + S);
    double total = 0;
    for (int64_t b = 0; b < P; ++b) {
      const int64_t row = r.row[b], ku = r.kept[b];
      const int64_t nrow = negatives_by_position ? b : row;
      T* Vb = Vp + b * K * h;
      for (int64_t j = ku; j < K; ++j) std::fill(Vb + j * h, Vb + (j + 1) * h, T(0));  // dead: 0
      const T* t = tp + row * h;
      T m = ninf, lead = ninf;
      int64_t best = 0;
      for (int64_t j = 0; j < ku; ++j) {  // label-aware attention over the live capsules
        const T score = dot(Vb + j * h, t, h);
        signed_pow(score, p, cap, eps, g[j], dgp[b * K + j]);
        m = std::max(m, g[j]);
        if (score > lead) {
          lead = score;
          best = j;
        }
      }
      T* ab = ap + b * K;
      if (p > 1.0 && std::abs(lead) > T(cap)) {
        // the leader's power overflows: the exact weights are one-hot (as the reference's hard row),
        // with no gradient through the choice
        for (int64_t j = 0; j < ku; ++j) {
          ab[j] = T(j == best);
          dgp[b * K + j] = T(0);
        }
      } else {
        T sum = 0;
        for (int64_t j = 0; j < ku; ++j) sum += (ab[j] = std::exp(g[j] - m));
        for (int64_t j = 0; j < ku; ++j) ab[j] /= sum;
      }
      T* vb = vp + b * h;
      for (int64_t j = 0; j < ku; ++j) axpy(ab[j], Vb + j * h, vb, h);
      o[0] = dot(vb, t, h) - (tlq ? tlq[row] : T(0));  // sampled softmax with logQ correction
      m = o[0];
      for (int64_t s = 0; s < S; ++s) {
        const bool hit = nid && nid[nrow * S + s] == tid[row];  // accidental hit: dropped
        o[1 + s] = hit ? ninf : dot(vb, np + (nrow * S + s) * h, h) - (nlq ? nlq[nrow * S + s] : T(0));
        m = std::max(m, o[1 + s]);
      }
      T z_sum = 0;
      for (int64_t s = 0; s <= S; ++s) z_sum += (pp[b * (1 + S) + s] = std::exp(o[s] - m));
      for (int64_t s = 0; s <= S; ++s) pp[b * (1 + S) + s] /= z_sum;
      total += double(m + std::log(z_sum) - o[0]);
    }
    loss.fill_(total / double(std::max<int64_t>(P, 1)));
  });
  return {loss, C, mapped, weights, z, u, hidden, act, V, alpha, dpow, v, pi, index_t, meta};
}

// Gradients of loss · grad_out: [values [N, h], target [B, h], negatives [R, S, h], bilinear,
// w1, b1, w2, b2] (the last four undefined without the user-profile layer).
std::vector<Tensor> backward(const Tensor& grad_out, const std::vector<Tensor>& saved,
                             const Tensor& values, const Tensor& bilinear,
                             const c10::optional<Tensor>& w1, const c10::optional<Tensor>& w2,
                             const c10::optional<Tensor>& user, const Tensor& target,
                             const Tensor& negatives, bool negatives_by_position, double p) {
  const Tensor &C = saved[1], &mapped = saved[2], &weights = saved[3], &z = saved[4], &u = saved[5];
  const Tensor &hidden = saved[6], &act = saved[7], &V = saved[8], &alpha = saved[9];
  const Tensor &dpow = saved[10], &v = saved[11], &pi = saved[12], &index = saved[13], &meta = saved[14];
  const int64_t P = meta.size(0), K = weights.size(1), L = weights.size(2), h = values.size(1);
  const int64_t S = negatives.size(1);
  const bool profile = w1.has_value();
  Tensor d_target = at::zeros_like(target);
  Tensor d_negatives = at::zeros_like(negatives);
  Tensor dV = at::zeros({P, K, h}, values.options());

  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "iacn_fused_backward_loss", [&] {
    using T = scalar_t;
    const T gl = grad_out.item<T>() / T(std::max<int64_t>(P, 1));
    const int64_t* mt = meta.data_ptr<int64_t>();
    const T* Vp = V.data_ptr<T>();
    const T* ap = alpha.data_ptr<T>();
    const T* dgp = dpow.data_ptr<T>();
    const T* vp = v.data_ptr<T>();
    const T* pp = pi.data_ptr<T>();
    const T* tp = target.data_ptr<T>();
    const T* np = negatives.data_ptr<T>();
    T* dtp = d_target.data_ptr<T>();
    T* dnp = d_negatives.data_ptr<T>();
    T* dVp = dV.data_ptr<T>();
    std::vector<T> dv(h), dalpha(K);
    for (int64_t b = 0; b < P; ++b) {
      const int64_t row = mt[3 * b], ku = mt[3 * b + 1];
      const int64_t nrow = negatives_by_position ? b : row;
      const T* t = tp + row * h;
      const T* vb = vp + b * h;
      T* dt = dtp + row * h;
      const T* pib = pp + b * (1 + S);
      // d loss_b / d o = softmax - onehot(positive)
      const T d0 = (pib[0] - T(1)) * gl;
      for (int64_t k = 0; k < h; ++k) dv[k] = d0 * t[k];
      axpy(d0, vb, dt, h);
      for (int64_t s = 0; s < S; ++s) {
        const T ds = pib[1 + s] * gl;
        if (ds == T(0)) continue;
        axpy(ds, np + (nrow * S + s) * h, dv.data(), h);
        axpy(ds, vb, dnp + (nrow * S + s) * h, h);
      }
      // v = Σ_j alpha_j V_j; alpha = softmax(signed_pow(V_j · t))
      const T* Vb = Vp + b * K * h;
      T* dVb = dVp + b * K * h;
      T mean = 0;
      for (int64_t j = 0; j < ku; ++j) {
        dalpha[j] = dot(dv.data(), Vb + j * h, h);
        mean += ap[b * K + j] * dalpha[j];
        axpy(ap[b * K + j], dv.data(), dVb + j * h, h);
      }
      for (int64_t j = 0; j < ku; ++j) {
        const T dscore = ap[b * K + j] * (dalpha[j] - mean) * dgp[b * K + j];
        axpy(dscore, t, dVb + j * h, h);
        axpy(dscore, Vb + j * h, dt, h);
      }
    }
  });

  Tensor du, d_w1, d_b1, d_w2, d_b2;
  if (profile) {
    const Tensor A = act.view({P * K, -1});
    const Tensor dV2 = dV.view({P * K, h});
    d_w2 = at::mm(dV2.t(), A);
    d_b2 = dV2.sum(0);
    const Tensor d_hidden = at::threshold_backward(at::mm(dV2, *w2), hidden.view({P * K, -1}), 0);  // relu
    const Tensor user_rows = user->index_select(0, meta.select(1, 0));
    d_w1 = at::cat({at::mm(d_hidden.t(), u.view({P * K, h})),
                    at::mm(d_hidden.view({P, K, -1}).sum(1).t(), user_rows)}, 1);
    d_b1 = d_hidden.sum(0);
    du = at::mm(d_hidden, w1->narrow(1, 0, h)).view({P, K, h});
  } else {
    du = dV;
  }

  Tensor d_mapped = at::zeros_like(mapped);
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "iacn_fused_backward_routing", [&] {
    using T = scalar_t;
    const int64_t* mt = meta.data_ptr<int64_t>();
    const T* wp = weights.data_ptr<T>();
    const T* zp = z.data_ptr<T>();
    T* dup = du.data_ptr<T>();
    T* dmp = d_mapped.data_ptr<T>();
    for (int64_t b = 0; b < P; ++b) {
      const int64_t ku = mt[3 * b + 1], cs = mt[3 * b + 2];
      const int64_t n = (b + 1 < P ? mt[3 * (b + 1) + 2] : mapped.size(0)) - cs;
      for (int64_t j = 0; j < ku; ++j) {
        // u = z |z| / (1 + |z|^2): dz = q du + (du · z) q'(|z|) / |z| z (0 at z = 0, as autograd)
        const T* zj = zp + (b * K + j) * h;
        T* dj = dup + (b * K + j) * h;  // becomes dz in place
        const T norm = std::sqrt(dot(zj, zj, h));
        const T q = norm / (T(1) + norm * norm);
        const T c = norm > T(0) ? dot(dj, zj, h) * (T(1) - norm * norm) /
                                      ((T(1) + norm * norm) * (T(1) + norm * norm) * norm)
                                : T(0);
        for (int64_t k = 0; k < h; ++k) dj[k] = q * dj[k] + c * zj[k];
        // z_j = Σ_i w_ij S c_i (the weights carry no gradient)
        for (int64_t i = 0; i < n; ++i) axpy(wp[(b * K + j) * L + i], dj, dmp + (cs + i) * h, h);
      }
    }
  });
  const Tensor d_bilinear = at::mm(d_mapped.t(), C);
  Tensor d_values = at::zeros_like(values);
  d_values.index_copy_(0, index, at::mm(d_mapped, bilinear));
  return {d_values, d_target, d_negatives, d_bilinear, d_w1, d_b1, d_w2, d_b2};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // no GIL needed: the kernels touch tensors only (and may run beside the main thread's Python)
  m.def("forward", &forward, "IaCN loss forward (CPU)", py::call_guard<py::gil_scoped_release>());
  m.def("backward", &backward, "IaCN loss backward (CPU)", py::call_guard<py::gil_scoped_release>());
}
