"""Accuracy and uncertainty-quality metrics of an ensemble on labelled structures.

Keys (ASE units; the same with a ``_kcal`` suffix in kcal/mol-based units):
``energy_rmse``, ``energy_mae`` (eV), ``force_rmse``, ``force_mae`` (eV/Å),
``force_mll`` (mean Gaussian log-likelihood of the force components under the
predicted mean and total variance), ``force_mll_recalibrated`` (the same with the
variances scaled by ``calibration_factor``), ``force_auc_roc`` (AUC-ROC of the
predicted σ for detecting components with |error| above a threshold), the same AUC of
each part of that σ alone where the ensemble gives them (``force_auc_roc_spread``: the
members' disagreement; ``force_auc_roc_sigma_head``: the likelihood's σ_F head; which
part ranks the errors, :func:`force_variance_parts`) and
``calibration_factor`` c = mean(e²)/mean(σ²), the factor on the predicted variance that
would match it to the observed mean squared error (or the factor given, e.g. one fitted
on a validation set).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from ase import Atoms
from scipy.stats import rankdata

from flytune.bayes.ensemble import Ensemble
from flytune.data import labels_of, read_labelled
from flytune.errors import FlytuneError
from flytune.finetune import MODEL_FILE
from flytune.files import write_text_atomic
from flytune.units import KCAL_MOL

LOG_KCAL = math.log(KCAL_MOL)  # log p in kcal/mol/Å units = log p in eV/Å units + LOG_KCAL


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """AUC-ROC = P(score of a positive > score of a negative), ties counted ½ (Mann–Whitney).

    NaN when one class is empty.
    """
    scores, positive = np.asarray(scores, float).ravel(), np.asarray(positive, bool).ravel()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def gaussian_mll(errors: np.ndarray, variances: np.ndarray) -> float:
    """Mean of log N(e; 0, σ²) over all entries."""
    errors, variances = np.asarray(errors, float), np.asarray(variances, float)
    return float(np.mean(-0.5 * errors**2 / variances - 0.5 * np.log(2 * np.pi * variances)))


def force_variance_parts(force_var: np.ndarray, force_deviation: np.ndarray, n_members: int) -> dict[str, np.ndarray]:
    r"""Split the total force variance (A, 3) of an M-member ensemble into its two parts,
    per component (eV²/Å²), from each atom's member deviation d_a, (A,)
    (:func:`flytune.bayes.ensemble.force_deviation`):

        spread_a   = d_a² · M / (M − 1) / 3        (Var_m of the member forces, ddof 1,
                                                    averaged over the 3 components)
        sigma_head = mean_c σ²_{a,c} − spread_a     (mean over members of σ_F², clipped at 0)

    The spread is 0 for one member. Each is constant over an atom's components.
    """
    spread = force_deviation**2 * n_members / (n_members - 1) / 3 if n_members > 1 else np.zeros(len(force_var))
    head = np.clip(np.asarray(force_var).mean(axis=1) - spread, 0.0, None)
    return {"spread": np.repeat(spread[:, None], 3, axis=1), "sigma_head": np.repeat(head[:, None], 3, axis=1)}


def error_metrics(
    energy_error: np.ndarray,
    force_error: np.ndarray,
    force_var: np.ndarray,
    force_error_threshold: float = KCAL_MOL,
    calibration_factor: float | None = None,
    force_var_parts: dict[str, np.ndarray] | None = None,
) -> dict[str, float]:
    """Metrics of energy errors (S,) and force-component errors/variances (A, 3), eV units.

    ``force_mll_recalibrated`` scales the variances by ``calibration_factor`` (e.g. fitted
    on a validation set); by default by c = mean(e²)/mean(σ²) of these errors. Each entry
    of ``force_var_parts`` (a part of ``force_var``, (A, 3)) adds ``force_auc_roc_<name>``.
    """
    if calibration_factor is None:
        c = float(np.mean(force_error**2) / np.mean(force_var))
    else:
        c = float(calibration_factor)
    large = np.abs(force_error) > force_error_threshold
    out = {
        "energy_rmse": float(np.sqrt(np.mean(energy_error**2))),
        "energy_mae": float(np.mean(np.abs(energy_error))),
        "force_rmse": float(np.sqrt(np.mean(force_error**2))),
        "force_mae": float(np.mean(np.abs(force_error))),
        "force_mll": gaussian_mll(force_error, force_var),
        "force_mll_recalibrated": gaussian_mll(force_error, c * force_var),
        "force_auc_roc": roc_auc(np.sqrt(force_var), large),
        "calibration_factor": c,
    }
    for name, part in (force_var_parts or {}).items():
        out[f"force_auc_roc_{name}"] = roc_auc(np.sqrt(part), large)
    for key in ("energy_rmse", "energy_mae", "force_rmse", "force_mae"):
        out[f"{key}_kcal"] = out[key] / KCAL_MOL
    for key in ("force_mll", "force_mll_recalibrated"):
        out[f"{key}_kcal"] = out[key] + LOG_KCAL
    for key in [k for k in out if k.startswith("force_auc_roc")] + ["calibration_factor"]:
        out[f"{key}_kcal"] = out[key]
    return out


def evaluate(
    ensemble: Ensemble,
    structures: Sequence[Atoms],
    force_error_threshold: float = KCAL_MOL,
    batch_size: int = 16,
    calibration_factor: float | None = None,
) -> dict[str, float]:
    """Predict ``structures`` and compare with their labels.

    Reference energies get the ensemble's energy offset; an ensemble without one
    (the pretrained model) takes it from the first structure, as in the paper.
    ``force_error_threshold`` (eV/Å, default 1 kcal/mol/Å) defines a large force error
    for the AUC-ROC. ``calibration_factor``: see :func:`error_metrics`.
    """
    labels = [labels_of(a, where=f"structure {i}") for i, a in enumerate(structures)]
    offset = ensemble.data.energy_offset
    if offset is None:
        offset = ensemble.data.pretrained_energy(structures[0]) - labels[0].energy
    pred = ensemble.predict(structures, batch_size=batch_size)
    energy_error = np.array([lab.energy + offset for lab in labels]) - pred.energy
    force_error = np.concatenate([lab.forces for lab in labels]) - pred.forces
    parts = force_variance_parts(pred.forces_var, pred.force_deviation, len(ensemble.members))
    metrics = error_metrics(energy_error, force_error, pred.forces_var, force_error_threshold, calibration_factor, parts)
    metrics.update(
        n_structures=len(structures),
        n_members=len(ensemble.members),
        energy_offset=float(offset),
        force_error_threshold=float(force_error_threshold),
    )
    return metrics


def load_model(spec: str, device: str = "cpu") -> Ensemble:
    """An ensemble from a fine-tuning folder, a ``model.pt`` file (of ``flytune finetune``
    or ``flytune run``), or a backbone name or file (the pretrained model, one member)."""
    path = Path(spec)
    if path.is_dir():
        if not (path / MODEL_FILE).exists():
            raise FlytuneError(f"{spec!r} has no {MODEL_FILE}; give a folder written by `flytune finetune` or a backbone name")
        return Ensemble.load(path / MODEL_FILE, workers=1, device=device)
    if path.suffix == ".pt" and path.is_file():
        return Ensemble.load(path, workers=1, device=device)
    return Ensemble.pretrained(spec, device=device)


def evaluate_file(
    model: str,
    data: str | os.PathLike,
    *,
    frames: str = ":",
    force_threshold_kcal: float = 1.0,
    json_out: str | os.PathLike | None = None,
    device: str = "cpu",
) -> dict:
    """``flytune evaluate``: the metrics of :func:`evaluate` for ``model`` (see
    :func:`load_model`) on the labelled structures of ``data``, with the threshold of a
    large force error in kcal/mol/Å; written to ``json_out`` when given."""
    if force_threshold_kcal <= 0:
        raise FlytuneError(f"--force-threshold must be > 0 (got {force_threshold_kcal})")
    structures = read_labelled(data, frames)
    with load_model(model, device) as ensemble:
        metrics = evaluate(ensemble, structures, force_threshold_kcal * KCAL_MOL)
    metrics["model"] = model
    metrics["data"] = os.fspath(data)
    if json_out is not None:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(json_out, json.dumps(metrics, indent=2))
    return metrics
