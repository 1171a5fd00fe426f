#!/usr/bin/env bash
# Issue 4's GPU figures (speed.py's gpu section) on a lent device machine.
#
# That machine (nvidia-h200) has Python 3.12 with a CUDA build of torch, but not ase,
# sevenn or pydantic, and no ../shared/data; so they travel in the ignored folder .gpu/:
#
#   benchmarks/gpu.sh prepare      # here: Python 3.12 wheels (the .venv's versions) and the
#                                  # CCSD(T) ethanol frames into .gpu/ (~50 MB)
#   device run: command "benchmarks/gpu.sh run", carry [".gpu"], timeout_s 540
#                                  # ~6-8 min with the machine's start; the paper update
#                                  # runs only if foreseen under --gpu-budget-s (300 s)
#   cp <files_at>/speed_gpu.json benchmarks/results/
#   .venv/bin/python benchmarks/speed.py --only gpu --force  # copies it into speed.json under "gpu"
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
prepare)
    mkdir -p .gpu/whl .gpu/data/ethanol_ccsd_t_sgdml
    pins=$(.venv/bin/python -c 'from importlib.metadata import version as v
print(" ".join(f"{n}=={v(n)}" for n in ("ase", "sevenn", "e3nn", "pydantic", "pydantic-core",
      "annotated-types", "typing-inspection", "braceexpand", "matscipy")))')
    # shellcheck disable=SC2086
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .gpu/whl $pins
    cp "${FLYTUNE_DATA:-../shared/data}/ethanol_ccsd_t_sgdml/ethanol_ccsd_t-train.npz" .gpu/data/ethanol_ccsd_t_sgdml/
    du -sh .gpu
    ;;
run)
    : "${OUT:?run this on the device machine, where OUT is set}"
    python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .gpu/whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD" FLYTUNE_DATA="$PWD/.gpu/data" PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/log.txt"
    python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())' | tee -a "$OUT/log.txt"
    # what was measured comes back even if a later part fails or runs out of time
    timeout 480 python3 benchmarks/speed.py --only gpu --force 2>&1 | tee -a "$OUT/log.txt" || true
    cp benchmarks/results/speed_gpu.json "$OUT/" 2>/dev/null || echo "no speed_gpu.json: nothing was measured"
    ;;
*)
    echo "usage: benchmarks/gpu.sh prepare | run" >&2
    exit 2
    ;;
esac
