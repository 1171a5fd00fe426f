"""Several walkers sharing one ensemble: batched rounds, concurrent reference calls through
a real local Parsl HighThroughputExecutor, the run directory per walker, and SIGKILL at
any point with reference futures in flight."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ase import units
from ase.build import bulk
from ase.io import read, write

from conftest import build_small_mace
from flytune.bayes.ensemble import Ensemble
from flytune.errors import FlytuneError
from flytune.otf.calculator import OnTheFlyCalculator
from flytune.otf.run import OnTheFlyRun
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
name = "ase.calculators.emt:EMT"
[uncertainty]
threshold = 0.05
[md]
driver = "langevin"
timestep_fs = 2.0
temperature_K = 500
steps = 10
trajectory_every = 3
[safety]
force_call_after = 3
{execution}
[[walkers]]
temperature_K = 300
[[walkers]]
temperature_K = 900
seed = 11
md = {{friction_per_fs = 0.02}}
[[walkers]]
structure = "cu4_b.xyz"
schedule = [{{steps = 6, temperature_K = 400}}, {{steps = 4, temperature_K = 800, ramp = true}}]
"""
PARSL = '[execution]\nbackend = "parsl"\nmax_workers = 2'


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("walkers")
    build_small_mace(path / "cu.model", numbers=(1, 6, 8, 29))
    for name, seed in (("cu4", 3), ("cu4_b", 5)):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
        atoms.rattle(0.1, seed=seed)
        write(path / f"{name}.xyz", atoms)
    return path


def write_config(workdir: Path, name: str, execution: str = PARSL) -> Path:
    path = workdir / f"{name}.toml"
    path.write_text(CONFIG.format(run_dir=name, execution=execution))
    return path


def run_cli(workdir: Path, config: Path, env_extra=None) -> subprocess.CompletedProcess:
    """``flytune run`` in a session of its own, its output in files: a run killed by a fault
    point leaves its Parsl workers behind (holding pipes open), and they go with the
    session's process group, as a batch job's processes go when the job is killed."""
    env = dict(os.environ, **(env_extra or {}))
    out, err = workdir / f"{config.stem}.out", workdir / f"{config.stem}.err"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "flytune", "run", str(config), "--quiet"], cwd=workdir,
                                env=env, stdout=stdout, stderr=stderr, start_new_session=True)
        try:
            proc.wait(timeout=600)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, out.read_text(), err.read_text())


def labels_by_call(run_dir: Path) -> dict[int, dict]:
    """The exact label records, by force call (walkers' labels are written as they return)."""
    records = [json.loads(line) for line in (run_dir / "checkpoint" / "labels.jsonl").read_text().splitlines()]
    by_call = {r["info"]["force_call"]: r for r in records}
    assert len(by_call) == len(records), "a structure was labelled twice"
    return by_call


def step_rows(run_dir: Path, walker: int) -> list[list[str]]:
    return [r.split(",")[:7] for r in (run_dir / "walkers" / str(walker) / "steps.csv").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(workdir):
    result = run_cli(workdir, write_config(workdir, "full"))
    assert result.returncode == 0, result.stderr
    assert "through Parsl" in result.stderr
    return workdir / "full"


def test_walkers_share_one_ensemble_and_keep_their_own_files(uninterrupted):
    rd = uninterrupted
    summary = json.loads((rd / "summary.json").read_text())
    assert summary["steps"] == 3 * 10 and summary["force_calls"] == 3 * 11  # 10 steps + the start, each
    labels = labels_by_call(rd)
    interventions = [json.loads(line) for line in (rd / "interventions.jsonl").read_text().splitlines()]
    assert len(labels) == len(interventions) == summary["reference_calls"]
    # every walker's first structure is labelled; each label and call names its walker
    assert {iv["walker"] for iv in interventions if iv["first"]} == {0, 1, 2}
    assert {r["info"]["walker"] for r in labels.values()} == {0, 1, 2}
    assert sorted(iv["force_call"] for iv in interventions) == sorted(labels)
    per_walker = summary["walkers"]
    assert [w["walker"] for w in per_walker] == [0, 1, 2]
    assert all(w["steps"] == 10 for w in per_walker)
    assert sum(w["reference_calls"] for w in per_walker) == summary["reference_calls"]
    for w in per_walker:
        mine = [iv for iv in interventions if iv["walker"] == w["walker"] and not iv["first"]]
        expected = np.mean([abs(iv["error"]) > summary["threshold_eV"] for iv in mine]) if mine else None
        assert w["exceed_fraction"] == pytest.approx(expected)
    for i in range(3):
        rows = step_rows(rd, i)
        assert len(rows) == 1 + 11 and rows[0][0] == "step"
        assert [int(r[0]) for r in rows[1:]] == list(range(11))
        assert len(read(rd / "walkers" / str(i) / "trajectory.traj", index=":")) == 1 + 10 // 3
    assert not (rd / "steps.csv").exists()
    # force calls of one round are consecutive: walker 0, 1, 2 at every step
    calls = {i: [int(r[1]) for r in step_rows(rd, i)[1:]] for i in range(3)}
    assert calls[0] == list(range(1, 34, 3)) and calls[1] == list(range(2, 34, 3)) and calls[2] == list(range(3, 34, 3))
    # one model learned every label of every walker
    assert len(Ensemble.read_state(rd / "model.pt")["data"]["numbers"]) == len(labels)


def test_status_and_report_show_each_walker(uninterrupted, workdir):
    result = subprocess.run([sys.executable, "-m", "flytune", "status", str(uninterrupted)], cwd=workdir,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for i in range(3):
        assert f"walker {i}: 10 MD steps" in result.stderr
    report = summarize_run(read_run(uninterrupted))
    summary = json.loads((uninterrupted / "summary.json").read_text())
    assert report["md_steps"] == 30 and report["walkers"] == summary["walkers"]
    assert report["simulated_ps"] == pytest.approx(3 * 10 * 2.0 / 1000)


def test_the_parsl_run_labels_what_the_in_process_run_labels(workdir, uninterrupted):
    """Concurrent reference calls change where and when labels are made, not which."""
    result = run_cli(workdir, write_config(workdir, "local", execution=""))
    assert result.returncode == 0, result.stderr
    expected, got = labels_by_call(uninterrupted), labels_by_call(workdir / "local")
    assert sorted(got) == sorted(expected)
    for call, record in expected.items():
        assert got[call]["positions"] == record["positions"] and got[call]["energy"] == record["energy"]
    for i in range(3):
        assert step_rows(workdir / "local", i) == step_rows(uninterrupted, i)


@pytest.mark.parametrize("kill_at", ["label-written:2", "label-written:5", "mid-update:3", "checkpoint-written:3"])
def test_sigkill_with_reference_futures_in_flight_loses_and_repeats_nothing(workdir, uninterrupted, kill_at):
    """Killed as the second label of round 0 is written (before the first checkpoint, the
    third call sent to a Parsl worker), later as a label is written, inside an update, or
    as a checkpoint is renamed: the resumed run has exactly the labels, steps and summary
    of the unbroken one, keeps what was on disk, and labels no structure twice."""
    name = "kill_" + kill_at.replace(":", "_").replace("-", "_")
    config = write_config(workdir, name)
    killed = run_cli(workdir, config, {"FLYTUNE_KILL_AT": kill_at})
    assert killed.returncode == -9, killed.stderr
    before = labels_by_call(workdir / name) if (workdir / name / "checkpoint" / "labels.jsonl").exists() else {}
    resumed = run_cli(workdir, config)
    assert resumed.returncode == 0, resumed.stderr
    expected, got = labels_by_call(uninterrupted), labels_by_call(workdir / name)
    assert sorted(got) == sorted(expected)
    for call, record in expected.items():
        assert got[call]["positions"] == record["positions"] and got[call]["forces"] == record["forces"]
    for call, record in before.items():  # what was on disk at the kill is kept, not recomputed
        assert got[call] == record
    for i in range(3):
        assert step_rows(workdir / name, i) == step_rows(uninterrupted, i)
        assert len(read(workdir / name / "walkers" / str(i) / "trajectory.traj", index=":")) == 1 + 10 // 3
    summary, full = (json.loads((d / "summary.json").read_text()) for d in (workdir / name, uninterrupted))
    assert summary["reference_calls"] == full["reference_calls"] and summary["walkers"] == full["walkers"]


def test_rounds_predict_every_walker_in_one_batch(workdir, monkeypatch):
    """In process: every round is one ensemble evaluation of all three structures, and each
    walker keeps its own temperature (its thermostat's target) and seed."""
    rounds, inside = [], []
    evaluate, predict = OnTheFlyCalculator.evaluate, Ensemble.predict

    def spy_evaluate(self, structures, walkers=None):
        rounds.append((len(structures), walkers))
        inside.append([])
        return evaluate(self, structures, walkers)

    def spy_predict(self, structures, **kwargs):
        if inside:
            inside[-1].append(len(structures))
        return predict(self, structures, **kwargs)

    monkeypatch.setattr(OnTheFlyCalculator, "evaluate", spy_evaluate)
    monkeypatch.setattr(Ensemble, "predict", spy_predict)
    config = load_run_config(write_config(workdir, "batched", execution=""))
    otf = OnTheFlyRun(config, log=lambda m: None)
    otf.open()
    try:
        targets = []
        otf.advance(on_progress=lambda r: targets.append([w.dyn.temp / units.kB for w in r.walkers]))
    finally:
        otf.close()
    assert rounds == [(3, [0, 1, 2])] * 11  # the start and 10 steps
    assert all(batches[0] == 3 for batches in inside)  # one prediction of all three (then misfits after updates)
    assert targets[0][:2] == pytest.approx([300, 900]) and targets[0][2] == pytest.approx(400)
    assert targets[-1][2] == pytest.approx(800)
    assert [w.seed for w in otf.walkers] == [3, 11, 5]
    assert otf.walkers[1].dyn.fr == pytest.approx(0.02 / units.fs)


def test_check_describes_every_walker(workdir):
    otf = OnTheFlyRun(load_run_config(write_config(workdir, "check")), log=lambda m: None)
    lines = otf.describe()
    assert any("through Parsl (2 local worker(s))" in line for line in lines)
    assert [line.split(":")[0] for line in lines if line.startswith("walker")] == ["walker 0", "walker 1", "walker 2"]
    assert lines[-3].endswith("langevin, 10 steps at 300 K, seed 3")
    assert lines[-2].endswith("langevin, 10 steps at 900 K, seed 11")
    assert "cu4_b.xyz, langevin, 10 steps at 400–800 K, seed 5" in lines[-1]
    assert not (workdir / "check").exists()  # nothing was started


def test_walkers_of_different_compositions_are_refused(workdir):
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)[:3]
    write(workdir / "cu3.xyz", atoms)
    text = CONFIG.format(run_dir="mixed", execution="").replace('structure = "cu4_b.xyz"', 'structure = "cu3.xyz"')
    (workdir / "mixed.toml").write_text(text)
    with pytest.raises(FlytuneError, match="differ in composition .*walker 2: Cu3.*own run directory"):
        OnTheFlyRun(load_run_config(workdir / "mixed.toml"), log=lambda m: None)


@pytest.mark.parametrize("edit, message", [
    ("temperature_K = 300", "temperature_K = 300\nschedule = [{steps = 2, temperature_K = 5}]"),
    ("temperature_K = 300", "temperature_K = 300\nmd = {frction_per_fs = 1}"),
])
def test_bad_walker_tables_are_one_line_errors(workdir, edit, message):
    text = CONFIG.format(run_dir="bad", execution="").replace(edit, message, 1)
    (workdir / "bad.toml").write_text(text)
    with pytest.raises(FlytuneError) as info:
        load_run_config(workdir / "bad.toml")
    assert "walkers" in str(info.value) and "\n" not in str(info.value)
    assert ("not both" in str(info.value)) or ("frction_per_fs" in str(info.value))


def test_deferred_updates_pool_every_walkers_labels_and_walkers_may_end_early(workdir):
    """With ``policy = "deferred"`` the labels of all walkers wait in one queue and one
    update learns them; a walker with fewer steps drops out of the rounds at its end."""
    text = CONFIG.format(run_dir="pooled", execution='[updates]\npolicy = "deferred"\nmax_pending = 5\n'
                         'critical_factor = 1e6')
    text = text.replace("md = {friction_per_fs = 0.02}", "md = {friction_per_fs = 0.02, steps = 6}")
    (workdir / "pooled.toml").write_text(text)
    otf = OnTheFlyRun(load_run_config(workdir / "pooled.toml"), log=lambda m: None)
    otf.open()
    try:
        summary = otf.advance()
    finally:
        otf.close()
    rd = workdir / "pooled"
    updates = [json.loads(line) for line in (rd / "updates.jsonl").read_text().splitlines()]
    assert updates.pop()["reason"] == "final"  # [updates] final_cycles = 1, after the last round
    interventions = [json.loads(line) for line in (rd / "interventions.jsonl").read_text().splitlines()]
    assert [w["steps"] for w in summary["walkers"]] == [10, 6, 10] and summary["steps"] == 26
    assert updates[0]["reason"] == "first" and updates[0]["labels_learned"] == 3  # the three first labels
    assert sum(u["labels_learned"] for u in updates) == len(interventions) == summary["reference_calls"]
    assert any(u["reason"] == "max pending" and u["labels_learned"] >= 5 for u in updates)
    assert summary["updates"] == len(updates) < len({iv["step"] for iv in interventions})
    pending_walkers = {iv["walker"] for iv in interventions if iv["update"] == "deferred"}
    assert len(pending_walkers) > 1  # labels of several walkers waited together
    assert len(step_rows(rd, 1)) == 1 + 7


def test_calls_at_once_are_marked_and_the_speedup_prices_the_calls_made_alone(uninterrupted):
    interventions = [json.loads(line) for line in (uninterrupted / "interventions.jsonl").read_text().splitlines()]
    by_step = {}
    for iv in interventions:
        by_step.setdefault(iv["step"], []).append(iv)
    assert all(iv["calls_at_once"] == len(group) for group in by_step.values() for iv in group)
    assert by_step[0][0]["calls_at_once"] == 3  # the three first structures, at once on the Parsl workers
    summary = json.loads((uninterrupted / "summary.json").read_text())
    alone = [iv["reference_s"] for iv in interventions if iv["calls_at_once"] == 1 and iv["reference_s"] > 0]
    if alone:
        assert summary["median_reference_s"] == pytest.approx(float(np.median(alone)))
    # overlapping calls: the MD waited less than the calls lasted together
    assert summary["time_reference_wall_s"] <= summary["time_reference_s"] + 0.5
