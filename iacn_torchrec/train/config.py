"""Training configuration: dataclasses, loadable from YAML and overridable from the command line.

Precedence: dataclass defaults < ``--config FILE.yaml`` < explicit flags (``--lr``, ``--delta`` ...)
< ``--set section.field=value`` overrides. The resolved config is written into every run's
``config.yaml`` and ``metrics.json``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from iacn_torchrec.errors import UserError
from iacn_torchrec.modules.iacn import IaCNConfig

MODELS = ("din", "dien", "wide_deep", "dlrm")
# Embedding-table optimizers. "adam": dense kernel + torch.optim.Adam (the peers' choice);
# the others are TorchRec/FBGEMM fused in-backward optimizers (sparse row updates).
EMBEDDING_OPTIMIZERS = ("adam", "sgd", "rowwise_adagrad")
SHARDING_TYPES = ("table_wise", "row_wise", "column_wise")
DIEN_NEGATIVES = ("prepared", "popularity")


class ConfigError(UserError, ValueError):
    """A configuration value is missing, unknown or out of range; the message names the field."""


@dataclass
class DataConfig:
    path: str = ""  # prepared dataset directory (`iacn prepare --out`)
    batch_size: int = 128  # per rank
    eval_batch_size: int = 2048  # with two batches scored at once: the fastest here (performance-log.md)
    drop_last: bool = False
    num_test_samples: int | None = None  # evaluate on the first N test samples only (smoke runs)
    # train on the first N train samples only (smoke runs; `iacn bench train`'s like-for-like epochs
    # against a peer that takes the first N rows)
    num_train_samples: int | None = None
    # DIEN's negative behaviours: "popularity" (drawn for every batch in proportion to item popularity,
    # as the reference's data iterator) or "prepared" (the dataset's, drawn once, uniform; the
    # default until session 21, see LEGACY_DEFAULTS). Read by DIEN only.
    dien_negatives: str = "popularity"

    def __post_init__(self) -> None:
        if self.dien_negatives not in DIEN_NEGATIVES:
            raise ConfigError(f"data.dien_negatives={self.dien_negatives!r}: choose one of "
                              f"{', '.join(DIEN_NEGATIVES)}")
        if self.batch_size <= 0 or self.eval_batch_size <= 0:
            raise ConfigError("data.batch_size and data.eval_batch_size must be positive")
        if self.batch_size < 2:  # as the loader's rule for an epoch's last batch
            raise ConfigError(f"data.batch_size must be at least 2 per rank, got {self.batch_size}: the "
                              "towers' BatchNorm cannot train on one sample")
        for name in ("num_test_samples", "num_train_samples"):
            n = getattr(self, name)
            if n is not None and n <= 0:
                raise ConfigError(f"data.{name} must be positive or null, got {n}")


@dataclass
class ModelConfig:
    name: str = "din"
    emb_dim: int = 18  # per table (orig part, or orig + aux with iacn.keep_width); DIEN reference code: 18
    user_dim: int = 18
    dien_aux_loss_weight: float = 1.0
    # DIEN's GRU/AUGRU hidden size; None: 2·emb_dim, the plain model's item width (reference code)
    dien_hidden: int | None = None
    compile: bool = False  # torch.compile the main model in place (CTRWithIaCN.compile_submodules)
    # one process, unsharded: IaCN's forward+backward on a worker thread, beside the main backward
    iacn_worker: bool = True
    # fields of the main model's own config by name (DINConfig, DIENConfig, WideDeepConfig,
    # DLRMConfig: tower_activation, tower_hidden, deep_input_bn, ...); the others keep the
    # reference code's defaults (models.framework.main_model_config)
    main: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in MODELS:
            raise ConfigError(f"model.name={self.name!r}: choose one of {', '.join(MODELS)}")
        if self.main is None:  # a `main:` whose lines are all commented out
            self.main = {}
        if not isinstance(self.main, dict):
            raise ConfigError(f"model.main: expected a mapping of field: value, got {self.main!r}")
        from iacn_torchrec.models.framework import main_model_config  # noqa: PLC0415 (torch, lazily)

        try:
            main_model_config(self.name, self.main)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.emb_dim <= 0 or self.user_dim <= 0:
            raise ConfigError("model.emb_dim and model.user_dim must be positive")
        if not (math.isfinite(self.dien_aux_loss_weight) and self.dien_aux_loss_weight >= 0):
            raise ConfigError(
                f"model.dien_aux_loss_weight must be finite and >= 0, got {self.dien_aux_loss_weight}")
        if self.dien_hidden is not None and self.dien_hidden <= 0:
            raise ConfigError(f"model.dien_hidden must be positive (or null), got {self.dien_hidden}")


@dataclass
class OptimConfig:
    lr: float = 1e-3  # Adam for dense parameters (DIEN code: 1e-3; paper: 1e-4)
    embedding_optimizer: str = "adam"
    embedding_lr: float | None = None  # defaults to lr for adam, 0.05 for fused sgd/adagrad
    aux_embedding_optimizer: str | None = None  # aux tables may use another one (None: same)
    weight_decay: float = 0.0  # dense parameters only (the tables get none, on every path)

    def __post_init__(self) -> None:
        for name in ("embedding_optimizer", "aux_embedding_optimizer"):
            v = getattr(self, name)
            if v is not None and v not in EMBEDDING_OPTIMIZERS:
                raise ConfigError(f"optim.{name}={v!r}: choose one of {', '.join(EMBEDDING_OPTIMIZERS)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"optim.lr must be finite and positive, got {self.lr}")
        if self.embedding_lr is not None and not (math.isfinite(self.embedding_lr) and self.embedding_lr > 0):
            raise ConfigError(
                f"optim.embedding_lr must be finite and positive (or null), got {self.embedding_lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"optim.weight_decay must be finite and >= 0, got {self.weight_decay}")

    def fused(self, aux_tables: bool) -> bool:
        """Whether any table uses a TorchRec fused (in-backward) optimizer, which needs DMP;
        ``aux_tables``: whether the model has aux tables (IaCN on), the only ones
        ``aux_embedding_optimizer`` applies to."""
        return self.embedding_optimizer != "adam" or (
            aux_tables and self.aux_embedding_optimizer not in (None, "adam"))

    def table_lr(self, optimizer: str) -> float:
        if self.embedding_lr is not None:
            return self.embedding_lr
        return self.lr if optimizer == "adam" else 0.05


@dataclass
class DistributedConfig:
    # Per-table sharding types, e.g. {"item_orig": "row_wise", "item_aux": "column_wise"};
    # tables not named are left to the planner.
    sharding_types: dict[str, str] = field(default_factory=dict)
    backend: str | None = None  # gloo on CPU, nccl on CUDA (default from the device)
    pipeline: bool = True  # TrainPipelineSparseDist when sharded

    def __post_init__(self) -> None:
        if self.backend not in (None, "gloo", "nccl"):
            raise ConfigError(f"distributed.backend={self.backend!r}: choose gloo, nccl or null")
        for table, st in self.sharding_types.items():
            if not isinstance(table, str):
                raise ConfigError(f"distributed.sharding_types: table names are strings, got {table!r}")
            if st not in SHARDING_TYPES:
                raise ConfigError(
                    f"distributed.sharding_types[{table!r}]={st!r}: choose one of {', '.join(SHARDING_TYPES)}"
                )


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    iacn: IaCNConfig = field(default_factory=IaCNConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    out: str = "runs/default"
    epochs: int = 1
    max_steps: int | None = None  # stop after this many optimizer steps (smoke runs)
    seed: int = 0
    # torch.set_num_threads; None leaves torch's default. 1 by default: at batch 128 the step is many
    # small ops, and on a busy 2-core box a second thread measured slower (docs/results/performance-log.md)
    threads: int | None = 1
    # cores for evaluation (concurrent batches, one torch thread each, on an unsharded CPU model;
    # intra-op threads otherwise); None = this process's share of the cores (cpu_count // world_size)
    eval_threads: int | None = None
    eval_every: int = 0  # evaluate on the test split every N steps (0: only at the end)
    checkpoint_every: int = 0  # checkpoint every N steps (0: at the end of every epoch and of the run)
    log_every: int = 50
    progress: bool = True
    resume: bool = True  # resume from OUT/checkpoint if present

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            raise ConfigError("epochs must be positive")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ConfigError("max_steps must be positive")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be in [0, 2**32) (numpy's seed range), got {self.seed}")
        if not str(self.out).strip():  # '' would write the run into the current directory
            raise ConfigError("out must name a run directory, got ''")
        if self.log_every < 1:
            raise ConfigError(f"log_every must be >= 1, got {self.log_every}")
        for name in ("eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                when = "only at the end" if name == "eval_every" else "at each epoch's end and the run's"
                raise ConfigError(f"{name} must be >= 0 (0: {when}), got {getattr(self, name)}")
        for name in ("threads", "eval_threads"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{name} must be None or >= 1, got {v}")
        if self.iacn.enabled and self.iacn.keep_width and self.iacn.aux_dim >= self.model.emb_dim:
            raise ConfigError(
                f"iacn.keep_width splits model.emb_dim={self.model.emb_dim} into E_orig and E_aux: "
                f"iacn.aux_dim={self.iacn.aux_dim} must be smaller")

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return _build(cls, d, "")

    @classmethod
    def from_yaml(cls, path: str | Path, stored: bool = False) -> TrainConfig:
        """``stored``: a run's own ``config.yaml`` (written by ``iacn train``), read as that run was
        trained (:func:`stored_config`), not as a hand-written config of today."""
        path = Path(path)
        try:
            d = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except (OSError, UnicodeDecodeError) as e:  # a directory, no permission, a binary file
            raise ConfigError(f"{path}: cannot read the config file ({e})") from None
        except yaml.MarkedYAMLError as e:  # the line, not PyYAML's '"<unicode string>", line N'
            line = f"line {e.problem_mark.line + 1}: " if e.problem_mark else ""
            raise ConfigError(f"{path}: {line}not valid YAML: {e.problem or e.context}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        if stored:
            d = stored_config(d)
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def override(self, assignments: list[str]) -> TrainConfig:
        """Apply ``section.field=value`` overrides (values parsed as YAML, integers as plain decimals:
        :class:`_DecimalIntLoader`); a whole section cannot be replaced."""
        d = self.to_dict()
        for a in assignments:
            if "=" not in a:
                raise ConfigError(f"--set {a!r}: expected section.field=value")
            key, raw = a.split("=", 1)
            node = d
            parts = key.strip().split(".")
            for p in parts[:-1]:
                if not isinstance(node.get(p), dict):
                    raise ConfigError(f"--set {a!r}: unknown section {p!r}")
                node = node[p]
            # mappings whose keys are the user's: distributed.sharding_types, model.main
            open_mapping = parts[0] == "distributed" or parts[:2] == ["model", "main"]
            if parts[-1] not in node and not (isinstance(node, dict) and open_mapping):
                section = ".".join(parts[:-1]) + "." if len(parts) > 1 else ""
                raise ConfigError(f"--set {a!r}: unknown field {key!r}"
                                  f"{_did_you_mean(parts[-1], node, section)}")
            if len(parts) == 1 and isinstance(node.get(parts[0]), dict):  # a whole section would replace
                # every field of it, silently dropping the flags set there before (--model, --iacn)
                raise ConfigError(f"--set {a!r}: {parts[0]!r} is a section: set its fields one by one "
                                  f"({parts[0]}.FIELD=VALUE)")
            try:
                node[parts[-1]] = yaml.load(raw, Loader=_DecimalIntLoader)
            except yaml.YAMLError as e:  # one line, not PyYAML's several
                problem = getattr(e, "problem", None) or str(e).splitlines()[0]
                raise ConfigError(f"--set {a!r}: the value is not valid YAML ({problem})") from None
        return TrainConfig.from_dict(d)


#: fields only DIEN reads (flattened names): another model's run is the same run whatever they say
DIEN_ONLY = ("model.dien_hidden", "model.dien_aux_loss_weight", "data.dien_negatives")

#: fields whose default changed after runs were stored without them (flattened name → the value such
#: a run was trained with): a stored configuration lacking one means this value, not today's default.
#: ``data.dien_negatives`` was "prepared" until it took the DIEN reference's popularity draws.
LEGACY_DEFAULTS: dict[str, Any] = {"data.dien_negatives": "prepared"}


def stored_config(d: dict[str, Any]) -> dict[str, Any]:
    """A stored run's configuration (``config.yaml``, ``metrics.json``'s ``config``) as that run was
    trained: :data:`LEGACY_DEFAULTS` for the fields it lacks, ``model.main`` by
    :func:`stored_model_main`. Returns a new dict; sections that are not mappings are kept as they are."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    for name, value in LEGACY_DEFAULTS.items():
        section, field = name.split(".")
        if isinstance(out.get(section), dict) and field not in out[section]:
            out[section][field] = value
    if isinstance(out.get("model"), dict):
        out["model"]["main"] = stored_model_main(out["model"])
    return out


#: ``model.main`` of runs stored before the field existed, by model: the main model they were built
#: with. Wide&Deep's deep part was ReLU without an input BatchNorm until it took the DIEN reference
#: code's (BatchNorm, PReLU); the other models' defaults have not changed.
LEGACY_MODEL_MAIN: dict[str, dict[str, Any]] = {
    "wide_deep": {"deep_activation": "relu", "deep_input_bn": False},
}


def stored_model_main(model: dict[str, Any]) -> Any:
    """The ``model.main`` that a stored run's ``model`` section (``config.yaml``, ``metrics.json``,
    a checkpoint's fingerprint) was built with: its own, or, for a run stored before the field
    existed, :data:`LEGACY_MODEL_MAIN`. (A field added to the config since a run counts at its
    default elsewhere; this one's absence means another architecture than today's default.)"""
    if "main" in model:
        return model["main"]
    return dict(LEGACY_MODEL_MAIN.get(model.get("name"), {}))


def resolved_main(name: Any, main: Any) -> Any:
    """``main`` as every field of model ``name``'s own config
    (:func:`~iacn_torchrec.models.framework.resolved_model_main`): what resumes and reuse compare.
    As given when it cannot be read (another version's field): then compared as it is."""
    from iacn_torchrec.models.framework import resolved_model_main  # noqa: PLC0415 (torch, lazily)

    try:
        return resolved_model_main(name, main)
    except (ValueError, TypeError, AttributeError):
        return main


_INT_TAG = "tag:yaml.org,2002:int"


class _DecimalIntLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` whose integers are plain decimals (YAML 1.2's core schema): YAML 1.1 reads
    ``0256`` as octal 174 and ``1:30`` as base-60 90, silently; here they are strings, which a
    numeric field then refuses, and ``010`` is 10 as ``--seed 010`` is."""


_DecimalIntLoader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != _INT_TAG]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_DecimalIntLoader.add_implicit_resolver(_INT_TAG, re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))
_DecimalIntLoader.add_constructor(_INT_TAG, lambda loader, node: int(loader.construct_scalar(node), 10))


class _UniqueKeyLoader(_DecimalIntLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (YAML keeps the last one,
    so a config with a forgotten earlier line would silently train with the later value)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: keys it brings may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key {key!r} is given twice in one section", key_node.start_mark)
                seen.add(key)
            except TypeError:  # an unhashable key: the base class says so, with its line
                break
        return super().construct_mapping(node, deep=deep)


def _did_you_mean(name: str, known: Any, prefix: str = "") -> str:
    """``"; did you mean 'iacn.lam'?"`` for a near miss among ``known`` names, else ``""``."""
    close = difflib.get_close_matches(name, [str(k) for k in known], n=1, cutoff=0.6)
    return f"; did you mean {prefix + close[0]!r}?" if close else ""


def _build(cls: type, d: dict[str, Any], prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if d is None and prefix:  # a section whose lines are all commented out
        d = {}
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
    not_names = [k for k in d if not isinstance(k, str)]
    if not_names:  # YAML 1.1 reads on/off/yes/no as booleans, 1 as an int
        raise ConfigError(f"{where}: field names must be strings, got {not_names!r} (quote them)")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        hints = [h for h in (_did_you_mean(u, fields, prefix) for u in unknown) if h]
        raise ConfigError(f"unknown config field(s) {', '.join(prefix + u for u in unknown)}{''.join(hints)}")
    kwargs = {}
    hints = typing.get_type_hints(cls)
    for name, value in d.items():
        sub = _DATACLASS_FIELDS.get((cls, name))
        if sub is not None:
            kwargs[name] = _build(sub, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hints[name], f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{prefix}{e}" if prefix and not str(e).startswith(prefix) else str(e)) from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from None


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """``value`` (from YAML or ``--set``) as the field's declared type: ``float``, ``int``, ``bool``,
    ``str`` or a ``dict``, each possibly ``| None``. YAML reads ``1e-5`` as a string (it wants
    ``1.0e-5``): a number in a string is accepted for a number field, nothing else is converted."""
    args = typing.get_args(tp) if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union \
        else ()
    if args:
        if value is None and type(None) in args:
            return None
        tp = next(a for a in args if a is not type(None))
    base = typing.get_origin(tp) or tp
    kind = {float: "a number", int: "an integer", bool: "true or false", str: "a string", dict: "a mapping"}
    if base not in kind:
        return value
    ok = value
    if base in (float, int) and isinstance(value, str):
        try:
            ok = base(value)
        except ValueError:
            ok = None
    elif base is int and isinstance(value, float) and value.is_integer():
        ok = int(value)
    if base is float and isinstance(ok, int) and not isinstance(ok, bool):
        ok = float(ok)
    good = isinstance(ok, base) and not (base in (int, float) and isinstance(ok, bool))
    if base is float and good and math.isnan(ok):
        good = False
    if not good:
        raise ConfigError(f"{name}: expected {kind[base]}{' or null' if args else ''}, got {value!r}")
    return ok


_DATACLASS_FIELDS: dict[tuple[type, str], type] = {
    (TrainConfig, "data"): DataConfig,
    (TrainConfig, "model"): ModelConfig,
    (TrainConfig, "iacn"): IaCNConfig,
    (TrainConfig, "optim"): OptimConfig,
    (TrainConfig, "distributed"): DistributedConfig,
}
