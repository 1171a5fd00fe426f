#!/usr/bin/env bash
# Create .venv and install flytune with everything it needs (CPU PyTorch 2.13.0).
# torch and e3nn are pinned in the same pip command as the rest, so nothing replaces
# them; mace-torch goes in with --no-deps because its e3nn==0.4.4 pin breaks sevenn
# (its other run-time dependencies are listed in pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0" "e3nn==0.6.0" -e ".[test]"
.venv/bin/python -m pip install --quiet --no-deps "mace-torch==0.3.16"
.venv/bin/python -c "import torch, e3nn, sevenn, mace, chgnet; assert torch.__version__.startswith('2.13.0'), torch.__version__"
