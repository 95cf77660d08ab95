"""Joins a main CTR model with the IaCN auxiliary task: ``L = L_main + λ·L_IaCN``.

The framework owns no maths of its own: :class:`InterestAwareEmbeddings` does the lookups and the
δ / 1-δ gradient split, the main model turns :class:`EmbeddedBatch` into logits (and, for DIEN, its
auxiliary loss), :class:`IaCNTask` turns the aux views into ``L_IaCN``. With IaCN off there are no
aux tables and no IaCN module, so the model is parameter-for-parameter the plain main model.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import difflib
import json
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor

from iacn_torchrec.models.dien import DIEN, DIENConfig
from iacn_torchrec.models.din import DIN, DINConfig
from iacn_torchrec.models.dlrm_plugin import DLRMConfig, DLRMMain
from iacn_torchrec.models.layers import activation_layer
from iacn_torchrec.models.wide_deep import WideDeep, WideDeepConfig
from iacn_torchrec.modules.embeddings import EmbeddedBatch, InterestAwareEmbeddings, accumulate_row_grads
from iacn_torchrec.modules.iacn import IaCNConfig, IaCNTask

__all__ = ["CTRWithIaCN", "build_model", "main_model_config", "resolved_model_main", "MODEL_NAMES"]

MODEL_NAMES = ("din", "dien", "wide_deep", "dlrm")
_MODELS: dict[str, tuple[type[nn.Module], type]] = {
    "din": (DIN, DINConfig),
    "dien": (DIEN, DIENConfig),
    "wide_deep": (WideDeep, WideDeepConfig),
    "dlrm": (DLRMMain, DLRMConfig),  # TorchRec's DLRM arches; the EBC plug-in is in dlrm_plugin.py
}


#: main-model config fields that ``ModelConfig`` sets with a field of its own (one way to set each)
_OWN_FIELDS = {"dien": {"aux_loss_weight": "model.dien_aux_loss_weight", "hidden_size": "model.dien_hidden"}}


def main_model_config(model_name: str, overrides: Mapping[str, Any] | None = None) -> Any:
    """The main model's own config (``DINConfig`` / ``DIENConfig`` / ``WideDeepConfig`` /
    ``DLRMConfig``): the reference code's defaults, with ``overrides`` by field name (``iacn train
    --set model.main.FIELD=VALUE``, or ``model: {main: {...}}`` in a YAML config).

    Each value is checked against its field's default: widths a list of positive integers (stored as
    the tuple the field holds), activations a name :func:`~iacn_torchrec.models.layers.activation_layer`
    knows, flags booleans, ``dropout`` in ``[0, 1)``. ``ValueError`` names the field (``model.main.…``)
    and, for an unknown one, the fields there are."""
    if model_name not in _MODELS:
        raise ValueError(f"model {model_name!r}: choose one of {', '.join(MODEL_NAMES)}")
    cls = _MODELS[model_name][1]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    defaults = cls()
    values: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        where = f"model.main.{key}"
        if key in _OWN_FIELDS.get(model_name, {}):
            raise ValueError(f"{where}: set it with {_OWN_FIELDS[model_name][key]}")
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"{where}: {cls.__name__} has no such field; {hint}"
                             f"its fields: {', '.join(fields)}")
        default = getattr(defaults, key)
        if isinstance(default, tuple):
            if not (isinstance(value, (list, tuple))
                    and all(type(v) is int and v >= 1 for v in value)):  # type(): a YAML true is no width
                raise ValueError(f"{where}: {value!r} is not a list of positive integers (widths)")
            value = tuple(value)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"{where}: {value!r} is not true or false")
        elif isinstance(default, float):
            if isinstance(value, str):  # YAML reads 1e-1 as a string: a number in a string is a number
                try:
                    value = float(value)
                except ValueError:
                    pass
            if type(value) not in (int, float) or not math.isfinite(value):
                raise ValueError(f"{where}: {value!r} is not a number")
            value = float(value)
            if key == "dropout" and not 0.0 <= value < 1.0:
                raise ValueError(f"{where}: {value!r} is not in [0, 1)")
        elif isinstance(default, str):
            if not isinstance(value, str):
                raise ValueError(f"{where}: {value!r} is not a string")
            if key.endswith("activation"):
                try:
                    activation_layer(value, 1)
                except ValueError as e:
                    raise ValueError(f"{where}: {e}") from None
                value = value.lower()  # one spelling: PReLU and prelu are the same model
        values[key] = value
    try:
        return cls(**values)
    except ValueError as e:  # the config's own checks (e.g. DLRM's OverArch ending in 1)
        raise ValueError(f"model.main: {e}") from None


def resolved_model_main(model_name: str, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Every field of the main model's config that ``overrides`` give it (:func:`main_model_config`)
    as plain JSON values: what resumes and reuse compare, so that a spelled-out default, or another
    spelling of an activation, is the same model, and a later change of a default is not. Fields that
    ``ModelConfig`` sets with fields of its own (DIEN's ``aux_loss_weight``, ``hidden_size``) are left
    to those."""
    resolved = dataclasses.asdict(main_model_config(model_name, overrides))
    for key in _OWN_FIELDS.get(model_name, {}):
        resolved.pop(key)
    return json.loads(json.dumps(resolved))


_WORKER: concurrent.futures.ThreadPoolExecutor | None = None
_WORKER_LOCK = threading.Lock()


def _iacn_worker() -> concurrent.futures.ThreadPoolExecutor:
    """The process's one IaCN worker thread (created on first use)."""
    global _WORKER
    with _WORKER_LOCK:
        if _WORKER is None:
            _WORKER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="iacn")
        return _WORKER


def drain_iacn_worker() -> None:
    """Wait until the IaCN worker has finished what was submitted to it (a step whose backward
    failed leaves its IaCN running: it must not draw from the global RNG after the next run seeds it)."""
    if _WORKER is not None:
        _WORKER.submit(lambda: None).result()


class _JoinBranch(torch.autograd.Function):
    """Joins the IaCN branch, computed on the worker thread, back into the main graph.

    Forward: a zero scalar (so the main forward never waits for the worker); its input is the
    model's private scalar leaf (``CTRWithIaCN._join_input``, which gets no gradient), so the join
    is part of a backward from the loss and nothing else waits for it.
    Backward: waits for the worker's forward+backward, which computed (not accumulated) the
    gradients of ``λ·L_IaCN`` w.r.t. the aux rows it looked up (already × (1-δ)) and IaCN's
    parameters; scales them by the upstream gradient (so ``(c·loss).backward()`` and loss scalers
    act on IaCN as on the serial graph) and adds them to ``.grad``: the rows' into their tables'
    (:func:`accumulate_row_grads` into the gradient the main lookups have accumulated by then,
    since the join is created first and so runs last, :meth:`CTRWithIaCN._iacn_on_worker`; a zero
    gradient where there is none), the parameters' as the serial backward would. Returns no
    gradient through the graph."""

    @staticmethod
    def forward(ctx, pending, *inputs: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.pending, ctx.num_inputs = pending, len(inputs)
        return inputs[0].new_zeros(())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        # the worker's result stays with the node: a second backward (retain_graph=True) reuses it
        row_grads, param_grads = ctx.pending.result()
        scale = float(grad)  # 1 for the usual loss.backward(): no multiplications
        with torch.no_grad():
            for p, g in param_grads:
                g = g if scale == 1.0 else g * scale
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.add_(g)
        if row_grads:
            tables, ids, rows = zip(*row_grads)
            accumulate_row_grads(list(tables), list(ids), list(rows), scale)
        return (None,) * (1 + ctx.num_inputs)


class CTRWithIaCN(nn.Module):
    """A main CTR model trained with the IaCN auxiliary task.

    Args:
        embeddings: the interest-aware embeddings (``aux_dim > 0`` iff IaCN is on).
        main_model: ``forward(EmbeddedBatch) -> (logits [B], model_aux_loss | None)``.
        iacn: the IaCN task, or None (the plain main model).
        lam: λ (default: ``iacn.config.lam``; 0 without a task). With λ = 0 IaCN is not run at all
            (its loss cannot reach any parameter) and ``iacn_loss`` is reported as 0.
        delta: δ, the main model's share of the gradient reaching ``E_aux`` (default:
            ``iacn.config.delta``; 1 without a task). Given together with a task, λ and δ must
            equal its config's: the config stays the one source of truth.
        item_log_q: ``[num_items + 1]`` log sampling probability of every item id (the log-uniform
            sampler's logQ correction), or None.

    ``forward(batch)`` (``batch.sparse_features``: KJT, ``batch.labels``: ``[B]``) returns
    ``(loss, (logits, main_loss, iacn_loss))`` with ``main_loss = BCE(logits, labels) +
    model_aux_loss`` and ``loss = main_loss + λ·iacn_loss``; the second element is detached (for
    logging and metrics, as TorchRec's ``DLRMTrain`` does).
    """

    def __init__(
        self,
        embeddings: InterestAwareEmbeddings,
        main_model: nn.Module,
        iacn: IaCNTask | None = None,
        lam: float | None = None,
        delta: float | None = None,
        item_log_q: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if iacn is not None:
            for name, given in (("lam", lam), ("delta", delta)):
                if given is not None and float(given) != float(getattr(iacn.config, name)):
                    raise ValueError(f"CTRWithIaCN: {name}={given} differs from the IaCN task's "
                                     f"config.{name}={getattr(iacn.config, name)}")
            lam, delta = iacn.config.lam, iacn.config.delta
        lam = 0.0 if lam is None else lam
        delta = 1.0 if delta is None else delta
        if iacn is not None and embeddings.aux is None:
            raise ValueError("CTRWithIaCN: an IaCN task needs aux tables (aux_dim > 0)")
        if not 0.0 <= float(delta) <= 1.0:
            raise ValueError(f"CTRWithIaCN: delta must be in [0, 1], got {delta}")
        if float(lam) < 0:
            raise ValueError(f"CTRWithIaCN: lam must be >= 0, got {lam}")
        if iacn is not None and iacn.config.sampler != "in_batch" and not embeddings.with_iacn_negatives:
            raise ValueError(
                f"CTRWithIaCN: sampler {iacn.config.sampler!r} needs InterestAwareEmbeddings("
                "with_iacn_negatives=True) and a loader that adds iacn_neg_item / iacn_neg_cate"
            )
        self.embeddings = embeddings
        self.main_model = main_model
        self.iacn = iacn
        self.lam = float(lam)
        self.delta = float(delta)
        #: run IaCN's forward+backward on a worker thread, beside the main backward (see
        #: :meth:`run_iacn_on_worker`); off by default.
        self.iacn_on_worker = False
        # the worker path's join node needs one input that requires grad to be in the graph; a leaf
        # of its own (no parameter: not in the state dict or the optimizer, never given a gradient)
        self._join_input = torch.zeros((), requires_grad=True)
        self.item_log_q: torch.Tensor | None
        if item_log_q is not None:
            if item_log_q.dim() != 1 or item_log_q.numel() != embeddings.num_items + 1:
                raise ValueError(
                    f"CTRWithIaCN: item_log_q must be [num_items + 1] = [{embeddings.num_items + 1}]; "
                    f"got {list(item_log_q.shape)}"
                )
            # a buffer so .to(device) moves it; not persistent: it is data, not a learned state
            self.register_buffer("item_log_q", item_log_q.detach().float().clone(), persistent=False)
        else:
            self.item_log_q = None

    @property
    def runs_iacn(self) -> bool:
        return self.iacn is not None and self.lam != 0.0

    def _log_q(
        self, target_ids: torch.Tensor, negative_ids: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """log Q of the targets and the sampled negatives (the log-uniform sampler's correction)."""
        if self.item_log_q is None:
            return None, None
        return self.item_log_q[target_ids], None if negative_ids is None else self.item_log_q[negative_ids]

    def _iacn_inputs(self, emb: EmbeddedBatch) -> dict[str, Any]:
        """The keyword arguments of :meth:`IaCNTask.forward` for the aux views of ``emb`` (built with
        ``aux_views=True``).

        Item ids go along for accidental-hit masking, log Q of targets / negatives for the
        log-uniform sampler's correction. The user embedding is passed detached (``E_orig``, the
        ``uid`` table included, is trained by the main loss only). IaCN draws its training-mode
        routing logits from the global RNG when it runs, after the main model's forward, serially
        or on the worker thread alike (see :meth:`_iacn_on_worker`)."""
        assert self.iacn is not None
        target_log_q, neg_log_q = self._log_q(emb.target_ids, emb.negative_ids)
        aux_hist = emb.aux_hist_jagged()  # jagged when possible: routing maps only the real behaviours
        return dict(
            aux_hist=aux_hist,
            hist_lengths=emb.hist_lengths,
            aux_target=emb.aux_target,
            # the user table belongs to E_orig, which gets g_main only: IaCN's user-profile layer
            # reads the user embedding as a feature
            user=emb.user.detach(),
            aux_negatives=emb.aux_negatives,
            neg_log_q=neg_log_q,
            target_log_q=target_log_q,
            target_ids=emb.target_ids,
            negative_ids=emb.negative_ids,
            negative_rows=emb.negative_rows,
        )

    def iacn_loss(self, emb: EmbeddedBatch, labels: torch.Tensor) -> torch.Tensor:
        """``L_IaCN`` on the aux views of ``emb`` (built with ``aux_views=True``)."""
        assert self.iacn is not None
        return self.iacn(labels=labels, **self._iacn_inputs(emb))

    def _iacn_on_worker(
        self, kjt: Any, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor, EmbeddedBatch], None]]:
        """Prepares IaCN's forward *and backward* for the worker thread; call it before the main
        model's lookups.

        The worker reads IaCN's views of ``kjt`` straight from the aux tables
        (:meth:`InterestAwareEmbeddings.detached_aux_views`): the main model's embeddings are built
        without aux views, so the main thread runs the main model alone (no aux views, no lookups of
        the negatives, none of their backward). The worker's backward computes the gradients of
        ``λ·L_IaCN`` w.r.t. the rows it looked up and IaCN's parameters; :class:`_JoinBranch` adds
        them to ``.grad`` (the rows' × (1-δ), IaCN's share of ``E_aux``'s gradient). The worker
        draws IaCN's routing logits from the global RNG, as the serial path does after the main
        model's forward: it runs during the main backward, which draws nothing, and the next forward
        starts after the join has waited for it, so the RNG's draws keep one order and the worker
        run equals the serial one up to float summation order (the join adds IaCN's gradients last).

        The join is created here, before the lookups: it has the lowest sequence number in the step's
        graph, so the autograd engine runs it last; and its graph input is a private scalar leaf,
        not an aux table (whose accumulation would otherwise wait for it). So the tables' own
        gradients are accumulated first and the join adds IaCN's rows into ``.grad`` holding them (no
        dense zero fill, no second dense add), and the worker has the whole main backward to finish.
        The main thread builds nothing else here: the worker lists IaCN's parameters itself.

        Returns ``(join, iacn_loss, start)``: add ``join`` (value 0) to the loss, then call
        ``start(loss, emb)`` with that total loss and the main model's embedded batch: the worker
        starts when the backward through ``loss`` begins, runs IaCN and adds ``λ·L_IaCN`` to
        ``loss``'s value in place; ``iacn_loss`` is a scalar it fills with ``L_IaCN``. Both values
        are final once that ``backward`` has returned; an exception on the worker is raised by it.
        """
        assert self.iacn is not None and self.embeddings.aux is not None
        pending: concurrent.futures.Future = concurrent.futures.Future()
        join = _JoinBranch.apply(pending, self._join_input)
        iacn_loss = labels.new_zeros(())
        lam, share = self.lam, 1.0 - self.delta
        # a thread keeps the intra-op thread count it started with: use the training thread's
        threads = torch.get_num_threads()

        def work(total: torch.Tensor, user: torch.Tensor, hist_lengths: torch.Tensor,
                 hist_offsets: torch.Tensor) -> None:
            try:  # the outcome goes to `pending`, which the main backward's join waits on
                if torch.get_num_threads() != threads:
                    torch.set_num_threads(threads)
                params = [p for p in self.iacn.parameters() if p.requires_grad]
                views = self.embeddings.detached_aux_views(kjt)
                target_log_q, neg_log_q = self._log_q(views.target_ids, views.negative_ids)
                hist = JaggedTensor(values=views.hist_values, lengths=hist_lengths, offsets=hist_offsets)
                loss = self.iacn(
                    labels=labels, aux_hist=hist, hist_lengths=hist_lengths, aux_target=views.target,
                    user=user.detach(), aux_negatives=views.negatives, neg_log_q=neg_log_q,
                    target_log_q=target_log_q, target_ids=views.target_ids, negative_ids=views.negative_ids,
                    negative_rows=views.negative_rows,
                )
                # computed, not accumulated into .grad: the join scales and accumulates them inside
                # the main backward (so zero_grad or a second forward meanwhile cannot interfere)
                grads = torch.autograd.grad(lam * loss, views.rows + params, allow_unused=True)
                with torch.no_grad():
                    iacn_loss.copy_(loss)
                    total.add_(lam * loss)
                    row_grads = [(t, ids, g * share) for t, ids, g in zip(views.tables, views.ids, grads)
                                 if g is not None and t.requires_grad and share != 0.0]
                param_grads = [(p, g) for p, g in zip(params, grads[len(views.rows):]) if g is not None]
                del views, hist, loss, grads, target_log_q, neg_log_q
                pending.set_result((row_grads, param_grads))
            except BaseException as e:
                pending.set_exception(e)

        def start(loss: torch.Tensor, emb: EmbeddedBatch) -> None:
            args = (loss.detach(), emb.user, emb.hist_lengths, emb.hist_offsets)
            submitted: list[bool] = []

            # IaCN runs beside the main *backward*, whose autograd engine holds no GIL: submitted
            # from the backward's first node, the worker's Python meets none of the main thread's
            # (the step loop's Python between forward and backward used to hold it off, measured)
            def submit(grad_outputs: Any) -> None:
                if not submitted:  # once: a second backward (retain_graph=True) reuses the result
                    submitted.append(True)
                    _iacn_worker().submit(work, *args)

            loss.grad_fn.register_prehook(submit)

        return join, iacn_loss, start

    def _worker_applies(self, labels: torch.Tensor) -> bool:
        """Whether this forward runs IaCN on the worker thread (see :meth:`run_iacn_on_worker`)."""
        # CPU only: on CUDA the join would block the device's autograd thread, which the worker's
        # own backward needs (there IaCN runs serially, as it would with run_iacn_on_worker(False))
        return (self.iacn_on_worker and self.runs_iacn and self.training and torch.is_grad_enabled()
                and labels.device.type == "cpu" and self.embeddings.reads_aux_tables_directly()
                and any(t.weight.requires_grad for t in self.embeddings.aux.embeddings.values()))

    def forward(self, batch: Any) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        labels = batch.labels.float()
        run_iacn = self.runs_iacn
        if self._worker_applies(labels):
            # before the lookups: the join must come first in the graph (see _iacn_on_worker)
            join, iacn_loss, start = self._iacn_on_worker(batch.sparse_features, labels)
            # the main graph without aux views: IaCN reads the tables itself on the worker
            emb = self.embeddings(batch.sparse_features, self.delta, aux_views=False)
            logits, main_loss = self._main_loss(emb, labels)
            loss = main_loss + join
            start(loss, emb)
            return loss, (logits.detach(), main_loss.detach(), iacn_loss.detach())
        emb = self.embeddings(batch.sparse_features, self.delta, aux_views=run_iacn)
        logits, main_loss = self._main_loss(emb, labels)
        iacn_inputs = self._iacn_inputs(emb) if run_iacn else {}
        if run_iacn:
            iacn_loss = self.iacn(labels=labels, **iacn_inputs)
            loss = main_loss + self.lam * iacn_loss
        else:
            iacn_loss = torch.zeros((), device=logits.device)
            loss = main_loss
        return loss, (logits.detach(), main_loss.detach(), iacn_loss.detach())

    def _main_loss(self, emb: EmbeddedBatch, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [B], BCE(logits, labels) + the main model's own aux loss)``."""
        logits, model_aux_loss = self.main_model(emb)
        main_loss = F.binary_cross_entropy_with_logits(logits, labels)
        if model_aux_loss is not None:
            main_loss = main_loss + model_aux_loss
        return logits, main_loss

    def run_iacn_on_worker(self, enabled: bool = True) -> CTRWithIaCN:
        """Run IaCN's forward and backward on a worker thread while the main model runs its
        backward (training mode with gradients only; evaluation and ``predict`` never run IaCN).

        On a CPU the main model's many small ops cannot use a second core through intra-op threads,
        but IaCN is an independent branch of the graph: with one torch thread each, the two
        branches overlap on two cores. The worker starts when the forward has built the loss, so
        IaCN's Python-heavy forward meets the main backward, which runs in the autograd engine
        without the GIL. The worker reads IaCN's views from the aux tables itself, so the main
        thread runs the capacity-matched model only. The result is the same computation (the
        gradients reaching every parameter are the serial ones up to float summation order), so
        this is an execution choice, made by the trainer for the single-process, unsharded path.
        IaCN's gradients reach ``.grad`` during the main backward (scaled by its upstream gradient),
        as in the serial graph. Call ``backward`` on the returned loss once per forward, best with
        ``retain_graph=True`` and the loss dropped after the optimizer step (as the trainer's step
        loop does): freeing the graph's saved tensors inside backward takes the GIL once per tensor,
        and the worker's Python holds it. Plain CPU tables only: with sharded aux tables, on CUDA
        (where the join would block the device's autograd thread) or DDP, IaCN runs serially.
        """
        self.iacn_on_worker = bool(enabled)
        return self

    def compile_submodules(self, main: bool = True, iacn: bool = False, **kwargs: Any) -> CTRWithIaCN:
        """``torch.compile`` the main model (and optionally the IaCN task) *in place*
        (``nn.Module.compile``: parameter names, checkpoints and the optimizer are unchanged).

        Opt-in (``ModelConfig.compile``): the first steps pay the compilation (seconds for the main
        model, about a minute for IaCN). Measured on the 2-core CPU box (DIN, batch 128, 1 thread):
        main model compiled ~18 % faster steps for plain DIN, ~6 % with IaCN; compiling IaCN too
        gave no further gain, hence ``iacn=False`` by default. ``kwargs`` go to ``torch.compile``
        (default ``dynamic=True``: jagged sizes change every batch).
        """
        kwargs.setdefault("dynamic", True)
        if main:
            self.main_model.compile(**kwargs)
        if iacn and self.iacn is not None:
            self.iacn.compile(**kwargs)
        return self

    @torch.no_grad()  # not inference_mode: the batch's KJT caches views that a training step may reuse
    def predict(self, batch: Any) -> torch.Tensor:
        """Click probabilities ``[B]`` from ``E_orig ⊕ E_aux`` and the main model only (IaCN is not
        run; call ``eval()`` first so BatchNorm / Dice use their running statistics)."""
        emb = self.embeddings(batch.sparse_features, self.delta, aux_views=False)
        logits, _ = self.main_model(emb)
        return torch.sigmoid(logits)


def build_model(
    model_name: str,
    num_users: int,
    num_items: int,
    num_cates: int,
    max_len: int,
    iacn: IaCNConfig | None = None,
    emb_dim: int = 18,
    user_dim: int | None = None,
    item_log_q: torch.Tensor | None = None,
    dien_aux_loss_weight: float | None = None,
    dien_hidden: int | None = None,
    model_config: Any = None,
    init_bound: float | None = None,
    device: torch.device | None = None,
) -> CTRWithIaCN:
    """Builds ``model_name`` ∈ {din, dien, wide_deep, dlrm} with IaCN as configured.

    Parameters are created from torch's global RNG in a fixed order (tables ``uid, item_orig,
    cate_orig[, item_aux, cate_aux]``, then the main model, then IaCN), so ``torch.manual_seed``
    before the call fixes the model. With ``iacn`` None or disabled: no aux tables, no IaCN module.

    With IaCN on, every main-model parameter whose shape does not depend on the aux width is then
    overwritten with the plain model's draw from the same seed (see :func:`_share_plain_init`), so
    arms paired by seed start from the same main model as far as shapes allow (DESIGN.md,
    "Measuring"); the global RNG continues exactly as if that had not happened.

    Args:
        emb_dim: per-table dimension of ``E_orig`` (the aux tables get ``iacn.aux_dim``); with
            ``iacn.keep_width`` the width of ``E_orig ⊕ E_aux``, so ``E_orig`` gets ``emb_dim - aux_dim``.
        user_dim: user table dimension (default ``emb_dim``).
        item_log_q: ``[num_items + 1]`` log sampling probabilities (required for the log-uniform
            sampler, used for logQ correction).
        dien_aux_loss_weight: overrides ``DIENConfig.aux_loss_weight``.
        dien_hidden: overrides ``DIENConfig.hidden_size``; when both are None DIEN's GRU gets the
            plain model's item width ``2·emb_dim`` whether IaCN is on or not (the reference code's
            fixed ``HIDDEN_SIZE``): IaCN widens what the main model reads, not its layers.
        model_config: a ``DINConfig`` / ``DIENConfig`` / ``WideDeepConfig`` (defaults otherwise).
        init_bound: see :class:`InterestAwareEmbeddings`.
    """
    if model_name not in _MODELS:
        raise ValueError(f"build_model: model_name={model_name!r}; choose one of {', '.join(MODEL_NAMES)}")
    cls, cfg_cls = _MODELS[model_name]
    cfg = model_config if model_config is not None else cfg_cls()
    if not isinstance(cfg, cfg_cls):
        raise TypeError(f"build_model: {model_name} takes a {cfg_cls.__name__}, got {type(cfg).__name__}")
    if isinstance(cfg, DIENConfig):
        if dien_aux_loss_weight is not None:
            cfg = replace(cfg, aux_loss_weight=float(dien_aux_loss_weight))
        if dien_hidden is not None or cfg.hidden_size is None:
            cfg = replace(cfg, hidden_size=int(dien_hidden) if dien_hidden is not None else 2 * emb_dim)
    on = iacn is not None and iacn.enabled
    if on and iacn.sampler == "log_uniform" and item_log_q is None:
        raise ValueError("build_model: IaCN sampler 'log_uniform' needs item_log_q (log Q per item id)")
    user_dim = emb_dim if user_dim is None else user_dim
    orig_dim = emb_dim
    if on and iacn.keep_width:
        if iacn.aux_dim >= emb_dim:
            raise ValueError(f"build_model: iacn.keep_width splits emb_dim={emb_dim} into E_orig and E_aux; "
                             f"aux_dim={iacn.aux_dim} must be smaller")
        orig_dim = emb_dim - iacn.aux_dim

    def tables(orig: int, aux: int, after_orig_tables: Callable[[], None] | None = None):
        return InterestAwareEmbeddings(
            num_users, num_items, num_cates, max_len,
            orig_dim=orig,
            aux_dim=aux,
            user_dim=user_dim,
            with_neg_hist=model_name == "dien",
            with_iacn_negatives=aux > 0 and iacn.sampler != "in_batch",
            device=device,
            init_bound=init_bound,
            after_orig_tables=after_orig_tables,
        )

    start = torch.get_rng_state() if on else None
    after_plain_tables: list[torch.Tensor] = []
    # at the paper's width the user and E_orig tables are the plain model's, drawn alike: the RNG
    # state after them is the plain arm's before its main model (keep-width tables are narrower)
    def record() -> None:
        after_plain_tables.append(torch.get_rng_state())

    embeddings = tables(orig_dim, iacn.aux_dim if on else 0, record if on and orig_dim == emb_dim else None)
    main_model = cls(user_dim, embeddings.item_dim, max_len, cfg)
    if on:
        def plain_tables_drawn() -> torch.Tensor:  # the RNG state after the plain arm's tables
            if after_plain_tables:
                return after_plain_tables[0]
            torch.set_rng_state(start)  # keep-width: replay the plain tables (a transient copy)
            tables(emb_dim, 0)
            return torch.get_rng_state()

        _share_plain_init(main_model, plain_tables_drawn, lambda: cls(user_dim, 2 * emb_dim, max_len, cfg))
    task = None
    if on:
        task = IaCNTask(iacn, item_dim=embeddings.aux_item_dim, max_len=max_len, user_dim=user_dim)
    model = CTRWithIaCN(embeddings, main_model, task, item_log_q=item_log_q if on else None)
    return model.to(device) if device is not None else model


def _share_plain_init(
    main_model: nn.Module,
    plain_tables_drawn: Callable[[], torch.Tensor],
    plain_main: Callable[[], nn.Module],
) -> None:
    """Gives ``main_model`` the plain arm's initial values wherever a parameter's shape allows.

    The plain model (IaCN off, the same seed) draws its tables and then its main model from torch's
    global RNG. An IaCN arm draws aux tables in between and its layers that read ``E_orig ⊕ E_aux``
    are wider, so every later layer would start from other draws and a seed-paired lift would
    compare two initialisations. This sets the RNG to the plain arm's state after its tables
    (``plain_tables_drawn()``: recorded while the tables were drawn at the paper's width, replayed
    at keep width), draws the plain main model (``plain_main()``), copies every parameter and buffer
    of the same name and shape into ``main_model``, and restores the RNGs to where they were, so
    the draws after this (IaCN's module, training) are unchanged. The wider layers keep their own
    draws.
    """
    # tables on a GPU draw from its generator (restored too); the main model from the CPU's
    cuda = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):
        torch.set_rng_state(plain_tables_drawn())
        twin = plain_main()
    theirs = dict(twin.named_parameters()) | dict(twin.named_buffers())
    with torch.no_grad():
        for name, t in list(main_model.named_parameters()) + list(main_model.named_buffers()):
            src = theirs.get(name)
            if src is not None and src.shape == t.shape and src.dtype == t.dtype:
                t.copy_(src)
