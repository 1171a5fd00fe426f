"""``flytune md``: MD on the fine-tuned ensemble alone, with σ and the calibrated
P(|e| > ε) at every step, stopping where the trajectory leaves the trusted region."""

import json
import subprocess
import sys

import numpy as np
import pytest
from ase.build import bulk
from ase.io import read, write

from conftest import build_small_mace, emt_labelled
from flytune.bayes.calibration import Calibrator
from flytune.bayes.ensemble import Ensemble
from flytune.config import ModelConfig, UncertaintyConfig
from flytune.errors import FlytuneError
from flytune.otf.production import production_md
from flytune.otf.rundir import RunDirectory
from flytune.report import read_run, summarize_run
from flytune.runconfig import load_run_config

CONFIG = """
structure = "cu4.xyz"
run_dir = "run"
seed = 2
[uncertainty]
threshold = {threshold}
threshold_unit = "eV"
[md]
driver = "langevin"
timestep_fs = 2.0
temperature_K = 300
steps = 12
trajectory_every = 4
[production]
untrusted_steps = 3
out = "{out}"
{extra}
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("production")
    build_small_mace(path / "cu.model", numbers=(29,))
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.rattle(0.05, seed=1)
    write(path / "cu4.xyz", atoms)
    labels = []
    for seed in range(3):
        a = atoms.copy()
        a.rattle(0.05, seed=seed + 10)
        labels.append(emt_labelled(a, with_stress=True))
    with Ensemble.from_config(ModelConfig(backbone=str(path / "cu.model"), chains=2, cycle_steps=6, batch_size=2,
                                          eta_max=1e-3), UncertaintyConfig(threshold=0.05, threshold_unit="eV"),
                              seed=0) as ens:
        ens.update(labels)
        calibrator = Calibrator(1.5, 10.0)
        calibrator.observe(0.01, 0.005)
        (path / "run").mkdir()
        ens.save(path / "run" / "model.pt", calibrator)
    return path


def config(folder, name, threshold, extra=""):
    path = folder / f"{name}.toml"
    path.write_text(CONFIG.format(threshold=threshold, out=name, extra=extra))
    return load_run_config(path)


def test_md_logs_sigma_and_the_calibrated_probability(folder):
    summary = production_md(config(folder, "trusted", threshold=10.0), log=lambda m: None)
    assert summary["steps"] == 12 and summary["stopped"] is None and summary["left_trusted_region_at_step"] is None
    rd = RunDirectory(folder / "trusted")
    steps = rd.read_steps()
    assert steps["step"].tolist() == list(range(13))
    state = Ensemble.read_state(folder / "run" / "model.pt")
    calibrator = Calibrator.from_state_dict(state["calibrator"])
    expected = [float(calibrator.prob_exceed(10.0, s)) for s in steps["energy_std_eV"]]
    np.testing.assert_allclose(steps["prob_exceed"], expected, rtol=1e-9)
    assert np.all(steps["energy_std_eV"] > 0) and not steps["reference_called"].any()
    assert len(read(rd.trajectory, index=":")) == 1 + 12 // 4
    assert json.loads(rd.summary.read_text()) == summary
    assert not (rd.path / "untrusted.extxyz").exists()
    report = summarize_run(read_run(rd.path))  # `flytune report` reads it like a run directory
    assert report["md_steps"] == 12 and report["reference_calls"] == 0
    with pytest.raises(FlytuneError, match="holds an earlier MD"):
        production_md(config(folder, "trusted", threshold=10.0), log=lambda m: None)


def test_md_stops_where_the_trajectory_leaves_the_trusted_region(folder):
    messages = []
    summary = production_md(config(folder, "untrusted", threshold=1e-6), log=messages.append)
    assert summary["left_trusted_region_at_step"] == 2 and summary["steps"] == 2
    assert summary["stopped"] == "left the trusted region at step 2"
    frame = read(folder / "untrusted" / "untrusted.extxyz")
    assert frame.info["step"] == 2 and frame.info["prob_exceed"] > 0.05
    assert any("left the region the model was taught" in m for m in messages)


def test_md_can_warn_and_go_on(folder):
    (folder / "warned.toml").write_text(CONFIG.format(threshold=1e-6, out="warned", extra='on_untrusted = "warn"'))
    result = subprocess.run([sys.executable, "-m", "flytune", "md", str(folder / "warned.toml"), "--quiet"],
                            cwd=folder, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads((folder / "warned" / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["steps_above_level"] == 13 and summary["stopped"] is None
    assert summary["left_trusted_region_at_step"] == 2
    assert "13 steps with P(|e| > ε) above 5 %" in result.stderr + result.stdout


def test_md_without_a_model_is_one_clear_error(folder, tmp_path):
    cfg = config(folder, "nomodel", threshold=1.0).model_copy(update={"run_dir": str(tmp_path / "none")})
    with pytest.raises(FlytuneError, match="no fine-tuned model"):
        production_md(cfg, log=lambda m: None)


def test_spot_checks_measure_the_true_error_with_the_reference(folder):
    from ase.calculators.emt import EMT

    extra = 'spot_check_every = 4\n[reference]\nname = "ase.calculators.emt:EMT"'
    summary = production_md(config(folder, "spot", threshold=10.0, extra=extra), log=lambda m: None)
    records = [json.loads(line) for line in (folder / "spot" / "spot_checks.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 4, 8, 12] and summary["spot_checks"] == 4
    with Ensemble.load(folder / "run" / "model.pt", workers=1) as ens:
        offset = ens.data.energy_offset
    frames = {a.info["step"]: a for a in read(folder / "spot" / "trajectory.traj", index=":")}
    for r in records:
        probe = frames[r["step"]].copy()
        probe.calc = EMT()
        assert r["energy_ref_eV"] == pytest.approx(probe.get_potential_energy())
        assert r["error_eV"] == pytest.approx(r["energy_ref_eV"] + offset - r["energy_pred_eV"])
    errors = np.array([r["error_eV"] for r in records])
    assert summary["spot_check_rmse_eV"] == pytest.approx(float(np.sqrt(np.mean(errors**2))))
    assert summary["spot_check_exceed_fraction"] == pytest.approx(float(np.mean(np.abs(errors) > 10.0)))
