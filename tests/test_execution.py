"""Reference calls through Parsl (``[execution] backend = "parsl"``): a real local
HighThroughputExecutor, the timeout, retries, the workers' stderr, the cluster examples."""

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk

from flytune.config import ExecutionConfig, ReferenceConfig, RunConfig
from flytune.errors import FlytuneError
from flytune.otf.execution import ParslReference, build_reference, parsl_config, with_mpi_launcher
from flytune.otf.reference import Reference, ReferenceFailure, make_reference

TESTS = Path(__file__).resolve().parent
EXAMPLES = TESTS.parent / "docs" / "examples"
LOCAL = ExecutionConfig(backend="parsl", parsl="htex_local", max_workers=1)


@pytest.fixture
def workers_import_tests(monkeypatch):
    """Worker processes inherit the environment: let them import conftest's calculators."""
    monkeypatch.setenv("PYTHONPATH", str(TESTS))


@pytest.fixture
def cu4():
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.rattle(0.05, seed=1)
    return atoms


def test_a_parsl_call_labels_exactly_as_in_process(tmp_path, cu4, workers_import_tests, monkeypatch):
    """Energy, forces and stress from a worker of a local HighThroughputExecutor equal the
    in-process call; the calculator works in its own folder; stderr reaches the run's log."""
    config = ReferenceConfig(name="conftest:NoisyEMT")
    monkeypatch.chdir(tmp_path)  # the in-process call leaves its file here
    local = make_reference(config.name).compute(cu4)
    with ParslReference(config, LOCAL, tmp_path) as ref:
        first = ref.compute(cu4)
        second = ref.compute(cu4)  # the same worker and calculator, computed afresh
    for got in (first, second):
        assert got.energy == local.energy
        np.testing.assert_array_equal(got.forces, local.forces)
        np.testing.assert_array_equal(got.stress, local.stress)
        assert got.attempts == 1 and got.wall_s > 0
    assert (tmp_path / "noisy_emt.txt").read_text() == "called\n"
    folders = list((tmp_path / "reference").iterdir())
    assert len(folders) == 1 and (folders[0] / "noisy_emt.txt").read_text().count("called") == 2
    assert (tmp_path / "reference.log").read_text().count("NoisyEMT on Cu4") == 2


def test_a_hung_call_times_out_and_is_retried(tmp_path, cu4, workers_import_tests):
    """A call that never returns within reference.timeout_s fails each attempt with a message
    that says why and where to look, instead of a run that waits for ever."""
    config = ReferenceConfig(name="conftest:SlowEMT", options={"delay": 30.0}, retries=1, timeout_s=2.0)
    with ParslReference(config, ExecutionConfig(backend="parsl", max_workers=2), tmp_path) as ref:
        start = time.perf_counter()
        with pytest.raises(ReferenceFailure) as info:
            ref.compute(cu4)
        waited = time.perf_counter() - start
    message = str(info.value)
    assert "after 2 attempts through Parsl" in message and message.count("no result after 2 s") == 2
    assert "reference.timeout_s" in message and str(tmp_path / "parsl") in message
    assert 4 <= waited < 15


def test_a_failing_worker_call_is_retried(tmp_path, cu4, workers_import_tests):
    """The first call in the worker raises; the retry succeeds (calls counted per process)."""
    config = ReferenceConfig(name="conftest:FailingCalculator", options={"mode": "raise", "succeed_first": 0},
                             retries=1)
    with ParslReference(config, LOCAL, tmp_path) as ref:
        with pytest.raises(ReferenceFailure, match="segmentation fault"):
            ref.compute(cu4)  # every call fails after the first 0: both attempts
    config = ReferenceConfig(name="conftest:FailOnce", retries=1)
    with ParslReference(config, LOCAL, tmp_path / "once") as ref:
        result = ref.compute(cu4)
    assert result.attempts == 2
    assert result.energy == make_reference("ase.calculators.emt:EMT").compute(cu4).energy


def test_mpi_launcher_goes_before_the_command():
    assert with_mpi_launcher({"command": "vasp_std", "encut": 400}, "srun -n 64") == {
        "command": "srun -n 64 vasp_std", "encut": 400}
    assert with_mpi_launcher({"xc": "PBE"}, None) == {"xc": "PBE"}
    with pytest.raises(FlytuneError, match="reference.options.command is not set"):
        with_mpi_launcher({"xc": "PBE"}, "srun -n 64")
    with pytest.raises(FlytuneError, match="applies to backend = 'parsl'"):
        build_reference(ReferenceConfig(name="ase.calculators.emt:EMT"),
                        ExecutionConfig(mpi_launcher="srun"), "run")


def test_execution_config_is_validated(tmp_path):
    assert isinstance(build_reference(ReferenceConfig(name="ase.calculators.emt:EMT"), ExecutionConfig(), "r"),
                      Reference)
    with pytest.raises(ValueError, match="htex_local"):
        ExecutionConfig(parsl="pbs")
    with pytest.raises(ValueError, match="walltime"):
        RunConfig.model_validate({"structure": "x.xyz", "execution": {"slurm": {"walltime": "12 hours"}}})
    with pytest.raises(FlytuneError, match="no such file"):
        parsl_config(ExecutionConfig(backend="parsl", parsl=str(tmp_path / "missing.py")), tmp_path)
    (tmp_path / "wrong.py").write_text("config = 3\n")
    with pytest.raises(FlytuneError, match="must define `config`"):
        parsl_config(ExecutionConfig(backend="parsl", parsl=str(tmp_path / "wrong.py")), tmp_path)
    (tmp_path / "mine.py").write_text(
        "from parsl.config import Config\nfrom parsl.executors import ThreadPoolExecutor\n"
        "config = Config(executors=[ThreadPoolExecutor(label='mine')])\n")
    config = parsl_config(ExecutionConfig(backend="parsl", parsl=str(tmp_path / "mine.py")), tmp_path)
    assert [e.label for e in config.executors] == ["mine"]
    with pytest.raises(FlytuneError, match="neither one of"):
        build_reference(ReferenceConfig(name="no.such:Calculator"), LOCAL, tmp_path)


@pytest.mark.parametrize("example", ["slurm_vasp.toml", "slurm_cp2k.toml"])
def test_run_check_accepts_the_cluster_examples(example):
    """The documented SLURM configs validate and build their Parsl config here, where there
    is neither SLURM nor VASP nor an MPI CP2K, and nothing is started or written."""
    result = subprocess.run([sys.executable, "-m", "flytune", "run", "--check", str(EXAMPLES / example)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = " ".join((result.stdout + result.stderr).split())
    assert "ready to run (nothing was started)" in out
    assert "HighThroughputExecutor with SlurmProvider" in out and "command 'srun -n" in out
    assert not (EXAMPLES / "runs").exists()
