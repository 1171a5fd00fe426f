"""Why the adaptive cycle end rarely fires in a real on-the-fly run: the series it tests.

Loads the fine-tuned ensemble of an on-the-fly run (``runs/<run>/run/model.pt``, all
its labels) and runs one more update cycle, with the run's own settings, on a few of its
chains, without stopping. It records the two series that the early-stop rule
(:mod:`flytune.bayes.early_stop`) watches in the full-noise phase, ℓ_new (the newest
label's log-likelihood, at the steps whose minibatch holds it) and L̂ (the minibatch
estimate of the mean log-likelihood), and at every test point (each W values of L̂) the
drift d of both series next to the standard error that independent values would give,
sqrt((s_A² + s_B²)/W).

    .venv/bin/python benchmarks/early_stop_series.py otf_ethanol_pbe [--chains 0,1]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import numpy as np
import torch
from common import ROOT, update_results

from flytune.bayes.chain import ChainJob
from flytune.bayes.early_stop import EarlyStop, drift


@dataclass(frozen=True)
class Recorder(EarlyStop):
    """The run's early-stop rule, called at the same test points, that records each test
    (the series as they stood) and never stops the chain."""

    calls: list = field(default_factory=list)

    def settled(self, newest_ll, mean_ll) -> bool:
        self.calls.append((list(newest_ll), list(mean_ll), super().settled(newest_ll, mean_ll)))
        return False


def standard_error(values: list[float], window: int) -> float:
    """sqrt((s_A² + s_B²)/W): the SE of ȳ_B − ȳ_A if the values were independent."""
    if len(values) < 2 * window:
        return float("nan")
    a, b = np.asarray(values[-2 * window : -window]), np.asarray(values[-window:])
    return float(np.sqrt((a.var(ddof=1) + b.var(ddof=1)) / window))


def window_means(values: list[float], width: int = 8) -> list[float]:
    return [float(np.mean(values[i : i + width])) for i in range(0, len(values), width)]


def main() -> None:
    from flytune.bayes.ensemble import Ensemble

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run")
    parser.add_argument("--chains", default="0,1")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ensemble = Ensemble.load(ROOT / "benchmarks" / "runs" / args.run / "run" / "model.pt", workers=1)
    config = ensemble.config
    window = config.early_stop_window
    schedule = ensemble.update_schedule()
    first_full_noise = int(np.argmax(schedule.temperature >= 1.0)) + 1  # 1-based step
    chains = []
    for index in map(int, args.chains.split(",")):
        recorder = Recorder(window=window, tolerance_nats=config.early_stop_tolerance_nats)
        ensemble.run([ChainJob(ensemble.chains[index], schedule, new_labels=1, replace_samples=True,
                               early_stop=recorder)])
        newest, mean = recorder.calls[-1][0], recorder.calls[-1][1]
        chain_tests = [{
            "step": first_full_noise + len(m) - 1, "newest_values": len(n),
            "drift_newest": drift(n, window), "se_newest": standard_error(n, window),
            "drift_mean": drift(m, window), "se_mean": standard_error(m, window), "settled": settled,
        } for n, m, settled in recorder.calls]
        chains.append({"chain": index, "newest_ll_means_of_8": window_means(newest),
                       "mean_ll_means_of_8": window_means(mean), "tests": chain_tests})
        for t in chain_tests:
            print(f"chain {index} step {t['step']}: d_new {t['drift_newest']:.2f} (SE {t['se_newest']:.2f}), "
                  f"d_mean {t['drift_mean']:.2f} (SE {t['se_mean']:.2f}), settled {t['settled']}")
        print("  l_new by 8:", " ".join(f"{v:.0f}" for v in chains[-1]["newest_ll_means_of_8"]))
    entry = {"labels": len(ensemble.data), "cycle_steps": config.cycle_steps, "window": window,
             "tolerance_nats": config.early_stop_tolerance_nats,
             "first_full_noise_step": first_full_noise, "chains": chains}
    print("wrote", update_results("early_stop_series", args.run, entry))


if __name__ == "__main__":
    main()
