"""Several MD trajectories (walkers) that share one ensemble and one calibration.

Each walker has its own structure, ASE integrator, thermostat RNG and temperature
schedule; its ``atoms.calc`` is a :class:`WalkerCalculator`, which hands every force
call to the run's one :class:`~flytune.otf.calculator.OnTheFlyCalculator`. A *round*
(:func:`run_together`) advances every walker by one MD step: each integrator runs in a
thread of its own until it asks for forces; once every walker has asked (or finished),
their structures are predicted in one batched ensemble evaluation
(:meth:`~flytune.otf.calculator.OnTheFlyCalculator.evaluate`), the reference calls
that the decisions ask for run at once, and the results go back to the integrators.
Only the integrators' own Python runs in those threads; the ensemble, the reference and
the files are used from the calling thread alone. One walker needs no thread: its force
calls are evaluated where they are made.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from ase.md.md import MolecularDynamics

from flytune.config import MDConfig
from flytune.otf.calculator import OnTheFlyCalculator, check_stress_defined, restore_results, result_cache


class _Aborted(Exception):
    """Ends a walker's step when the round failed elsewhere (its state is not used again)."""


class WalkerCalculator(Calculator):
    """The ASE calculator of one walker: its force calls are evaluated by the shared
    on-the-fly calculator (alone, or together with the other walkers' in a round)."""

    def __init__(self, engine: OnTheFlyCalculator, index: int):
        super().__init__()
        self.engine = engine
        self.index = index
        self.channel: tuple[queue.Queue, queue.Queue] | None = None  # (to the round, from it) in a round

    @property
    def implemented_properties(self) -> list[str]:
        return self.engine.implemented_properties

    def get_property(self, name, atoms=None, allow_calculation=True):
        check_stress_defined(name, atoms if atoms is not None else self.atoms)
        return super().get_property(name, atoms, allow_calculation)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        if self.channel is None:
            self.results = self.engine.evaluate([self.atoms], [self.index])[0]
            return
        to_round, from_round = self.channel
        to_round.put(("forces", self.index, self.atoms))
        reply = from_round.get()
        if reply is None:
            raise _Aborted
        self.results = reply

    def cache(self) -> dict | None:
        """The structure and results of the last force call (for a checkpoint)."""
        return result_cache(self.atoms, self.results)

    def restore_cache(self, cache: dict | None, atoms: Atoms) -> None:
        """Take back :meth:`cache`'s results for ``atoms``, so that resuming makes no extra call."""
        restored = restore_results(cache, atoms)
        if restored is not None:
            self.atoms, self.results = restored


@dataclass
class Walker:
    """One trajectory of a run: walker ``index`` with its own MD settings and seed."""

    index: int
    md: MDConfig
    seed: int
    atoms: Atoms
    dyn: MolecularDynamics
    calc: WalkerCalculator
    frames: int = 0  # trajectory frames written
    in_step: bool = field(default=False, repr=False)

    @property
    def step(self) -> int:
        """The MD step a force call belongs to (during ``dyn.step()``: the one being made)."""
        return self.dyn.nsteps + (1 if self.in_step else 0)

    @property
    def done(self) -> bool:
        return self.dyn.nsteps >= self.md.total_steps


def run_together(engine: OnTheFlyCalculator, walkers: list[Walker], action: Callable[[Walker], None]) -> None:
    """Do ``action(walker)`` (an MD step) for every walker, with their force calls
    evaluated together: once every walker waits for forces or has finished, one
    :meth:`~flytune.otf.calculator.OnTheFlyCalculator.evaluate` of all waiting structures
    (in walker order), then on. An exception in a walker or in the evaluation ends the
    round (the other walkers' steps are abandoned) and is raised here."""
    if len(walkers) == 1:
        action(walkers[0])
        return
    inbox: queue.Queue = queue.Queue()
    replies = {w.index: queue.Queue(maxsize=1) for w in walkers}

    def work(walker: Walker) -> None:
        try:
            action(walker)
        except _Aborted:
            inbox.put(("done", walker.index, None))
        except BaseException as exc:  # raised in the caller's thread
            inbox.put(("done", walker.index, exc))
        else:
            inbox.put(("done", walker.index, None))

    for w in walkers:
        w.calc.channel = (inbox, replies[w.index])
    threads = [threading.Thread(target=work, args=(w,), name=f"walker-{w.index}", daemon=True) for w in walkers]
    running, error = {w.index for w in walkers}, None
    try:
        for thread in threads:
            thread.start()
        while running:
            waiting: dict[int, Atoms] = {}
            while running:  # until each walker has asked for forces or finished its step
                kind, index, payload = inbox.get()
                running.discard(index)
                if kind == "forces":
                    waiting[index] = payload
                elif payload is not None and error is None:
                    error = payload
            if not waiting:
                break
            order = sorted(waiting)
            results = None
            if error is None:
                try:
                    results = engine.evaluate([waiting[i] for i in order], order)
                except BaseException as exc:
                    error = exc
            for k, index in enumerate(order):
                replies[index].put(results[k] if results is not None else None)
                running.add(index)
    except BaseException:  # Ctrl-C while waiting: release every walker
        for reply in replies.values():
            try:
                reply.put_nowait(None)
            except queue.Full:
                pass
        raise
    finally:
        for thread in threads:
            thread.join()
        for w in walkers:
            w.calc.channel = None
    if error is not None:
        raise error
