"""Sharding-planner benchmarks: plan validity, the aux tables' exact bytes, does-not-fit errors, CLI."""

from __future__ import annotations

import json
import math

import pytest

from iacn_torchrec.distributed.plan_cli import load_scenario
from iacn_torchrec.distributed.plan_specs import GIB, SpecError
from iacn_torchrec.distributed.planning import (
    ModelSpec,
    PlanDoesNotFitError,
    PlanOptions,
    TopologySpec,
    compare_iacn,
    measure_sharded_embeddings,
    plan_tables,
)

SMALL = ModelSpec(
    "small", num_users=1000, num_items=5000, num_cates=50, orig_dim=16, aux_dim=8, user_dim=16, hist_len=4
)


def test_small_plan_is_valid():
    topo = TopologySpec(world_size=4, local_world_size=2, compute_device="cuda", hbm_gib=1.0)
    opts = PlanOptions(batch_size=32)
    res, plan = plan_tables(SMALL, topo, opts, with_iacn=True)
    assert res.fits
    assert [t.name for t in res.tables] == ["uid", "item_orig", "cate_orig", "item_aux", "cate_aux"]
    cap = int(GIB * (1 - opts.reserve_fraction))
    assert len(res.rank_hbm) == 4 and max(res.rank_hbm) <= cap
    for t, spec_t in zip(res.tables, SMALL.tables(True)):
        assert (t.rows, t.dim) == (spec_t.num_embeddings, spec_t.embedding_dim)
        assert all(0 <= r < 4 for r in t.ranks)
        if t.sharding_type != "data_parallel":  # the shards tile the table exactly once
            assert t.param_bytes == t.rows * t.dim * 4
    # the ShardingPlan TorchRec returns covers both collections and every table
    assert set(plan.plan) == {"orig", "aux"}
    assert set(plan.plan["aux"]) == {"item_aux", "cate_aux"}
    assert math.isfinite(res.step_estimate_ms) and res.step_estimate_ms > 0


@pytest.mark.parametrize("optimizer,row_floats", [("rowwise_adagrad", 1), ("sgd", 0)])
def test_iacn_adds_exactly_the_aux_table_bytes(optimizer, row_floats):
    # CPU topology, table-wise only: each table is one shard whose DDR estimate is
    # weights + optimizer state + input ids (int64) + output rows (fp32), all computable by hand.
    W, B = 2, 16
    topo = TopologySpec(world_size=W, local_world_size=W, compute_device="cpu", ddr_gib=4)
    opts = PlanOptions(batch_size=B, optimizer=optimizer, sharding_types=("table_wise",))
    c = compare_iacn(SMALL, topo, opts)
    base, iacn, delta = c["baseline"], c["iacn"], c["delta"]
    assert base.fits and iacn.fits
    aux = [t for t in SMALL.tables(True) if t.module == "aux"]
    state = sum(t.num_embeddings * t.embedding_dim * 4 + row_floats * t.num_embeddings * 4 for t in aux)
    # item_aux: 5001 rows x 8 -> 160,032 B weights (+ 20,004 B row-wise state); cate_aux: 51 x 8
    assert state == (5001 * 8 * 4 + 51 * 8 * 4) + row_floats * (5001 + 51) * 4
    assert delta["state_bytes"] == state == delta["aux_state_bytes"]
    ids = sum(sum(t.pooling_factors) * B for t in aux)  # lookups per rank per step
    io = sum(
        math.ceil(sum(t.pooling_factors) * B * W * 8)
        + math.ceil(sum(t.pooling_factors) * B * W * t.embedding_dim * 4)
        for t in aux
    )
    assert ids == (1 + 4) * B * 2
    assert delta["total_ddr"] == state + io
    assert delta["total_hbm"] == 0
    # and the baseline tables are planned the same way in both runs
    for t in base.tables:
        t2 = iacn.table(t.name)
        assert (t2.sharding_type, t2.param_bytes, t2.optimizer_bytes) == (
            t.sharding_type,
            t.param_bytes,
            t.optimizer_bytes,
        )


def test_aux_tables_that_do_not_fit_name_table_and_shortfall():
    # item tables 2,000,001 x 32 (256 MB) fit 2 x 0.3 GiB HBM; an aux twin of dim 256 (2 GB) does not.
    spec = ModelSpec("tight", 1000, 2_000_000, 100, orig_dim=32, aux_dim=256, user_dim=32, hist_len=2)
    topo = TopologySpec(world_size=2, local_world_size=2, compute_device="cuda", hbm_gib=0.3)
    opts = PlanOptions(batch_size=8, offload="never")
    c = compare_iacn(spec, topo, opts)
    assert c["baseline"].fits
    iacn = c["iacn"]
    assert not iacn.fits and not c["delta"]
    assert "'item_aux'" in iacn.error and "short by" in iacn.error
    # its smallest shard: row-wise over 2 ranks, 1,000,001 rows x 256 x 4 B (+ row-wise state, I/O)
    avail = int(0.3 * GIB * 0.85)
    assert iacn.shortfall["item_aux"] >= 1_000_001 * 256 * 4 + 1_000_001 * 4 - avail
    with pytest.raises(PlanDoesNotFitError, match="item_aux"):
        plan_tables(spec, topo, opts, with_iacn=True)


def test_offload_falls_back_to_uvm_caching():
    spec = ModelSpec("uvm", 1000, 2_000_000, 100, orig_dim=64, aux_dim=64, user_dim=64, hist_len=2)
    topo = TopologySpec(world_size=2, local_world_size=2, compute_device="cuda", hbm_gib=0.5, ddr_gib=8)
    res = compare_iacn(spec, topo, PlanOptions(batch_size=8, offload="auto"))["iacn"]
    assert res.fits and res.mode == "uvm_caching" and "HBM-only" in res.error
    assert any(t.compute_kernel == "fused_uvm_caching" for t in res.tables)
    assert res.max_rank_ddr > 0


def test_meta_json_read_defensively(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"counts": {"users": 10, "items": 20}, "max_len": 5}))
    with pytest.raises(SpecError, match="counts.categories"):
        ModelSpec.from_meta(tmp_path)
    (tmp_path / "meta.json").write_text(
        json.dumps({"source": "x", "counts": {"users": 10, "items": 20, "categories": 3}, "max_len": 5})
    )
    spec = ModelSpec.from_meta(tmp_path, orig_dim=8, user_dim=8, aux_dim=4)
    rows = {t.name: t.num_embeddings for t in spec.tables(True)}
    assert rows == {"uid": 11, "item_orig": 21, "cate_orig": 4, "item_aux": 21, "cate_aux": 4}
    assert spec.hist_len == 5.0
    with pytest.raises(SpecError, match="no such meta.json"):
        ModelSpec.from_meta(tmp_path / "missing")


def test_scenario_errors_name_file_and_field(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(
        "name: x\nmodel: {num_users: 1, num_items: 2, num_cates: 3, orig_dims: 4}\nworld_sizes: [2]\n"
    )
    with pytest.raises(SpecError, match=r"bad.yaml.*orig_dims"):
        load_scenario(p)
    model = "model: {num_users: 1, num_items: 2, num_cates: 3}\nworld_sizes: [2]\n"
    for extra, shown in (("plan: {batch_size: '128'}", r"batch_size must be an integer >= 1, got '128'"),
                         ("plan: {sharding_types: row_wise}", r"sharding_types must be a non-empty list"),
                         ("plan: {sharding_types: [rw]}", r"unknown sharding type\(s\) \['rw'\]"),
                         ("plan: {reserve_fraction: 1.5}", r"reserve_fraction must be in \[0, 1\)"),
                         ("plan: {cache_load_factor: -1}", r"cache_load_factor must be in \(0, 1\]"),
                         ("topology: {world_size: 4}", r"'topology' must be a mapping without 'world_size'"),
                         ("topology: {hbm_gib: -1}", r": topology: hbm_gib must be a positive")):
        p.write_text(f"name: x\n{model}{extra}\n")
        with pytest.raises(SpecError, match=rf"bad\.yaml.*{shown}"):
            load_scenario(p)


def test_cli_writes_json_and_markdown(tmp_path):
    from iacn_torchrec.cli import main

    spec = tmp_path / "tiny.yaml"
    spec.write_text(
        "name: tiny\n"
        "model: {num_users: 100, num_items: 500, num_cates: 10, orig_dim: 8, user_dim: 8, hist_len: 3}\n"
        "aux_dims: [8, 4]\n"
        "world_sizes: [2]\n"
        "topology: {local_world_size: 2, hbm_gib: 1}\n"
        "plan: {batch_size: 8}\n"
    )
    out = tmp_path / "out"
    assert main(["plan", "--spec", str(spec), "--out", str(out)]) == 0
    data = json.loads((out / "plan.json").read_text())
    assert [(r["variant"], r["aux_dim"]) for r in data["rows"]] == [("baseline", 0), ("iacn", 8), ("iacn", 4)]
    names = [t["name"] for t in data["rows"][1]["result"]["tables"]]
    assert names == ["uid", "item_orig", "cate_orig", "item_aux", "cate_aux"]
    assert data["rows"][2]["delta"]["aux_state_bytes"] == (501 * 4 * 4 + 501 * 4) + (11 * 4 * 4 + 11 * 4)
    md = (out / "plan.md").read_text()
    assert "IaCN aux=4" in md and "item_aux" in md


@pytest.mark.slow
@pytest.mark.parametrize("user_dim", [16, 24])  # 24: uid in a collection of its own, as in training
def test_measured_state_bytes_match_plan_on_cpu_rank(user_dim):
    spec = ModelSpec("m", 1000, 20_000, 50, orig_dim=16, aux_dim=8, user_dim=user_dim, hist_len=4)
    assert {t.name: t.module for t in spec.tables()}["uid"] == ("orig" if user_dim == 16 else "user")
    (r,) = measure_sharded_embeddings(spec, True, 1, PlanOptions(batch_size=32), steps=2, warmup=1)
    assert r["measured_weight_bytes"] + r["measured_optimizer_bytes"] == r["planned_state_bytes"]


def test_training_planner_gets_ids_per_sample_and_keeps_memory_back():
    """The training run's planner sees each feature's ids per sample (a history is up to L ids, IaCN's
    negatives S), and a CPU topology keeps 15 % of each rank's share of memory back (TorchRec's own
    reservation shrinks HBM only)."""
    import torch

    from iacn_torchrec.distributed.sharding import _physical_memory, planner_constraints, topology
    from iacn_torchrec.train.config import TrainConfig

    cfg = TrainConfig().override(["iacn.num_negatives=7"])
    features = {"item_orig": ["item", "hist_item", "neg_hist_item"], "item_aux": ["item", "iacn_neg_item"]}
    c = planner_constraints(cfg, {"item_orig": "sgd", "item_aux": "sgd"}, {"item_orig": 16, "item_aux": 16},
                            2, features, max_len=20)
    assert c["item_orig"].pooling_factors == [1.0, 20.0, 20.0]
    assert c["item_aux"].pooling_factors == [1.0, 7.0]
    # row-wise Adagrad keeps one accumulator per row: the planner is not offered column-wise for it
    c = planner_constraints(cfg, {"item_orig": "rowwise_adagrad", "item_aux": "sgd"})
    assert "column_wise" not in c["item_orig"].sharding_types
    assert "column_wise" in c["item_aux"].sharding_types
    pinned = TrainConfig().override(['distributed.sharding_types={"item_orig": "column_wise"}'])
    assert planner_constraints(pinned, {"item_orig": "rowwise_adagrad"})["item_orig"].sharding_types == [
        "column_wise"]
    topo = topology(2, torch.device("cpu"))
    mem = _physical_memory()
    assert all(d.storage.ddr == int(0.85 * mem) // 2 for d in topo.devices)


def test_column_wise_widths_and_a_table_that_stays_whole(capsys):
    """TorchRec's column-wise shards are of equal width: the narrowest multiple of 4 dividing the dim
    into at most world_size shards; a dim with none stays whole, and a pinned column_wise says so."""
    from iacn_torchrec.distributed.sharding import _cw_shard_width, planner_constraints
    from iacn_torchrec.train.config import TrainConfig

    assert [_cw_shard_width(d, 2) for d in (16, 24, 8, 12, 20)] == [8, 12, 4, 12, 20]
    assert _cw_shard_width(20, 5) == 4 and _cw_shard_width(12, 3) == 4
    pinned = TrainConfig().override(['distributed.sharding_types={"item_orig": "column_wise", '
                                     '"cate_orig": "column_wise"}'])
    capsys.readouterr()
    planner_constraints(pinned, {"item_orig": "sgd", "cate_orig": "sgd"}, {"item_orig": 20, "cate_orig": 16},
                        world_size=2)
    err = capsys.readouterr().err
    assert "item_orig: column_wise on 2 ranks leaves its 20 columns whole" in err and "cate_orig" not in err


def test_training_topology_respects_a_cgroup_memory_limit(tmp_path, monkeypatch):
    import os

    import torch

    from iacn_torchrec.distributed import sharding

    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = tmp_path / "memory.max"
    monkeypatch.setattr(sharding, "_cgroup_memory_files", lambda: [str(tmp_path / "absent"), str(limit)])
    for raw, want in (("max\n", physical), (f"{physical * 4}\n", physical), ("1073741824\n", 2**30)):
        limit.write_text(raw)
        assert sharding._physical_memory() == want
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    topo = sharding.topology(2, torch.device("cpu"))
    assert topo.devices[0].storage.ddr == int(0.85 * 2**30) // 2
    # a job's cgroup below the root (Slurm, systemd: no cgroup namespace): its files and its
    # ancestors', v1 and v2
    cg = tmp_path / "cgroup"
    cg.write_text("12:memory:/slurm/job_5\n3:cpu,cpuacct:/slurm/job_5\n0::/system.slice/x.service\n")
    monkeypatch.undo()
    assert sharding._cgroup_memory_files(str(cg)) == [
        "/sys/fs/cgroup/memory/slurm/job_5/memory.limit_in_bytes",
        "/sys/fs/cgroup/memory/slurm/memory.limit_in_bytes",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
        "/sys/fs/cgroup/system.slice/x.service/memory.max",
        "/sys/fs/cgroup/system.slice/memory.max",
        "/sys/fs/cgroup/memory.max"]


def test_pooled_specs_count_the_history_ids():
    """A pooled (DLRM-style) bag still looks up every id of the history: its pooling factor is the
    history length, as for sequence specs (the planner sized pooled histories as one id)."""
    from iacn_torchrec.distributed.plan_specs import ModelSpec, PlanOptions, TopologySpec
    from iacn_torchrec.distributed.planning import build_constraints

    topo = TopologySpec(world_size=2, local_world_size=2, compute_device="cpu", ddr_gib=4)
    for pooled in (False, True):
        spec = ModelSpec("p", num_users=100, num_items=1000, num_cates=10, hist_len=20, pooled=pooled)
        c = build_constraints(spec, True, topo, PlanOptions(batch_size=32), offload=False)
        assert c["item_orig"].pooling_factors == [1.0, 20.0] and c["cate_aux"].pooling_factors == [1.0, 20.0]


TINY_MODEL = "model: {num_users: 100, num_items: 500, num_cates: 10, orig_dim: 8, user_dim: 8, hist_len: 3}\n"


def _spec(tmp_path, body: str, model: str = TINY_MODEL):
    p = tmp_path / "s.yaml"
    p.write_text(f"name: t\n{model}{body}")
    return p


def test_plan_section_must_be_a_mapping(tmp_path):
    p = _spec(tmp_path, "world_sizes: [2]\nplan: 5\n")
    with pytest.raises(SpecError, match=r"s\.yaml: 'plan' must be a mapping of plan options, got 5"):
        load_scenario(p)


@pytest.mark.parametrize("types,device,bad", [("[grid_shard]", "cuda", "grid_shard"),
                                              ("[row_wise, table_column_wise]", "cuda", "table_column_wise"),
                                              ("[table_row_wise]", "cuda", "table_row_wise"),
                                              ("[data_parallel]", "cpu", "data_parallel")])
def test_sharding_types_the_sequence_collection_cannot_use_are_refused(tmp_path, types, device, bad):
    p = _spec(tmp_path, f"world_sizes: [2]\ntopology: {{compute_device: {device}}}\n"
                        f"plan: {{sharding_types: {types}}}\n")
    with pytest.raises(SpecError, match=rf"s\.yaml: plan options: sharding_types \['{bad}'\] not supported "
                                        rf"by sequence EmbeddingCollection tables on {device}; allowed: "):
        load_scenario(p)
    # the planner API refuses them too (instead of TorchRec's multi-line RuntimeError)
    topo = TopologySpec(world_size=2, local_world_size=2, compute_device=device)
    with pytest.raises(SpecError, match="not supported"):
        plan_tables(SMALL, topo, PlanOptions(batch_size=8, sharding_types=(bad,)), with_iacn=True)


def test_supported_sharding_types_match_torchrec_sharders():
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

    from iacn_torchrec.distributed.plan_specs import SUPPORTED_SHARDING_TYPES

    for device in ("cuda", "cpu"):
        assert set(SUPPORTED_SHARDING_TYPES[(True, device)]) == set(
            EmbeddingBagCollectionSharder().sharding_types(device))
        ec = set(EmbeddingCollectionSharder().sharding_types(device))
        # a sequence collection's data-parallel lookup fails in fbgemm on CPU: not offered there
        ec -= {"data_parallel"} if device == "cpu" else set()
        assert set(SUPPORTED_SHARDING_TYPES[(False, device)]) == ec


def test_booleans_are_not_integers(tmp_path):
    for body, shown in (("world_sizes: [2]\naux_dims: [true]\n", r"'aux_dims' must be a non-empty list of "),
                        ("world_sizes: [2]\naux_dims: []\n", r"'aux_dims' must be a non-empty list of "),
                        ("world_sizes: [2, true]\n", r"'world_sizes' must be a non-empty list of positive"),
                        ("world_sizes: [true]\n", r"'world_sizes' must be a non-empty list of positive")):
        with pytest.raises(SpecError, match=rf"s\.yaml: {shown}"):
            load_scenario(_spec(tmp_path, body))
    for field in ("num_users", "orig_dim", "aux_dim", "hist_len", "iacn_negatives"):
        model = f"model: {{num_users: 100, num_items: 500, num_cates: 10, {field}: true}}\n"
        if field == "num_users":
            model = "model: {num_users: true, num_items: 500, num_cates: 10}\n"
        with pytest.raises(SpecError, match=rf"s\.yaml: model: model field '{field}' has a bad value True"):
            load_scenario(_spec(tmp_path, "world_sizes: [2]\n", model))
    with pytest.raises(SpecError, match="'num_users' must be an integer, got True"):
        ModelSpec("m", num_users=True, num_items=5, num_cates=2)


def test_infinite_sizes_and_a_binary_meta_json_are_spec_errors(tmp_path):
    """inf passes a "> 0" check: capacities, counts and a meta.json's 1e400 must be finite (int(inf)
    raised OverflowError), and a meta.json that is not UTF-8 is named, not a traceback."""
    for topo in ({"hbm_gib": math.inf}, {"ddr_gib": math.inf}):
        with pytest.raises(SpecError, match=r"must be a positive finite number, got inf"):
            TopologySpec(world_size=2, **topo)
    with pytest.raises(SpecError, match=r"s\.yaml: model: model field 'num_users' has a bad value inf"):
        load_scenario(_spec(tmp_path, "world_sizes: [2]\n",
                            "model: {num_users: .inf, num_items: 5, num_cates: 2}\n"))
    d = tmp_path / "meta"
    d.mkdir()
    (d / "meta.json").write_text('{"counts": {"users": 3, "items": 4, "categories": 2}, "max_len": 1e400}')
    with pytest.raises(SpecError, match=r"field 'max_len' must be a positive integer, got inf"):
        ModelSpec.from_meta(d)
    (d / "meta.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(SpecError, match=r"meta\.json: not UTF-8 text"):
        ModelSpec.from_meta(d)


@pytest.mark.parametrize("argv,shown", [
    (["--aux-dim", "0"], r"--aux-dim: IaCN aux dims must be >= 1, got \[0\]"),
    (["--aux-dim", "8", "-4"], r"--aux-dim: .* got \[8, -4\]"),
    (["--orig-dim", "0"], r"--orig-dim: must be a number >= 1"),
    (["--world-size", "2", "0"], r"--world-size: must be >= 1"),
    (["--iacn-negatives", "-1"], r"--iacn-negatives: must be a number >= 0"),
    (["--compute-device", "cpu", "--hbm-gib", "16", "--offload", "always"],
     r"--hbm-gib, --offload: no effect with compute_device cpu"),
])
def test_cli_dims_are_checked_before_planning(tmp_path, monkeypatch, capsys, argv, shown):
    import re

    from iacn_torchrec.cli import main
    from iacn_torchrec.distributed import planning

    def no_planning(*a, **k):
        raise AssertionError("planned before the arguments were checked")

    monkeypatch.setattr(planning, "plan_with_fallback", no_planning)
    monkeypatch.setattr(planning, "compare_iacn", no_planning)
    (tmp_path / "meta.json").write_text(json.dumps({"counts": {"users": 10, "items": 20, "categories": 3},
                                                    "max_len": 5}))
    assert main(["plan", "--meta", str(tmp_path), "--out", str(tmp_path / "o"), *argv]) == 2
    out = capsys.readouterr().err.strip()  # errors go to stderr
    assert len(out.splitlines()) == 1 and re.search(shown, out), out


def test_cpu_does_not_fit_message_says_what_is_reserved():
    spec = ModelSpec("big", 1000, 2_000_000, 100, orig_dim=64, aux_dim=64, user_dim=64, hist_len=2)
    topo = TopologySpec(world_size=2, local_world_size=2, compute_device="cpu", ddr_gib=0.2)
    with pytest.raises(PlanDoesNotFitError) as e:
        plan_tables(spec, topo, PlanOptions(batch_size=8), with_iacn=False)
    head = str(e.value).splitlines()[0]
    assert "nothing reserved: the reservation applies to HBM only" in head and "15%" not in head
    topo = TopologySpec(world_size=2, local_world_size=2, compute_device="cuda", hbm_gib=0.2)
    with pytest.raises(PlanDoesNotFitError, match="after reserving 15% of HBM"):
        plan_tables(spec, topo, PlanOptions(batch_size=8), with_iacn=False)


def test_fractional_iacn_negatives_are_planned(tmp_path):
    # 2.5 negatives per sample on average (S_neg = 5, half the samples positive): the aux tables' id
    # and output I/O is sized from the fractional pooling factor
    p = _spec(tmp_path, "world_sizes: [2]\n",
              "model: {num_users: 1000, num_items: 5000, num_cates: 50, orig_dim: 16, aux_dim: 8, "
              "user_dim: 16, hist_len: 4, iacn_negatives: 2.5}\n")
    spec = load_scenario(p).model
    assert spec.iacn_negatives == 2.5
    aux = [t for t in spec.tables(True) if t.module == "aux"]
    assert all(t.pooling_factors == (1.0, 4.0, 2.5) for t in aux)
    W, B = 2, 16
    topo = TopologySpec(world_size=W, local_world_size=W, compute_device="cpu", ddr_gib=4)
    delta = compare_iacn(spec, topo, PlanOptions(batch_size=B, optimizer="sgd",
                                                 sharding_types=("table_wise",)))["delta"]
    state = sum(t.num_embeddings * t.embedding_dim * 4 for t in aux)
    io = sum(math.ceil(7.5 * B * W * 8) + math.ceil(7.5 * B * W * t.embedding_dim * 4) for t in aux)
    assert delta["total_ddr"] == state + io
    from iacn_torchrec.cli import main

    meta = tmp_path / "m"
    meta.mkdir()
    (meta / "meta.json").write_text(json.dumps({"counts": {"users": 10, "items": 20, "categories": 3},
                                                "max_len": 5}))
    out = tmp_path / "o"
    assert main(["plan", "--meta", str(meta), "--iacn-negatives", "2.5", "--compute-device", "cpu",
                 "--out", str(out)]) == 0
    assert json.loads((out / "plan.json").read_text())["model"]["iacn_negatives"] == 2.5


def test_a_broken_yaml_spec_is_one_line(tmp_path, capsys):
    """YAML's parser reports the error over several lines; `iacn plan` prints one."""
    from iacn_torchrec.cli import main

    spec = tmp_path / "broken.yaml"
    spec.write_text("name: x\nmodel: {num_items: 10\n  emb_dim: [\n")
    assert main(["plan", "--spec", str(spec), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "broken.yaml: not valid YAML: " in err and "line" in err, err


def test_a_spec_that_is_not_utf8_text_is_a_spec_error(tmp_path):
    p = tmp_path / "bin.yaml"
    p.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(SpecError, match=r"^.*bin\.yaml: not UTF-8 text \(byte 0xff at offset 0\)$"):
        load_scenario(p)


def test_an_out_path_that_is_a_file_is_refused_before_planning(tmp_path, monkeypatch, capsys):
    from iacn_torchrec.cli import main
    from iacn_torchrec.distributed import planning

    def no_planning(*a, **k):
        raise AssertionError("planned before the output path was checked")

    monkeypatch.setattr(planning, "plan_with_fallback", no_planning)
    monkeypatch.setattr(planning, "compare_iacn", no_planning)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"counts": {"users": 10, "items": 20, "categories": 3},
                                                    "max_len": 5}))
    (tmp_path / "outfile").write_text("keep me")
    for out, shown in (("outfile", "--out outfile: exists and is not a directory"),
                       ("outfile/sub", "--out outfile/sub: outfile is not a directory")):
        assert main(["plan", "--meta", str(tmp_path), "--out", out]) == 2
        assert capsys.readouterr().err == f"iacn plan: {shown}\n"
    assert (tmp_path / "outfile").read_text() == "keep me"
