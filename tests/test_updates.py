"""The update schedule: when a label is learned (every label, or deferred by the cost rule)."""

import numpy as np
import pytest
from ase.build import molecule

from flytune.config import UpdatesConfig
from flytune.data import labelled
from flytune.otf.updates import UpdateSchedule

EPS = 0.02  # ε, eV


def label(i: int):
    atoms = molecule("H2O")
    atoms.positions[0, 0] += 0.01 * i
    return labelled(atoms, -10.0 - i, np.full((3, 3), 0.1 * i))


def deferred(**settings) -> UpdateSchedule:
    return UpdateSchedule(UpdatesConfig(policy="deferred", **settings), threshold_eV=EPS)


def test_every_label_is_learned_at_once_by_default():
    schedule = UpdateSchedule(threshold_eV=EPS)
    for i in range(3):
        assert schedule.add(label(i), error_eV=0.0, reference_s=1.0) == "every"
        assert len(schedule.take()) == 1


def test_deferred_updates_follow_the_ski_rental_rule():
    """The first label measures the update cost; later labels wait until the reference
    time since the last update reaches that cost."""
    schedule = deferred(max_pending=100)
    assert schedule.add(label(0), error_eV=0.0, reference_s=3.0, first=True) == "first"
    assert len(schedule.take()) == 1
    schedule.updated(10.0)  # an update costs 10 s
    reasons = [schedule.add(label(i), error_eV=0.01, reference_s=3.0) for i in range(1, 5)]
    assert reasons == [None, None, None, "cost"]  # 3 + 3 + 3 < 10 ≤ 12
    learned = schedule.take()
    assert [a.get_potential_energy() for a in learned] == [-11.0, -12.0, -13.0, -14.0]  # oldest first
    schedule.updated(4.0)
    assert schedule.state.reference_s == 0.0
    assert schedule.add(label(5), error_eV=0.0, reference_s=3.0) is None
    assert schedule.add(label(6), error_eV=0.0, reference_s=1.0) == "cost"  # 4 s of calls = the new cost


def test_a_critical_miss_or_a_full_queue_updates_at_once():
    schedule = deferred(max_pending=3, critical_factor=2.0)
    schedule.add(label(0), error_eV=0.0, reference_s=0.1, first=True)
    schedule.take()
    schedule.updated(100.0)
    assert schedule.add(label(1), error_eV=2.01 * EPS, reference_s=0.1) == "critical"
    schedule.take()
    schedule.updated(100.0)
    assert schedule.add(label(2), error_eV=-1.99 * EPS, reference_s=0.1) is None  # |e| ≤ 2ε
    assert schedule.add(label(3), error_eV=0.0, reference_s=0.1) is None
    assert schedule.add(label(4), error_eV=0.0, reference_s=0.1) == "max pending"


def test_by_default_an_error_outside_the_promise_updates_at_once():
    """critical_factor = 1: a deferred label whose |e| > ε is learned at once (with 2, PBE
    ethanol met 16 errors in (ε, 2ε] in a row while its labels waited)."""
    schedule = deferred(max_pending=100)
    schedule.add(label(0), error_eV=0.0, reference_s=0.1, first=True)
    schedule.take()
    schedule.updated(100.0)
    assert schedule.add(label(1), error_eV=0.99 * EPS, reference_s=0.1) is None
    assert schedule.add(label(2), error_eV=-1.01 * EPS, reference_s=0.1) == "critical"
    assert len(schedule.take()) == 2


def test_under_a_force_criterion_a_force_error_outside_the_promise_updates_at_once():
    eps_f = 0.3  # ε_F, eV/Å
    schedule = UpdateSchedule(UpdatesConfig(policy="deferred", max_pending=100), threshold_eV=EPS,
                              force_threshold_eV_A=eps_f)
    energy_only = deferred(max_pending=100)
    for s in (schedule, energy_only):
        s.add(label(0), error_eV=0.0, reference_s=0.1, first=True)
        s.take()
        s.updated(100.0)
    assert schedule.add(label(1), error_eV=0.0, reference_s=0.1, force_error_eV_A=0.99 * eps_f) is None
    assert schedule.add(label(2), error_eV=0.0, reference_s=0.1, force_error_eV_A=1.01 * eps_f) == "critical"
    assert energy_only.add(label(2), error_eV=0.0, reference_s=0.1, force_error_eV_A=10.0) is None


def test_critical_misses_wait_while_the_last_update_missed_its_own_label():
    """An update that did not learn its newest label would be repeated in vain by the next
    critical miss (SevenNet-0 ethanol: 12 such updates in a row): critical labels then wait
    for the cost rule, until an update learns its label."""
    schedule = deferred(max_pending=100)
    schedule.add(label(0), error_eV=0.0, reference_s=1.0, first=True)
    schedule.take()
    schedule.updated(10.0, learned=False)
    assert schedule.add(label(1), error_eV=1.5 * EPS, reference_s=3.0) is None
    assert schedule.waits_because.startswith("critical, but the last update missed")
    assert schedule.add(label(2), error_eV=0.0, reference_s=3.0) is None and schedule.waits_because == ""
    restored = deferred(max_pending=100)
    restored.load_state_dict(schedule.state_dict())  # the checkpoint keeps it
    assert restored.state.missed and restored.add(label(3), error_eV=2 * EPS, reference_s=4.0) == "cost"
    restored.take()
    restored.updated(10.0)  # this update learned: critical misses update at once again
    assert restored.add(label(4), error_eV=1.5 * EPS, reference_s=1.0) == "critical"
    assert deferred().state.missed is False  # a checkpoint from before the rule: none missed


def test_pending_labels_survive_the_checkpoint():
    schedule = deferred()
    schedule.add(label(0), error_eV=0.0, reference_s=1.0, first=True)
    schedule.take()
    schedule.updated(50.0)
    for i in (1, 2):
        schedule.add(label(i), error_eV=0.0, reference_s=2.5)
    restored = deferred()
    restored.load_state_dict(schedule.state_dict())
    assert restored.state.reference_s == pytest.approx(5.0) and restored.state.last_update_s == 50.0
    assert len(restored.pending) == 2
    for a, b in zip(schedule.pending, restored.pending):
        np.testing.assert_array_equal(a.positions, b.positions)
        np.testing.assert_array_equal(a.get_forces(), b.get_forces())
        assert a.get_potential_energy() == b.get_potential_energy()
