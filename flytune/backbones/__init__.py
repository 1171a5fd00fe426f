"""Adapters that expose pretrained potentials through one torch interface.

>>> backbone = load_backbone("7net-0")              # SevenNet-0, bundled in sevenn
>>> backbone = load_backbone("mace-mp-medium.model") # a MACE model file
>>> backbone = load_backbone("chgnet")              # CHGNet 0.3.0, bundled in chgnet
"""

from __future__ import annotations

import os

from flytune.backbones.base import Backbone, BackboneOutput, Graph, GraphBatch
from flytune.errors import FlytuneError

__all__ = ["Backbone", "BackboneOutput", "Graph", "GraphBatch", "load_backbone", "backbone_family"]


def _looks_like_sevennet(spec: str) -> bool:
    from flytune.backbones.sevennet import is_bundled

    return is_bundled(spec) or spec.endswith(".pth")


def backbone_family(spec: str) -> str:
    """``"nequip"`` for SevenNet names/checkpoints, ``"chgnet"`` for CHGNet names/files
    (``*.pth.tar``), ``"mace"`` for MACE model files."""
    from flytune.backbones.chgnet import is_chgnet

    if is_chgnet(spec):
        return "chgnet"
    if _looks_like_sevennet(spec):
        return "nequip"
    if os.path.isfile(spec) or spec.endswith(".model"):
        return "mace"
    raise FlytuneError(
        f"unknown backbone {spec!r}; give '7net-0', a SevenNet checkpoint (.pth), "
        "'chgnet', a CHGNet file (.pth.tar) or a MACE model file (.model)"
    )


def load_backbone(spec: str, **options) -> Backbone:
    """Load a pretrained backbone by name or path.

    ``spec``: ``"7net-0"`` (SevenNet-0, shipped inside ``sevenn``), a SevenNet checkpoint
    ``*.pth``, ``"chgnet"`` (CHGNet 0.3.0, shipped inside ``chgnet``; also
    ``"chgnet-0.2.0"``, ``"chgnet-r2scan"``) or a CHGNet file ``*.pth.tar``, or a MACE
    model file. ``options`` go to the adapter (``modal`` for
    multi-fidelity SevenNet, ``dtype``/``head`` for MACE).
    """
    family = backbone_family(spec)
    if family == "nequip":
        from flytune.backbones.sevennet import SevenNetBackbone

        return SevenNetBackbone(spec, **options)
    if family == "chgnet":
        from flytune.backbones.chgnet import CHGNetBackbone

        return CHGNetBackbone(spec, **options)
    from flytune.backbones.mace import MACEBackbone

    return MACEBackbone(spec, **options)
