"""What a reference call costs through Parsl against in-process (issue 26): one walker,
calls one after another, as the on-the-fly loop makes them.

Two references: EMT on Cu4 (microseconds of compute, so the wall time is the path's own
cost) and PySCF B3LYP/6-31G* (DF) on ethanol (the demo's reference, seconds per call).
Each is called ``--calls`` times on slightly displaced structures, in this process
(``backend = "local"``) and through a local HighThroughputExecutor with one worker
(``parsl = "htex_local"``); the Parsl figures exclude its start-up, which is reported
apart. Results in ``results/parsl_overhead.json``.

    .venv/bin/python benchmarks/parsl_overhead.py [--calls 40] [--pyscf-calls 6]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
from ase.build import bulk, molecule
from common import write_results

from flytune.config import ExecutionConfig, ReferenceConfig
from flytune.otf.execution import ParslReference
from flytune.otf.reference import make_reference

CASES = {
    "emt_cu4": (ReferenceConfig(name="ase.calculators.emt:EMT"), lambda: bulk("Cu", "fcc", a=3.6, cubic=True)),
    "pyscf_ethanol": (ReferenceConfig(name="pyscf", options={"xc": "b3lyp", "basis": "6-31g*", "density_fit": True}),
                      lambda: molecule("CH3CH2OH")),
}


def structures(make, n: int):
    out = []
    for i in range(n):
        atoms = make()
        atoms.rattle(0.02, seed=i)
        out.append(atoms)
    return out


def timed(reference, frames) -> list[float]:
    """Wall time of each call, as the run records it (``ReferenceResult.wall_s``)."""
    return [reference.compute(atoms).wall_s for atoms in frames]


def stats(times: list[float]) -> dict:
    t = np.asarray(times[1:])  # the first call of each path warms it up (imports, SCF guess)
    return {"calls": len(t), "median_s": float(np.median(t)), "mean_s": float(np.mean(t)), "max_s": float(np.max(t))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=40, help="EMT calls per path")
    parser.add_argument("--pyscf-calls", type=int, default=6, help="PySCF calls per path")
    args = parser.parse_args()
    results = {}
    for name, (config, make) in CASES.items():
        frames = structures(make, args.calls if name == "emt_cu4" else args.pyscf_calls)
        local = stats(timed(make_reference(config.name, config.options, config.retries), frames))
        with tempfile.TemporaryDirectory() as run_dir:
            reference = ParslReference(config, ExecutionConfig(backend="parsl", parsl="htex_local", max_workers=1),
                                       run_dir)
            start = time.perf_counter()
            reference.start()
            startup = time.perf_counter() - start
            try:
                parsl = stats(timed(reference, frames))
            finally:
                reference.close()
        results[name] = {"local": local, "parsl_htex_local": parsl, "parsl_start_s": startup,
                         "overhead_per_call_s": parsl["median_s"] - local["median_s"]}
        print(name, results[name], flush=True)
    print("wrote", write_results("parsl_overhead", {"cases": results}))


if __name__ == "__main__":
    main()
