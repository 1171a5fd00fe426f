"""The run directory: the whole memory of an on-the-fly run.

- ``labels.extxyz``: every labelled structure (raw and offset-corrected energy, forces,
  stress, force call, time), appended and flushed as soon as the reference returns;
  ``checkpoint/labels.jsonl`` holds the same records at full precision for replay;
- ``steps.csv``: one row per force call; ``interventions.jsonl``: one per reference call;
  ``updates.jsonl``: one per posterior update;
- ``trajectory.traj``: the MD trajectory (ASE); ``summary.json``; ``run_config.json``;
- ``checkpoint/checkpoint.pt``: ensemble, calibrator, offset, calculator counters, MD
  state and the lengths of every log.

A run with ``[[walkers]]`` keeps one ``labels.extxyz``, ``interventions.jsonl`` and
``updates.jsonl`` (labels and interventions carry a ``walker`` field) and, per walker
``i``, ``walkers/<i>/steps.csv`` and ``walkers/<i>/trajectory.traj``.

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
                "prob_force_exceed", "reference_called", "temperature_K", "uncontrolled", "force_deviation_eV_A",
                "predict_s"]


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
    """Files of one run; ``lock()`` refuses a second process on the same directory.

    ``walkers``: the number of ``[[walkers]]`` tables (0: one walker, its steps and
    trajectory at the top); None: read from ``run_config.json`` (an existing run)."""

    def __init__(self, path: str | os.PathLike, walkers: int | None = 0):
        self.path = Path(path)
        self.config = self.path / "run_config.json"
        if walkers is None:
            saved = json.loads(self.config.read_text()) if self.config.exists() else {}
            walkers = len(saved.get("config", {}).get("walkers", []))
        self.walkers = walkers
        self.labels = self.path / "labels.extxyz"
        folders = [self.path / "walkers" / str(i) for i in range(walkers)] or [self.path]
        self.walker_steps = [folder / "steps.csv" for folder in folders]
        self.walker_trajectories = [folder / "trajectory.traj" for folder in folders]
        self.steps, self.trajectory = self.walker_steps[0], self.walker_trajectories[0]
        self.interventions = self.path / "interventions.jsonl"
        self.updates = self.path / "updates.jsonl"
        self.summary = self.path / "summary.json"
        self.checkpoint_dir = self.path / "checkpoint"
        self.checkpoint = self.checkpoint_dir / "checkpoint.pt"
        self.exact_labels = self.checkpoint_dir / "labels.jsonl"
        self._lock_file = None
        self._step_columns: dict[int, list[str] | None] = {}

    # -- lifecycle ------------------------------------------------------------------
    def lock(self) -> None:
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        for path in self.walker_steps:
            path.parent.mkdir(parents=True, exist_ok=True)
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

    def append_step(self, row: dict, walker: int = 0) -> None:
        """One row of walker ``walker``'s ``steps.csv``, in the columns of its header (a run
        directory written by an older version keeps its columns)."""
        path = self.walker_steps[walker]
        if self._step_columns.get(walker) is None:
            with open(path, "a+", newline="") as f:
                f.seek(0)
                header = f.readline().strip()
            self._step_columns[walker] = header.split(",") if header else None
        columns = self._step_columns[walker]
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns or STEP_COLUMNS)
            if columns is None:
                writer.writeheader()
                self._step_columns[walker] = columns = STEP_COLUMNS
            writer.writerow({k: row.get(k) for k in columns})

    def read_steps(self, walker: int | None = 0) -> dict[str, np.ndarray]:
        """The columns of walker ``walker``'s ``steps.csv`` as arrays (booleans, floats; an
        empty cell is NaN; the ``uncontrolled`` column stays text); ``None``: every walker's
        rows, walker after walker, with a ``walker`` column."""
        if walker is None:
            parts = [self.read_steps(i) for i in range(len(self.walker_steps))]
            for i, part in enumerate(parts):
                part["walker"] = np.full(len(next(iter(part.values()), [])), i)
            keys = [k for k in parts[0] if all(k in p for p in parts)]
            return {k: np.concatenate([p[k] for p in parts]) for k in keys}
        columns: dict[str, list] = {}
        path = self.walker_steps[walker]
        if path.exists():
            with open(path, newline="") as f:
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

    def append_frame(self, atoms: Atoms, walker: int = 0) -> None:
        with Trajectory(self.walker_trajectories[walker], "a") as traj:
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
        ``updates`` (absent in checkpoints older than ``updates.jsonl``: kept as is);
        ``steps`` and ``frames`` hold one count per walker (a number: the one walker's).
        """
        labels = self.read_exact_labels()
        _rewrite_lines(self.exact_labels, [json.dumps(label_record(a)) for a in labels])
        if self.labels.exists() or labels:
            with replacing(self.labels) as tmp:
                write(tmp, labels, format="extxyz") if labels else tmp.write_text("")
        per_walker = lambda key: counts[key] if isinstance(counts[key], list) else [counts[key]]  # noqa: E731
        for path, rows in zip(self.walker_steps, per_walker("steps")):
            if path.exists():
                _rewrite_lines(path, path.read_text().splitlines()[: rows + 1])
        for log, key in ((self.interventions, "interventions"), (self.updates, "updates")):
            if log.exists() and key in counts:
                _rewrite_lines(log, log.read_text().splitlines()[: counts[key]])
        for path, count in zip(self.walker_trajectories, per_walker("frames")):
            if path.exists():
                frames = read(path, index=":")[:count]
                with replacing(path) as tmp, Trajectory(tmp, "w") as traj:
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


def force_exceed_fraction(records: list[dict], force_threshold_eV_A: float | None) -> float | None:
    """Fraction of the interventions that test a prediction (all but the first) whose
    largest per-atom force error max_a |ΔF_a| exceeds ε_F; None without ε_F or such records."""
    errors = np.array([r["force_error_max"] for r in records if not r["first"] and "force_error_max" in r])
    if force_threshold_eV_A is None or not errors.size:
        return None
    return float(np.mean(errors > force_threshold_eV_A))


def md_steps_of(steps: dict[str, np.ndarray]) -> int:
    """MD steps in ``steps`` (:meth:`RunDirectory.read_steps`): the last step of each walker, summed."""
    if "step" not in steps or not steps["step"].size:
        return 0
    walker = steps.get("walker", np.zeros(steps["step"].size, dtype=int))
    return int(sum(steps["step"][walker == w][-1] for w in np.unique(walker)))


def cost_figures(steps: dict[str, np.ndarray], interventions: list[dict], updates: list[dict],
                 wall_s: float | None) -> dict:
    """What a run cost and where it kept its promise, from its logs.

    - ``steps_uncontrolled``: force calls that ran with P(|e| > ε) above the level and no
      reference call (a call cap, a wait between calls, a failed reference), and
      ``uncontrolled_by_cause``;
    - ``speedup_vs_reference_md`` = MD steps (of all walkers) × median t_ref / wall time:
      how much faster the run was than the reference doing every step;
    - ``reference_over_prediction`` = median t_ref / median t_pred: the limit of that
      speed-up (one ensemble prediction per step instead of one reference call);
    - ``updates``, ``labels_per_update`` and ``median_s_per_chain_step`` of the updates
      the MD waited for or ran beside, and ``final_cycles`` / ``final_cycles_s``: the
      cycles over all labels after the last step (``[updates] final_cycles``);
    - ``calls_by_reason`` (first, probability, forced, check) and ``calls_by_label_misfit``: the
      probability calls that the label misfit caused (with the ensemble's σ alone, P was
      below the level; :func:`flytune.otf.decision.trusted_sigma`).

    t_ref counts calls made in this run directory (a label replayed on resume costs 0),
    and only those made alone, when there are any: while no background update ran and
    with no other walker's call at once (``calls_at_once``); a call that shares the cores
    takes longer than the reference alone would, and pricing the reference MD at that
    time would flatter the speed-up.
    """
    causes = [c for c in steps.get("uncontrolled", np.array([])) if c]
    by_cause = {c: causes.count(c) for c in sorted(set(causes))}
    md_steps = md_steps_of(steps)
    made = [r for r in interventions if r["reference_s"] > 0]
    alone = [r for r in made if not r.get("update_running") and r.get("calls_at_once", 1) == 1]
    t_ref = np.array([r["reference_s"] for r in (alone or made)])
    t_pred = steps.get("predict_s", np.array([]))
    t_pred = t_pred[np.isfinite(t_pred)]
    median_ref = float(np.median(t_ref)) if t_ref.size else None
    if not updates:  # a run directory from before updates.jsonl: one update per call
        updates = [{"labels_learned": 1} for _ in interventions]
    final = [u for u in updates if u.get("reason") == "final"]
    updates = [u for u in updates if u.get("reason") != "final"]
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
        "final_cycles": len(final),
        "final_cycles_s": sum(u["update_s"] for u in final),
    }


def walker_figures(rd: RunDirectory, interventions: list[dict], threshold_eV: float) -> list[dict]:
    """Per walker of a run with ``[[walkers]]``: MD steps, reference calls, the fraction
    of its tested errors above ε (``threshold_eV``), their RMSE (eV) and its steps run
    outside the promise."""
    out = []
    for i in range(len(rd.walker_steps)):
        steps = rd.read_steps(i)
        mine = [r for r in interventions if r.get("walker", 0) == i]
        exceed, rmse = intervention_figures(mine, threshold_eV)
        out.append({"walker": i, "steps": md_steps_of(steps), "reference_calls": len(mine), "exceed_fraction": exceed,
                    "rmse_at_interventions_eV": rmse,
                    "steps_uncontrolled": int(sum(bool(c) for c in steps.get("uncontrolled", [])))})
    return out
