"""Markov chains of the ensemble and the runners that advance them.

A :class:`Chain` is the whole state of one member's sampler: SGHMC state, its own
random generator (minibatch draws and noise) and the samples it has produced.
:func:`run_chain` advances one chain through a :class:`Schedule`; it depends only on
its inputs, so chains can run one after another in this process
(:class:`SequentialRunner`) or in worker processes (:class:`ProcessRunner`, one per
core or GPU) with identical results for the same seeds.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import queue
import signal
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch.func import functional_call

from flytune.bayes import sghmc
from flytune.bayes.dataset import TrainingSet
from flytune.bayes.early_stop import EarlyStop
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
    (on-the-fly update) instead of being appended (offline cycles). ``early_stop``: end
    the cycle once the chain has settled (:mod:`flytune.bayes.early_stop`); for
    schedules whose only sample is at the end.
    """

    chain: Chain
    schedule: Schedule
    priority: bool = True
    replace_samples: bool = True
    early_stop: EarlyStop | None = None


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
    newest_ll: list[float] = []  # ℓ_new and L̂ in the full-noise phase, for early_stop
    mean_ll: list[float] = []
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
        if progress is not None:
            progress(chain.index, k + 1, float(state.aux.mean()))
        if k in sample_steps:
            samples.append(state.params)
        elif job.early_stop is not None and schedule.temperature[k] >= 1.0:
            ll = state.aux.cpu()
            mean_ll.append(float((weights.to(ll.dtype) * ll).sum()))
            newest = indices == num_data - 1
            if bool(newest.any()):
                newest_ll.append(float(ll[newest].mean()))
            if len(mean_ll) % job.early_stop.window == 0 and job.early_stop.settled(newest_ll, mean_ll):
                samples.append(state.params)
                break
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


def _worker_main(conn, spec_state: dict, threads: int, device: str, events, stop) -> None:
    """A resident worker: holds its model, prior, data set (graphs built once) and chains.

    Messages from the parent: ``("prior", state)``, ``("data", state, start)`` (structures
    ``start..`` of the data set; ``start == 0`` replaces it), ``("run", jobs, settings)``
    where a job's chain is ``None`` for a chain the worker already holds, and ``("close",)``.
    Every message is answered, ``("ok", result)`` or ``("error", traceback)``.
    """
    import traceback

    _exit_with_parent()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)  # as flytune.bayes.ensemble.reproducible
    model = ModelSpec.from_state_dict(spec_state).build(device)
    prior: GaussianPrior | None = None
    data = TrainingSet(model.backbone)
    chains: dict[int, Chain] = {}

    def progress(index: int, step: int, value: float) -> None:
        events.put((index, step, value))

    while True:
        message = conn.recv()
        try:
            kind = message[0]
            if kind == "close":
                conn.send(("ok", None))
                return
            if kind == "prior":
                prior = GaussianPrior.from_state_dict(tree_to(message[1], device))
                result = None
            elif kind == "data":
                if message[2] == 0:
                    data = TrainingSet(model.backbone)
                data.extend_from_state_dict(message[1])
                result = None
            else:  # run
                _, jobs, settings = message
                result = []
                for index, job in jobs:
                    chain = chains[index] if job.chain is None else job.chain.to(device)
                    job = dataclasses.replace(job, chain=chain)
                    chains[index] = run_chain(model, prior, data, job, settings, progress, stop)
                    result.append(tree_to(chains[index].state_dict(), "cpu"))
            conn.send(("ok", result))
        except Exception:
            conn.send(("error", traceback.format_exc()))


class ProcessRunner:
    """Runs chains in ``workers`` resident processes, each holding its own model.

    Chain m always runs in worker m mod ``workers``, which keeps the chain's sampler state,
    the prior and the data set (with its neighbour lists) between runs: a run sends only
    the structures added since the last one, the schedules, and the state of chains that
    changed outside the worker (e.g. loaded from a checkpoint); it returns the new chain
    states. Each worker uses ``threads`` torch threads (default: the cores divided among
    the workers) and one device: the spec's, or with ``"cuda"`` one GPU per worker in turn.
    Progress is relayed through a queue; a stop flag shared with the workers ends every
    chain at its next step.
    """

    def __init__(self, spec: ModelSpec, workers: int, threads: int | None = None):
        cores = os.cpu_count() or 1
        self.threads = threads or max(1, cores // workers)
        self.device = spec.device
        ctx = mp.get_context("spawn")
        self.events = ctx.Queue()
        self.stop_event = ctx.Event()
        self._conns = []
        self._processes = []
        with _sigint_ignored():
            for device in worker_devices(spec.device, workers):
                parent_end, child_end = ctx.Pipe()
                process = ctx.Process(
                    target=_worker_main,
                    args=(child_end, spec.state_dict(), self.threads, device, self.events, self.stop_event),
                    daemon=True,
                )
                process.start()
                child_end.close()
                self._conns.append(parent_end)
                self._processes.append(process)
        self._prior: GaussianPrior | None = None
        self._data: TrainingSet | None = None
        self._data_sent = 0
        #: the chain object each worker holds, by chain index
        self._resident: dict[int, Chain] = {}

    def _exchange(
        self, messages: Sequence[tuple | None], progress: Progress | None = None, stop: StopFlag | None = None
    ) -> list:
        """Send message i to worker i (None: nothing) and collect the answers, relaying
        progress and the stop flag while waiting."""
        for conn, message in zip(self._conns, messages):
            if message is not None:
                conn.send(message)
        answers = []
        for conn, process, message in zip(self._conns, self._processes, messages):
            if message is None:
                answers.append(None)
                continue
            while not conn.poll(0.2):
                self._relay(progress, stop)
                if not process.is_alive():
                    raise RuntimeError(f"chain worker {process.pid} died (exit code {process.exitcode})")
            status, result = conn.recv()
            if status == "error":
                raise RuntimeError(f"a chain worker failed:\n{result}")
            answers.append(result)
        return answers

    def _relay(self, progress: Progress | None, stop: StopFlag | None) -> None:
        if stop is not None and stop.is_set():
            self.stop_event.set()
        while True:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return
            if progress is not None:
                progress(*event)

    def _sync(self, prior: GaussianPrior, data: TrainingSet) -> None:
        """Send the prior if it changed and the structures the workers do not hold yet."""
        if prior is not self._prior:
            state = tree_to(prior.state_dict(), "cpu")
            self._exchange([("prior", state)] * len(self._conns))
            self._prior = prior
        if data is not self._data or len(data) < self._data_sent:
            self._data, self._data_sent = data, 0
        if len(data) > self._data_sent:
            state = data.state_dict(start=self._data_sent)
            self._exchange([("data", state, self._data_sent)] * len(self._conns))
            self._data_sent = len(data)

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
        self._sync(prior, data)
        per_worker: list[list] = [[] for _ in self._conns]
        for job in jobs:
            index = job.chain.index
            resident = self._resident.get(index) is job.chain
            sent = dataclasses.replace(job, chain=None if resident else job.chain.to("cpu"))
            per_worker[index % len(self._conns)].append((index, sent))
        answers = self._exchange([("run", w, settings) if w else None for w in per_worker], progress, stop)
        chains: dict[int, Chain] = {}
        for worker_jobs, states in zip(per_worker, answers):
            for (index, _), state in zip(worker_jobs, states or []):
                chains[index] = Chain.from_state_dict(state).to(self.device)
        self._relay(progress, stop)
        self._resident.update(chains)
        return [chains[job.chain.index] for job in jobs]

    def close(self) -> None:
        for conn, process in zip(self._conns, self._processes):
            if process.is_alive():
                try:
                    conn.send(("close",))
                    conn.recv()
                except (OSError, EOFError):
                    pass
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
        self._conns, self._processes = [], []
