"""The run directory: the whole memory of an on-the-fly run.

- ``labels.extxyz``: every labelled structure (raw and offset-corrected energy, forces,
  stress, force call, time), appended and flushed as soon as the reference returns;
  ``checkpoint/labels.jsonl`` holds the same records at full precision for replay;
- ``steps.csv``: one row per force call; ``interventions.jsonl``: one per reference call;
  ``updates.jsonl``: one per posterior update;
- ``trajectory.traj``: the MD trajectory (ASE); ``summary.json``; ``run_config.json``;
- ``checkpoint/checkpoint.pt``: ensemble, calibrator, offset, calculator counters, MD
  state and the lengths of every log.

Every rewrite is atomic (:func:`flytune.files.replacing`: write, fsync, rename, fsync
of the directory); appends are flushed to disk as they are made.

A resumed run truncates the logs to the checkpoint's lengths and replays the labels
written after it, so no label is lost or duplicated. :func:`pack` and :func:`unpack` carry
a run directory to another machine (or keep it between batch jobs) as one tar.xz file.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.io import Trajectory, read, write

from flytune.data import labelled
from flytune.errors import FlytuneError
from flytune.files import replacing, write_text_atomic
from flytune.otf import faults

STEP_COLUMNS = ["step", "force_call", "time_fs", "energy_eV", "energy_std_eV", "prob_exceed",
                "reference_called", "temperature_K", "uncontrolled", "predict_s"]


def _fsync_append(path: Path, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def label_record(atoms: Atoms) -> dict:
    """A JSON-able, lossless record of a labelled structure (floats round-trip exactly)."""
    res = atoms.calc.results
    return {
        "numbers": atoms.numbers.tolist(),
        "positions": atoms.positions.tolist(),
        "cell": np.asarray(atoms.cell).tolist(),
        "pbc": atoms.pbc.tolist(),
        "energy": float(res["energy"]),
        "forces": np.asarray(res["forces"]).tolist(),
        "stress": np.asarray(res["stress"]).tolist() if res.get("stress") is not None else None,
        "info": {k: v for k, v in atoms.info.items() if isinstance(v, (int, float, str, bool))},
    }


def label_from_record(record: dict) -> Atoms:
    atoms = Atoms(numbers=record["numbers"], positions=record["positions"], cell=record["cell"], pbc=record["pbc"])
    atoms = labelled(atoms, record["energy"], record["forces"], record["stress"])
    atoms.info.update(record["info"])
    return atoms


class RunDirectory:
    """Files of one run; ``lock()`` refuses a second process on the same directory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.labels = self.path / "labels.extxyz"
        self.steps = self.path / "steps.csv"
        self.interventions = self.path / "interventions.jsonl"
        self.updates = self.path / "updates.jsonl"
        self.trajectory = self.path / "trajectory.traj"
        self.summary = self.path / "summary.json"
        self.config = self.path / "run_config.json"
        self.checkpoint_dir = self.path / "checkpoint"
        self.checkpoint = self.checkpoint_dir / "checkpoint.pt"
        self.exact_labels = self.checkpoint_dir / "labels.jsonl"
        self._lock_file = None
        self._step_columns: list[str] | None = None

    # -- lifecycle ------------------------------------------------------------------
    def lock(self) -> None:
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        handle = open(self.path / ".lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            if exc.errno in (errno.EAGAIN, errno.EACCES):  # BlockingIOError: held by another process
                raise FlytuneError(
                    f"run directory {str(self.path)!r} is in use by {owner}; wait for it to finish or stop it"
                ) from None
            raise FlytuneError(
                f"cannot lock run directory {str(self.path)!r}: its filesystem does not support file locks "
                f"({os.strerror(exc.errno) if exc.errno else exc}), as on Lustre or NFS mounted without them; "
                "put run_dir on a filesystem with locks (a local disk, or Lustre mounted with -o flock)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"flytune pid {os.getpid()}")
        handle.flush()
        self._lock_file = handle

    def unlock(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    @property
    def resumable(self) -> bool:
        return self.checkpoint.exists()

    # -- appends --------------------------------------------------------------------
    def append_label(self, atoms: Atoms) -> None:
        """Record a labelled structure: the exact record first, then the extxyz copy."""
        _fsync_append(self.exact_labels, json.dumps(label_record(atoms)) + "\n")
        with open(self.labels, "a") as f:
            write(f, atoms, format="extxyz")
            f.flush()
            os.fsync(f.fileno())

    def append_step(self, row: dict) -> None:
        """One row of ``steps.csv``, in the columns of its header (a run directory written
        by an older version keeps its columns)."""
        if self._step_columns is None:
            with open(self.steps, "a+", newline="") as f:
                f.seek(0)
                header = f.readline().strip()
            self._step_columns = header.split(",") if header else None
        with open(self.steps, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self._step_columns or STEP_COLUMNS)
            if self._step_columns is None:
                writer.writeheader()
                self._step_columns = STEP_COLUMNS
            writer.writerow({k: row.get(k) for k in self._step_columns})

    def read_steps(self) -> dict[str, np.ndarray]:
        """The columns of ``steps.csv`` as arrays (booleans, floats; an empty cell is NaN;
        the ``uncontrolled`` column stays text)."""
        columns: dict[str, list] = {}
        if self.steps.exists():
            with open(self.steps, newline="") as f:
                for row in csv.DictReader(f):
                    for k, v in row.items():
                        columns.setdefault(k, []).append(v)
        return {k: np.array(v) if k == "uncontrolled" else _column(v) for k, v in columns.items()}

    def append_intervention(self, record: dict) -> None:
        _fsync_append(self.interventions, json.dumps(record) + "\n")

    def read_interventions(self) -> list[dict]:
        """The records of ``interventions.jsonl``, in order (none before the first call)."""
        return _read_jsonl(self.interventions)

    def append_update(self, record: dict) -> None:
        _fsync_append(self.updates, json.dumps(record) + "\n")

    def read_updates(self) -> list[dict]:
        """The records of ``updates.jsonl`` (one per posterior update), in order."""
        return _read_jsonl(self.updates)

    def append_frame(self, atoms: Atoms) -> None:
        with Trajectory(self.trajectory, "a") as traj:
            traj.write(atoms)

    def write_json(self, path: Path, data: dict) -> None:
        write_text_atomic(path, json.dumps(data, indent=2))

    # -- checkpoint -----------------------------------------------------------------
    def write_checkpoint(self, state: dict) -> None:
        """Atomic: a kill leaves either the old or the new checkpoint, never half of one."""
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        with replacing(self.checkpoint, before_rename=lambda: faults.point("checkpoint-written")) as tmp:
            torch.save(state, tmp)

    def read_checkpoint(self) -> dict:
        try:
            return torch.load(self.checkpoint, weights_only=True, map_location="cpu")
        except Exception as exc:
            raise FlytuneError(f"cannot read the checkpoint of {str(self.path)!r} ({exc}); "
                               "start a new run directory") from exc

    # -- resume ---------------------------------------------------------------------
    def read_exact_labels(self) -> list[Atoms]:
        """Every complete label record (a line cut by a kill is dropped)."""
        if not self.exact_labels.exists():
            return []
        records = []
        for line in self.exact_labels.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
        return [label_from_record(r) for r in records]

    def truncate(self, counts: dict) -> list[Atoms]:
        """Cut every log back to the checkpoint's lengths; returns the labels after it.

        ``counts``: ``labels``, ``steps`` (rows), ``interventions``, ``frames`` and
        ``updates`` (absent in checkpoints older than ``updates.jsonl``: kept as is).
        """
        labels = self.read_exact_labels()
        _rewrite_lines(self.exact_labels, [json.dumps(label_record(a)) for a in labels])
        if self.labels.exists() or labels:
            with replacing(self.labels) as tmp:
                write(tmp, labels, format="extxyz") if labels else tmp.write_text("")
        if self.steps.exists():
            lines = self.steps.read_text().splitlines()
            _rewrite_lines(self.steps, lines[: counts["steps"] + 1])
        for log, key in ((self.interventions, "interventions"), (self.updates, "updates")):
            if log.exists() and key in counts:
                _rewrite_lines(log, log.read_text().splitlines()[: counts[key]])
        if self.trajectory.exists():
            frames = read(self.trajectory, index=":")[: counts["frames"]]
            with replacing(self.trajectory) as tmp, Trajectory(tmp, "w") as traj:
                for frame in frames:
                    traj.write(frame)
        return labels[counts["labels"]:]


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _column(values: list[str]) -> np.ndarray:
    if values and values[0] in ("True", "False"):
        return np.array([v == "True" for v in values])
    return np.array([float(v) if v not in ("", "None") else np.nan for v in values])


def _rewrite_lines(path: Path, lines: list[str]) -> None:
    write_text_atomic(path, "".join(line + "\n" for line in lines))


#: SGHMC statistics that every update re-initialises (``sghmc.init`` before its first step)
RESET_BY_NEXT_UPDATE = ("momenta", "sq_grad_avg", "sq_grad_max")
#: not packed: the lock, the final ensemble and the report (``flytune run`` and
#: ``flytune report`` write them again)
NOT_PACKED = (".lock", "model.pt", "report")


def compact_checkpoint(state: dict) -> dict:
    """The checkpoint with the statistics that the next update resets zeroed, for chains
    whose last update completed: the run continues bit for bit, and the zeros compress
    away (the SGHMC state of a chain is then its parameters only)."""
    for chain in state["ensemble"]["chains"]:
        if not chain["interrupted"]:
            for key in RESET_BY_NEXT_UPDATE:
                chain["state"][key] = {k: torch.zeros_like(v) for k, v in chain["state"][key].items()}
    return state


def pack(run_dir: str | os.PathLike, archive: str | os.PathLike) -> Path:
    """Write a stopped run directory to one ``.tar.xz`` file with a compact checkpoint
    (:func:`compact_checkpoint`); :func:`unpack` restores it and the run resumes where it
    stopped. Refuses a directory in use by a run."""
    rd, archive = RunDirectory(run_dir), Path(archive)
    if not rd.resumable:
        raise FlytuneError(f"{str(rd.path)!r} has no checkpoint/checkpoint.pt: is it a flytune run directory?")
    rd.lock()
    try:
        checkpoint = io.BytesIO()
        torch.save(compact_checkpoint(rd.read_checkpoint()), checkpoint)
        archive.parent.mkdir(parents=True, exist_ok=True)
        with replacing(archive) as tmp, tarfile.open(tmp, "w:xz") as tar:
            for path in sorted(rd.path.rglob("*")):
                rel = path.relative_to(rd.path)
                if path.is_file() and rel.parts[0] not in NOT_PACKED and path != rd.checkpoint and path.suffix != ".tmp":
                    tar.add(path, arcname=str(rel))
            info = tarfile.TarInfo(str(rd.checkpoint.relative_to(rd.path)))
            info.size = checkpoint.getbuffer().nbytes
            checkpoint.seek(0)
            tar.addfile(info, checkpoint)
    finally:
        rd.unlock()
    return archive


def unpack(archive: str | os.PathLike, run_dir: str | os.PathLike) -> Path:
    """Recreate the run directory written by :func:`pack` at ``run_dir`` (new or empty)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FlytuneError(f"{str(run_dir)!r} is not empty: unpack into a new directory")
    try:
        with tarfile.open(archive, "r:xz") as tar:
            tar.extractall(run_dir, filter="data")
    except (OSError, tarfile.TarError) as exc:
        raise FlytuneError(f"cannot unpack {str(archive)!r} ({exc}); pass a file written by `flytune pack`") from exc
    if not RunDirectory(run_dir).resumable:
        raise FlytuneError(f"{str(archive)!r} holds no flytune checkpoint; pass a file written by `flytune pack`")
    return run_dir


def intervention_figures(records: list[dict], threshold_eV: float) -> tuple[float | None, float | None]:
    """(fraction of |error| > ε, RMSE in eV) over the interventions that test a
    prediction: all but the first, whose error is zero by the energy offset. None if none."""
    errors = np.array([r["error"] for r in records if not r["first"]])
    if not errors.size:
        return None, None
    return float(np.mean(np.abs(errors) > threshold_eV)), float(np.sqrt(np.mean(errors**2)))


def cost_figures(steps: dict[str, np.ndarray], interventions: list[dict], updates: list[dict],
                 wall_s: float | None) -> dict:
    """What a run cost and where it kept its promise, from its logs.

    - ``steps_uncontrolled``: force calls that ran with P(|e| > ε) above the level and no
      reference call (a call cap, a wait between calls, a failed reference), and
      ``uncontrolled_by_cause``;
    - ``speedup_vs_reference_md`` = MD steps × median t_ref / wall time: how much faster
      the run was than the reference doing every step;
    - ``reference_over_prediction`` = median t_ref / median t_pred: the limit of that
      speed-up (one ensemble prediction per step instead of one reference call);
    - ``updates``, ``labels_per_update`` and ``median_s_per_chain_step`` of the updates;
    - ``calls_by_reason`` (first, probability, forced, check) and ``calls_by_label_misfit``: the
      probability calls that the label misfit caused (with the ensemble's σ alone, P was
      below the level; :func:`flytune.otf.decision.trusted_sigma`).

    t_ref counts calls made in this run directory (a label replayed on resume costs 0),
    and only those made while no background update ran, when there are any: a call that
    shares the cores with an update takes longer than the reference alone would, and
    pricing the reference MD at that time would flatter the speed-up.
    """
    causes = [c for c in steps.get("uncontrolled", np.array([])) if c]
    by_cause = {c: causes.count(c) for c in sorted(set(causes))}
    md_steps = int(steps["step"][-1]) if "step" in steps and steps["step"].size else 0
    made = [r for r in interventions if r["reference_s"] > 0]
    alone = [r for r in made if not r.get("update_running")]
    t_ref = np.array([r["reference_s"] for r in (alone or made)])
    t_pred = steps.get("predict_s", np.array([]))
    t_pred = t_pred[np.isfinite(t_pred)]
    median_ref = float(np.median(t_ref)) if t_ref.size else None
    if not updates:  # a run directory from before updates.jsonl: one update per call
        updates = [{"labels_learned": 1} for _ in interventions]
    learned = sum(u["labels_learned"] for u in updates)
    per_step = [u["s_per_chain_step"] for u in updates if "s_per_chain_step" in u]
    return {
        "steps_uncontrolled": len(causes),
        "uncontrolled_by_cause": by_cause,
        "calls_by_reason": dict(Counter(r.get("reason", "first" if r.get("first") else "probability")
                                        for r in interventions)),
        "calls_by_label_misfit": sum(bool(r.get("by_misfit")) for r in interventions),
        "speedup_vs_reference_md": md_steps * median_ref / wall_s if median_ref and wall_s else None,
        "reference_over_prediction": median_ref / float(np.median(t_pred)) if median_ref and t_pred.size else None,
        "median_reference_s": median_ref,
        "median_predict_s": float(np.median(t_pred)) if t_pred.size else None,
        "updates": len(updates),
        "labels_per_update": learned / len(updates) if updates else None,
        "median_s_per_chain_step": float(np.median(per_step)) if per_step else None,
    }
