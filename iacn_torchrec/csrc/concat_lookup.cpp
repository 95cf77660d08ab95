// The main model's item-side views in one call: each view's rows looked up in every item-side table
// and concatenated, E_orig(item) ⊕ E_aux(item) ⊕ E_orig(cate) ⊕ E_aux(cate), with a gradient factor per
// table (δ on the aux tables: the main model's share of E_aux's gradient).
//
// The same values and table gradients as InterestAwareEmbeddings' ATen path (one nn.Embedding lookup
// per table, split per feature, δ's lerp on the aux pieces, a cat per view; modules/embeddings.py),
// whose ~20 ops a batch and their autograd records cost more than the row copies themselves. The
// table gradients are dense [rows, dim], zero-filled then accumulated row by row, as
// nn.Embedding's; the autograd node is C++, so the main backward never takes the GIL for it.
#include <torch/extension.h>

#include <cstring>
#include <vector>

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// dst[ids[i]] += s · src[i·stride : i·stride + d] for i < n: a [rows, d] table gradient accumulated
// row by row (ids already checked), the lookup's backward and accumulate_rows alike.
template <typename T>
void add_rows(T* dst, int64_t d, const int64_t* ids, int64_t n, const T* src, int64_t stride, T s) {
  for (int64_t i = 0; i < n; ++i) {
    T* out = dst + ids[i] * d;
    const T* row = src + i * stride;
    for (int64_t k = 0; k < d; ++k) out[k] += s * row[k];
  }
}

// tables: T_j [R_j, d_j]; ids: per view v its item ids (ids[2v]) and category ids (ids[2v + 1]),
// int64 [n_v]; kinds[j]: 0 if table j reads item ids, 1 category ids; scales[j]: its gradient factor.
class ConcatLookup : public torch::autograd::Function<ConcatLookup> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList tables, at::TensorList ids,
                               std::vector<double> scales, std::vector<int64_t> kinds) {
    const int64_t J = int64_t(tables.size()), V = int64_t(ids.size()) / 2;
    TORCH_CHECK(J > 0 && int64_t(scales.size()) == J && int64_t(kinds.size()) == J && ids.size() % 2 == 0,
                "concat_lookup: one scale and one kind per table, an (item, cate) id pair per view");
    int64_t D = 0;
    for (const Tensor& t : tables) {
      // the row copies read the table's storage as [rows, d]: a strided or expanded one would be misread
      TORCH_CHECK(t.dim() == 2 && t.is_contiguous() && t.scalar_type() == tables[0].scalar_type(),
                  "concat_lookup: tables must be contiguous [rows, d] of one dtype");
      D += t.size(1);
    }
    for (const Tensor& i : ids)
      TORCH_CHECK(i.dim() == 1 && i.scalar_type() == at::kLong && i.is_contiguous(),
                  "concat_lookup: ids must be contiguous int64 [n]");
    for (int64_t v = 0; v < V; ++v)
      TORCH_CHECK(ids[2 * v].numel() == ids[2 * v + 1].numel(),
                  "concat_lookup: view ", v, " has ", ids[2 * v].numel(), " item ids and ",
                  ids[2 * v + 1].numel(), " category ids");
    variable_list outs;
    AT_DISPATCH_FLOATING_TYPES(tables[0].scalar_type(), "concat_lookup_forward", [&] {
      using T = scalar_t;
      for (int64_t v = 0; v < V; ++v) {
        const int64_t n = ids[2 * v].numel();
        Tensor out = at::empty({n, D}, tables[0].options());
        T* op = out.data_ptr<T>();
        int64_t col = 0;
        for (int64_t j = 0; j < J; ++j) {
          const int64_t d = tables[j].size(1), rows = tables[j].size(0);
          const T* tp = tables[j].data_ptr<T>();
          const int64_t* ip = ids[2 * v + kinds[j]].data_ptr<int64_t>();
          for (int64_t i = 0; i < n; ++i) {
            TORCH_CHECK_INDEX(ip[i] >= 0 && ip[i] < rows, "concat_lookup: id ", ip[i], " is out of range for ",
                              "a table of ", rows, " rows (view ", v, ", table ", j, ")");
            std::memcpy(op + i * D + col, tp + ip[i] * d, d * sizeof(T));
          }
          col += d;
        }
        outs.push_back(out);
      }
    });
    ctx->save_for_backward(ids.vec());
    std::vector<int64_t> rows, dims;
    for (const Tensor& t : tables) {
      rows.push_back(t.size(0));
      dims.push_back(t.size(1));
    }
    ctx->saved_data["rows"] = rows;
    ctx->saved_data["dims"] = dims;
    ctx->saved_data["kinds"] = kinds;
    ctx->saved_data["scales"] = scales;
    ctx->set_materialize_grads(false);
    return outs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list ids = ctx->get_saved_variables();
    const std::vector<int64_t> rows = ctx->saved_data["rows"].toIntVector();
    const std::vector<int64_t> dims = ctx->saved_data["dims"].toIntVector();
    const std::vector<int64_t> kinds = ctx->saved_data["kinds"].toIntVector();
    const std::vector<double> scales = ctx->saved_data["scales"].toDoubleVector();
    const int64_t J = int64_t(rows.size()), V = int64_t(grads.size());
    int64_t D = 0;
    for (int64_t d : dims) D += d;
    std::vector<Tensor> g_views(V);
    at::TensorOptions options;
    for (int64_t v = 0; v < V; ++v)
      if (grads[v].defined()) {
        g_views[v] = grads[v].contiguous();
        options = g_views[v].options();
      }
    variable_list out;
    int64_t col = 0;
    for (int64_t j = 0; j < J; ++j) {
      const int64_t d = dims[j];
      Tensor g;
      if (ctx->needs_input_grad(j) && options.has_dtype()) {
        g = at::zeros({rows[j], d}, options);
        AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "concat_lookup_backward", [&] {
          using T = scalar_t;
          T* gp = g.data_ptr<T>();
          const T s = T(scales[j]);
          for (int64_t v = 0; v < V; ++v) {
            if (!g_views[v].defined()) continue;
            add_rows(gp, d, ids[2 * v + kinds[j]].data_ptr<int64_t>(), ids[2 * v].numel(),
                     g_views[v].data_ptr<T>() + col, D, s);
          }
        });
      }
      out.push_back(g);
      col += d;
    }
    out.resize(J + ids.size() + 2);  // no gradient for the ids, the scales or the kinds
    return out;
  }
};

variable_list apply(const std::vector<Tensor>& tables, const std::vector<Tensor>& ids,
                    std::vector<double> scales, std::vector<int64_t> kinds) {
  return ConcatLookup::apply(at::TensorList(tables), at::TensorList(ids), std::move(scales), std::move(kinds));
}

// dst[j][ids[j][i]] += scale * src[j][i] for every table j: IaCN's rows, computed on the worker thread,
// added into the tables' dense gradients by the framework's join (index_add_ costs ~15 ns a row here).
void accumulate_rows(const std::vector<Tensor>& dst, const std::vector<Tensor>& ids, const std::vector<Tensor>& src,
                     double scale) {
  TORCH_CHECK(dst.size() == ids.size() && dst.size() == src.size(),
              "accumulate_rows: one id and one row tensor per table");
  for (size_t j = 0; j < dst.size(); ++j) {
    const Tensor& g = dst[j];
    const Tensor rows = src[j].contiguous();
    const Tensor idx = ids[j].contiguous();
    TORCH_CHECK(g.dim() == 2 && g.is_contiguous() && rows.dim() == 2 && rows.size(1) == g.size(1) &&
                    idx.scalar_type() == at::kLong && idx.dim() == 1 && idx.numel() == rows.size(0) &&
                    rows.scalar_type() == g.scalar_type() && g.device().is_cpu() && rows.device().is_cpu(),
                "accumulate_rows: table ", j, ": a contiguous CPU [rows, d] gradient, int64 [n] ids and [n, d] ",
                "rows of its dtype");
    const int64_t n = idx.numel(), d = g.size(1), R = g.size(0);
    const int64_t* ip = idx.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i)
      TORCH_CHECK_INDEX(ip[i] >= 0 && ip[i] < R, "accumulate_rows: id ", ip[i], " is out of range for a table of ",
                        R, " rows (table ", j, ")");
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "accumulate_rows", [&] {
      add_rows(g.data_ptr<scalar_t>(), d, ip, n, rows.data_ptr<scalar_t>(), d, scalar_t(scale));
    });
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // no GIL needed: the kernel and its autograd node touch tensors only
  m.def("apply", &apply, "item-side lookups concatenated per view, with per-table gradient factors (CPU)",
        py::call_guard<py::gil_scoped_release>());
  m.def("accumulate_rows", &accumulate_rows, "dst[j].index_add_(0, ids[j], scale * src[j]) for every table j (CPU)",
        py::call_guard<py::gil_scoped_release>());
}
