"""Where reference calls run: in this process, or as Parsl apps on workers (``[execution]``).

``backend = "local"`` (the default) calls the reference calculator in the run's own
process (:class:`flytune.otf.reference.Reference`). ``backend = "parsl"`` sends each
call to a Parsl HighThroughputExecutor and waits for its future:

- ``parsl = "htex_local"``: ``max_workers`` worker processes on this machine;
- ``parsl = "slurm"``: SLURM jobs (``[execution.slurm]``: partition, nodes per job,
  walltime, the shell lines that prepare a node), with ``max_workers`` calls at once
  per job; ``mpi_launcher`` (``"srun -n 64"``) is put before the reference's
  ``options.command`` (``"vasp_std"``, ``"cp2k_shell.psmp"``) so that each call
  runs as an MPI job inside the allocation;
- the path of a Python file that defines a Parsl ``config``: anything Parsl can do (PBS,
  LSF, Flux, several executors).

A call is the same as in-process: the structure is labelled on a fresh calculator
(kept per worker process, so PySCF still starts from the previous density there),
checked for finite values, and retried ``reference.retries`` times. Each attempt waits
at most ``reference.timeout_s``: a lost worker or a hung interchange (Parsl can wait
silently for ever) becomes a failed attempt with a message naming the Parsl logs, and
``on_failure`` decides as for any failure. A timed-out attempt cannot be stopped on its
worker; that worker stays busy until the calculation ends. What the calculations write
to stderr goes to ``RUN_DIR/reference.log``, their files to ``RUN_DIR/reference/<host>-<pid>/``;
Parsl's own logs go to ``RUN_DIR/parsl/``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib.util
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path

from ase import Atoms

from flytune.config import ExecutionConfig, ReferenceConfig
from flytune.errors import FlytuneError
from flytune.otf.reference import BUILTIN, Reference, ReferenceFailure, ReferenceResult, make_reference, retrying

EXECUTOR_LABEL = "reference"


def with_mpi_launcher(options: dict, launcher: str | None) -> dict:
    """``options`` with ``command`` prefixed by the MPI launcher (``"srun -n 64 vasp_std"``)."""
    if not launcher:
        return dict(options)
    command = options.get("command")
    if not command:
        raise FlytuneError(
            f"execution.mpi_launcher = {launcher!r} is put before the reference's command, but "
            "reference.options.command is not set; give the program, e.g. command = \"vasp_std\" "
            "(ase.calculators.vasp:Vasp) or \"cp2k_shell.psmp\" (cp2k)")
    return {**options, "command": f"{launcher} {command}"}


def _bin_script(script: str) -> str:
    """A Parsl entry script next to this interpreter (a virtual environment that is not
    activated keeps it off PATH), else the bare name."""
    path = Path(sys.executable).parent / script
    return str(path) if path.exists() else script


def parsl_config(execution: ExecutionConfig, run_dir: str | os.PathLike):
    """The Parsl ``Config`` for ``[execution]`` (built, not started)."""
    from parsl.config import Config
    from parsl.executors import HighThroughputExecutor
    from parsl.executors.high_throughput.executor import DEFAULT_INTERCHANGE_LAUNCH_CMD, DEFAULT_LAUNCH_CMD
    from parsl.launchers import SimpleLauncher
    from parsl.providers import LocalProvider, SlurmProvider

    logs = str(Path(run_dir).resolve() / "parsl")
    if execution.parsl.endswith(".py"):
        return _user_config(Path(execution.parsl))
    launch = DEFAULT_LAUNCH_CMD.replace("process_worker_pool.py", shlex.quote(_bin_script("process_worker_pool.py")), 1)
    interchange = [_bin_script(DEFAULT_INTERCHANGE_LAUNCH_CMD[0]), *DEFAULT_INTERCHANGE_LAUNCH_CMD[1:]]
    if execution.parsl == "htex_local":
        threads = max(1, (os.cpu_count() or 1) // execution.max_workers)
        provider = LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1,
                                 worker_init=f"export OMP_NUM_THREADS={threads}")
        executor = HighThroughputExecutor(label=EXECUTOR_LABEL, max_workers_per_node=execution.max_workers,
                                          provider=provider, address="127.0.0.1", launch_cmd=launch,
                                          interchange_launch_cmd=interchange, worker_logdir_root=logs)
        return Config(executors=[executor], run_dir=logs, retries=0, strategy="none", usage_tracking=0)
    s = execution.slurm
    provider = SlurmProvider(partition=s.partition, account=s.account, qos=s.qos, nodes_per_block=s.nodes_per_block,
                             cores_per_node=s.cores_per_node, walltime=s.walltime, init_blocks=1, min_blocks=0,
                             max_blocks=s.max_blocks, worker_init=s.worker_init, scheduler_options=s.scheduler_options,
                             exclusive=s.exclusive, launcher=SimpleLauncher())  # one worker pool per job: MPI spans it
    executor = HighThroughputExecutor(label=EXECUTOR_LABEL, max_workers_per_node=execution.max_workers,
                                      provider=provider, launch_cmd=launch, interchange_launch_cmd=interchange,
                                      worker_logdir_root=logs)
    return Config(executors=[executor], run_dir=logs, retries=0, usage_tracking=0)


def _user_config(path: Path):
    from parsl.config import Config

    if not path.is_file():
        raise FlytuneError(f"execution.parsl = {str(path)!r}: no such file; give a Python file that defines "
                           "`config = parsl.config.Config(...)`, or use 'htex_local' / 'slurm'")
    spec = importlib.util.spec_from_file_location("flytune_parsl_config", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise FlytuneError(f"execution.parsl = {str(path)!r} failed to load ({type(exc).__name__}: {exc})") from None
    config = getattr(module, "config", None)
    if not isinstance(config, Config):
        raise FlytuneError(f"{path} must define `config`, a parsl.config.Config (found {type(config).__name__})")
    return config


# -- in the worker ------------------------------------------------------------------------
_WORKER_REFERENCES: dict[str, Reference] = {}


@contextlib.contextmanager
def _stderr_to(path: str):
    """Send this process's stderr (file descriptor 2, so the calculator's C and Fortran
    output too) to ``path`` while the block runs."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "a") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def label_in_worker(name: str, options: dict, atoms: Atoms, want_stress: bool, run_dir: str) -> ReferenceResult:
    """One attempt of one reference call, run by a Parsl worker (module level, so that
    Parsl sends it by reference). The calculator is kept per worker process, and works in
    ``RUN_DIR/reference/<host>-<pid>/`` so that file-based programs (VASP, CP2K) of two
    workers never share a folder."""
    key = json.dumps([name, options], sort_keys=True, default=str)
    if key not in _WORKER_REFERENCES:
        folder = Path(run_dir) / "reference" / f"{socket.gethostname()}-{os.getpid()}"
        folder.mkdir(parents=True, exist_ok=True)
        os.chdir(folder)
        _WORKER_REFERENCES[key] = make_reference(name, options, retries=0)
    with _stderr_to(str(Path(run_dir) / "reference.log")):
        return _WORKER_REFERENCES[key].attempt(atoms, want_stress)  # the run retries


# -- in the run ---------------------------------------------------------------------------
class ParslReference:
    """Labels structures through Parsl: the contract of :class:`~flytune.otf.reference.Reference`
    (``compute(atoms) -> ReferenceResult``), each attempt a Parsl app with a timeout."""

    #: calls of several walkers run at once (:func:`~flytune.otf.reference.compute_concurrently`)
    concurrent = True

    def __init__(self, reference: ReferenceConfig, execution: ExecutionConfig, run_dir: str | os.PathLike):
        self.name = reference.name
        self.options = with_mpi_launcher(reference.options, execution.mpi_launcher)
        self.retries = reference.retries
        self.timeout_s = reference.timeout_s
        self.run_dir = Path(run_dir).resolve()
        self.log_path = self.run_dir / "reference.log"
        self.execution = execution
        if self.name not in BUILTIN:
            make_reference(self.name, {})  # resolves the import path here; built in the workers
        self.config = parsl_config(execution, run_dir)
        self._dfk = None
        self._app = None

    def describe(self) -> str:
        e = self.execution
        where = {"htex_local": f"{e.max_workers} local worker(s)",
                 "slurm": f"SLURM jobs of {e.slurm.nodes_per_block} node(s), partition {e.slurm.partition or '(default)'}, "
                          f"walltime {e.slurm.walltime}, {e.max_workers} call(s) per job"}.get(e.parsl, e.parsl)
        command = f", command {self.options['command']!r}" if "command" in self.options else ""
        executors = ", ".join(f"{type(x).__name__} with {type(x.provider).__name__}" for x in self.config.executors)
        return (f"reference {self.name!r} through Parsl ({where}{command}), timeout {self.timeout_s:g} s per attempt; "
                f"Parsl config: {executors}, logs in {self.config.run_dir}")

    def start(self) -> None:
        from parsl import python_app
        from parsl.dataflow.dflow import DataFlowKernel

        if self._dfk is None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._dfk = DataFlowKernel(self.config)
            self._app = python_app(label_in_worker, data_flow_kernel=self._dfk)

    def close(self) -> None:
        if self._dfk is not None:
            self._dfk.cleanup()
            self._dfk = self._app = None

    def __enter__(self) -> ParslReference:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def compute(self, atoms: Atoms, want_stress: bool | None = None) -> ReferenceResult:
        want_stress = bool(atoms.pbc.all()) if want_stress is None else want_stress
        self.start()
        return retrying(lambda: self.attempt(atoms, want_stress), self.name, atoms, self.retries,
                        f" through Parsl (stderr in {self.log_path})")

    def attempt(self, atoms: Atoms, want_stress: bool) -> ReferenceResult:
        """One calculation on a worker, waited for at most ``timeout_s``."""
        future = self._app(self.name, self.options, atoms.copy(), want_stress, str(self.run_dir))
        try:
            return future.result(timeout=self.timeout_s)
        except concurrent.futures.TimeoutError:
            raise ReferenceFailure(f"no result after {self.timeout_s:g} s (reference.timeout_s): a lost worker or "
                                   f"a hung Parsl interchange; see {self.run_dir / 'parsl'}") from None


def build_reference(reference: ReferenceConfig, execution: ExecutionConfig,
                    run_dir: str | os.PathLike) -> Reference | ParslReference:
    """The reference of a run: in-process, or through Parsl (not started until its first call
    or :meth:`ParslReference.start`)."""
    if execution.backend == "local":
        if execution.mpi_launcher:
            raise FlytuneError("execution.mpi_launcher applies to backend = 'parsl'; with 'local', put the "
                               "launcher in reference.options.command yourself")
        return make_reference(reference.name, reference.options, reference.retries)
    try:
        import parsl  # noqa: F401
    except ImportError:
        raise FlytuneError("execution.backend = 'parsl' needs Parsl: `pip install parsl`") from None
    return ParslReference(reference, execution, run_dir)
