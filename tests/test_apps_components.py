"""The TorchX component builds the job it documents (no scheduler involved)."""

from __future__ import annotations

import pytest
from helpers import load_app

components = load_app("components")


def test_train_component_passes_args_resources_and_cpu_choice():
    app = components.train("--data", "d dir", "--model", "din", nproc_per_node=2, cpu=4, memMB=1000)
    role = app.roles[0]
    assert role.num_replicas == 1 and role.resource.cpu == 4 and role.resource.memMB == 1000
    cmd = " ".join([role.entrypoint, *role.args])
    assert "--nproc_per_node 2" in cmd and "-m iacn_torchrec.cli train" in cmd
    assert "'d dir'" in cmd  # quoted for the shell, intact
    assert role.env["CUDA_VISIBLE_DEVICES"] == ""  # gpu=0 means CPU (gloo) even on a GPU host
    gpu = components.train("--data", "d", nproc_per_node=2, gpu=2).roles[0]
    assert "CUDA_VISIBLE_DEVICES" not in gpu.env and gpu.resource.gpu == 2
    with pytest.raises(ValueError, match="nproc_per_node=4 workers but 2 GPUs per node"):
        components.train("--data", "d", nproc_per_node=4, gpu=2)
    # a named resource decides the GPUs, as TorchX does (gpu's default 0 must not hide them)
    named = components.train("--data", "d", nproc_per_node=4, h="aws_p3.8xlarge").roles[0]
    assert named.resource.gpu == 4 and "CUDA_VISIBLE_DEVICES" not in named.env
    with pytest.raises(ValueError, match="need gpu >= 0"):
        components.train("--data", "d", nproc_per_node=0)
