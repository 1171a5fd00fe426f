"""Time of one SGHMC chain-step on ethanol with SevenNet-0 (batch of 5 structures).

Setting: 6 CCSD(T) ethanol frames in the data set, a 7th added by ``Ensemble.update``,
so every minibatch is a priority draw of 5 structures collated into one graph. One
cycle of K steps per chain; the first cycle (graph building, allocator warm-up) is not
timed. Reported: seconds per chain-step with 1 and 2 torch threads (one chain,
in-process) and the throughput of 2 chains in 2 worker processes (1 thread each).

``--malloc-pairs N`` measures instead whether glibc's allocator settings speed up the
workers: the fast-setting shape (4 chains in 2 workers, 3 timed updates each) with the
stock allocator and with ``MALLOC_MMAP_THRESHOLD_`` = 1 GiB, ``MALLOC_TRIM_THRESHOLD_`` =
2 GiB (large blocks stay on the heap instead of fresh mmap pages that fault on first
touch), alternating N times; stored under ``malloc_probe``.

    .venv/bin/python benchmarks/chain_step.py [--steps 40] [--malloc-pairs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from unittest import mock

import numpy as np
import torch
from common import ETHANOL_CCSD_T, RESULTS, machine, update_results, write_results

from flytune.bayes.ensemble import Ensemble
from flytune.config import ModelConfig
from flytune.data import read_labelled


def timed_update(ensemble: Ensemble, frame) -> float:
    start = time.perf_counter()
    ensemble.update([frame])
    return time.perf_counter() - start


#: glibc malloc tunables read from the environment at process start (inherited by spawned workers)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 31)}


def workers_rate(frames, steps: int, allocator_env: dict[str, str]) -> list[float]:
    """Chain-steps/s of 3 updates of 4 chains in 2 fresh workers started under ``allocator_env``
    (the probe's variables are unset otherwise; the environment is restored afterwards)."""
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV} | allocator_env
    config = ModelConfig(chains=4, cycle_steps=steps, workers=2, threads_per_worker=1)
    with mock.patch.dict(os.environ, env, clear=True), Ensemble.from_config(config, seed=0) as ens:
        ens.add_data(frames[:6])
        timed_update(ens, frames[6])  # starts the workers
        return [4 * steps / timed_update(ens, frame) for frame in frames[7:10]]


def malloc_probe(frames, steps: int, pairs: int) -> None:
    rows = []
    for _ in range(pairs):
        for name, env in (("stock", {}), ("heap", MALLOC_ENV)):
            rates = workers_rate(frames, steps, env)
            rows.append({"allocator": name, "chain_steps_per_s": rates})
            print(name, " ".join(f"{r:.2f}" for r in rates), "chain-steps/s")
    mean = {name: float(np.mean([r["chain_steps_per_s"] for r in rows if r["allocator"] == name]))
            for name in ("stock", "heap")}
    print("heap / stock:", f"{mean['heap'] / mean['stock']:.3f}")
    entry = {"date": machine()["date"], "env": MALLOC_ENV, "steps_per_cycle": steps, "runs": rows,
             "mean_chain_steps_per_s": mean, "heap_over_stock": mean["heap"] / mean["stock"]}
    print("wrote", update_results("chain_step", "malloc_probe", entry))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40, help="SGHMC steps per timed cycle")
    parser.add_argument("--malloc-pairs", type=int, default=0, help="only the allocator probe, N alternations")
    args = parser.parse_args()
    if args.malloc_pairs:
        malloc_probe(read_labelled(ETHANOL_CCSD_T, "0:10"), args.steps, args.malloc_pairs)
        return
    frames = read_labelled(ETHANOL_CCSD_T, "0:9")
    results: dict = {"setting": "SevenNet-0, CCSD(T) ethanol, batch of 5 (one batched graph), priority minibatches",
                     "steps_per_cycle": args.steps}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        config = ModelConfig(chains=2, cycle_steps=args.steps, workers=1, threads_per_worker=threads)
        with Ensemble.from_config(config, seed=0) as ens:
            ens.add_data(frames[:6])
            timed_update(ens, frames[6])  # warm-up
            wall = timed_update(ens, frames[7])
        results[f"s_per_chain_step_{threads}_threads"] = wall / (2 * args.steps)
        print(f"{threads} thread(s): {wall / (2 * args.steps):.3f} s per chain-step")
    config = ModelConfig(chains=2, cycle_steps=args.steps, workers=2, threads_per_worker=1)
    with Ensemble.from_config(config, seed=0) as ens:
        ens.add_data(frames[:6])
        timed_update(ens, frames[6])  # starts the workers
        wall = timed_update(ens, frames[7])
    results["chain_steps_per_s_2_workers"] = 2 * args.steps / wall
    results["s_per_chain_step_2_workers"] = wall / (2 * args.steps)
    print(f"2 workers x 1 thread: {2 * args.steps / wall:.2f} chain-steps/s")
    stored = RESULTS / "chain_step.json"
    if stored.exists() and "malloc_probe" in (probe := json.loads(stored.read_text())):
        results["malloc_probe"] = probe["malloc_probe"]  # a separate measurement (--malloc-pairs): kept
    print("wrote", write_results("chain_step", results))


if __name__ == "__main__":
    main()
