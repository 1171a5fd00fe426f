"""Time of one SGHMC chain-step on ethanol with SevenNet-0 (batch of 5 structures).

Setting: 6 CCSD(T) ethanol frames in the data set, a 7th added by ``Ensemble.update``,
so every minibatch is a priority draw of 5 structures collated into one graph. One
cycle of K steps per chain; the first cycle (graph building, allocator warm-up) is not
timed. Reported: seconds per chain-step with 1 and 2 torch threads (one chain,
in-process) and the throughput of 2 chains in 2 worker processes (1 thread each).

    .venv/bin/python benchmarks/chain_step.py [--steps 40]
"""

from __future__ import annotations

import argparse
import time

import torch

from common import ETHANOL_CCSD_T, write_results
from flytune.bayes.ensemble import Ensemble
from flytune.config import ModelConfig
from flytune.data import read_labelled


def timed_update(ensemble: Ensemble, frame) -> float:
    start = time.perf_counter()
    ensemble.update([frame])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40, help="SGHMC steps per timed cycle")
    args = parser.parse_args()
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
    print("wrote", write_results("chain_step", results))


if __name__ == "__main__":
    main()
