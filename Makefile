# iacn-torchrec: every command a user or CI needs. `make demo` / `make test` set up .venv first.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
# the stamp is older than pyproject.toml or this Makefile (its pins) when either changed: reinstall
STAMP := $(VENV)/.installed-v2
export PATH := $(abspath $(VENV))/bin:$(PATH)
export OMP_NUM_THREADS ?= 2

.PHONY: install demo test test-fast lint bench plan-bench dist-bench reproduce clean

install: $(STAMP)

# The pinned CPU stack (README, "Quick start"). torchrec's metadata requires the CUDA fbgemm-gpu, so it and
# our own package go in with --no-deps after their real dependencies.
$(STAMP): pyproject.toml Makefile
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q fbgemm-gpu-cpu==1.8.0
	$(VPY) -m pip install -q --no-deps torchrec==1.8.0
	# torch named again: pip must not move it to satisfy a newer package (tensordict requires torch)
	$(VPY) -m pip install -q torch==2.13.0 tensordict==0.15.3 torchmetrics==1.0.3 tqdm pyre-extensions iopath \
		torchx==0.7.0 numpy==2.4.6 pyyaml matplotlib pytest pytest-timeout ruff==0.17.6 ninja
	$(VPY) -m pip install -q --no-deps -e .
	# builds the C++ kernels now (~30 s each, cached in ~/.cache/torch_extensions), not at the first step
	$(VPY) -c "from iacn_torchrec.kernels import KERNELS, load_kernel; [print(f'fused {k} kernel:', 'built' if load_kernel(k) else 'NOT built (its ATen ops will run)') for k in KERNELS]"
	$(VPY) -c "import torch, torchrec, fbgemm_gpu, torchx, torchmetrics, iopath; print('stack ok: torch', torch.__version__, 'torchrec', torchrec.__version__)"
	touch $(STAMP)

demo: install
	$(VPY) -m iacn_torchrec.cli demo

# The whole suite, the multi-process TorchX kill/resume test included (about 3 minutes on 2 idle cores)
test: install
	$(VPY) -m pytest -q tests

# Skips the tests marked slow (spawned TorchX jobs, planner measurements on real ranks)
test-fast: install
	$(VPY) -m pytest -q -m "not slow" tests

lint: install
	$(VENV)/bin/ruff check iacn_torchrec apps tests

clean:
	rm -rf $(VENV) .pytest_cache

# Sharding-planner benchmarks: IaCN's aux tables at public and industrial scale (docs/results/planner.md)
plan-bench: install
	$(VPY) apps/plan_bench.py

prepared/amazon-beauty-din-L20-s0: | install
	$(VENV)/bin/iacn prepare --source tsv --interactions data/amazon-beauty/interactions.tsv.gz \
		--items data/amazon-beauty/items.tsv.gz --protocol din --max-len 20 --seed 0 --out $@ --no-progress

# Training throughput vs DeepCTR-Torch (its own venv), IaCN overhead, scaling (docs/results/performance.md)
bench: install prepared/amazon-beauty-din-L20-s0
	bash apps/peer_setup.sh
	$(VENV)/bin/iacn bench train --json --out docs/results/performance

# 1 process vs 2 gloo processes (table/column/row-wise) on Beauty with DIN+IaCN
dist-bench: install prepared/amazon-beauty-din-L20-s0
	$(VPY) apps/dist_bench.py --data prepared/amazon-beauty-din-L20-s0 --repeats 3

# The paper's experiments on the embedded Beauty data (5 seeds by default: hours on 2 cores)
reproduce: install prepared/amazon-beauty-din-L20-s0
	$(VENV)/bin/iacn reproduce
