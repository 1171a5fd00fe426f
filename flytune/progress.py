"""Progress display for long sampling runs, and clean Ctrl-C handling."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
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


class StepCounter:
    """A sampler progress callback ``(chain, steps_done, mean_ll)`` that counts the
    chain-steps done (the latest report of each chain) and passes every report on."""

    def __init__(self, forward: Callable[[int, int, float], None] | None = None):
        self.forward = forward
        self._done: dict[int, int] = {}

    @property
    def completed(self) -> int:
        return sum(self._done.values())

    def __call__(self, chain: int, steps_done: int, mean_ll: float) -> None:
        self._done[chain] = steps_done
        if self.forward is not None:
            self.forward(chain, steps_done, mean_ll)


class _Bar:
    """A rich progress display used as a context manager."""

    _progress: Progress

    @staticmethod
    def _bar(name: str, *fields: str, quiet: bool, console: Console | None) -> Progress:
        """Name, bar, n of total, the ``fields`` columns, elapsed time and ETA."""
        return Progress(TextColumn(name), BarColumn(), MofNCompleteColumn(), *map(TextColumn, fields),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=quiet)

    def __enter__(self):
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()


class SamplingProgress(_Bar, StepCounter):
    """A rich progress bar over all chain-steps, with the current loss and the step rate.

    Use as the ``progress`` callback of the samplers: ``(chain, steps_done, mean_ll)``.
    The loss shown is −ℓ, the negative log-likelihood per structure of the last minibatch.
    """

    def __init__(self, total_steps: int, description: str = "sampling", quiet: bool = False,
                 console: Console | None = None):
        StepCounter.__init__(self, self._show)
        self.total = total_steps
        self.quiet = quiet
        self._start = time.perf_counter()
        self._progress = self._bar("[bold]{task.description}", "{task.fields[rate]:.2f} chain-steps/s",
                                   "loss {task.fields[loss]}", quiet=quiet, console=console)
        self._task = self._progress.add_task(description, total=total_steps, rate=0.0, loss="-")

    @property
    def rate(self) -> float:
        """Chain-steps per second since the start."""
        return self.completed / max(time.perf_counter() - self._start, 1e-9)

    def _show(self, chain: int, steps_done: int, mean_ll: float) -> None:
        self._progress.update(self._task, completed=self.completed, rate=self.rate, loss=f"{-mean_ll:.4g}")


class RunProgress(_Bar):
    """Progress of an on-the-fly run: step, simulated time, reference calls, last P (and
    in red the steps that ran without the call the rule asked for), T, ETA, and during a
    posterior update the chain and SGHMC step it has reached.

    Call it after every MD step with the run; :meth:`update_step` is the ``progress``
    callback of the updates."""

    def __init__(self, total_steps: int, timestep_fs: float, quiet: bool = False, console: Console | None = None):
        self.timestep_fs = timestep_fs
        self._progress = self._bar("[bold]MD", "{task.fields[ps]:.3f} ps", "calls {task.fields[calls]}",
                                   "P {task.fields[prob]}", "{task.fields[temperature]} K",
                                   "{task.fields[update]}", quiet=quiet, console=console)
        self._task = self._progress.add_task("md", total=total_steps, ps=0.0, calls=0, prob="-", temperature="-",
                                          update="")

    def __call__(self, run) -> None:
        walkers = run.walkers
        done = max(w.dyn.nsteps for w in walkers)  # every walker not yet at its end steps once per round
        prob = max(w.calc.results.get("prob_exceed", float("nan")) for w in walkers)
        temperatures = [w.atoms.get_temperature() for w in walkers]
        self._progress.update(
            self._task,
            completed=done,
            ps=done * self.timestep_fs / 1000,
            calls=run.calc.state.reference_calls,
            prob=f"{prob:.3f}"
            + (f" [bold red]{n} steps without the call asked for[/]" if (n := run.calc.state.steps_uncontrolled) else ""),
            temperature=" ".join(f"{t:.0f}" for t in temperatures),
            update="",
        )

    def update_step(self, chain: int, step: int, mean_ll: float) -> None:
        self._progress.update(self._task, update=f"updating: chain {chain}, step {step}")


class MDProgress(_Bar):
    """Progress of production MD (``flytune md``): step, simulated time, σ, P(|e| > ε),
    the steps above the call level so far, T and ETA. Call it as ``(step, results)``."""

    def __init__(self, total_steps: int, timestep_fs: float, quiet: bool = False, console: Console | None = None):
        self.timestep_fs = timestep_fs
        self.above = 0
        self._progress = self._bar("[bold]MD", "{task.fields[ps]:.3f} ps", "σ {task.fields[sigma]}",
                                   "P {task.fields[prob]}", "{task.fields[above]}", quiet=quiet, console=console)
        self._task = self._progress.add_task("md", total=total_steps, ps=0.0, sigma="-", prob="-", above="")

    def __call__(self, step: int, results: dict, level: float = 0.05) -> None:
        self.above += results["prob_exceed"] > level
        self._progress.update(self._task, completed=step, ps=step * self.timestep_fs / 1000,
                              sigma=f"{1000 * results['energy_std']:.1f} meV", prob=f"{results['prob_exceed']:.3f}",
                              above=f"[bold red]{self.above} steps above the level[/]" if self.above else "")
