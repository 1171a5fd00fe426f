"""The on-the-fly loop: calculator, run directory, restart after SIGKILL, failures, config."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.io import read, write
from ase.md.verlet import VelocityVerlet
from ase import units
import torch

from conftest import FailingCalculator, build_small_mace
from flytune.bayes.calibration import FORCE_CALIBRATIONS
from flytune.bayes.ensemble import Ensemble
from flytune.config import ModelConfig, UncertaintyConfig
from flytune.errors import FlytuneError
from flytune.config import SafetyConfig
from flytune.otf.calculator import OnTheFlyCalculator
from flytune.otf.reference import Reference, make_reference
from flytune.otf.run import run
from flytune.otf.rundir import cost_figures, unpack
from flytune.report import read_run, summarize_run
from flytune.runconfig import load_run_config

CONFIG = """
structure = "cu4.xyz"
run_dir = "{run_dir}"
seed = 3
checkpoint_every = 4
[model]
backbone = "cu.model"
chains = 2
cycle_steps = 12
batch_size = 2
eta_max = 1e-3
[reference]
name = "{reference}"
{reference_extra}
[uncertainty]
threshold = 0.05
[md]
driver = "langevin"
timestep_fs = 2.0
temperature_K = 500
steps = {steps}
trajectory_every = 3
[safety]
force_call_after = 3
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("otf")
    build_small_mace(path / "cu.model", numbers=(1, 6, 8, 29))
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.rattle(0.1, seed=3)
    write(path / "cu4.xyz", atoms)
    return path


def write_config(workdir, name, steps=15, reference="ase.calculators.emt:EMT", reference_extra="", **extra):
    text = CONFIG.format(run_dir=name, steps=steps, reference=reference, reference_extra=reference_extra)
    for key, value in extra.items():
        text = text.replace(key, value)
    path = workdir / f"{name}.toml"
    path.write_text(text)
    return path


# -- the calculator under an ASE driver -------------------------------------------------
def small_calculator(workdir, force_call_after: int):
    """The small MACE ensemble with EMT as the reference."""
    ensemble = Ensemble.from_config(
        ModelConfig(backbone=str(workdir / "cu.model"), chains=2, cycle_steps=12, batch_size=2, eta_max=1e-3),
        UncertaintyConfig(threshold=0.05), seed=0,
    )
    calc = OnTheFlyCalculator(ensemble, make_reference("ase.calculators.emt:EMT"),
                              safety=SafetyConfig(force_call_after=force_call_after))
    return ensemble, calc


def test_calculator_under_velocity_verlet(workdir):
    ensemble, calc = small_calculator(workdir, force_call_after=4)
    atoms = read(workdir / "cu4.xyz")
    atoms.calc = calc
    dyn = VelocityVerlet(atoms, 2 * units.fs)
    seen = []

    def check():
        res = calc.results
        seen.append(res["reference_called"])
        if res["reference_called"]:
            emt = atoms.copy()
            emt.calc = EMT()
            # the MD got the reference forces and the offset-corrected reference energy
            np.testing.assert_allclose(res["forces"], emt.get_forces(), atol=1e-10)
            assert res["energy"] == pytest.approx(emt.get_potential_energy() + ensemble.data.energy_offset, abs=1e-10)
            np.testing.assert_allclose(res["stress"], emt.get_stress(), atol=1e-10)
        assert res["energy_std"] > 0 and 0 <= res["prob_exceed"] <= 1

    dyn.attach(check, interval=1)
    dyn.run(12)
    assert seen[0] is True  # the first structure is always labelled
    assert calc.state.reference_calls == sum(seen) >= 3
    assert len(ensemble.data) == calc.state.reference_calls
    first = ensemble.data.structures[0]
    assert ensemble.data.energy_offset == pytest.approx(ensemble.data.pretrained_energy(first) - first.get_potential_energy())
    assert calc.decision.calibrator.n == calc.state.reference_calls - 1  # the first is not an error sample


def student_t_calculator(workdir, safety: SafetyConfig, rows: list, reasons: dict):
    """ε = 1 eV with the Gamma prior (1.5, 20): the second structure has P(|e| > ε) above
    5 %, and once it is learned the later ones are below."""
    ensemble = Ensemble.from_config(
        ModelConfig(backbone=str(workdir / "cu.model"), chains=2, cycle_steps=12, batch_size=2, eta_max=1e-3),
        UncertaintyConfig(threshold=1.0, threshold_unit="eV", calibration_shape=1.5, calibration_rate=20.0), seed=0,
    )
    calc = OnTheFlyCalculator(ensemble, make_reference("ase.calculators.emt:EMT"), safety=safety,
                              on_step=rows.append,
                              on_intervention=lambda atoms, iv: reasons.update({iv.force_call: iv.reason}))
    return ensemble, calc


def test_student_t_rule_decides_without_safety_nets(workdir):
    """No forced calls: the calibrated probability alone causes a call (P > 5 %), a
    confident ensemble makes none (P ≤ 5 %), and on a step without a call the MD gets the
    ensemble mean, not the reference."""
    rows, reasons = [], {}
    ensemble, calc = student_t_calculator(workdir, SafetyConfig(force_call_after=None), rows, reasons)
    atoms = read(workdir / "cu4.xyz")
    atoms.calc = calc
    dyn = VelocityVerlet(atoms, 2 * units.fs)
    md_saw_mean = []

    def check():
        if not calc.results["reference_called"]:
            mean = ensemble.predict(atoms)
            reference = atoms.copy()
            reference.calc = EMT()
            np.testing.assert_array_equal(atoms.get_forces(), mean.forces)  # what VelocityVerlet uses
            assert atoms.get_potential_energy() == float(mean.energy[0])
            assert np.abs(atoms.get_forces() - reference.get_forces()).max() > 1e-3
            md_saw_mean.append(dyn.nsteps)

    dyn.attach(check, interval=1)
    dyn.run(8)
    called = [r for r in rows if r["reference_called"]]
    assert all(r["reference_called"] for r in rows if r["prob_exceed"] > 0.05)  # no step outside the promise
    assert all(r["prob_exceed"] <= 0.05 for r in rows if not r["reference_called"])
    assert "probability" in reasons.values() and "forced" not in reasons.values()
    assert all(r["prob_exceed"] > 0.05 for r in called if reasons[r["force_call"]] == "probability")
    assert len(called) < len(rows) and len(md_saw_mean) >= 5
    assert calc.state.steps_uncontrolled == 0 and all(r["uncontrolled"] == "" for r in rows)


@pytest.mark.parametrize("force_threshold, force_calibration",
                         [(2.5, "components"), (3.5, "components"), (2.5, "largest_atom")])
def test_force_criterion_decides_on_the_largest_atom_force_error(workdir, force_threshold, force_calibration):
    """criterion = "forces": a step without a call has P(max_a |ΔF_a| > ε_F) ≤ 5 %, a call
    by the probability has it above 5 %. At ε_F = 2.5 eV/Å the force rule calls where the
    energy rule alone would not (P(|e| > ε) ≤ 5 %); at 3.5 eV/Å it is confident between
    the calibration checks. Each call feeds the force calibration (one z², or its largest
    atom error) and records max_a |ΔF_a|; the force calibration survives a checkpoint,
    and a resume under the other force calibration is refused with the fix."""
    rows, ivs = [], []
    u = UncertaintyConfig(threshold=10.0, threshold_unit="eV", calibration_shape=1.5, calibration_rate=20.0,
                          criterion="forces", force_threshold=force_threshold, force_threshold_unit="eV/A",
                          force_calibration=force_calibration)
    ensemble = Ensemble.from_config(
        ModelConfig(backbone=str(workdir / "cu.model"), chains=2, cycle_steps=12, batch_size=2, eta_max=1e-3), u, seed=0)
    calc = OnTheFlyCalculator(ensemble, make_reference("ase.calculators.emt:EMT"),
                              safety=SafetyConfig(force_call_after=None), on_step=rows.append,
                              on_intervention=lambda atoms, iv: ivs.append((atoms, iv)))
    atoms = read(workdir / "cu4.xyz")
    atoms.calc = calc
    VelocityVerlet(atoms, 2 * units.fs).run(10)
    by_reason = {iv.force_call: iv.reason for _, iv in ivs}
    by_probability = [r for r in rows if by_reason.get(r["force_call"]) == "probability"]
    assert all(r["prob_force_exceed"] > 0.05 for r in by_probability)
    assert all(r["prob_force_exceed"] <= 0.05 for r in rows if not r["reference_called"])
    if force_threshold == 2.5:
        assert any(r["prob_exceed"] <= 0.05 for r in by_probability)  # called for the forces alone
    else:
        assert any(not r["reference_called"] for r in rows)
    assert calc.decision.force_calibrator.n == calc.state.reference_calls - 1
    for label, iv in ivs[1:]:
        step = next(r for r in rows if r["force_call"] == iv.force_call)
        assert iv.force_error_max > 0 and iv.prob_force_exceed == step["prob_force_exceed"]
    again = OnTheFlyCalculator(ensemble, make_reference("ase.calculators.emt:EMT"))
    again.load_state_dict(calc.state_dict())
    assert again.decision.force_calibrator == calc.decision.force_calibrator
    assert type(again.decision.force_calibrator) is FORCE_CALIBRATIONS[force_calibration]
    assert again.decision.criterion == "forces" and again.decision.force_threshold_eV_A == force_threshold
    assert calc.schedule.force_threshold_eV_A == force_threshold  # its force misses are critical too
    other = next(k for k in FORCE_CALIBRATIONS if k != force_calibration)
    ensemble.uncertainty = u.model_copy(update={"force_calibration": other})
    with pytest.raises(FlytuneError, match=f"force_calibration = '{force_calibration}' to resume"):
        OnTheFlyCalculator(ensemble, make_reference("ase.calculators.emt:EMT")).load_state_dict(calc.state_dict())


@pytest.mark.parametrize("deviation_threshold", [1e-9, 1.0])
def test_force_deviation_trigger_calls_where_the_members_disagree(workdir, deviation_threshold):
    """trigger = "force_deviation" (the DP-GEN / aims-PAX baseline): after the first label,
    a call exactly where the members' largest per-atom force deviation (2e-5 eV/Å after
    12-step chains) exceeds the threshold, whatever the calibrated probability says, and no
    calibration checks; the calibration is still fed."""
    rows, ivs = [], []
    u = UncertaintyConfig(threshold=10.0, threshold_unit="eV", calibration_shape=1.5, calibration_rate=20.0,
                          trigger="force_deviation", force_deviation_threshold=deviation_threshold)
    ensemble = Ensemble.from_config(
        ModelConfig(backbone=str(workdir / "cu.model"), chains=2, cycle_steps=12, batch_size=2, eta_max=1e-3), u, seed=0)
    calc = OnTheFlyCalculator(ensemble, make_reference("ase.calculators.emt:EMT"),
                              safety=SafetyConfig(force_call_after=None), on_step=rows.append,
                              on_intervention=lambda atoms, iv: ivs.append(iv))
    atoms = read(workdir / "cu4.xyz")
    atoms.calc = calc
    VelocityVerlet(atoms, 2 * units.fs).run(6)
    reasons = [iv.reason for iv in ivs]
    assert reasons[0] == "first" and all(r["force_deviation_eV_A"] > 0 for r in rows[1:])
    if deviation_threshold < 1e-6:
        assert reasons[1:] == ["force deviation"] * 6  # every later step
    else:
        assert reasons == ["first"]  # no calibration check either
    assert calc.decision.calibrator.n == calc.state.reference_calls - 1


def test_a_call_cap_that_blocks_the_rule_is_counted_per_step(workdir):
    """With max_reference_calls = 1 the rule's second call is refused: that step and every
    later one with P(|e| > ε) > 5 % is marked, with its cause."""
    rows, reasons = [], {}
    ensemble, calc = student_t_calculator(workdir, SafetyConfig(force_call_after=None, max_reference_calls=1),
                                          rows, reasons)
    atoms = read(workdir / "cu4.xyz")
    atoms.calc = calc
    VelocityVerlet(atoms, 2 * units.fs).run(5)
    assert rows[0]["reference_called"] and not any(r["reference_called"] for r in rows[1:])
    marked = [r for r in rows if r["uncontrolled"]]
    assert marked and all(r["uncontrolled"] == "call cap" and r["prob_exceed"] > 0.05 for r in marked)
    assert all(r["prob_exceed"] <= 0.05 for r in rows[1:] if not r["uncontrolled"])
    assert calc.state.uncontrolled == {"call cap": len(marked)}


@pytest.mark.parametrize("label_misfit,misfit_as",
                         [(False, "spread"), (True, "spread"), (True, "bias"), (True, "correction")])
def test_members_that_miss_their_labels_do_not_silence_the_rule(workdir, label_misfit, misfit_as):
    """Two chains of 12 steps cannot fit or spread: after the first label the members miss
    it by more than σ_E and agree with each other, so σ ≈ σ_E. The published rule
    (``label_misfit = false``) then never calls again while the errors exceed ε; with the
    misfit in σ (:func:`trusted_sigma`, :class:`LabelMisfit`), carried as the expected
    error (:func:`carried_error`) or taken off the prediction (:meth:`LabelMisfit.corrected`)
    every step with |e| > ε is called, and each step's σ, expected error and energy are the
    ensemble's with the misfit of the newest label."""
    from ase import Atoms
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    from flytune.otf.decision import carried_error, trusted_sigma

    ensemble = Ensemble.from_config(
        ModelConfig(backbone=str(workdir / "cu.model"), chains=2, cycle_steps=12, batch_size=2, eta_max=1e-3),
        UncertaintyConfig(threshold=0.05, threshold_unit="eV", label_misfit=label_misfit, label_misfit_as=misfit_as,
                          calibration_checks=5 if label_misfit else 0), seed=0,
    )
    rows, misfits, raw = [], [], {}

    def on_update(record):  # the energy misfit at the newest label, recomputed here
        label = ensemble.data.structures[-1]
        target = label.get_potential_energy() + ensemble.data.energy_offset
        misfits.append((record["label_misfit_eV"], abs(float(ensemble.predict(label).energy[0]) - target)))

    interventions = []
    calc = OnTheFlyCalculator(ensemble, make_reference("ase.calculators.emt:EMT"), on_step=rows.append,
                              on_update=on_update, on_intervention=lambda label, iv: interventions.append(iv))
    predict = ensemble.predict

    def spy(structures, **kwargs):  # the ensemble's own σ at each force call, and the misfit then
        out = predict(structures, **kwargs)
        if calc.state.force_calls not in raw:  # the first prediction of a force call: its structure
            structure = structures if isinstance(structures, Atoms) else structures[0]
            raw[calc.state.force_calls] = (structure.copy(), float(out.energy_std[0]), calc.misfit,
                                           out.member_energy[:, 0])
        return out

    ensemble.predict = spy
    atoms = read(workdir / "cu4.xyz")
    MaxwellBoltzmannDistribution(atoms, temperature_K=500, rng=np.random.default_rng(0))
    atoms.calc = calc
    errors = []

    def score():
        used = atoms.get_potential_energy()  # (the first call sets the offset)
        emt = atoms.copy()
        emt.calc = EMT()
        errors.append(abs(emt.get_potential_energy() + ensemble.data.energy_offset - used))

    dyn = VelocityVerlet(atoms, 2 * units.fs)
    score()
    dyn.attach(score, interval=1)
    dyn.run(8)
    called = [r["reference_called"] for r in rows]
    uncalled_errors = [e for e, c in zip(errors, called) if not c]
    for recorded, recomputed in misfits:
        assert recorded == pytest.approx(recomputed, rel=1e-6)
    assert misfits[0][0] > ensemble.model.energy_sigma  # the first update missed its own label by > σ_E
    if not label_misfit:
        assert called == [True] + [False] * 8  # blind: one call, then none
        assert max(uncalled_errors) > 0.05  # while the errors exceed ε
    else:
        assert sum(called) >= 3 and all(e <= 0.05 for e in uncalled_errors)
        for row in rows[1:]:
            structure, sigma, misfit, member_energy = raw[row["force_call"]]
            if misfit_as == "correction":  # the members' spread about their anchors at L
                anchored = misfit.anchored_sigma(structure, member_energy, ensemble.model.energy_sigma)
                assert anchored is not None
                expected = carried_error(anchored, *misfit.carried(structure))[1]
            elif misfit_as == "bias":
                expected = carried_error(sigma, *misfit.carried(structure))[1]
            else:
                expected = trusted_sigma(sigma, ensemble.model.energy_sigma, misfit.at(structure))
            assert row["energy_std_eV"] == pytest.approx(float(expected), rel=1e-9)
        for iv in interventions[1:]:  # the error expected at each call: −d(x) as a bias, none otherwise
            structure, _, misfit, _ = raw[iv.force_call]
            carried = -misfit.carried(structure)[0]
            assert iv.error_mean == pytest.approx(carried if misfit_as == "bias" else 0.0, rel=1e-9, abs=1e-15)
            # as a correction −d(x) was added to the prediction, and the error is the corrected one's
            assert iv.correction == pytest.approx(carried if misfit_as == "correction" else 0.0, rel=1e-9, abs=1e-15)
            assert iv.error == pytest.approx(iv.energy_ref - iv.energy_pred, rel=1e-9)
        if misfit_as in ("bias", "correction"):
            assert any((iv.error_mean if misfit_as == "bias" else iv.correction) != 0 for iv in interventions[1:])


def test_a_deferred_label_sets_the_misfit_from_the_prediction_it_corrected(workdir):
    """With the update deferred, the members that missed a label go on predicting: the
    misfit is that prediction's, at once (d_L = −error), and a later update replaces it."""
    from flytune.config import UpdatesConfig

    ensemble = Ensemble.from_config(
        ModelConfig(backbone=str(workdir / "cu.model"), chains=2, cycle_steps=12, batch_size=2, eta_max=1e-3),
        UncertaintyConfig(threshold=0.05, threshold_unit="eV"), seed=0,
    )
    interventions, updates = [], []
    calc = OnTheFlyCalculator(ensemble, make_reference("ase.calculators.emt:EMT"),
                              updates=UpdatesConfig(policy="deferred", max_pending=3, critical_factor=1e6),
                              on_intervention=lambda label, iv: interventions.append((label, iv, calc.misfit)),
                              on_update=updates.append)
    atoms = read(workdir / "cu4.xyz")
    atoms.calc = calc
    VelocityVerlet(atoms, 2 * units.fs).run(8)
    deferred = [(label, iv, m) for label, iv, m in interventions if iv.update == "deferred"]
    assert deferred and len(updates) >= 2  # the first label's update, then one for 3 pending labels
    for label, iv, misfit in deferred:
        assert np.array_equal(misfit.positions, label.positions)
        assert misfit.energy_residual_eV == pytest.approx(-iv.error, abs=1e-12)
    learned = [m for _, iv, m in interventions if iv.update != "deferred"][1:]
    assert learned and all(abs(m.energy_residual_eV) == pytest.approx(u["label_misfit_eV"])
                           for m, u in zip(learned, updates[1:]))


def test_a_corrected_run_gives_the_md_the_reference_at_a_waiting_label(workdir):
    """``label_misfit_as = "correction"``, update deferred: the misfit of a waiting label is
    the members' own miss there (not the corrected prediction's), so the prediction the MD
    is given at that structure is the reference's energy (+ Δ) and forces, each step's energy
    is the members' mean less d(x), and the errors at calls are the corrected prediction's."""
    from flytune.config import UpdatesConfig

    ensemble = Ensemble.from_config(
        ModelConfig(backbone=str(workdir / "cu.model"), chains=2, cycle_steps=12, batch_size=2, eta_max=1e-3),
        UncertaintyConfig(threshold=0.3, threshold_unit="eV", label_misfit_as="correction"), seed=0,
    )
    interventions, rows = [], []
    calc = OnTheFlyCalculator(ensemble, make_reference("ase.calculators.emt:EMT"),
                              updates=UpdatesConfig(policy="deferred", max_pending=3, critical_factor=1e6),
                              on_intervention=lambda label, iv: interventions.append((label, iv, calc.misfit)),
                              on_step=rows.append)
    predict, members = ensemble.predict, {}

    def spy(structures, **kwargs):  # the members' mean at each force call's structure
        out = predict(structures, **kwargs)
        members.setdefault(calc.state.force_calls, (float(out.energy[0]), out.forces.copy()))
        return out

    ensemble.predict = spy
    atoms = read(workdir / "cu4.xyz")
    atoms.calc = calc
    VelocityVerlet(atoms, 2 * units.fs).run(8)
    deferred = [(label, iv, m) for label, iv, m in interventions if iv.update == "deferred"]
    assert deferred
    for label, iv, misfit in deferred:  # the members that predicted at the label go on predicting
        energy, forces = members[iv.force_call]
        assert misfit.energy_residual_eV == pytest.approx(energy - iv.energy_ref, abs=1e-12)
        energy, forces = misfit.corrected(label, energy, forces)
        assert energy == pytest.approx(iv.energy_ref, abs=1e-12)
        assert np.allclose(forces, label.get_forces(apply_constraint=False), atol=1e-12)
    corrected = [iv for _, iv, _ in interventions[1:] if iv.correction != 0]
    assert corrected and all(iv.error_mean == 0 for _, iv, _ in interventions)
    for iv in corrected:
        assert iv.energy_pred == pytest.approx(members[iv.force_call][0] + iv.correction, abs=1e-12)
        assert iv.error == pytest.approx(iv.energy_ref - iv.energy_pred, abs=1e-12)
    uncalled = [r for r in rows[1:] if not r["reference_called"]]
    assert any(r["energy_eV"] != pytest.approx(members[r["force_call"]][0], abs=1e-9) for r in uncalled)


def test_a_second_order_correction_adds_the_fitted_curvature_and_learns_it_at_calls(workdir):
    """``correction_order = 2``: each step's prediction is the members' mean less d(x) plus
    κ̄·q̂ (q̂ the members' change beyond first order from the newest label, κ̄ the fit before
    the step); every call after the first, with a label to anchor on, feeds the fit, which
    a checkpoint carries."""
    from ase import Atoms

    ensemble = Ensemble.from_config(
        ModelConfig(backbone=str(workdir / "cu.model"), chains=2, cycle_steps=12, batch_size=2, eta_max=1e-3),
        UncertaintyConfig(threshold=0.05, threshold_unit="eV", label_misfit_as="correction", correction_order=2),
        seed=0,
    )
    interventions = []
    calc = OnTheFlyCalculator(ensemble, make_reference("ase.calculators.emt:EMT"),
                              on_intervention=lambda label, iv: interventions.append(iv))
    predict, seen = ensemble.predict, {}

    def spy(structures, **kwargs):  # the members' mean, the misfit and κ̄ at each force call's structure
        out = predict(structures, **kwargs)
        structure = structures if isinstance(structures, Atoms) else structures[0]
        seen.setdefault(calc.state.force_calls, (structure.copy(), float(out.energy[0]), out.forces.copy(),
                                                 calc.misfit, calc.curvature_fit.ratio))
        return out

    ensemble.predict = spy
    atoms = read(workdir / "cu4.xyz")
    atoms.calc = calc
    VelocityVerlet(atoms, 2 * units.fs).run(8)
    anchored = [iv for iv in interventions[1:] if seen[iv.force_call][3] is not None]
    assert len(anchored) >= 2 and calc.curvature_fit.n == len(anchored)
    for iv in anchored:
        structure, energy, forces, misfit, ratio = seen[iv.force_call]
        q = misfit.curvature(structure, energy, forces)[0]
        assert (iv.curvature, iv.curvature_ratio) == (pytest.approx(q, rel=1e-9), ratio)
        assert iv.correction == pytest.approx(-misfit.carried(structure)[0] + ratio * q, rel=1e-9, abs=1e-12)
        assert iv.error == pytest.approx(iv.energy_ref - iv.energy_pred, rel=1e-9)
    assert calc.curvature_fit.ratio != 0 and any(iv.curvature_ratio != 0 for iv in anchored)
    resumed = OnTheFlyCalculator(ensemble, make_reference("ase.calculators.emt:EMT"))
    resumed.load_state_dict(calc.state_dict())
    assert resumed.curvature_fit == calc.curvature_fit


def test_a_critical_miss_after_an_update_that_missed_waits_for_the_cost_rule(workdir):
    """Deferred, critical_factor 1: a call whose |e| > ε updates at once only while the last
    update learned its own newest label (its misfit there, as σ, gives P(|e| > ε) within
    the level); after one that did not, such calls wait ("deferred: critical, but ...") and
    the cost rule or the queue decides."""
    from flytune.config import UpdatesConfig

    ensemble = Ensemble.from_config(
        ModelConfig(backbone=str(workdir / "cu.model"), chains=2, cycle_steps=12, batch_size=2, eta_max=1e-3),
        UncertaintyConfig(threshold=0.05, threshold_unit="eV"), seed=0,
    )
    events = []
    calc = OnTheFlyCalculator(ensemble, make_reference("ase.calculators.emt:EMT"),
                              updates=UpdatesConfig(policy="deferred", max_pending=5),
                              on_intervention=lambda label, iv: events.append(("call", iv)),
                              on_update=lambda record: events.append(("update", record)))
    atoms = read(workdir / "cu4.xyz")
    atoms.calc = calc
    VelocityVerlet(atoms, 2 * units.fs).run(12)
    missed = before = False  # as the last update left it, and before that update
    waited = 0
    for kind, event in events:
        if kind == "update":  # reported before the call that started it
            before, missed = missed, not event["learned"]
        elif abs(event.error) > 0.05 and not event.first:
            if before if event.labels_learned else missed:  # waits, or another rule is due
                assert event.update != "critical"
                waited += event.update.startswith("deferred: critical, but the last update missed")
            else:
                assert event.update == "critical"  # (the schedule's own test has this case)
    assert waited > 0
    updates = [event for kind, event in events if kind == "update"]
    assert all(u["learned"] for u in updates if u["label_misfit_eV"] <= ensemble.model.energy_sigma)
    assert not all(u["learned"] for u in updates)


@pytest.mark.parametrize("force_threshold", [1.5, 2.5])
def test_under_the_force_criterion_an_update_learns_its_label_only_within_eps_f(workdir, force_threshold):
    """criterion = "forces", deferred: an update has learned its newest label only if no
    atom's force is off by more than ε_F there and P(max_a |ΔF_a| > ε_F) from the per-atom
    force stds there is within 5 % (the energy threshold, 10 eV, never objects here); a
    force miss above ε_F after an update that did not learn waits instead of updating at
    once (on a periodic cell whose max-atom force errors sit near ε_F, updating at every
    such call cost one update per frame)."""
    from flytune.config import UpdatesConfig

    u = UncertaintyConfig(threshold=10.0, threshold_unit="eV", criterion="forces", force_threshold=force_threshold,
                          force_threshold_unit="eV/A")
    ensemble = Ensemble.from_config(
        ModelConfig(backbone=str(workdir / "cu.model"), chains=2, cycle_steps=12, batch_size=2, eta_max=1e-3), u, seed=0)
    records, expected, ivs = [], [], []

    def on_update(record):  # the premise, measured here with the members the update left
        label = calc.newest[0]
        pred = ensemble.predict([label])
        residual = np.linalg.norm(pred.forces - label.get_forces(apply_constraint=False), axis=1).max()
        prob = calc.decision.prob_force_exceed(np.sqrt(pred.forces_var.mean(axis=1)))
        expected.append(bool(residual <= force_threshold and prob <= 0.05))
        records.append(record)

    calc = OnTheFlyCalculator(ensemble, make_reference("ase.calculators.emt:EMT"),
                              updates=UpdatesConfig(policy="deferred", max_pending=3), on_update=on_update,
                              on_intervention=lambda atoms, iv: ivs.append(iv))
    atoms = read(workdir / "cu4.xyz")
    atoms.calc = calc
    VelocityVerlet(atoms, 2 * units.fs).run(12)
    assert len(records) > 2 and [r["learned"] for r in records] == expected
    assert not all(expected)
    if force_threshold == 2.5:
        assert expected[0]  # the first update learned its label, later ones did not
    missed = [iv for iv in ivs[1:] if iv.force_error_max > force_threshold]
    if force_threshold == 1.5:
        assert missed and all(iv.update.startswith("deferred: critical, but the last update missed") or
                              iv.update == "max pending" for iv in missed)


def test_an_update_that_misses_its_newest_label_runs_more_cycles_up_to_max_cycles(workdir):
    """[updates] max_cycles: a blocking update that has not learned its newest label runs
    one more cycle on the same labels (the data set does not grow), up to max_cycles; one
    that learned it stops; each record gives its cycles and all their chain steps."""
    from flytune.config import UpdatesConfig

    ensemble = Ensemble.from_config(
        ModelConfig(backbone=str(workdir / "cu.model"), chains=2, cycle_steps=12, batch_size=2, eta_max=1e-3),
        UncertaintyConfig(threshold=0.05, threshold_unit="eV"), seed=0,
    )
    updates = []
    calc = OnTheFlyCalculator(ensemble, make_reference("ase.calculators.emt:EMT"),
                              updates=UpdatesConfig(policy="every", max_cycles=3), on_update=updates.append)
    atoms = read(workdir / "cu4.xyz")
    atoms.calc = calc
    VelocityVerlet(atoms, 2 * units.fs).run(10)
    assert updates and [u["labels"] for u in updates] == list(range(1, len(updates) + 1))
    assert all(1 <= u["cycles"] <= 3 and u["chain_steps"] == u["cycles"] * 2 * 12 for u in updates)
    assert all(0 < u["worker_s"] <= u["update_s"] for u in updates)  # every cycle's compute, within the wall time
    assert all(u["learned"] or u["cycles"] == 3 for u in updates)  # stops only when learned or at the cap
    assert any(u["cycles"] > 1 for u in updates)


def test_final_cycles_run_over_all_labels_once_after_the_md(workdir):
    """[updates] final_cycles: after the MD, cycles over all labels with no label favoured,
    booked as updates with reason "final" that learn no new label; asking again does
    nothing, and a later update that learns labels makes them due again."""
    ensemble = Ensemble.from_config(
        ModelConfig(backbone=str(workdir / "cu.model"), chains=2, cycle_steps=12, batch_size=2, eta_max=1e-3),
        UncertaintyConfig(threshold=0.05, threshold_unit="eV"), seed=0,
    )
    updates = []
    calc = OnTheFlyCalculator(ensemble, make_reference("ase.calculators.emt:EMT"), on_update=updates.append)
    atoms = read(workdir / "cu4.xyz")
    atoms.calc = calc
    VelocityVerlet(atoms, 2 * units.fs).run(4)
    labels, during_md = len(ensemble.data), len(updates)
    before = [{k: v.clone() for k, v in m.items()} for m in ensemble.members]
    calc.learn_final(2)
    assert [u["reason"] for u in updates[during_md:]] == ["final", "final"]
    assert all(u["labels_learned"] == 0 and u["labels"] == labels and u["chain_steps"] == 2 * 12
               for u in updates[during_md:])
    assert len(ensemble.data) == labels and calc.state.final_cycles == 2
    assert any(not torch.equal(m[k], b[k]) for m, b in zip(ensemble.members, before) for k in m)
    calc.learn_final(2)
    assert len(updates) == during_md + 2  # done already
    VelocityVerlet(atoms, 2 * units.fs).run(6)  # the run extended: new labels, new final cycles
    assert len(ensemble.data) > labels and calc.state.final_cycles == 0
    calc.learn_final(1)
    assert updates[-1]["reason"] == "final" and calc.state.final_cycles == 1


def test_stress_is_declared_only_for_periodic_structures(workdir):
    """A molecule: `get_stress()` is refused up front with a message that says why, before
    any prediction or reference call; a periodic cell has stress."""
    from ase.build import molecule
    from ase.calculators.calculator import PropertyNotImplementedError

    ensemble = Ensemble.from_config(ModelConfig(backbone=str(workdir / "cu.model"), chains=2, cycle_steps=12), seed=0)
    calc = OnTheFlyCalculator(ensemble, make_reference("ase.calculators.emt:EMT"))
    water = molecule("H2O")
    water.calc = calc
    with pytest.raises(PropertyNotImplementedError, match="periodic in all three directions"):
        water.get_stress()
    assert calc.state.force_calls == 0
    water.get_forces()
    assert "stress" not in calc.implemented_properties
    cell = read(workdir / "cu4.xyz")
    periodic = OnTheFlyCalculator(ensemble.__class__.from_config(ensemble.config, seed=0),
                                  make_reference("ase.calculators.emt:EMT"))
    cell.calc = periodic
    assert cell.get_stress().shape == (6,) and "stress" in periodic.implemented_properties


def test_composition_change_is_refused(workdir):
    ensemble = Ensemble.from_config(ModelConfig(backbone=str(workdir / "cu.model"), chains=2, cycle_steps=12), seed=0)
    calc = OnTheFlyCalculator(ensemble, make_reference("ase.calculators.emt:EMT"))
    atoms = read(workdir / "cu4.xyz")
    atoms.calc = calc
    atoms.get_forces()
    smaller = atoms[:3]
    smaller.calc = calc
    with pytest.raises(FlytuneError, match="composition changed"):
        smaller.get_forces()


# -- run directory, restart ------------------------------------------------------------
def run_cli(workdir, config, env_extra=None, timeout=600):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "flytune", "run", str(config), "--quiet"], cwd=workdir,
                          env=env, capture_output=True, text=True, timeout=timeout)


def label_records(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "checkpoint" / "labels.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(workdir):
    config = write_config(workdir, "full")
    result = run_cli(workdir, config)
    assert result.returncode == 0, result.stderr
    return workdir / "full"


def test_run_directory_contents(uninterrupted):
    rd = uninterrupted
    summary = json.loads((rd / "summary.json").read_text())
    for key in ("steps", "reference_calls", "exceed_fraction", "rmse_at_interventions_eV",
                "time_md_s", "time_reference_s", "time_update_s"):
        assert key in summary
    assert summary["steps"] == 15 and summary["reference_calls"] >= 5
    # the cost figures: one update per call (policy "every"), none of the steps outside the promise
    records = update_records(rd)
    updates = update_records(rd, final=False)
    assert summary["updates"] == len(updates) == summary["reference_calls"] and summary["labels_per_update"] == 1
    # [updates] final_cycles = 1 (the default): one cycle over all labels after the last MD step, booked apart
    assert records[:-1] == updates and records[-1]["reason"] == "final" and records[-1]["labels_learned"] == 0
    assert records[-1]["labels"] == summary["reference_calls"] and records[-1]["step"] == summary["steps"]
    assert summary["final_cycles"] == 1 and summary["final_cycles_s"] == pytest.approx(records[-1]["update_s"])
    assert summary["time_update_s"] == pytest.approx(sum(u["update_s"] for u in records))
    assert all(u["chain_steps"] == 2 * 12 and u["s_per_chain_step"] > 0 for u in records)
    # the split of an update's wall time: the chains' own compute (measured where they ran) and the rest
    assert all(0 < u["worker_s"] <= u["update_s"] for u in records)
    assert all(u["overhead_s"] == pytest.approx(u["update_s"] - u["worker_s"]) for u in updates)
    assert summary["steps_uncontrolled"] == 0 and summary["uncontrolled_by_cause"] == {}
    t_ref = sorted(json.loads(line)["reference_s"] for line in (rd / "interventions.jsonl").read_text().splitlines())
    assert summary["median_reference_s"] == pytest.approx(float(np.median(t_ref)))
    assert summary["speedup_vs_reference_md"] == pytest.approx(15 * np.median(t_ref) / summary["wall_s"])
    assert summary["reference_over_prediction"] == pytest.approx(np.median(t_ref) / summary["median_predict_s"])
    labels = read(rd / "labels.extxyz", index=":")
    assert len(labels) == summary["reference_calls"] == len(label_records(rd))
    assert all("energy_raw" in a.info and "step" in a.info for a in labels)
    steps = (rd / "steps.csv").read_text().splitlines()
    assert len(steps) == 1 + summary["force_calls"]
    interventions = (rd / "interventions.jsonl").read_text().splitlines()
    assert len(interventions) == summary["reference_calls"]
    assert {"error", "energy_std", "calibrated_std", "shape", "rate", "reference_s", "update_s"} <= set(json.loads(interventions[1]))
    assert len(read(rd / "trajectory.traj", index=":")) == 1 + 15 // 3
    assert (rd / "model.pt").exists()


@pytest.mark.parametrize("kill_at", ["label-written:3", "mid-update:4", "checkpoint-written:5", "checkpoint-written:2"])
def test_sigkill_and_resume_loses_and_duplicates_nothing(workdir, uninterrupted, kill_at):
    name = "kill_" + kill_at.replace(":", "_").replace("-", "_")
    config = write_config(workdir, name)
    killed = run_cli(workdir, config, {"FLYTUNE_KILL_AT": kill_at})
    assert killed.returncode == -9, killed.stderr  # it really died at the fault point
    resumed = run_cli(workdir, config)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    expected, got = label_records(uninterrupted), label_records(workdir / name)
    assert len(got) == len(expected)
    for a, b in zip(expected, got):
        assert a["positions"] == b["positions"] and a["energy"] == b["energy"] and a["forces"] == b["forces"]
    assert len(read(workdir / name / "labels.extxyz", index=":")) == len(expected)
    steps_full = (uninterrupted / "steps.csv").read_text().splitlines()
    steps_resumed = (workdir / name / "steps.csv").read_text().splitlines()
    assert [r.split(",")[:7] for r in steps_full] == [r.split(",")[:7] for r in steps_resumed]
    summary = json.loads((workdir / name / "summary.json").read_text())
    assert summary["reference_calls"] == len(expected)


def test_a_run_with_reference_calls_through_parsl_labels_the_same(workdir, uninterrupted):
    """`[execution] backend = "parsl"` (a local HighThroughputExecutor): the same run makes
    the same calls and gets the same labels as in-process, and says where they ran."""
    config = write_config(workdir, "parsl", **{"[safety]": '[execution]\nbackend = "parsl"\n[safety]'})
    result = run_cli(workdir, config)
    assert result.returncode == 0, result.stderr
    assert "through Parsl" in result.stderr
    expected, got = label_records(uninterrupted), label_records(workdir / "parsl")
    assert len(got) == len(expected)
    for a, b in zip(expected, got):
        assert a["positions"] == b["positions"] and a["energy"] == b["energy"] and a["forces"] == b["forces"]
    assert (workdir / "parsl" / "parsl").is_dir() and (workdir / "parsl" / "reference").is_dir()


DEFERRED = {"[safety]": '[updates]\npolicy = "deferred"\nmax_pending = 4\ncritical_factor = 1e6\n[safety]'}


@pytest.fixture(scope="module")
def deferred(workdir):
    """The run of :func:`uninterrupted` with updates deferred until 4 labels wait (the
    cost rule never fires first: EMT takes milliseconds, an update a second)."""
    result = run_cli(workdir, write_config(workdir, "deferred", **DEFERRED))
    assert result.returncode == 0, result.stderr
    return workdir / "deferred"


def update_records(run_dir: Path, final: bool = True):
    """``updates.jsonl``; ``final = False``: without the cycles after the last MD step."""
    records = [json.loads(line) for line in (run_dir / "updates.jsonl").read_text().splitlines()]
    return records if final else [u for u in records if u["reason"] != "final"]


def test_deferred_updates_learn_every_label_in_fewer_updates(deferred):
    summary = json.loads((deferred / "summary.json").read_text())
    updates = update_records(deferred, final=False)
    interventions = [json.loads(line) for line in (deferred / "interventions.jsonl").read_text().splitlines()]
    assert updates[0]["reason"] == "first" and updates[0]["labels_learned"] == 1
    assert {u["reason"] for u in updates[1:]} <= {"max pending", "end of run"}
    assert all(u["labels_learned"] == 4 for u in updates[1:] if u["reason"] == "max pending")
    assert sum(u["labels_learned"] for u in updates) == summary["reference_calls"] == len(interventions)
    assert summary["updates"] == len(updates) < summary["reference_calls"]
    assert summary["labels_per_update"] == pytest.approx(summary["reference_calls"] / len(updates))
    # each update but the last one's flush follows a call; the other calls were deferred
    assert sum(iv["update"] != "deferred" for iv in interventions) == sum(u["reason"] != "end of run" for u in updates)
    assert summary["labels_pending"] == 0
    assert len(Ensemble.read_state(deferred / "model.pt")["data"]["numbers"]) == summary["reference_calls"]


@pytest.mark.parametrize("kill_at", ["label-written:8", "mid-update:4", "final-cycle:1"])
def test_sigkill_with_labels_pending_loses_and_repeats_none(workdir, deferred, kill_at):
    """Killed with labels 6 and 7 waiting in the checkpoint as label 8 is written, during
    the update that learns labels 2–5, or after the final cycle ran but before it was
    checkpointed: the resumed run has the same labels, calls and updates (one final cycle)
    as the unbroken one."""
    name = "deferred_kill_" + kill_at.replace(":", "_").replace("-", "_")
    config = write_config(workdir, name, **DEFERRED)
    killed = run_cli(workdir, config, {"FLYTUNE_KILL_AT": kill_at})
    assert killed.returncode == -9, killed.stderr
    resumed = run_cli(workdir, config)
    assert resumed.returncode == 0, resumed.stderr
    assert label_records(workdir / name) == label_records(deferred)
    key = lambda u: (u["force_call"], u["reason"], u["labels_learned"], u["labels"])  # noqa: E731
    assert [key(u) for u in update_records(workdir / name)] == [key(u) for u in update_records(deferred)]
    rows = lambda d: [r.split(",")[:7] for r in (d / "steps.csv").read_text().splitlines()]  # noqa: E731
    assert rows(workdir / name) == rows(deferred)


BACKGROUND = {"[safety]": DEFERRED["[safety]"].replace("[safety]", "background = true\n[safety]")}


def assert_every_label_learned_once(run_dir: Path):
    """Every reference call is in the labels exactly once, and the final model learned all."""
    summary = json.loads((run_dir / "summary.json").read_text())
    records = label_records(run_dir)
    assert summary["steps"] == 15 and len(records) == summary["reference_calls"]
    assert len({json.dumps(r["positions"]) for r in records}) == len(records)  # no structure labelled twice
    assert len(Ensemble.read_state(run_dir / "model.pt")["data"]["numbers"]) == len(records)
    assert summary["labels_pending"] == 0
    return summary


def test_background_updates_run_while_the_md_goes_on(workdir):
    """The update runs in a worker process while the MD goes on (on the current ensemble,
    still calling the reference); its chains are swapped in some force calls later."""
    from flytune.config import UpdatesConfig

    ensemble = Ensemble.from_config(
        ModelConfig(backbone=str(workdir / "cu.model"), chains=2, cycle_steps=12, batch_size=2, eta_max=1e-3),
        UncertaintyConfig(threshold=0.05), seed=0,
    )
    records, calls = [], []
    calc = OnTheFlyCalculator(ensemble, make_reference("conftest:SlowEMT", {"delay": 0.1}),
                              safety=SafetyConfig(force_call_after=3), on_update=records.append,
                              on_intervention=lambda atoms, iv: calls.append(iv),
                              updates=UpdatesConfig(policy="deferred", background=True, max_pending=4,
                                                    critical_factor=1e6))
    atoms = read(workdir / "cu4.xyz")
    atoms.calc = calc
    with ensemble:
        VelocityVerlet(atoms, 2 * units.fs).run(40)
        calc.learn_pending("end of run")
    background = [r for r in records if r["reason"].startswith("background: ")]
    assert background and all(r["force_call"] > r["started_force_call"] for r in background)  # the MD went on
    # one that finished during the MD (not waited for at the end) kept the MD waiting only
    # to read its chains (the first one also waits for the workers to start)
    polled = [r for r in background[1:] if r["force_call"] < calc.state.force_calls]
    assert all(r["waited_s"] < 0.5 * r["update_s"] for r in polled)
    assert sum(r["labels_learned"] for r in records) == calc.state.reference_calls == len(ensemble.data)
    assert ensemble.learning == 0 and not calc.schedule.pending
    assert calc.state.time_update_s == pytest.approx(sum(r["waited_s"] for r in records))
    # calls made while an update shared the machine are marked
    assert not calls[0].update_running and any(iv.update_running for iv in calls)


def test_the_speedup_prices_the_reference_at_the_calls_made_alone():
    """A call that shared the cores with a background update is slower than the reference
    alone: t_ref leaves those out, unless every call was made so."""
    rows = [{"reference_s": t, "update_running": running} for t, running in ((1.0, False), (1.2, False),
                                                                          (3.0, True), (3.1, True), (2.9, True))]
    steps = {"step": np.arange(11), "predict_s": np.full(11, 0.1)}
    figures = cost_figures(steps, rows, [], 10.0)
    assert figures["median_reference_s"] == pytest.approx(1.1)
    assert figures["speedup_vs_reference_md"] == pytest.approx(10 * 1.1 / 10.0)
    contended = cost_figures(steps, [r for r in rows if r["update_running"]], [], 10.0)
    assert contended["median_reference_s"] == pytest.approx(3.0)


def test_sigkill_during_a_background_update_loses_no_label(workdir):
    name = "background_kill"
    config = write_config(workdir, name, **BACKGROUND)
    killed = run_cli(workdir, config, {"FLYTUNE_KILL_AT": "label-written:8"})
    assert killed.returncode == -9, killed.stderr
    checkpoint = torch.load(workdir / name / "checkpoint" / "checkpoint.pt", weights_only=True)
    assert checkpoint["calculator"]["schedule"]["pending"]  # labels not yet learned when it died
    resumed = run_cli(workdir, config)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    assert_every_label_learned_once(workdir / name)


def test_steps_outside_the_promise_are_named_in_the_summary_and_the_final_line(workdir):
    config = write_config(workdir, "capped", steps=6, **{"force_call_after = 3": "max_reference_calls = 2"})
    result = run_cli(workdir, config)
    assert result.returncode == 0, result.stderr
    summary = json.loads((workdir / "capped" / "summary.json").read_text())
    marked = [r for r in (workdir / "capped" / "steps.csv").read_text().splitlines()[1:] if "call cap" in r]
    n = summary["steps_uncontrolled"]
    assert n == len(marked) >= 3 and summary["uncontrolled_by_cause"] == {"call cap": n}
    line = f"{n} of {summary['force_calls']} steps ran with P(|e|>ε) > 5 % and no call: call cap ({n})"
    assert line in " ".join((result.stdout + result.stderr).split())


@pytest.mark.parametrize("cut_update", [1, 3])
def test_stop_during_an_update_redoes_it_on_resume(workdir, uninterrupted, monkeypatch, cut_update):
    """Ctrl-C during an update (the first one, before any checkpoint, or a later one) keeps
    no cut posterior: the run stops with the label on disk, and the same command replays it
    (no second reference call) and redoes the update in full, as if never stopped."""
    import threading

    name = f"cut_{cut_update}"
    config = load_run_config(write_config(workdir, name))
    stop, updates = threading.Event(), []

    def progress(chain, step, mean_ll):
        if chain == 0 and step == 3:
            updates.append(step)
            if len(updates) == cut_update:
                stop.set()

    first = run(config, log=lambda m: None, stop=stop, on_update_progress=progress)
    assert first["stopped"].startswith("interrupted during the update")
    assert len(label_records(workdir / name)) == cut_update  # the cut update's label is on disk
    assert first["reference_calls"] == cut_update - 1
    model = workdir / name / "model.pt"  # the last checkpoint's ensemble, without the cut update
    assert model.exists() == (cut_update > 1)
    if model.exists():
        with Ensemble.load(model) as saved:
            assert len(saved.data) == cut_update - 1
    compute, calls = Reference.compute, []
    monkeypatch.setattr(Reference, "compute", lambda self, atoms, **kw: calls.append(1) or compute(self, atoms, **kw))
    logs = []
    summary = run(config, log=logs.append)
    assert summary["stopped"] is None and "1 label(s) to replay" in logs[0]
    expected, got = label_records(uninterrupted), label_records(workdir / name)
    assert got == expected
    assert len(calls) == len(expected) - cut_update  # the kept label was not recomputed
    full, resumed = ((d / "steps.csv").read_text().splitlines() for d in (uninterrupted, workdir / name))
    assert [r.split(",")[:7] for r in full] == [r.split(",")[:7] for r in resumed]


def test_second_process_is_refused(workdir):
    from flytune.otf.rundir import RunDirectory

    holder = RunDirectory(workdir / "locked")
    holder.lock()
    try:
        config = write_config(workdir, "locked")
        result = run_cli(workdir, config)
        assert result.returncode == 2 and "in use" in result.stderr
    finally:
        holder.unlock()


# -- reference failures ----------------------------------------------------------------
@pytest.mark.parametrize("mode", ["raise", "nan"])
def test_reference_failure_retries_then_stops_with_checkpoint(workdir, mode):
    name = f"fail_{mode}"
    extra = f'retries = 2\n[reference.options]\nmode = "{mode}"\nsucceed_first = 2\n'
    path = write_config(workdir, name, reference="conftest:FailingCalculator", reference_extra=extra)
    FailingCalculator.calls = 0
    with pytest.raises(FlytuneError, match="after 3 attempts") as info:
        run(load_run_config(path), log=lambda m: None)
    message = str(info.value)
    assert "checkpoint is intact" in message and "Cu4" in message
    assert FailingCalculator.calls == 2 + 3  # two good calls, then 1 try + 2 retries
    labels = label_records(workdir / name)
    assert len(labels) == 2 and len(read(workdir / name / "labels.extxyz", index=":")) == 2
    summary = json.loads((workdir / name / "summary.json").read_text())
    assert summary["stopped"].startswith("reference failure")
    # the fixed reference resumes the run from the intact checkpoint and keeps both labels
    path.write_text(path.read_text().replace(f'mode = "{mode}"', 'mode = "ok"'))
    logs = []
    summary = run(load_run_config(path), log=logs.append)
    assert any("resuming" in line for line in logs)
    assert summary["steps"] == 15 and summary["stopped"] is None
    assert label_records(workdir / name)[:2] == labels


def test_reference_failure_skip_policy(workdir):
    extra = 'retries = 1\non_failure = "skip"\n[reference.options]\nmode = "raise"\nsucceed_first = 2\n'
    path = write_config(workdir, "fail_skip", reference="conftest:FailingCalculator", reference_extra=extra)
    FailingCalculator.calls = 0
    summary = run(load_run_config(path), log=lambda m: None)
    assert summary["steps"] == 15 and summary["reference_calls"] == 2
    assert summary["skipped_reference_failures"] >= 1


def test_the_published_rule_is_named_when_chosen(workdir):
    """``label_misfit = false`` is allowed (to reproduce the paper) but said at the start;
    the summary counts the calls by reason either way."""
    published = "threshold = 0.05\nlabel_misfit = false\ncalibration_checks = 0"
    path = write_config(workdir, "published", steps=2, **{"threshold = 0.05": published})
    logs = []
    summary = run(load_run_config(path), log=logs.append)
    assert any("label_misfit = false and uncertainty.calibration_checks = 0" in line and "published rule" in line
               for line in logs)
    assert summary["calls_by_reason"]["first"] == 1 and summary["calls_by_label_misfit"] == 0
    assert sum(summary["calls_by_reason"].values()) == summary["reference_calls"]


# -- configuration ---------------------------------------------------------------------
BAD = [
    ("malformed", lambda t: t.replace("seed = 3", "seed = = 3"), "malformed TOML"),
    ("unknown_key", lambda t: t.replace("chains = 2", "chians = 2"), "did you mean 'chains'"),
    ("unknown_top", lambda t: t.replace("seed = 3", "sed = 3"), "did you mean 'seed'"),
    ("no_structure", lambda t: t.replace('"cu4.xyz"', '"missing.xyz"'), "not found"),
    ("empty_structure", lambda t: t.replace('"cu4.xyz"', '"empty.xyz"'), "no atoms"),
    ("element", lambda t: t.replace('"cu4.xyz"', '"gold.xyz"'), "Au"),
    ("reference_name", lambda t: t.replace("ase.calculators.emt:EMT", "nosuchcode"), "neither one of"),
    ("cp2k_missing", lambda t: t.replace("ase.calculators.emt:EMT", "cp2k"), "apt-get install cp2k"),
    ("epsilon", lambda t: t.replace("threshold = 0.05", "threshold = 0"), "threshold"),
    ("epsilon_negative", lambda t: t.replace("threshold = 0.05", "threshold = -1"), "threshold"),
    ("timestep", lambda t: t.replace("timestep_fs = 2.0", "timestep_fs = 0"), "timestep_fs"),
]


@pytest.mark.parametrize("case,edit,message", BAD, ids=[b[0] for b in BAD])
def test_bad_config_one_line_exit_2(workdir, case, edit, message, monkeypatch, capsys):
    from flytune.cli import main

    if case == "cp2k_missing":  # a machine without cp2k_shell on PATH, also where cp2k is installed
        (workdir / "no_cp2k").mkdir()
        monkeypatch.setenv("PATH", str(workdir / "no_cp2k"))
    write(workdir / "gold.xyz", bulk("Au", "fcc", a=4.08))
    (workdir / "empty.xyz").write_text("0\n\n")
    path = workdir / f"bad_{case}.toml"
    path.write_text(edit(CONFIG.format(run_dir=f"bad_{case}", steps=5, reference="ase.calculators.emt:EMT",
                                       reference_extra="")))
    monkeypatch.setattr(sys, "argv", ["flytune", "run", str(path), "--quiet"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_info.value.code == 2
    assert len(lines) == 1 and message in lines[0], err
    assert not (workdir / f"bad_{case}" / "checkpoint" / "checkpoint.pt").exists()


def test_different_config_cannot_resume(workdir, uninterrupted, monkeypatch, capsys):
    from flytune.cli import main

    path = write_config(workdir, "full")
    path.write_text(path.read_text().replace("chains = 2", "chains = 3"))
    monkeypatch.setattr(sys, "argv", ["flytune", "run", str(path), "--quiet"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert "different config" in capsys.readouterr().err


def test_changed_threshold_takes_effect_on_resume(workdir):
    path = write_config(workdir, "retune", steps=6)
    run(load_run_config(path), log=lambda m: None)
    path.write_text(path.read_text().replace("threshold = 0.05", "threshold = 0.2\ncalibration_discount = 0.9\n"
                                                                  "force_threshold = 0.5")
                    .replace("steps = 6", "steps = 9"))
    logs = []
    summary = run(load_run_config(path), log=logs.append)
    assert any("threshold changed from 0.05 to 0.2" in line for line in logs)
    assert any("calibration_discount changed from 1.0 to 0.9" in line for line in logs)
    # ε_F set on resume: the force errors of every call are scored against it
    assert summary["criterion"] == "energy" and summary["force_threshold_eV_A"] == 0.5
    assert 0 <= summary["force_exceed_fraction"] <= 1 and summary["force_calibration"]["n"] >= 0
    assert summary["steps"] == 9
    assert summary["threshold_eV"] == pytest.approx(0.2 * 0.0433641, rel=1e-4)
    ensemble = torch.load(workdir / "retune" / "checkpoint" / "checkpoint.pt", weights_only=True)["ensemble"]
    assert ensemble["spec"]["energy_sigma"] == pytest.approx(0.1 * summary["threshold_eV"])  # σ_E follows ε
    assert ensemble["calibrator"]["discount"] == 0.9
    report = summarize_run(read_run(workdir / "retune"))  # the report judges with the ε in force
    assert report["threshold_eV"] == pytest.approx(summary["threshold_eV"])
    assert report["exceed_fraction"] == pytest.approx(summary["exceed_fraction"])


def test_model_device_is_honoured_on_resume(workdir):
    """The device is not part of the run's identity: a run checkpointed on "cuda" resumes
    on the CPU that the config now names, and says so."""
    path = write_config(workdir, "moved_device", steps=4)
    run(load_run_config(path), log=lambda m: None)
    checkpoint = workdir / "moved_device" / "checkpoint" / "checkpoint.pt"
    state = torch.load(checkpoint, weights_only=True)
    state["ensemble"]["config"]["device"] = state["ensemble"]["spec"]["device"] = "cuda"
    torch.save(state, checkpoint)
    path.write_text(path.read_text().replace("steps = 4", "steps = 6").replace("[model]", '[model]\ndevice = "cpu"'))
    logs = []
    summary = run(load_run_config(path), log=logs.append)
    assert summary["steps"] == 6
    assert any("model.device changed from cuda to cpu" in line for line in logs)


def test_lock_on_a_filesystem_without_locks_is_one_clear_error(tmp_path, monkeypatch):
    import errno
    import fcntl

    from flytune.otf.rundir import RunDirectory

    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(FlytuneError, match="does not support file locks.*-o flock"):
        RunDirectory(tmp_path / "run").lock()


@pytest.mark.parametrize("driver", ["verlet", "nose-hoover", "npt"])
def test_drivers_resume_exactly(workdir, driver):
    """A run stopped half-way (as by Ctrl-C) and resumed equals an uninterrupted one,
    thermostat and barostat state included, along a temperature schedule."""
    import threading

    schedule = 'schedule = [{steps = 3, temperature_K = 300}, {steps = 3, temperature_K = 600, ramp = true}]'
    paths = {}
    for name in ("full", "split"):
        path = write_config(workdir, f"{driver}_{name}", steps=6)
        path.write_text(path.read_text().replace('driver = "langevin"', f'driver = "{driver}"')
                        .replace("steps = 6\n", f"steps = 6\n{schedule}\n"))
        paths[name] = load_run_config(path)
    run(paths["full"], log=lambda m: None)
    stop = threading.Event()
    first = run(paths["split"], log=lambda m: None, stop=stop,
                on_progress=lambda r: stop.set() if r.dyn.nsteps == 3 else None)
    assert first["steps"] == 3 and first["stopped"] == "interrupted"
    summary = run(paths["split"], log=lambda m: None)
    assert summary["steps"] == 6
    full, resumed = workdir / f"{driver}_full", workdir / f"{driver}_split"
    assert label_records(full) == label_records(resumed)
    rows = lambda d: [r.split(",")[:-1] for r in (d / "steps.csv").read_text().splitlines()]  # noqa: E731
    assert rows(full) == rows(resumed)  # every column but the last, the prediction's wall time
    frames = read(full / "trajectory.traj", index=":")
    assert len(frames) == 3
    if driver == "npt":
        assert not np.allclose(frames[0].cell, frames[-1].cell)  # the barostat moved the cell


def test_npt_turns_a_cell_that_is_not_triangular_into_one():
    """ASE's NPT refuses a cell with any element off both triangles (a cell relaxed by a cell
    filter has ~1e-7 Å there); the driver turns the structure in space instead: the cell
    becomes triangular, energy, force magnitudes, kinetic energy and distances stay."""
    from ase.md.melchionna import MelchionnaNPT

    from flytune.config import MDConfig
    from flytune.otf.run import make_dynamics, to_triangular_cell

    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.rattle(0.05, seed=1)
    turn = np.array([[np.cos(0.3), -np.sin(0.3), 0.0], [np.sin(0.3), np.cos(0.3), 0.0], [0.0, 0.0, 1.0]])
    atoms.set_cell(atoms.cell.array @ turn.T + 1e-7, scale_atoms=True)
    atoms.set_momenta(np.random.default_rng(0).normal(size=(len(atoms), 3)))
    atoms.calc = EMT()
    before = (atoms.get_potential_energy(), np.linalg.norm(atoms.get_forces(), axis=1), atoms.get_kinetic_energy(),
              atoms.get_all_distances(mic=True))
    assert not MelchionnaNPT._istriangular(atoms.cell.array)
    to_triangular_cell(atoms)
    assert MelchionnaNPT._istriangular(atoms.cell.array)
    after = (atoms.get_potential_energy(), np.linalg.norm(atoms.get_forces(), axis=1), atoms.get_kinetic_energy(),
             atoms.get_all_distances(mic=True))
    for x, y in zip(before, after):
        assert np.allclose(x, y, atol=1e-10)
    atoms.set_cell(atoms.cell.array @ turn.T, scale_atoms=True)  # the driver does it itself
    dyn = make_dynamics(MDConfig(driver="npt", temperature_K=300, steps=2), atoms, seed=1)
    assert MelchionnaNPT._istriangular(atoms.cell.array)
    dyn.run(2)  # not refused
    assert np.isfinite(atoms.get_potential_energy())


def test_init_writes_a_valid_commented_config_and_status_prints(workdir, uninterrupted, monkeypatch, capsys):
    from flytune.cli import main

    path = workdir / "example.toml"
    monkeypatch.setattr(sys, "argv", ["flytune", "init", str(path)])
    main()
    text = path.read_text()
    assert text.count("#") > 10
    (workdir / "ethanol.xyz").write_text("")
    config = load_run_config(path)
    assert config.model.backbone == "7net-0" and config.reference.name == "pyscf"
    assert config.uncertainty.threshold == 0.5 and config.md.driver == "langevin"
    monkeypatch.setattr(sys, "argv", ["flytune", "status", str(uninterrupted)])
    main()
    out = capsys.readouterr()
    assert json.loads(out.out)["steps"] == 15
    assert "reference calls (first 1, " in out.err  # and why the rule made them
    assert "not yet learned" not in out.err
    from flytune.cli import print_summary

    print_summary(json.loads(out.out) | {"labels_pending": 3, "stopped": "interrupted"}, "run")
    assert "3 label(s) not yet learned by model.pt" in capsys.readouterr().err


def test_calculator_under_an_optimiser_and_neb(workdir):
    from ase.mep import NEB
    from ase.optimize import BFGS

    _, calc = small_calculator(workdir, force_call_after=5)
    atoms = read(workdir / "cu4.xyz")
    atoms.calc = calc
    BFGS(atoms, logfile=None).run(fmax=1e-8, steps=6)
    assert calc.state.force_calls >= 6 and calc.state.reference_calls >= 2
    # NEB: three images share the calculator (each image is predicted in turn)
    start, end = atoms.copy(), atoms.copy()
    end.positions[0] += [0.2, 0.0, 0.0]
    images = [start, start.copy(), end]
    for image in images:
        image.calc = calc
    neb = NEB(images, allow_shared_calculator=True, method="improvedtangent")
    neb.interpolate()
    calls = calc.state.force_calls
    BFGS(neb, logfile=None).run(fmax=0.05, steps=2)
    assert calc.state.force_calls > calls
    assert np.all(np.isfinite(images[1].get_forces()))


def test_report_of_a_run_directory(uninterrupted, tmp_path, monkeypatch, capsys):
    """`flytune report RUN_DIR --json`: the figures agree with the run's own summary, the
    PNGs are images, and report.html opens offline (every image embedded)."""
    from flytune.cli import main

    out = tmp_path / "report"
    monkeypatch.setattr(sys, "argv", ["flytune", "report", str(uninterrupted), "--out", str(out), "--json"])
    main()
    printed = json.loads(capsys.readouterr().out)
    summary = json.loads((uninterrupted / "summary.json").read_text())
    assert printed == json.loads((out / "report.json").read_text())
    assert printed["reference_calls"] == summary["reference_calls"]
    assert printed["md_steps"] == summary["steps"] and printed["force_calls"] == summary["force_calls"]
    assert printed["exceed_fraction"] == pytest.approx(summary["exceed_fraction"])
    assert printed["rmse_at_interventions_eV"] == pytest.approx(summary["rmse_at_interventions_eV"])
    assert printed["calibration"]["shape"] == pytest.approx(summary["calibration"]["shape"])
    assert sum(printed["calls_by_quarter"]) == summary["reference_calls"]
    # how many calls the rule made and why, as the run's own summary says
    assert printed["calls_by_reason"] == summary["calls_by_reason"] and printed["calls_by_reason"]["first"] == 1
    assert sum(printed["calls_by_reason"].values()) == summary["reference_calls"]
    assert printed["calls_by_label_misfit"] == summary["calls_by_label_misfit"]
    assert printed["time_reference_s"] == pytest.approx(summary["time_reference_s"])
    page = (out / "report.html").read_text()
    assert "calls_by_reason" in page
    for name in ("calls", "probability", "errors", "sigma_error", "calibration", "traces"):
        png = (out / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
        assert f'alt="{name}"' in page
    assert page.count("data:image/png;base64,") == 6
    assert "http://" not in page and "https://" not in page


def test_packed_run_moves_and_resumes_exactly(workdir, uninterrupted, monkeypatch, capsys):
    """`flytune pack` a run stopped half-way, delete it, `flytune unpack` it: the resumed run
    equals an uninterrupted one, although the packed checkpoint drops the SGHMC statistics
    that the next update resets."""
    import shutil
    import threading

    import torch

    from flytune.cli import main

    config = load_run_config(write_config(workdir, "packed"))
    stop = threading.Event()
    first = run(config, log=lambda m: None, stop=stop, on_progress=lambda r: stop.set() if r.dyn.nsteps == 7 else None)
    assert first["steps"] == 7 and first["reference_calls"] >= 2
    run_dir, archive = workdir / "packed", workdir / "moved" / "packed.tar.xz"
    checkpoint_bytes = (run_dir / "checkpoint" / "checkpoint.pt").stat().st_size
    monkeypatch.setattr(sys, "argv", ["flytune", "pack", str(run_dir), str(archive)])
    main()
    assert "packed into" in capsys.readouterr().err
    assert archive.stat().st_size < 0.5 * checkpoint_bytes
    shutil.rmtree(run_dir)
    monkeypatch.setattr(sys, "argv", ["flytune", "unpack", str(archive), str(run_dir)])
    main()
    chains = torch.load(run_dir / "checkpoint" / "checkpoint.pt", weights_only=True)["ensemble"]["chains"]
    assert all(not v.any() for c in chains for v in c["state"]["momenta"].values())
    with pytest.raises(FlytuneError, match="not empty"):
        unpack(archive, run_dir)
    with pytest.raises(FlytuneError, match="written by `flytune pack`"):
        unpack(workdir / "cu4.xyz", workdir / "not_a_run")
    summary = run(config, log=lambda m: None)
    assert summary["steps"] == 15
    assert label_records(run_dir) == label_records(uninterrupted)
    rows = lambda d: [r.split(",")[:7] for r in (d / "steps.csv").read_text().splitlines()]
    assert rows(run_dir) == rows(uninterrupted)
