"""TorchX components for iacn-torchrec.

``train`` launches ``python -m iacn_torchrec.cli train <args>`` on every worker through
``torch.distributed.run`` (TorchX's ``dist.ddp``); each worker reads ``RANK`` / ``WORLD_SIZE`` /
``LOCAL_RANK`` from the environment, joins the process group (gloo on CPU, nccl on GPUs) and
TorchRec shards the tables across all workers. The same component runs anywhere TorchX has a
scheduler; only ``-s`` and the resources change::

    # 2 CPU processes on this machine (gloo)
    torchx run -s local_cwd apps/components.py:train --nproc_per_node 2 -- \\
        --data prepared/beauty --model din --iacn --embedding-optimizer rowwise_adagrad \\
        --emb-dim 16 --aux-dim 16 --set model.user_dim=16 --out runs/din-iacn-2r

    # 8 GPUs on one host (nccl), or 4 hosts x 8 GPUs on Kubernetes / Slurm
    torchx run -s local_cwd apps/components.py:train --nproc_per_node 8 --gpu 8 -- ...
    torchx run -s kubernetes -cfg queue=default apps/components.py:train \\
        --nnodes 4 --nproc_per_node 8 --gpu 8 --image <registry>/iacn-torchrec:latest -- ...
    torchx run -s slurm apps/components.py:train --nnodes 4 --nproc_per_node 8 --gpu 8 -- ...

(docs/distributed.md has the details: shared ``--out`` storage for checkpoints, resume, rendezvous.)
"""

# TorchX reads the component's signature with its own AST-based linter, which knows only the
# typing-module spellings (Optional, Dict, List), not ``X | None``: keep them here.
from typing import Dict, List, Optional  # noqa: UP035

import torchx.specs as specs
from torchx.components import dist


def train(
    *script_args: str,
    nproc_per_node: int = 1,
    nnodes: int = 1,
    image: str = "",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,  # noqa: UP045
    env: Optional[Dict[str, str]] = None,  # noqa: UP006, UP045
    max_retries: int = 0,
    rdzv_port: int = 29500,
    name: str = "iacn-train",
    mounts: Optional[List[str]] = None,  # noqa: UP006, UP045
) -> specs.AppDef:
    """Train a CTR model (with or without IaCN) on nnodes x nproc_per_node workers.

    Args:
        script_args: arguments of ``iacn train`` (``--data DIR --model din --iacn --out RUN ...``);
            ``--out`` must be storage every node sees (checkpoints are written by all ranks)
        nproc_per_node: workers per node (CPU processes, or GPUs: at most the node's GPU count)
        nnodes: number of nodes
        image: container image with this package installed, required by kubernetes/docker and
            slurm-with-containers; ignored by local_cwd (which runs in the current directory's
            environment). The default, TorchX's own image, does not hold iacn_torchrec.
        cpu: CPUs per node (for all its workers together: e.g. 8 workers x OMP_NUM_THREADS=2 need 16)
        gpu: GPUs per node (0: CPU training with gloo, GPUs hidden from the workers even on a GPU
            host; > 0: nccl, one GPU per worker, so nproc_per_node <= gpu)
        memMB: memory per node in MB (for all its workers together)
        h: a registered named resource (takes precedence over cpu, gpu, memMB)
        env: extra environment variables for the workers (e.g. OMP_NUM_THREADS=2)
        max_retries: scheduler-level retries of the whole job; a retry resumes from the newest
            complete checkpoint under --out (so do not pass ``--no-resume`` with retries: each retry
            would start over)
        rdzv_port: the c10d rendezvous port on the first node (multi-node only)
        name: job name
        mounts: mounts for container schedulers (type=bind,src=/data,dst=/data)
    """
    if gpu < 0 or nproc_per_node < 1 or nnodes < 1:
        raise ValueError(f"train: gpu={gpu}, nproc_per_node={nproc_per_node}, nnodes={nnodes}: "
                         "need gpu >= 0 and at least one node and worker")
    gpus = specs.named_resources[h].gpu if h else gpu  # a named resource decides, as TorchX does
    if gpus and nproc_per_node > gpus:
        raise ValueError(f"train: nproc_per_node={nproc_per_node} workers but {gpus} GPUs per node: "
                         "each worker trains on its own GPU")
    worker_env = {"OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}
    if gpus == 0:  # CPU training asked for: the backend follows torch.cuda.is_available()
        worker_env["CUDA_VISIBLE_DEVICES"] = ""
    worker_env.update(env or {})
    return dist.ddp(
        "train",
        *script_args,
        m="iacn_torchrec.cli",
        image=image or "ghcr.io/pytorch/torchx:latest",
        name=name,
        h=h,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=f"{nnodes}x{nproc_per_node}",
        env=worker_env,
        max_retries=max_retries,
        rdzv_port=rdzv_port,
        mounts=mounts,
    )
