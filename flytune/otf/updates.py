r"""When a new label is learned: the update schedule of an on-the-fly run (``[updates]``).

A label is used the moment the reference returns: its forces drive that MD step, its
error feeds the calibration, and it is on disk. What may wait is the SGHMC update that
makes the ensemble learn it (method §4), which costs far more than a prediction.

``policy = "every"`` updates after every label (the method as published).
``policy = "deferred"`` keeps the labels in a queue and updates, learning all of them in
one cycle per chain, at the first of:

1. ``first``: the first label of a run (it also measures what an update costs; until
   that measurement exists, rule 4 waits);
2. ``critical``: a label whose error |e| > ``critical_factor``·ε (the ensemble is badly
   wrong here; refit now), or, when the decision bounds the forces (``criterion =
   "forces"`` or ``"both"``), whose largest atom force error max_a |ΔF_a| >
   ``critical_factor``·ε_F, unless the last update did not learn its own newest label:
   it left a misfit there that alone keeps P(|e| > ε) above the call level, so it did
   not end the calls nearby, which is what the rule pays an update for. An update at
   once would then most likely repeat the miss (measured: SevenNet-0 on ethanol, 12
   single-label updates in a row at 65 s each, each leaving its label 0.40–0.56 kcal/mol
   off at ε = 0.5, against 3.4 s per reference call), and the label waits for rules 3–4
   like any other until an update learns its newest label;
3. ``max pending``: ``max_pending`` labels wait;
4. ``cost``: the reference time spent since the last update has reached the expected
   cost of the next update, taken as the wall time of the last one.

Rule 4 is the ski-rental rule: while the ensemble has not learned the new labels it
keeps asking for calls nearby, each costing t_ref ("renting"), and an update that ends
them costs t_upd ("buying"). Buying once the rent paid equals the price spends at most
twice what the best schedule in hindsight would have spent.

``background = true`` changes where an update runs, not when it is due: it starts in
the worker processes and the MD continues on the current ensemble
(:meth:`flytune.otf.calculator.OnTheFlyCalculator.poll_update` swaps the new chains in);
labels that fall due while one runs wait for it to finish.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ase import Atoms

from flytune.config import UpdatesConfig
from flytune.otf.rundir import label_from_record, label_record


@dataclass
class ScheduleState:
    """What the schedule remembers (part of the checkpoint)."""

    reference_s: float = 0.0  # reference wall time since the last update
    last_update_s: float | None = None  # wall time of the last update: the expected cost of the next
    pending: list[Atoms] = field(default_factory=list)  # labels not yet learned, oldest first
    started: bool = False  # an update has been started (the first label's)
    #: the last update did not learn its newest label (see rule 2): no critical updates
    missed: bool = False


class UpdateSchedule:
    """Decides, after each label, whether the posterior update runs now (see the module
    docstring); ``threshold_eV`` is ε, ``force_threshold_eV_A`` ε_F where the decision
    bounds the forces (None: critical misses are judged by the energy alone)."""

    def __init__(self, config: UpdatesConfig | None = None, threshold_eV: float = 1.0,
                 force_threshold_eV_A: float | None = None):
        self.config = config or UpdatesConfig()
        self.threshold_eV = threshold_eV
        self.force_threshold_eV_A = force_threshold_eV_A
        self.state = ScheduleState()
        #: why the label just added waits although its error was critical, else ""
        self.waits_because = ""

    @property
    def pending(self) -> list[Atoms]:
        return self.state.pending

    def add(self, label: Atoms, *, error_eV: float, reference_s: float, first: bool = False,
            force_error_eV_A: float = 0.0) -> str | None:
        """Queue ``label`` (its energy error ``error_eV``, its largest atom force error
        ``force_error_eV_A``); the reason to update now (``"every"``, ``"first"``,
        ``"critical"``, ``"max pending"``, ``"cost"``), or None to wait."""
        s, c = self.state, self.config
        s.pending.append(label)
        s.reference_s += reference_s
        self.waits_because = ""
        if c.policy == "every":
            return "every"
        if first or not s.started:
            return "first"
        force_critical = (self.force_threshold_eV_A is not None
                          and force_error_eV_A > c.critical_factor * self.force_threshold_eV_A)
        if abs(error_eV) > c.critical_factor * self.threshold_eV or force_critical:
            if not s.missed:
                return "critical"
            self.waits_because = "critical, but the last update missed its own newest label"
        if len(s.pending) >= c.max_pending:
            return "max pending"
        if s.last_update_s is not None and s.reference_s >= s.last_update_s:  # none measured yet: wait
            return "cost"
        return None

    def take(self) -> list[Atoms]:
        """The pending labels, for the update that starts now."""
        labels, self.state.pending = self.state.pending, []
        self.state.started = True
        return labels

    def updated(self, update_s: float, learned: bool = True) -> None:
        """An update of ``update_s`` seconds learned what :meth:`take` returned; ``learned``:
        its misfit at the run's newest label no longer asks for a call there (rule 2)."""
        self.state.reference_s = 0.0
        self.state.last_update_s = update_s
        self.state.missed = not learned

    def state_dict(self) -> dict:
        s = self.state
        return {"reference_s": s.reference_s, "last_update_s": s.last_update_s, "started": s.started,
                "missed": s.missed, "pending": [label_record(a) for a in s.pending]}

    def load_state_dict(self, state: dict) -> None:
        pending = [label_from_record(r) for r in state.get("pending", [])]
        self.state = ScheduleState(state.get("reference_s", 0.0), state.get("last_update_s"), pending,
                                   state.get("started", state.get("last_update_s") is not None),
                                   state.get("missed", False))
