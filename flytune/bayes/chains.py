"""Markov chains of the ensemble and the runners that advance them.

A :class:`Chain` is the whole state of one member's sampler: SGHMC state, its own
random generator (minibatch draws and noise) and the samples it has produced.
:func:`run_chain` advances one chain through a :class:`Schedule`; it depends only on
its inputs, so chains can run one after another in this process
(:class:`SequentialRunner`) or in worker processes (:class:`ProcessRunner`, one per
core or GPU) with identical results for the same seeds.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.managers import SyncManager
from typing import Protocol

import torch
from torch.func import functional_call

from flytune.bayes import sghmc
from flytune.bayes.dataset import TrainingSet
from flytune.bayes.minibatch import draw_minibatch
from flytune.bayes.model import ModelSpec, ProbabilisticModel
from flytune.bayes.prior import GaussianPrior
from flytune.bayes.schedules import Schedule
from flytune.bayes.tree import tree_to

Params = dict[str, torch.Tensor]
#: progress callback: (chain index, steps done in this run, mean log-likelihood per
#: structure of the last minibatch)
Progress = Callable[[int, int, float], None]


class StopFlag(Protocol):
    def is_set(self) -> bool: ...


@dataclass
class Chain:
    """One Markov chain: sampler state, its own generator state, and its samples."""

    index: int
    state: sghmc.SGHMCState
    rng_state: torch.Tensor
    samples: list[Params] = field(default_factory=list)
    #: True when the last run was stopped before its schedule ended
    interrupted: bool = False

    @classmethod
    def start(cls, index: int, params: Params, seed: int) -> Chain:
        """Chain ``index`` at ``params``; its generator is seeded from (seed, index)."""
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        return cls(index=index, state=sghmc.init_state(params), rng_state=generator.get_state())

    def state_dict(self) -> dict:
        return {
            "index": self.index,
            "state": self.state.state_dict(),
            "rng_state": self.rng_state,
            "samples": self.samples,
            "interrupted": self.interrupted,
        }

    def to(self, device: torch.device | str) -> Chain:
        return Chain.from_state_dict(tree_to(self.state_dict(), device))

    @classmethod
    def from_state_dict(cls, state: dict) -> Chain:
        return cls(
            index=int(state["index"]),
            state=sghmc.SGHMCState.from_state_dict(dict(state["state"])),
            rng_state=state["rng_state"],
            samples=[dict(s) for s in state["samples"]],
            interrupted=bool(state["interrupted"]),
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

    ``priority``: priority sampling of the newest structure (on-the-fly) or uniform
    (offline). ``replace_samples``: the new samples replace the chain's old ones
    (on-the-fly update) instead of being appended (offline cycles).
    """

    chain: Chain
    schedule: Schedule
    priority: bool = True
    replace_samples: bool = True


def log_posterior_fn(model: ProbabilisticModel, prior: GaussianPrior, num_data: int):
    """−Ũ(θ) = (1/N)·log p(θ) + Σ_b w_b·ℓ_{u_b}(θ) for a minibatch (graphs, labels, w)."""

    device = next(model.parameters()).device

    def log_posterior(params: Params, batch):
        graphs, labels, weights = batch
        graphs, labels, weights = graphs.to(device), labels.to(device), weights.to(device)
        pred = functional_call(model, params, (graphs,), {"create_graph": True})
        ll = model.log_likelihood(pred, labels, graphs)
        value = prior.log_prob(params) / num_data + (weights.to(ll.dtype) * ll).sum()
        return value, ll.detach()

    return log_posterior


def run_chain(
    model: ProbabilisticModel,
    prior: GaussianPrior,
    data: TrainingSet,
    job: ChainJob,
    settings: SamplerSettings,
    progress: Progress | None = None,
    stop: StopFlag | None = None,
) -> Chain:
    """Run ``job.schedule`` on ``job.chain``; returns the advanced chain (inputs untouched)."""
    chain, schedule = job.chain, job.schedule
    num_data = len(data)
    if num_data == 0:
        raise ValueError("cannot sample without data: add labelled structures first")
    generator = torch.Generator()
    generator.set_state(chain.rng_state)
    sampler = sghmc.build(
        log_posterior_fn(model, prior, num_data),
        friction=settings.friction,
        beta=settings.beta,
        mass_eps=settings.mass_eps,
        has_aux=True,
    )
    state = chain.state
    samples = [] if job.replace_samples else list(chain.samples)
    resets, sample_steps = set(schedule.reset_before), set(schedule.sample_after)
    interrupted = False
    for k in range(len(schedule)):
        if stop is not None and stop.is_set():
            interrupted = True
            break
        if k in resets:
            state = sampler.init(state.params)
        indices, weights = draw_minibatch(num_data, settings.batch_size, generator, job.priority)
        graphs, labels = data.batch(indices)
        state = sampler.update(
            state,
            (graphs, labels, weights),
            lr=float(schedule.step_size[k]),
            temperature=float(schedule.temperature[k]),
            num_data=num_data,
            generator=generator,
        )
        if k in sample_steps:
            samples.append(state.params)
        if progress is not None:
            progress(chain.index, k + 1, float(state.aux.mean()))
    if interrupted and not samples:
        samples.append(state.params)  # keep what the chain has: its current state
    state.aux = None
    return Chain(chain.index, state, generator.get_state(), samples, interrupted)


class SequentialRunner:
    """Runs chains one after another in this process.

    With ``threads`` set, torch uses that many threads while chains run, so results
    equal a :class:`ProcessRunner` with the same threads per worker bit for bit.
    """

    def __init__(self, model: ProbabilisticModel, threads: int | None = None):
        self.model = model
        self.threads = threads

    def run(
        self,
        prior: GaussianPrior,
        data: TrainingSet,
        jobs: Sequence[ChainJob],
        settings: SamplerSettings,
        progress: Progress | None = None,
        stop: StopFlag | None = None,
    ) -> list[Chain]:
        previous = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            return [run_chain(self.model, prior, data, job, settings, progress, stop) for job in jobs]
        finally:
            torch.set_num_threads(previous)

    def close(self) -> None:
        pass


# -- worker processes ------------------------------------------------------------------
def worker_devices(device: str, workers: int) -> list[str]:
    """Device of each worker: ``"cuda"`` spreads workers over the visible GPUs in turn."""
    if device == "cuda" and torch.cuda.device_count() > 1:
        return [f"cuda:{i % torch.cuda.device_count()}" for i in range(workers)]
    return [device] * workers


_WORKER: dict = {}


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Processes started inside inherit an ignored SIGINT (Python keeps it ignored), so a
    Ctrl-C sent to the whole process group reaches only the parent, which sets the stop flag."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _exit_with_parent() -> None:
    """In a helper process: exit as soon as the parent dies (even by SIGKILL), so that a
    killed run leaves no orphans burning the cores of the resumed one."""
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _worker_init(spec_state: dict, threads: int, events, stop, devices) -> None:
    _exit_with_parent()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)  # as flytune.bayes.ensemble.reproducible
    device = devices.get()  # one device per worker: cpu, or cuda:0, cuda:1, ...
    _WORKER["model"] = ModelSpec.from_state_dict(spec_state).build(device)
    _WORKER["device"], _WORKER["events"], _WORKER["stop"] = device, events, stop


def _worker_run(prior_state: dict, data_state: dict, job: ChainJob, settings: SamplerSettings) -> dict:
    """Run one job in a worker; tensors cross the process boundary on the CPU."""
    model, device, events = _WORKER["model"], _WORKER["device"], _WORKER["events"]
    data = TrainingSet.from_state_dict(model.backbone, data_state)
    prior = GaussianPrior.from_state_dict(tree_to(prior_state, device))
    job = ChainJob(job.chain.to(device), job.schedule, job.priority, job.replace_samples)

    def progress(index: int, step: int, value: float) -> None:
        events.put((index, step, value))

    chain = run_chain(model, prior, data, job, settings, progress, _WORKER["stop"])
    return tree_to(chain.state_dict(), "cpu")


class ProcessRunner:
    """Runs chains in ``workers`` spawned processes, each holding its own model.

    Each worker uses ``threads`` torch threads (default: the cores divided among the
    workers) and one device: the spec's, or with ``"cuda"`` one GPU per worker in turn.
    Progress is relayed through a queue; a stop flag shared with the workers ends every
    chain at its next step.
    """

    def __init__(self, spec: ModelSpec, workers: int, threads: int | None = None):
        cores = os.cpu_count() or 1
        self.threads = threads or max(1, cores // workers)
        self.device = spec.device
        self._ctx = mp.get_context("spawn")
        self._manager = SyncManager(ctx=self._ctx)
        with _sigint_ignored():
            self._manager.start(_exit_with_parent)
        self.events = self._manager.Queue()
        self.stop_event = self._manager.Event()
        devices = self._manager.Queue()
        for device in worker_devices(spec.device, workers):
            devices.put(device)
        self._pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=self._ctx,
            initializer=_worker_init,
            initargs=(spec.state_dict(), self.threads, self.events, self.stop_event, devices),
        )

    def run(
        self,
        prior: GaussianPrior,
        data: TrainingSet,
        jobs: Sequence[ChainJob],
        settings: SamplerSettings,
        progress: Progress | None = None,
        stop: StopFlag | None = None,
    ) -> list[Chain]:
        self.stop_event.clear()
        prior_state, data_state = tree_to(prior.state_dict(), "cpu"), data.state_dict()
        jobs = [ChainJob(j.chain.to("cpu"), j.schedule, j.priority, j.replace_samples) for j in jobs]
        with _sigint_ignored():  # workers are spawned on submit
            futures = [self._pool.submit(_worker_run, prior_state, data_state, j, settings) for j in jobs]
        while not all(f.done() for f in futures):
            if stop is not None and stop.is_set():
                self.stop_event.set()
            try:
                event = self.events.get(timeout=0.2)
            except queue.Empty:
                continue
            if progress is not None:
                progress(*event)
        while progress is not None and not self.events.empty():
            progress(*self.events.get())
        return [Chain.from_state_dict(f.result()).to(self.device) for f in futures]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._manager.shutdown()
