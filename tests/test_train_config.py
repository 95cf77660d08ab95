"""Config: YAML round trip, overrides, and clear errors naming the field."""

import pytest
import yaml

from iacn_torchrec.train.config import ConfigError, TrainConfig


def test_yaml_round_trip_and_override(tmp_path):
    cfg = TrainConfig().override(
        ["model.name=dien", "iacn.enabled=true", "iacn.delta=0.5", "optim.lr=0.0001"]
    )
    p = tmp_path / "c.yaml"
    p.write_text(cfg.to_yaml())
    back = TrainConfig.from_yaml(p)
    assert back == cfg
    assert back.model.name == "dien" and back.iacn.enabled
    assert back.iacn.delta == 0.5 and back.optim.lr == 1e-4


@pytest.mark.parametrize(
    "assignment, needle",
    [
        ("model.name=dlrm2", "model.name"),
        ("iacn.delta=1.5", "delta"),
        ("optim.embedding_optimizer=adamw", "optim.embedding_optimizer"),
        ("model.nope=1", "model.nope"),
        ("epochs=0", "epochs"),
        ("data.batch_size=1", "data.batch_size must be at least 2 per rank"),  # BatchNorm: a traceback before
        ("model.dien_hidden=-4", "model.dien_hidden"),
        ("distributed.sharding_types={item_aux: diagonal}", "item_aux"),
        ("distributed.sharding_types={1: row_wise}", "table names are strings"),
        ("seed=4294967296", "seed must be in"),  # numpy's np.random.seed refuses it mid-training
        ("out=''", "out must name a run directory"),
        ("optim.lr=.inf", "optim.lr must be finite"),
        ("optim.embedding_lr=.inf", "optim.embedding_lr must be finite"),
        ("optim.weight_decay=.inf", "optim.weight_decay must be finite"),
        ("model.dien_aux_loss_weight=.inf", "model.dien_aux_loss_weight must be finite"),
    ],
)
def test_bad_values_name_the_field(assignment, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        TrainConfig().override([assignment])


def test_keep_width_needs_aux_dim_below_emb_dim():
    on = ["iacn.enabled=true", "iacn.keep_width=true"]
    with pytest.raises(ConfigError, match=r"model\.emb_dim=18.*iacn\.aux_dim=18 must be smaller"):
        TrainConfig().override(on)
    assert TrainConfig().override([*on, "iacn.aux_dim=6"]).iacn.keep_width
    assert TrainConfig().override(["iacn.keep_width=true"]).iacn.keep_width  # IaCN off: nothing to split
    with pytest.raises(ConfigError, match="keep_width"):
        TrainConfig().override(["iacn.keep_width=3"])


def test_unknown_yaml_field_names_file_and_field(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("iacn:\n  lamda: 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*iacn\.lamda; did you mean 'iacn\.lam'\?"):
        TrainConfig.from_yaml(p)
    with pytest.raises(ConfigError, match=r"unknown field 'model\.emb_dm'; did you mean 'model\.emb_dim'\?"):
        TrainConfig().override(["model.emb_dm=4"])
    with pytest.raises(ConfigError, match=r"unknown field 'model\.zzz'$"):  # nothing close: no guess
        TrainConfig().override(["model.zzz=4"])


def test_yaml_sections_and_keys(tmp_path):
    """A section whose lines are all commented out is empty; a key YAML reads as a bool or int (on,
    yes, 1) is an error naming the section, not a traceback."""
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  # path: /x\nseed: 3\n")
    assert TrainConfig.from_yaml(p).seed == 3
    for text, where in (("data: {path: /x}\non: true\n", "config"), ("model:\n  1: 2\n", "model")):
        p.write_text(text)
        with pytest.raises(ConfigError, match=rf"c\.yaml: {where}: field names must be strings"):
            TrainConfig.from_yaml(p)
    with pytest.raises(ConfigError, match=r"^distributed: expected a mapping, got str$"):
        TrainConfig.from_dict({"distributed": "foo"})
    with pytest.raises(ConfigError, match=r"'distributed' is a section: set its fields one by one"):
        TrainConfig().override(["distributed=foo"])
    # a key given twice (YAML would keep the later one) names the key and its line
    p.write_text("data:\n  batch_size: 128\n  batch_size: 64\nseed: 1\n")
    twice = r"c\.yaml: line 3: not valid YAML: the key 'batch_size' is given twice in one section$"
    with pytest.raises(ConfigError, match=twice):
        TrainConfig.from_yaml(p)
    p.write_text("data: {batch_size: 64}\nmodel: {name: din}\nseed: 1\n")  # the same key in two sections
    assert TrainConfig.from_yaml(p).data.batch_size == 64
    # YAML merge keys still work, a key overriding a merged one included; an unhashable key is one line
    p.write_text("data:\n  <<: {batch_size: 64, eval_batch_size: 256}\n  eval_batch_size: 512\n")
    merged = TrainConfig.from_yaml(p).data
    assert (merged.batch_size, merged.eval_batch_size) == (64, 512)
    p.write_text("data:\n  [a, b]: 1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: line 2: not valid YAML: found unhashable key"):
        TrainConfig.from_yaml(p)


@pytest.mark.parametrize("value", ["@runs", "[din", "*x"])
def test_set_value_that_is_not_yaml(value):
    with pytest.raises(ConfigError, match=r"--set 'out=.*': the value is not valid YAML"):
        TrainConfig().override([f"out={value}"])


def test_unreadable_config_files(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot read the config file"):
        TrainConfig.from_yaml(tmp_path)  # a directory
    p = tmp_path / "bin.yaml"
    p.write_bytes(b"\xff\xfe\x00model")
    with pytest.raises(ConfigError, match=r"bin\.yaml: cannot read the config file"):
        TrainConfig.from_yaml(p)
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        TrainConfig.from_yaml(tmp_path / "nope.yaml")


def _train_parser():
    """``iacn train``'s argument parser."""
    import argparse

    from iacn_torchrec.train.cli import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    return p


def test_cli_flags_comma_separated_sharding_and_joined_sets():
    from iacn_torchrec.train.cli import config_from_args

    p = _train_parser()
    args = p.parse_args([
        "--data", "/x", "--model", "dien", "--iacn", "--delta", "0.5",
        "--sharding", "item_orig=row_wise,item_aux=column_wise",
        "--set", "iacn.lam=2;model.emb_dim=16",
    ])
    cfg = config_from_args(args)
    assert cfg.distributed.sharding_types == {"item_orig": "row_wise", "item_aux": "column_wise"}
    assert cfg.iacn.enabled and cfg.iacn.delta == 0.5 and cfg.iacn.lam == 2 and cfg.model.emb_dim == 16
    assert cfg.model.name == "dien" and cfg.data.path == "/x"
    kept = config_from_args(p.parse_args(["--data", "/x", "--iacn", "--aux-dim", "6", "--keep-width"]))
    assert kept.iacn.keep_width and kept.iacn.aux_dim == 6 and kept.model.emb_dim == 18
    assert not config_from_args(p.parse_args(["--data", "/x", "--iacn"])).iacn.keep_width
    with pytest.raises(ConfigError, match="no dataset"):
        config_from_args(p.parse_args(["--model", "din"]))
    # --sharding is a flag: --set overrides it; a flag value past U+FFFF survives the YAML round trip
    both = config_from_args(p.parse_args(["--data", "/x😀", "--sharding", "item_orig=column_wise",
                                          "--set", "distributed.sharding_types.item_orig=row_wise"]))
    assert both.distributed.sharding_types == {"item_orig": "row_wise"} and both.data.path == "/x😀"


def test_iacn_options_on_the_command_line_need_iacn_on(tmp_path):
    """An IaCN option given while IaCN is off would change nothing: refused, naming the option; a
    YAML config may still hold IaCN's options for the arms that turn it on."""
    from iacn_torchrec.train.cli import config_from_args

    p = _train_parser()
    with pytest.raises(ConfigError, match=r"--set iacn\.lam set IaCN's options, but IaCN is off"):
        config_from_args(p.parse_args(["--data", "/x", "--set", "iacn.lam=2"]))
    with pytest.raises(ConfigError, match=r"--delta, --set iacn\.aux_dim .*add --iacn"):
        config_from_args(p.parse_args(["--data", "/x", "--delta", "0.5",
                                       "--set", "model.emb_dim=16;iacn.aux_dim=6"]))
    on = config_from_args(p.parse_args(["--data", "/x", "--set", "iacn.enabled=true;iacn.lam=2"]))
    assert on.iacn.enabled and on.iacn.lam == 2
    assert not config_from_args(p.parse_args(["--data", "/x", "--set", "iacn.enabled=false"])).iacn.enabled
    cfg = tmp_path / "c.yaml"
    cfg.write_text("iacn:\n  enabled: false\n  lam: 0.5\n")
    off = config_from_args(p.parse_args(["--data", "/x", "--config", str(cfg)]))
    assert not off.iacn.enabled and off.iacn.lam == 0.5


def test_aux_optimizer_and_dien_options_need_their_model(tmp_path):
    """The aux tables' optimizer is IaCN's option (without IaCN there are no aux tables: it must not
    switch a plain run to the sharded path); DIEN's options given for another model are refused."""
    from iacn_torchrec.train.cli import config_from_args

    p = _train_parser()
    with pytest.raises(ConfigError, match=r"--aux-embedding-optimizer set IaCN's options, but IaCN is off"):
        config_from_args(p.parse_args(["--data", "/x", "--aux-embedding-optimizer", "sgd"]))
    with pytest.raises(ConfigError, match=r"--set optim\.aux_embedding_optimizer set IaCN's options"):
        config_from_args(p.parse_args(["--data", "/x", "--set", "optim.aux_embedding_optimizer=sgd"]))
    plain = TrainConfig().override(["optim.aux_embedding_optimizer=sgd"])  # a YAML config's base arm
    assert not plain.optim.fused(aux_tables=plain.iacn.enabled) and plain.optim.fused(aux_tables=True)
    for sets in (["model.dien_hidden=7"], ["model.dien_aux_loss_weight=5", "data.dien_negatives=prepared"]):
        shown = ", ".join(f"--set {s.split('=')[0]}" for s in sets)
        with pytest.raises(ConfigError, match=rf"{shown} set DIEN's options, but the model is din: add "
                                              r"--model dien"):
            config_from_args(p.parse_args(["--data", "/x", "--set", ";".join(sets)]))
    dien = config_from_args(p.parse_args(["--data", "/x", "--model", "dien", "--set", "model.dien_hidden=7"]))
    assert dien.model.dien_hidden == 7


def test_set_values_are_read_as_written(tmp_path):
    """YAML 1.1 reads 0256 as octal and 1:30 as base 60, silently: here integers are decimals (as
    ``--seed 010`` reads), other forms are refused by the field; a whole section is not replaced by
    ``--set`` (dropping the flags set in it); a bad value is one line; iacn.seed has a range."""
    c = TrainConfig().override(["data.batch_size=0256", "seed=010"])
    assert (c.data.batch_size, c.seed) == (256, 10)
    for a, want in (("seed=1:30", r"seed: expected an integer, got '1:30'"),
                    ("seed=0x10", r"seed: expected an integer, got '0x10'"),
                    ('model={"emb_dim": 16}', r"'model' is a section: set its fields one by one"),
                    ("iacn.lam=[1", r"--set 'iacn\.lam=\[1': the value is not valid YAML \(expected ',' or "
                                    r"'\]', but got '<stream end>'\)$"),
                    ("iacn.seed=18446744073709551616", r"IaCNConfig\.seed must be an int in \[0, 2\*\*32\)")):
        with pytest.raises(ConfigError, match=want):
            TrainConfig().override([a])
    (tmp_path / "c.yaml").write_text("seed: 010\ndata:\n  batch_size: 0256\n")
    c = TrainConfig.from_yaml(tmp_path / "c.yaml")
    assert (c.data.batch_size, c.seed) == (256, 10)
    assert TrainConfig().override(["distributed.sharding_types={uid: row_wise}"]).distributed.sharding_types \
        == {"uid": "row_wise"}  # a field holding a mapping is not a section


def test_every_train_flag_sets_its_own_field():
    """Each ``iacn train`` flag lands in the config field it names, with a value unlike the default
    (so a flag wired to the wrong field, or to none, shows)."""
    import functools

    from iacn_torchrec.train.cli import _FLAGS, config_from_args

    expected = {  # config path -> (command-line words, value)
        "data.path": (["--data", "/d"], "/d"),
        "data.batch_size": (["--batch-size", "64"], 64),
        "data.eval_batch_size": (["--eval-batch-size", "512"], 512),
        "model.name": (["--model", "dien"], "dien"),
        "model.emb_dim": (["--emb-dim", "16"], 16),
        "model.compile": (["--compile"], True),
        "iacn.delta": (["--delta", "0.4"], 0.4),
        "iacn.lam": (["--lam", "0.7"], 0.7),
        "iacn.pow_p": (["--pow-p", "3"], 3.0),
        "iacn.k_max": (["--k-max", "4"], 4),
        "iacn.routing_iters": (["--routing-iters", "2"], 2),
        "iacn.aux_dim": (["--aux-dim", "8"], 8),
        "iacn.keep_width": (["--keep-width"], True),
        "iacn.sampler": (["--sampler", "log_uniform"], "log_uniform"),
        "iacn.num_negatives": (["--num-negatives", "7"], 7),
        "optim.lr": (["--lr", "0.002"], 0.002),
        "optim.embedding_optimizer": (["--embedding-optimizer", "sgd"], "sgd"),
        "optim.aux_embedding_optimizer": (["--aux-embedding-optimizer", "rowwise_adagrad"],
                                          "rowwise_adagrad"),
        "optim.embedding_lr": (["--embedding-lr", "0.03"], 0.03),
        "epochs": (["--epochs", "3"], 3),
        "max_steps": (["--max-steps", "11"], 11),
        "seed": (["--seed", "5"], 5),
        "threads": (["--threads", "2"], 2),
        "eval_threads": (["--eval-threads", "1"], 1),
        "eval_every": (["--eval-every", "13"], 13),
        "checkpoint_every": (["--checkpoint-every", "17"], 17),
        "out": (["--out", "/tmp/r"], "/tmp/r"),
        "iacn.enabled": (["--iacn"], True),
        "resume": (["--no-resume"], False),
        "progress": (["--no-progress"], False),
    }
    assert {path for path, _ in _FLAGS.values()} <= set(expected)  # a new flag needs a line here

    def field(cfg, path):
        return functools.reduce(getattr, path.split("."), cfg)

    p = _train_parser()
    cfg = config_from_args(p.parse_args([w for words, _ in expected.values() for w in words]))
    default = TrainConfig()
    for path, (words, value) in expected.items():
        assert field(default, path) != value, path  # the test would not see this flag's wiring
        assert field(cfg, path) == value, (words, path, field(cfg, path))
    assert not config_from_args(p.parse_args(["--data", "/d", "--iacn", "--no-iacn"])).iacn.enabled


def test_model_section_reaches_the_model():
    """``model.*`` settings arrive in the built model: the widths, DIEN's hidden size, and DIEN's
    auxiliary-loss weight w, which scales the model's part of ``main_loss`` (``BCE + w·L_aux``)."""
    import torch
    import torch.nn.functional as F
    from helpers import planted_batch

    from iacn_torchrec.distributed.setup import build_model_from_config
    from iacn_torchrec.train.bench import _SynthDataset

    ds = _SynthDataset(num_users=20, num_items=60, num_cates=6, max_len=8)
    batch = planted_batch(16, seed=3, num_users=20, num_items=60, num_cates=6, max_len=8, neg_hist=True)
    aux_part = {}
    for w in (1.0, 0.25):
        cfg = TrainConfig().override(["model.name=dien", "model.emb_dim=6", "model.user_dim=5",
                                      "model.dien_hidden=10", f"model.dien_aux_loss_weight={w}"])
        torch.manual_seed(0)
        model = build_model_from_config(cfg, ds).train()
        assert model.main_model.config.aux_loss_weight == w and model.main_model.config.hidden_size == 10
        assert (model.embeddings.user_dim, model.embeddings.orig_dim) == (5, 6)
        _, (logits, main_loss, _) = model(batch)
        aux_part[w] = float(main_loss - F.binary_cross_entropy_with_logits(logits, batch.labels))
    assert aux_part[1.0] > 0
    assert aux_part[0.25] == pytest.approx(0.25 * aux_part[1.0], rel=1e-5)


@pytest.mark.parametrize("assignment, needle", [
    ("model.main.tower_activaton=prelu", r"model\.main\.tower_activaton: DINConfig has no such field; did "
                                         r"you mean 'tower_activation'\? its fields: att_hidden"),
    ("model.main.tower_activation=gelu", r"model\.main\.tower_activation: unknown activation 'gelu'"),
    ("model.main.tower_hidden=[200, 0]", r"model\.main\.tower_hidden: \[200, 0\] is not a list of positive"),
    ("model.main.tower_hidden=[true]", r"model\.main\.tower_hidden: \[True\] is not a list"),
    ("model.main.tower_input_bn=1", r"model\.main\.tower_input_bn: 1 is not true or false"),
    ("model.main.dropout=1.0", r"model\.main\.dropout: 1\.0 is not in \[0, 1\)"),
    ("model.main.att_activation=3", r"model\.main\.att_activation: 3 is not a string"),
    ("model.main=[1]", r"model\.main: expected a mapping"),
])
def test_bad_main_model_fields_name_the_field(assignment, needle):
    with pytest.raises(ConfigError, match=needle):
        TrainConfig().override([assignment])


def test_dien_fields_with_a_model_field_of_their_own_are_set_there():
    """One way to set each: DIEN's auxiliary-loss weight and hidden size have ``model.*`` fields."""
    for key, own in (("aux_loss_weight", "model.dien_aux_loss_weight"), ("hidden_size", "model.dien_hidden")):
        with pytest.raises(ConfigError, match=rf"model\.main\.{key}: set it with {own}"):
            TrainConfig().override(["model.name=dien", f"model.main.{key}=2"])


@pytest.mark.parametrize("name, sets, check", [
    ("din", ["model.main.tower_activation=prelu", "model.main.tower_hidden=[100, 50]"],
     lambda m: [type(x).__name__ for x in m.tower.net] == ["BatchNorm1d", "Linear", "_PReLULast", "Linear",
                                                           "_PReLULast", "Linear"]
     and [x.out_features for x in m.tower.net if hasattr(x, "out_features")] == [100, 50, 1]),
    ("dien", ["model.main.tower_input_bn=false", "model.main.att_hidden=[16]"],
     lambda m: type(m.tower.net[0]).__name__ == "Linear" and m.config.att_hidden == (16,)),
    ("wide_deep", ["model.main.deep_activation=relu", "model.main.deep_input_bn=false"],
     lambda m: [type(x).__name__ for x in m.deep.net] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]),
    ("wide_deep", [],  # DIEN's reference Model_WideDeep: bn1, dense 200 + PReLU, dense 80 + PReLU
     lambda m: [type(x).__name__ for x in m.deep.net] == ["BatchNorm1d", "Linear", "_PReLULast", "Linear",
                                                          "_PReLULast", "Linear"]),
    ("dlrm", ["model.main.over_arch_layer_sizes=[64, 1]"],
     lambda m: m.config.over_arch_layer_sizes == (64, 1)),
])
def test_main_model_fields_reach_the_model(tmp_path, name, sets, check):
    """``--set model.main.FIELD=VALUE`` (or ``model: {main: ...}`` in a YAML config) sets the main
    model's own config field; the rest keep the reference defaults."""
    from iacn_torchrec.distributed.setup import build_model_from_config
    from iacn_torchrec.train.bench import _SynthDataset

    ds = _SynthDataset(num_users=20, num_items=60, num_cates=6, max_len=8)
    cfg = TrainConfig().override([f"model.name={name}", *sets])
    assert check(build_model_from_config(cfg, ds).main_model)
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert TrainConfig.from_yaml(path).model.main == cfg.model.main


def test_a_stored_wide_deep_run_from_before_model_main_is_read_as_it_was_built(tmp_path):
    """Wide&Deep's deep part took the reference's BatchNorm and PReLU after runs had been stored
    without ``model.main``: such a run's config.yaml (with ``stored=True``: export, explain), its
    checkpoint fingerprint (resume) and its metrics.json config (reproduce's reuse) mean the ReLU
    part without BatchNorm it was built with, not today's default; other models are unaffected, and a
    hand-written config without ``main`` gets today's defaults."""
    import json

    from iacn_torchrec.experiments.reproduce import comparable
    from iacn_torchrec.train.loop import config_fingerprint, fingerprint_differences, main_model_hint

    legacy = {"deep_activation": "relu", "deep_input_bn": False}
    for name, want in (("wide_deep", legacy), ("din", {})):
        d = TrainConfig().override([f"model.name={name}"]).to_dict()
        del d["model"]["main"]
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(d))
        assert TrainConfig.from_yaml(tmp_path / "config.yaml", stored=True).model.main == want
        assert TrainConfig.from_yaml(tmp_path / "config.yaml").model.main == {}
        today = TrainConfig().override([f"model.name={name}"])
        as_built = TrainConfig().override([f"model.name={name}", *(f"model.main.{k}={v}" for k, v in
                                                                   {"deep_activation": "relu",
                                                                    "deep_input_bn": "false"}.items()
                                                                   if want)])
        assert (comparable(d) == comparable(today.to_dict())) == (not want)
        assert comparable(d) == comparable(as_built.to_dict())
        stored = json.loads(config_fingerprint(today, "abc"))
        del stored["model.main"]
        differ = fingerprint_differences(json.dumps(stored), config_fingerprint(today, "abc"))
        assert [d.split(":")[0] for d in differ] == (["model.main"] if want else [])
        assert fingerprint_differences(json.dumps(stored), config_fingerprint(as_built, "abc")) == []
        hint = main_model_hint(json.dumps(stored), config_fingerprint(today, "abc"))
        assert hint == ("resume the checkpoint's main model with --set 'model.main.deep_activation=\"relu\"' "
                        "--set 'model.main.deep_input_bn=false', or " if want else "")


def test_a_run_stored_before_popularity_negatives_is_read_as_it_was_trained(tmp_path):
    """``data.dien_negatives`` became "popularity" after runs had been stored without the field: a
    stored DIEN run means "prepared" in its config.yaml (``stored=True``), its checkpoint fingerprint
    (resume) and reproduce's reuse, so it is not taken for today's default; the field is DIEN's only,
    so another model's run matches whatever it says; a hand-written config gets today's default."""
    import json

    from iacn_torchrec.experiments.reproduce import comparable
    from iacn_torchrec.train.loop import config_fingerprint, fingerprint_differences

    assert TrainConfig().data.dien_negatives == "popularity"
    for name in ("dien", "din"):
        dien = name == "dien"
        d = TrainConfig().override([f"model.name={name}"]).to_dict()
        del d["data"]["dien_negatives"]
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(d))
        stored = TrainConfig.from_yaml(tmp_path / "config.yaml", stored=True)
        assert stored.data.dien_negatives == "prepared"
        assert TrainConfig.from_yaml(tmp_path / "config.yaml").data.dien_negatives == "popularity"
        today = TrainConfig().override([f"model.name={name}"])
        prepared = TrainConfig().override([f"model.name={name}", "data.dien_negatives=prepared"])
        assert (comparable(d) == comparable(today.to_dict())) is not dien
        assert comparable(d) == comparable(prepared.to_dict())
        fp = json.loads(config_fingerprint(today, "abc"))
        del fp["data.dien_negatives"]
        differ = fingerprint_differences(json.dumps(fp), config_fingerprint(today, "abc"))
        assert differ == (["data.dien_negatives: 'prepared' → 'popularity'"] if dien else [])
        assert fingerprint_differences(json.dumps(fp), config_fingerprint(prepared, "abc")) == []
        # one that says it (stored since the field existed) is compared as it says, for DIEN only
        other = fingerprint_differences(config_fingerprint(prepared, "abc"), config_fingerprint(today, "abc"))
        assert bool(other) is dien
        # so is every field only DIEN reads (config.DIEN_ONLY)
        weighted = TrainConfig().override([f"model.name={name}", "model.dien_aux_loss_weight=5"])
        assert bool(fingerprint_differences(config_fingerprint(weighted, "abc"),
                                            config_fingerprint(today, "abc"))) is dien


def test_the_same_main_model_spelled_otherwise_is_the_same_run():
    """Resumes and reproduce's reuse compare the main model, not the overrides' spelling: a default
    spelled out, an activation's capital letters, a number YAML reads as a string; a real change
    differs. A DLRM OverArch that does not end in 1 is refused in the config."""
    from iacn_torchrec.experiments.reproduce import comparable
    from iacn_torchrec.train.loop import config_fingerprint, fingerprint_differences

    plain = TrainConfig()
    for sets in (["model.main.tower_activation=dice", "model.main.tower_hidden=[200, 80]"],
                 ["model.main.att_activation=Sigmoid", "model.main.dropout=0e0"]):
        same = TrainConfig().override(sets)
        assert fingerprint_differences(config_fingerprint(plain, "h"), config_fingerprint(same, "h")) == []
        assert comparable(plain.to_dict()) == comparable(same.to_dict())
    other = TrainConfig().override(["model.main.tower_activation=PReLU"])
    differ = fingerprint_differences(config_fingerprint(plain, "h"), config_fingerprint(other, "h"))
    assert [d.split(":")[0] for d in differ] == ["model.main"]
    assert comparable(plain.to_dict()) != comparable(other.to_dict())
    assert TrainConfig().override(["model.main.dropout=1e-1"]).model.main == {"dropout": "1e-1"}  # YAML
    with pytest.raises(ConfigError, match=r"model\.main: over_arch_layer_sizes must end in 1 \(the logit\), "
                                          r"got \[64, 32\]"):
        TrainConfig().override(["model.name=dlrm", "model.main.over_arch_layer_sizes=[64, 32]"])


def test_dien_negatives_popularity_reaches_the_train_loader_and_trains(tmp_path):
    """``data.dien_negatives=popularity`` gives DIEN's training loader a popularity sampler (not the
    test loader, nor another model's); a DIEN run trains with it; an unknown value is refused."""
    import math

    from helpers import prepare_planted

    from iacn_torchrec.data.loader import PreparedDataset
    from iacn_torchrec.train.loop import make_loaders, train

    _, data = prepare_planted(tmp_path, num_users=40, seed=0)
    ds = PreparedDataset.open(data)
    for model, setting, want in (("dien", "popularity", True), ("dien", "prepared", False),
                                 ("din", "popularity", False)):
        cfg = TrainConfig().override([f"model.name={model}", f"data.dien_negatives={setting}"])
        train_loader, test_loader, _ = make_loaders(cfg, ds, 0, 1)
        assert (train_loader.neg_hist_sampler is not None) == want
        assert test_loader.neg_hist_sampler is None
    with pytest.raises(ConfigError, match=r"data\.dien_negatives='uniform': choose one of prepared, "
                                          r"popularity"):
        TrainConfig().override(["data.dien_negatives=uniform"])
    cfg = TrainConfig().override([f"data.path={data}", "data.batch_size=16", "model.name=dien",
                                  "data.dien_negatives=popularity", "max_steps=3", f"out={tmp_path / 'run'}",
                                  "progress=false", "threads=1"])
    result = train(cfg)
    assert result["steps"] == 3 and math.isfinite(result["test"]["logloss"])


def test_the_progress_bar_only_on_a_terminal(monkeypatch, tmp_path, capsys):
    """Without a terminal (TorchX, CI, a log file, ``iacn demo > log``) every bar refresh would become
    a log line: the training loop draws its bar only when stderr is a terminal, whatever the config
    asks; --no-progress turns it off there too."""
    import sys

    from helpers import prepare_planted

    from iacn_torchrec.runtime import show_progress
    from iacn_torchrec.train.cli import config_from_args
    from iacn_torchrec.train.loop import train

    p = _train_parser()
    for tty, requested, want in ((True, True, True), (True, False, False), (False, True, False)):
        monkeypatch.setattr(sys.stderr, "isatty", lambda tty=tty: tty)
        assert show_progress(requested) is want, (tty, requested)
    assert config_from_args(p.parse_args(["--data", "/d"])).progress is True
    assert config_from_args(p.parse_args(["--data", "/d", "--no-progress"])).progress is False
    _, data = prepare_planted(tmp_path, num_users=40, seed=0)
    for tty in (False, True):
        monkeypatch.setattr(sys.stderr, "isatty", lambda tty=tty: tty)
        cfg = TrainConfig().override([f"data.path={data}", "data.batch_size=16", "max_steps=3", "threads=1",
                                      f"out={tmp_path / f'run{tty}'}"])
        assert cfg.progress is True
        capsys.readouterr()
        train(cfg)
        err = capsys.readouterr().err
        assert ("3/3" in err) is tty, err  # tqdm's "3/3 [..., step/s]"
