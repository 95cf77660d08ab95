#!/usr/bin/env bash
# Creates .peer-venv with the peer library DeepCTR-Torch for `iacn bench train`
# (as the header of ../shared/bench/peer_deepctr.py says). Idempotent: an existing working
# .peer-venv is kept. Usage: bash apps/peer_setup.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.peer-venv}"
PY="${PYTHON:-python3}"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ('deepctr_torch', 'sklearn', 'requests')))" 2>/dev/null; then
  echo "$VENV: ready"
  exit 0
fi
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install --quiet torch==2.13.0 deepctr-torch==0.3.0 scikit-learn requests
"$VENV/bin/python" -c "import sklearn, requests, torch; print('ready: torch', torch.__version__)"
