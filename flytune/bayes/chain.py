"""One Markov chain of the ensemble: its state, and one run through a schedule.

A :class:`Chain` is the whole state of one member's sampler: the SGHMC state, its own
random generators (minibatch draws, SGHMC noise) and the samples it has produced.
:func:`run_chain` advances one chain through a :class:`Schedule` on the log posterior of
:mod:`flytune.bayes.posterior`; it depends only on its inputs, so the runners of
:mod:`flytune.bayes.runners` can run chains in this process or in worker processes with
identical results for the same seeds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from flytune.bayes import sghmc
from flytune.bayes.dataset import TrainingSet
from flytune.bayes.early_stop import EarlyStop
from flytune.bayes.minibatch import draw_minibatch
from flytune.bayes.model import ProbabilisticModel
from flytune.bayes.posterior import log_posterior
from flytune.bayes.prior import GaussianPrior
from flytune.bayes.schedules import Schedule
from flytune.bayes.tree import tree_to

Params = dict[str, torch.Tensor]
#: progress callback: (chain index, steps done in this run, mean log-likelihood per
#: structure of the last minibatch)
Progress = Callable[[int, int, float], None]
#: on an accelerator, progress is reported (and the device waited for) every this many
#: steps and at the end; on the CPU every step, where reading a value costs nothing
DEVICE_LOG_EVERY = 25


class StopFlag(Protocol):
    def is_set(self) -> bool: ...


@dataclass
class Chain:
    """One Markov chain: sampler state, its generators' states, and its samples.

    ``rng_state`` is the CPU generator that draws the minibatches (and, for a chain on
    the CPU, the SGHMC noise); ``noise_rng_state`` is the generator on the chain's
    accelerator that draws the noise there (``None`` until the chain first runs on one).
    Generator states always stay on the CPU, wherever the parameters are.
    """

    index: int
    state: sghmc.SGHMCState
    rng_state: torch.Tensor
    samples: list[Params] = field(default_factory=list)
    #: True when the last run was stopped before its schedule ended
    interrupted: bool = False
    noise_rng_state: torch.Tensor | None = None
    #: wall seconds of the last run, measured where the chain ran (a worker's compute,
    #: without the transfers to and from it)
    run_s: float = 0.0

    @classmethod
    def start(cls, index: int, params: Params, seed: int) -> Chain:
        """Chain ``index`` at ``params``; its generator is seeded from (seed, index)."""
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        return cls(index=index, state=sghmc.init_state(params), rng_state=generator.get_state())

    def state_dict(self) -> dict:
        state = {
            "index": self.index,
            "state": self.state.state_dict(),
            "rng_state": self.rng_state,
            "samples": self.samples,
            "interrupted": self.interrupted,
            "run_s": self.run_s,
        }
        if self.noise_rng_state is not None:
            state["noise_rng_state"] = self.noise_rng_state
        return state

    def to(self, device: torch.device | str) -> Chain:
        """The chain with its parameters, sampler statistics and samples on ``device``."""
        state = self.state_dict()
        moved = tree_to({k: state[k] for k in ("state", "samples")}, device)
        return Chain.from_state_dict({**state, **moved})

    @classmethod
    def from_state_dict(cls, state: dict) -> Chain:
        noise = state.get("noise_rng_state")
        return cls(
            index=int(state["index"]),
            state=sghmc.SGHMCState.from_state_dict(dict(state["state"])),
            rng_state=state["rng_state"].cpu(),
            samples=[dict(s) for s in state["samples"]],
            interrupted=bool(state["interrupted"]),
            noise_rng_state=None if noise is None else noise.cpu(),
            run_s=float(state.get("run_s", 0.0)),
        )


@dataclass(frozen=True)
class SamplerSettings:
    """Constants of SGHMC and of the minibatch estimator."""

    batch_size: int = 5
    friction: float = 0.1
    beta: float = 0.999
    mass_eps: float = 1e-4


@dataclass(frozen=True)
class ChainJob:
    """Advance ``chain`` through ``schedule``.

    ``new_labels``: how many of the newest structures the update learns, favoured by
    the priority minibatches (on-the-fly: the labels since the last update), or 0 for
    uniform draws (offline). ``replace_samples``: the new samples replace the chain's old ones
    (on-the-fly update) instead of being appended (offline cycles). ``early_stop``: end
    the cycle once the chain has settled (:mod:`flytune.bayes.early_stop`); for
    schedules whose only sample is at the end.
    """

    chain: Chain
    schedule: Schedule
    new_labels: int = 1
    replace_samples: bool = True
    early_stop: EarlyStop | None = None


def _generators(chain: Chain, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """(minibatch generator on the CPU, noise generator on ``device``): one and the same
    on the CPU; on an accelerator the noise generator is seeded from the CPU one the
    first time, and continues from its saved state after that."""
    draws = torch.Generator()
    draws.set_state(chain.rng_state)
    if device.type == "cpu":
        return draws, draws
    noise = torch.Generator(device=device)
    if chain.noise_rng_state is None:
        noise.manual_seed(int(torch.randint(2**62, (1,), generator=draws)))
    else:
        noise.set_state(chain.noise_rng_state)
    return draws, noise


def run_chain(
    model: ProbabilisticModel,
    prior: GaussianPrior,
    data: TrainingSet,
    job: ChainJob,
    settings: SamplerSettings,
    progress: Progress | None = None,
    stop: StopFlag | None = None,
) -> Chain:
    """Run ``job.schedule`` on ``job.chain``; returns the advanced chain (inputs untouched).

    Nothing in a step waits for an accelerator except progress reports (every
    :data:`DEVICE_LOG_EVERY` steps there) and the early-stop test (once per window).
    """
    started = time.perf_counter()
    chain, schedule = job.chain, job.schedule
    num_data = len(data)
    if num_data == 0:
        raise ValueError("cannot sample without data: add labelled structures first")
    device = next(iter(chain.state.params.values())).device
    draws, noise = _generators(chain, device)
    log_every = 1 if device.type == "cpu" else DEVICE_LOG_EVERY
    sampler = sghmc.build(
        log_posterior(model, prior, num_data),
        friction=settings.friction,
        beta=settings.beta,
        mass_eps=settings.mass_eps,
        has_aux=True,
    )
    state = chain.state
    samples = [] if job.replace_samples else list(chain.samples)
    resets, sample_steps = set(schedule.reset_before), set(schedule.sample_after)
    interrupted = False
    # ℓ_new (of the new structures) and L̂ in the full-noise phase, for early_stop: kept on the device, read per window
    newest_ll: list[torch.Tensor] = []
    mean_ll: list[torch.Tensor] = []
    for k in range(len(schedule)):
        if stop is not None and stop.is_set():
            interrupted = True
            break
        if k in resets:
            state = sampler.init(state.params)
        indices, weights = draw_minibatch(num_data, settings.batch_size, draws, job.new_labels)
        graphs, labels = data.batch(indices)
        state = sampler.update(
            state,
            (graphs, labels, weights),
            lr=float(schedule.step_size[k]),
            temperature=float(schedule.temperature[k]),
            num_data=num_data,
            generator=noise,
        )
        if progress is not None and ((k + 1) % log_every == 0 or k + 1 == len(schedule)):
            progress(chain.index, k + 1, float(state.aux.mean()))
        if k in sample_steps:
            samples.append(state.params)
        elif job.early_stop is not None and schedule.temperature[k] >= 1.0:
            ll = state.aux
            mean_ll.append((weights.to(ll.device, ll.dtype) * ll).sum())
            is_new = indices >= num_data - max(job.new_labels, 1)
            if bool(is_new.any()):
                newest_ll.append(ll[is_new.to(ll.device)].mean())
            if len(mean_ll) % job.early_stop.window == 0 and job.early_stop.settled(
                torch.stack(newest_ll).tolist() if newest_ll else [], torch.stack(mean_ll).tolist()
            ):
                samples.append(state.params)
                break
    if interrupted and not samples:
        samples.append(state.params)  # keep what the chain has: its current state
    state.aux = None
    return Chain(
        chain.index, state, draws.get_state(), samples, interrupted,
        noise_rng_state=None if noise is draws else noise.get_state(), run_s=time.perf_counter() - started,
    )
