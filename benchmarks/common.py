"""Helpers shared by the benchmark scripts: data location, machine description, JSON output."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DATA = Path(os.environ.get("FLYTUNE_DATA", ROOT.parent / "shared" / "data"))
ETHANOL_CCSD_T = DATA / "ethanol_ccsd_t_sgdml" / "ethanol_ccsd_t-train.npz"


def machine() -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "date": _dt.date.today().isoformat(),
    }


def write_results(name: str, results: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **results}, indent=2))
    return path
