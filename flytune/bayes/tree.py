"""Devices: moving nested containers of tensors (state dicts) between them, and
deterministic kernels on every one."""

from __future__ import annotations

import os
from typing import Any

import torch

#: cuBLAS needs a fixed workspace to be deterministic (PyTorch's reproducibility notes);
#: it must be set before the first CUDA call of the process
CUBLAS_WORKSPACE_CONFIG = ":4096:8"


def tree_to(obj: Any, device: torch.device | str) -> Any:
    """A copy of ``obj`` (dicts, lists, tuples of tensors and plain values) with tensors on ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: tree_to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(tree_to(v, device) for v in obj)
    return obj


def resolve_device(device: str) -> str:
    """``"auto"`` → ``"cuda"`` when a GPU is visible, else ``"cpu"``; others unchanged."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def reproducible() -> None:
    """Make torch's kernels deterministic (scatter/index_add sums in a fixed order).

    With several threads SevenNet's forces otherwise differ from call to call in the last
    bits (about 1e-6 eV/Å), so an MD run could not be repeated or resumed exactly; the
    cost measured on the CPU is nil. On CUDA, cuBLAS is deterministic only with a fixed
    workspace, so ``CUBLAS_WORKSPACE_CONFIG`` is set (unless the user set it) before any
    model is built. Called wherever a model is built (:meth:`ModelSpec.build`), which
    covers every ensemble and worker process.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)
    torch.use_deterministic_algorithms(True, warn_only=True)
