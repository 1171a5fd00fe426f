"""The Python API in one import: ``flytune.OnTheFlyCalculator.from_pretrained`` with an ASE
calculator instance as the reference, ε with its unit, settings as keywords."""

import numpy as np
import pytest
from ase import units
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.md.verlet import VelocityVerlet

import flytune
from conftest import build_small_mace
from flytune.units import KCAL_MOL, parse_energy


@pytest.fixture(scope="module")
def cu_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("api") / "cu.model"
    build_small_mace(path, numbers=(1, 6, 8, 29))
    return str(path)


def cu4():
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.rattle(0.1, seed=3)
    return atoms


def test_from_pretrained_with_a_calculator_instance_under_an_ase_driver(cu_model, tmp_path):
    reference = EMT()
    with flytune.OnTheFlyCalculator.from_pretrained(
        cu_model, reference=reference, threshold=(50, "meV"), chains=2, cycle_steps=12, batch_size=2,
        eta_max=1e-3, force_call_after=3, policy="deferred", max_pending=2, seed=1,
    ) as calc:
        assert calc.decision.threshold_eV == pytest.approx(0.05)
        assert calc.ensemble.config.chains == 2 and calc.schedule.config.policy == "deferred"
        assert calc.decision.safety.force_call_after == 3
        atoms = cu4()
        atoms.calc = calc
        rows = []
        calc.on_step = rows.append
        VelocityVerlet(atoms, 2 * units.fs).run(6)
        assert calc.state.reference_calls >= 2  # the first structure and at least one forced call
        # at a call the MD gets the reference's own energy (plus the offset), from the instance given
        called = [r for r in rows if r["reference_called"]]
        label = calc.ensemble.data.structures[-1] if not calc.schedule.pending else calc.schedule.pending[-1]
        check = label.copy()
        check.calc = EMT()
        assert called[-1]["energy_eV"] == pytest.approx(check.get_potential_energy() + calc.ensemble.data.energy_offset)
        calc.ensemble.save(tmp_path / "model.pt", calc.decision.calibrator)
    with flytune.load(tmp_path / "model.pt", workers=1) as ensemble:
        assert isinstance(ensemble, flytune.Ensemble)
        assert np.isfinite(ensemble.predict(atoms).energy).all()


@pytest.mark.parametrize("threshold, expected_eV", [
    ((0.5, "kcal/mol"), 0.5 * KCAL_MOL), ("0.5 kcal/mol", 0.5 * KCAL_MOL), ("20 meV", 0.02), ("0.01 eV", 0.01),
])
def test_threshold_takes_value_and_unit(threshold, expected_eV):
    from flytune.units import energy_to_eV

    assert energy_to_eV(*parse_energy(threshold)) == pytest.approx(expected_eV)


@pytest.mark.parametrize("kwargs, message", [
    ({"chans": 4}, "unknown setting 'chans'; did you mean 'chains'"),
    ({"chains": 1}, "invalid chains = 1"),
    ({"policy": "sometimes"}, "invalid policy = 'sometimes'"),
    ({"threshold": "0.5 parsec"}, "threshold: unknown energy unit 'parsec'"),
    ({"threshold": "half a kcal"}, "threshold: give an energy as"),
    ({"reference": 42}, "neither an ASE calculator nor a name"),
    ({"reference": "ase.calculators.nothere:X"}, "neither one of pyscf"),
])
def test_bad_keywords_are_one_line_errors(cu_model, kwargs, message):
    kwargs = {"reference": EMT(), **kwargs}
    with pytest.raises(flytune.FlytuneError) as info:
        flytune.OnTheFlyCalculator.from_pretrained(cu_model, **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_import_flytune_is_light_and_names_what_a_script_needs():
    import subprocess
    import sys

    code = "import sys, flytune; assert 'torch' not in sys.modules; print(sorted(flytune.__all__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in ("OnTheFlyCalculator", "Ensemble", "load", "finetune", "evaluate"):
        assert name in out.stdout and getattr(flytune, name) is not None


def test_the_readme_python_section_runs_as_written(tmp_path, monkeypatch):
    """The README's script block, executed as it stands (SevenNet-0 and GFN2-xTB)."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### In a Python script", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert "import flytune\n" in code and "flytune.otf" not in code and "flytune.bayes" not in code
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "model.pt").exists()


SCRIPT = """
import sys
import flytune
from ase.calculators.emt import EMT
from ase.io import read
from ase.md.verlet import VelocityVerlet
from ase import units

from pathlib import Path
from ase.io.trajectory import Trajectory

frames = Path(sys.argv[3] + ".traj")  # the script's own trajectory: a restart continues from its last frame
atoms = read(frames, -1) if frames.exists() else read(sys.argv[2])
with flytune.OnTheFlyCalculator.from_pretrained(
        sys.argv[1], reference=EMT(), threshold="50 meV", chains=2, cycle_steps=12, batch_size=2, eta_max=1e-3,
        force_call_after=3, seed=1, run_dir=sys.argv[3], timestep_fs=2.0) as calc:
    atoms.calc = calc
    dyn = VelocityVerlet(atoms, 2 * units.fs)
    dyn.attach(Trajectory(frames, "a", atoms).write, interval=1)
    dyn.run(int(sys.argv[4]))
"""


def run_script(tmp_path, cu_model, run_dir, steps, env_extra=None):
    import os
    import subprocess
    import sys

    from ase.io import write

    write(tmp_path / "cu4.xyz", cu4())
    (tmp_path / "script.py").write_text(SCRIPT)
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, str(tmp_path / "script.py"), cu_model, str(tmp_path / "cu4.xyz"),
                           str(run_dir), str(steps)], capture_output=True, text=True, timeout=300, env=env)


def test_a_script_keeps_a_run_directory_and_resumes_it(cu_model, tmp_path):
    import json

    from flytune.report import read_run, summarize_run

    run_dir = tmp_path / "run"
    first = run_script(tmp_path, cu_model, run_dir, 6)
    assert first.returncode == 0, first.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["force_calls"] == 7 and summary["steps"] == 7  # the start and 6 steps
    assert summary["simulated_ps"] == pytest.approx(7 * 2.0 / 1000)
    labels = (run_dir / "checkpoint" / "labels.jsonl").read_text().splitlines()
    assert len(labels) == summary["reference_calls"] >= 2
    assert len((run_dir / "steps.csv").read_text().splitlines()) == 1 + 7
    assert (run_dir / "model.pt").exists() and (run_dir / "checkpoint" / "checkpoint.pt").exists()
    assert summarize_run(read_run(run_dir))["reference_calls"] == summary["reference_calls"]
    again = run_script(tmp_path, cu_model, run_dir, 4)  # started again: the calculator resumes
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stderr
    after = json.loads((run_dir / "summary.json").read_text())
    # the script's last frame is the checkpoint's structure: its forces come from the cache, no new force call
    assert after["force_calls"] == 7 + 4 and after["reference_calls"] >= summary["reference_calls"]
    assert len((run_dir / "steps.csv").read_text().splitlines()) == 1 + 11
    # another run's settings are refused, with what differs
    with pytest.raises(flytune.FlytuneError, match="chains: 2 → 3"):
        flytune.OnTheFlyCalculator.from_pretrained(cu_model, reference=EMT(), chains=3, seed=1, run_dir=run_dir)


def test_a_killed_script_loses_no_label_and_computes_none_twice(cu_model, tmp_path):
    import json

    run_dir = tmp_path / "killed"
    killed = run_script(tmp_path, cu_model, run_dir, 6, {"FLYTUNE_KILL_AT": "label-written:3"})
    assert killed.returncode == -9, killed.stderr
    records = [json.loads(line) for line in (run_dir / "checkpoint" / "labels.jsonl").read_text().splitlines()]
    assert len(records) == 3
    resumed = run_script(tmp_path, cu_model, run_dir, 6)
    assert resumed.returncode == 0, resumed.stderr
    after = [json.loads(line) for line in (run_dir / "checkpoint" / "labels.jsonl").read_text().splitlines()]
    assert after[:3] == records  # the label written at the kill is kept, not recomputed
    positions = [json.dumps(r["positions"]) for r in after]
    assert len(set(positions)) == len(positions)  # the restarted MD went on from the script's last frame
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["reference_calls"] == len(after) and summary["labels_pending"] == 0
    with flytune.load(run_dir / "model.pt", workers=1) as ensemble:
        assert len(ensemble.data) == len(after)  # the final model learned every label


def test_ctrl_c_during_an_update_keeps_the_last_checkpoint(cu_model, tmp_path):
    """Inside the ``with`` block, Ctrl-C during a posterior update cuts it: the run
    directory keeps the checkpoint from before it, and the next start reuses its label."""
    import json
    import signal

    settings = dict(reference=EMT(), threshold="50 meV", chains=2, cycle_steps=12, batch_size=2, eta_max=1e-3,
                    force_call_after=2, seed=1, run_dir=tmp_path / "run", log=lambda m: None)
    script_handler = signal.getsignal(signal.SIGINT)  # SIG_IGN where the suite runs in the background
    with pytest.raises(KeyboardInterrupt, match="during a posterior update"):
        with flytune.OnTheFlyCalculator.from_pretrained(cu_model, **settings) as calc:
            atoms = cu4()
            atoms.calc = calc
            atoms.get_forces()  # the first label and its update
            calc.on_update_progress = lambda chain, step, ll: signal.raise_signal(signal.SIGINT) if step == 3 else None
            VelocityVerlet(atoms, 2 * units.fs).run(5)
    assert signal.getsignal(signal.SIGINT) is script_handler  # the script's handler is back
    labels = (tmp_path / "run" / "checkpoint" / "labels.jsonl").read_text().splitlines()
    assert len(labels) == 2 and not (tmp_path / "run" / "summary.json").exists()
    messages = []
    with flytune.OnTheFlyCalculator.from_pretrained(cu_model, **{**settings, "log": messages.append}) as calc:
        assert calc.state.reference_calls == 1 and len(calc.pending) == 1
        assert json.loads(labels[1])["info"]["force_call"] == calc.pending[0].force_call
    assert any("1 label(s) to reuse" in m for m in messages)
    with flytune.load(tmp_path / "run" / "model.pt", workers=1) as ensemble:
        assert len(ensemble.data) == 2  # the label of the cut update, learned at the block's end
