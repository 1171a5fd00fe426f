"""Progress display for long sampling runs, and clean Ctrl-C handling."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@contextmanager
def stop_on_sigint() -> Iterator[threading.Event]:
    """Turn the first Ctrl-C into a stop request (an Event); a second one aborts at once."""
    stop = threading.Event()
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        if stop.is_set():
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        stop.set()

    signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


class _Bar:
    """A rich progress display used as a context manager."""

    _progress: Progress

    def __enter__(self):
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()


class SamplingProgress(_Bar):
    """A rich progress bar over all chain-steps, with the current loss and the step rate.

    Use as the ``progress`` callback of the samplers: ``(chain, steps_done, mean_ll)``.
    The loss shown is −ℓ, the negative log-likelihood per structure of the last minibatch.
    """

    def __init__(self, total_steps: int, description: str = "sampling", quiet: bool = False,
                 console: Console | None = None):
        self.total = total_steps
        self.quiet = quiet
        self._done: dict[int, int] = {}
        self._start = time.perf_counter()
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:.2f} chain-steps/s"),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=quiet,
        )
        self._task = self._progress.add_task(description, total=total_steps, rate=0.0, loss="-")

    @property
    def completed(self) -> int:
        return sum(self._done.values())

    @property
    def rate(self) -> float:
        """Chain-steps per second since the start."""
        return self.completed / max(time.perf_counter() - self._start, 1e-9)

    def __call__(self, chain: int, steps_done: int, mean_ll: float) -> None:
        self._done[chain] = steps_done
        self._progress.update(self._task, completed=self.completed, rate=self.rate, loss=f"{-mean_ll:.4g}")


class RunProgress(_Bar):
    """Progress of an on-the-fly run: step, simulated time, reference calls, last P, T, ETA."""

    def __init__(self, total_steps: int, timestep_fs: float, quiet: bool = False, console: Console | None = None):
        self.timestep_fs = timestep_fs
        self._progress = Progress(
            TextColumn("[bold]MD"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[ps]:.3f} ps"),
            TextColumn("calls {task.fields[calls]}"),
            TextColumn("P {task.fields[prob]}"),
            TextColumn("{task.fields[temperature]:.0f} K"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=quiet,
        )
        self._task = self._progress.add_task("md", total=total_steps, ps=0.0, calls=0, prob="-", temperature=0.0)

    def __call__(self, run) -> None:
        results = run.calc.results
        self._progress.update(
            self._task,
            completed=run.dyn.nsteps,
            ps=run.dyn.nsteps * self.timestep_fs / 1000,
            calls=run.calc.state.reference_calls,
            prob=f"{results.get('prob_exceed', float('nan')):.3f}",
            temperature=run.atoms.get_temperature(),
        )
