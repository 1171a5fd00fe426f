"""Moving nested containers of tensors (state dicts) between devices."""

from __future__ import annotations

from typing import Any

import torch


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
