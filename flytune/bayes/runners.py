"""Runners: where the chains of an ensemble run.

Every runner has the one :class:`Runner` interface: ``run(prior, data, jobs, settings,
progress, stop)`` advances the chains of ``jobs`` on the posterior of ``prior`` and
``data`` and returns the new chains in the order of the jobs; ``close()`` frees what
the runner holds. Runners give identical chains for the same jobs:

- :class:`SequentialRunner` runs them one after another in this process;
- :class:`ProcessRunner` runs them in resident worker processes (one per core or GPU),
  each holding its model, the prior, the data set (graphs built once) and its chains,
  so that a run sends only what the workers do not have yet.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import queue
import signal
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch

from flytune.bayes.chain import Chain, ChainJob, Progress, SamplerSettings, StopFlag, run_chain
from flytune.bayes.dataset import TrainingSet
from flytune.bayes.model import ModelSpec, ProbabilisticModel
from flytune.bayes.prior import GaussianPrior
from flytune.bayes.tree import tree_to


class Runner(Protocol):
    """Advances chains; see the module docstring."""

    def run(self, prior: GaussianPrior, data: TrainingSet, jobs: Sequence[ChainJob], settings: SamplerSettings,
            progress: Progress | None = None, stop: StopFlag | None = None) -> list[Chain]:
        """One cycle of every job's chain on ``data`` under ``prior``: the new chains, in
        the order of ``jobs``. ``progress(chain, step, mean_ll)`` reports as they go; a
        set ``stop`` ends every chain early, keeping its current state."""
        ...

    def close(self) -> None: ...


def make_runner(spec: ModelSpec, model: ProbabilisticModel, workers: int, threads: int | None = None) -> Runner:
    """In this process for ``workers == 1`` (on ``model``), else ``workers`` processes."""
    if workers > 1:
        return ProcessRunner(spec, workers, threads)
    return SequentialRunner(model, threads)


class SequentialRunner:
    """Runs chains one after another in this process.

    With ``threads`` set, torch uses that many threads while chains run, so results
    equal a :class:`ProcessRunner` with the same threads per worker bit for bit.
    """

    def __init__(self, model: ProbabilisticModel, threads: int | None = None):
        self.model = model
        self.threads = threads

    def run(self, prior: GaussianPrior, data: TrainingSet, jobs: Sequence[ChainJob], settings: SamplerSettings,
            progress: Progress | None = None, stop: StopFlag | None = None) -> list[Chain]:
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
def worker_of(chain_index: int, workers: int) -> int:
    """The worker that runs chain ``chain_index``: chain m always runs in worker m mod ``workers``."""
    return chain_index % max(1, workers)


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
    model = ModelSpec.from_state_dict(spec_state).build(device)  # deterministic kernels from here on
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


@dataclass
class Traffic:
    """What a :class:`ProcessRunner` has sent its workers so far (each worker counted)."""

    structures: int = 0  # labelled structures
    chains: int = 0  # chain states (a chain the worker already holds is not sent)
    priors: int = 0


class ProcessRunner:
    """Runs chains in ``workers`` resident processes, each holding its own model.

    Chain m always runs in worker m mod ``workers``, which keeps the chain's sampler state,
    the prior and the data set (with its neighbour lists) between runs: a run sends only
    the structures added since the last one, the schedules, and the state of chains that
    changed outside the worker (e.g. loaded from a checkpoint); it returns the new chain
    states. :attr:`traffic` counts what was sent. Each worker uses ``threads`` torch
    threads (default: the cores divided among the workers) and one device: the spec's,
    or with ``"cuda"`` one GPU per worker in turn. Progress is relayed through a queue;
    a stop flag shared with the workers ends every chain at its next step.
    """

    def __init__(self, spec: ModelSpec, workers: int, threads: int | None = None):
        cores = os.cpu_count() or 1
        self.threads = threads or max(1, cores // workers)
        self.device = spec.device
        self.traffic = Traffic()
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
        self._in_flight: tuple | None = None  # (messages, jobs per worker, chain order) of a submitted run

    def _exchange(
        self, messages: Sequence[tuple | None], progress: Progress | None = None, stop: StopFlag | None = None
    ) -> list:
        """Send message i to worker i (None: nothing) and collect the answers, relaying
        progress and the stop flag while waiting."""
        self._send(messages)
        return self._answers(messages, progress, stop, block=True)

    def _send(self, messages: Sequence[tuple | None]) -> None:
        for conn, message in zip(self._conns, messages):
            if message is not None:
                conn.send(message)

    def _answers(self, messages: Sequence[tuple | None], progress: Progress | None, stop: StopFlag | None,
                 block: bool) -> list | None:
        """The answers to ``messages``; without ``block``, None unless every worker has answered."""
        if not block and not all(c.poll() for c, m in zip(self._conns, messages) if m is not None):
            self._relay(progress, stop)
            return None
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
            self.traffic.priors += len(self._conns)
        if data is not self._data or len(data) < self._data_sent:
            self._data, self._data_sent = data, 0
        if len(data) > self._data_sent:
            state = data.state_dict(start=self._data_sent)
            self._exchange([("data", state, self._data_sent)] * len(self._conns))
            self.traffic.structures += (len(data) - self._data_sent) * len(self._conns)
            self._data_sent = len(data)

    def run(self, prior: GaussianPrior, data: TrainingSet, jobs: Sequence[ChainJob], settings: SamplerSettings,
            progress: Progress | None = None, stop: StopFlag | None = None) -> list[Chain]:
        self.submit(prior, data, jobs, settings)
        return self.collect(progress, stop, block=True)

    def submit(self, prior: GaussianPrior, data: TrainingSet, jobs: Sequence[ChainJob],
               settings: SamplerSettings) -> None:
        """Start the chains of ``jobs`` in the workers and return at once: this process is
        free (for MD on the current ensemble) until :meth:`collect`. ``data`` may grow
        meanwhile; the workers get the new structures with the next submission."""
        if self._in_flight is not None:
            raise RuntimeError("a run is already in flight; collect it first")
        self.stop_event.clear()
        self._sync(prior, data)
        per_worker: list[list] = [[] for _ in self._conns]
        for job in jobs:
            index = job.chain.index
            resident = self._resident.get(index) is job.chain
            sent = dataclasses.replace(job, chain=None if resident else job.chain.to("cpu"))
            self.traffic.chains += 0 if resident else 1
            per_worker[worker_of(index, len(self._conns))].append((index, sent))
        messages = [("run", w, settings) if w else None for w in per_worker]
        self._send(messages)
        self._in_flight = (messages, per_worker, [job.chain.index for job in jobs])

    @property
    def in_flight(self) -> bool:
        return self._in_flight is not None

    def collect(self, progress: Progress | None = None, stop: StopFlag | None = None,
                block: bool = True) -> list[Chain] | None:
        """The new chains of the submitted run, in the order of its jobs; without
        ``block``, None while any worker is still busy."""
        messages, per_worker, order = self._in_flight
        try:
            answers = self._answers(messages, progress, stop, block)
        except BaseException:  # a failed or dead worker: the run is over
            self._in_flight = None
            raise
        if answers is None:
            return None
        self._in_flight = None
        chains: dict[int, Chain] = {}
        for worker_jobs, states in zip(per_worker, answers):
            for (index, _), state in zip(worker_jobs, states or []):
                chains[index] = Chain.from_state_dict(state).to(self.device)
        self._relay(progress, stop)
        self._resident.update(chains)
        return [chains[index] for index in order]

    def close(self) -> None:
        if self._in_flight is not None:  # stop the chains at their next step, drop the answers
            self.stop_event.set()
            try:
                self.collect(block=True)
            except RuntimeError:
                pass
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
