"""The uniform interface every pretrained potential is exposed through.

A :class:`Backbone` is a ``torch.nn.Module`` whose trainable parameters are the
pretrained weights. Structures are turned into graphs once (:meth:`Backbone.graph`,
neighbour lists included) and collated into one batched graph per minibatch
(:meth:`Backbone.collate`); :meth:`Backbone.forward` evaluates a batch with whatever
parameters the module currently holds, so ``torch.func.functional_call`` can evaluate
any posterior sample without copying weights into the module.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from ase import Atoms
from ase.data import chemical_symbols

from flytune.errors import FlytuneError


@dataclass
class Graph:
    """One structure prepared for a backbone: its tensors and neighbour list."""

    data: dict[str, Any]
    n_atoms: int
    periodic: bool


@dataclass
class GraphBatch:
    """Several structures collated into one disconnected graph."""

    data: dict[str, Any]
    #: (A,) index of the structure each atom belongs to
    structure_index: torch.Tensor
    #: (S,) True where the structure is periodic in all three directions
    periodic: torch.Tensor

    @property
    def n_structures(self) -> int:
        return int(self.periodic.shape[0])

    def to(self, device: torch.device | str) -> GraphBatch:
        """The batch with its tensors on ``device`` (no copy where they already are)."""
        data = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.data.items()}
        return GraphBatch(data, self.structure_index.to(device), self.periodic.to(device))


@dataclass
class BackboneOutput:
    """What a backbone returns for a batch (ASE units and sign conventions)."""

    #: (S,) total energies, eV
    energy: torch.Tensor
    #: (A, 3) forces −∂E/∂r, eV/Å
    forces: torch.Tensor
    #: (S, 3, 3) stress (1/V)·∂E/∂ε, eV/Å³; None when no structure of the batch is periodic.
    #: Rows of non-periodic structures are meaningless and must be masked.
    stress: torch.Tensor | None
    #: (A, F) per-atom rotation-invariant features (input of the force-σ head)
    features: torch.Tensor


class Backbone(torch.nn.Module, ABC):
    """A pretrained potential behind one interface.

    Subclasses set :attr:`family` (which selects the method's per-architecture defaults,
    ``"mace"`` or ``"nequip"``), :attr:`cutoff` (Å) and :attr:`feature_dim`.
    """

    family: ClassVar[str]
    #: True when ``forward(batch, functional=True)`` composes with ``torch.func.vmap``
    #: over stacked parameters (one pass for the whole ensemble)
    supports_vmap: bool = False
    #: human-readable identity of the weights, e.g. ``"7net-0"`` or a file path
    spec: str
    cutoff: float
    feature_dim: int

    # -- structures ---------------------------------------------------------------
    @property
    @abstractmethod
    def atomic_numbers(self) -> frozenset[int]:
        """Elements the backbone was trained on."""

    @abstractmethod
    def _graph(self, atoms: Atoms) -> dict[str, Any]:
        """Backbone-specific tensors of one structure (neighbour list included)."""

    @abstractmethod
    def collate(self, graphs: Sequence[Graph]) -> GraphBatch:
        """Collate graphs into one batched graph."""

    @abstractmethod
    def forward(
        self, batch: GraphBatch, *, create_graph: bool = False, functional: bool = False
    ) -> BackboneOutput:
        """Energies, forces (autograd), stress (periodic) and invariant features.

        ``create_graph=True`` keeps the graph of the force computation so that a loss
        on forces can be differentiated with respect to the parameters.
        ``functional=True`` (only where :attr:`supports_vmap`) computes forces with
        ``torch.func.grad`` and no in-place operation, so that ``vmap`` can batch it.
        """

    def one_pass(self, batch: GraphBatch) -> bool:
        """Whether an ensemble should evaluate ``batch`` for all members in one ``vmap``
        pass (faster) rather than member by member. Default: never."""
        return False

    # -- shared behaviour ---------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def check_atoms(self, atoms: Atoms) -> None:
        """Raise a :class:`FlytuneError` if ``atoms`` holds elements the backbone does not know."""
        unknown = sorted(set(atoms.numbers.tolist()) - self.atomic_numbers)
        if unknown:
            names = ", ".join(chemical_symbols[z] for z in unknown)
            raise FlytuneError(
                f"element(s) {names} are not known to backbone {self.spec!r}; "
                "choose a backbone trained on them (e.g. a universal model such as 7net-0 "
                "or MACE-MP) or remove them from the structure"
            )
        if atoms.pbc.any() and not atoms.pbc.all():
            raise FlytuneError(
                f"structure {atoms.get_chemical_formula()} is periodic in some directions only "
                f"(pbc={atoms.pbc.tolist()}); use pbc=True (with a vacuum gap) or pbc=False"
            )
        if atoms.pbc.all() and atoms.cell.volume <= 1e-6:
            raise FlytuneError(
                f"structure {atoms.get_chemical_formula()} is periodic but has no cell; "
                "set atoms.cell or use pbc=False"
            )

    def graph(self, atoms: Atoms) -> Graph:
        """Check ``atoms`` and build its graph."""
        self.check_atoms(atoms)
        return Graph(self._graph(atoms), len(atoms), bool(np.all(atoms.pbc)))

    def batch(self, structures: Sequence[Atoms]) -> GraphBatch:
        return self.collate([self.graph(a) for a in structures])

    def trainable_parameters(self) -> dict[str, torch.Tensor]:
        """Detached copies of the trainable (pretrained) parameters, by name."""
        return {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}

    def export(self, params: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
        """Write the backbone with ``params`` (names as in :meth:`trainable_parameters`) in
        the format of its own package, loadable by its stock ASE calculator; returns the
        file written (the suffix is the package's)."""
        raise FlytuneError(f"export is not available for the {type(self).__name__} backbone")

    @abstractmethod
    def random_parameters(self, seed: int) -> dict[str, torch.Tensor]:
        """Freshly initialised trainable parameters of the same architecture.

        Used by the uninformative (train-from-scratch) baseline; buffers such as
        atomic reference energies and scale/shift constants are kept.
        """


def structure_index(n_atoms: Sequence[int]) -> torch.Tensor:
    """(A,) structure index of each atom for structures of sizes ``n_atoms``."""
    return torch.repeat_interleave(torch.arange(len(n_atoms)), torch.as_tensor(list(n_atoms)))
