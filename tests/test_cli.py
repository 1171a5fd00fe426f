"""The command line: end to end on a tiny data set, and one-line errors with exit status 2."""

import json
import subprocess
import sys

import numpy as np
import pytest
from ase import Atoms
from ase.io import write

from flytune.cli import main
from flytune.data import labelled


def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["flytune", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def train_file(tmp_path_factory, ethanol_frames):
    path = tmp_path_factory.mktemp("data") / "train.extxyz"
    write(path, ethanol_frames[:6])
    return path


@pytest.fixture(scope="module")
def test_file(tmp_path_factory, ethanol_frames):
    path = tmp_path_factory.mktemp("data") / "test.extxyz"
    write(path, ethanol_frames[14:])
    return path


def test_finetune_then_evaluate(monkeypatch, capsys, tmp_path, train_file, test_file):
    out = tmp_path / "model"
    code, _, err = run_cli(monkeypatch, capsys, "finetune", "--data", str(train_file), "--out", str(out),
                           "--chains", "2", "--steps", "4", "--quiet")
    assert code == 0, err
    assert (out / "model.pt").exists()
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["n_structures"] == 6 and summary["n_members"] == 2 and not summary["interrupted"]
    report = tmp_path / "eval.json"
    code, stdout, err = run_cli(monkeypatch, capsys, "evaluate", "--model", str(out), "--data", str(test_file),
                                "--json", str(report))
    assert code == 0, err
    metrics = json.loads(report.read_text())
    for key in ("energy_rmse", "force_rmse", "force_mae", "force_mll", "force_auc_roc", "force_auc_roc_spread",
                "force_auc_roc_sigma_head", "calibration_factor"):
        assert np.isfinite(metrics[key]) and np.isfinite(metrics[key + "_kcal"])
    assert metrics["n_members"] == 2
    assert "force RMSE" in stdout and "spread only" in stdout
    # the pretrained model by name, for before/after comparisons
    code, _, err = run_cli(monkeypatch, capsys, "evaluate", "--model", "7net-0", "--data", str(test_file),
                           "--json", str(tmp_path / "pre.json"), "--quiet")
    assert code == 0, err
    assert json.loads((tmp_path / "pre.json").read_text())["n_members"] == 1
    # an existing output folder is not overwritten silently
    code, _, err = run_cli(monkeypatch, capsys, "finetune", "--data", str(train_file), "--out", str(out), "--quiet")
    assert code == 2 and "--overwrite" in err


def write_bad(tmp_path, kind):
    path = tmp_path / f"{kind}.extxyz"
    water = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    if kind == "noforces":
        water.info["energy"] = -1.0
        write(path, [water])
    elif kind == "nan":
        forces = np.zeros((3, 3))
        forces[0, 0] = np.nan
        write(path, [labelled(water, -1.0, forces)])
    elif kind == "element":
        write(path, [labelled(Atoms("Po2", positions=[[0, 0, 0], [0, 0, 2.6]]), -1.0, np.zeros((2, 3)))])
    return path


@pytest.mark.parametrize(
    "case,extra,message",
    [
        ("missing", [], "not found"),
        ("noforces", [], "no forces"),
        ("nan", [], "NaN"),
        ("element", [], "Po"),
        ("ok", ["--threshold", "0"], "threshold"),
        ("ok", ["--threshold", "-1"], "threshold"),
        ("ok", ["--chains", "1"], "chains"),
        ("ok", ["--eta-start", "1e6"], "diverged"),  # a step size that blows the weights up
    ],
)
def test_bad_input_one_line_exit_2_nothing_written(monkeypatch, capsys, tmp_path, train_file, case, extra, message):
    data = {"missing": tmp_path / "none.xyz", "ok": train_file}.get(case) or write_bad(tmp_path, case)
    out = tmp_path / "out"
    code, _, err = run_cli(monkeypatch, capsys, "finetune", "--data", str(data), "--out", str(out),
                           "--steps", "2", "--quiet", *extra)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_python_m_flytune():
    result = subprocess.run([sys.executable, "-m", "flytune", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for command in ("finetune", "evaluate", "demo"):
        assert command in result.stdout


def test_evaluate_unknown_model(monkeypatch, capsys, test_file):
    code, _, err = run_cli(monkeypatch, capsys, "evaluate", "--model", "nonsense", "--data", str(test_file))
    assert code == 2 and "unknown backbone" in err


def test_ctrl_c_stops_cleanly_and_keeps_samples(tmp_path, train_file):
    """SIGINT to the whole process group (as Ctrl-C does), with chains in worker processes."""
    import os
    import signal
    import time

    out = tmp_path / "interrupted"
    proc = subprocess.Popen(
        [sys.executable, "-m", "flytune", "finetune", "--data", str(train_file), "--out", str(out),
         "--chains", "2", "--workers", "2", "--steps", "100000", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    deadline = time.time() + 120
    while not (tmp_path / "interrupted.tmp").exists():  # the output being written
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    time.sleep(20)  # workers start and sample
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["interrupted"] and summary["n_members"] == 2
    assert summary["chain_steps"] < 200000  # stopped long before the end
    assert "interrupted" in stderr
    assert (out / "model.pt").exists()


def test_demo_config_is_the_example_with_the_demo_cuts(tmp_path):
    """`flytune demo` writes the example configuration with its cuts set in place: the
    settings equal the demo's own (those of the template it replaced)."""
    import tomllib

    from flytune.config import RunConfig
    from flytune.demo import write_demo
    from flytune.runconfig import load_run_config

    path = write_demo(tmp_path)
    expected = RunConfig.model_validate({
        "structure": str(tmp_path / "ethanol.xyz"), "run_dir": str(tmp_path / "run"), "seed": 1,
        "model": {"backbone": "7net-0", "chains": 2, "cycle_steps": 40, "eta_max": 1e-3, "workers": 2},
        "reference": {"name": "pyscf", "options": {"xc": "b3lyp", "basis": "6-31g*", "density_fit": True}},
        "uncertainty": {"threshold": 1.0, "threshold_unit": "kcal/mol"},
        "md": {"driver": "langevin", "timestep_fs": 0.5, "temperature_K": 300, "steps": 300},
    })
    config = load_run_config(path)
    assert config == expected
    assert config.safety.max_reference_calls is None and config.safety.force_call_after is None  # no crutches
    capped = load_run_config(write_demo(tmp_path / "capped", max_calls=25, force_after=40))
    assert (capped.safety.max_reference_calls, capped.safety.force_call_after) == (25, 40)
    text = path.read_text()
    assert text.startswith("# flytune demo") and "# " in text.split("[model]")[1]  # the example's comments stay
    assert tomllib.loads(text)["md"]["steps"] == 300
    assert (tmp_path / "ethanol.xyz").exists()
