"""The labelled structures D seen so far, with graphs built once per structure."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from ase import Atoms

from flytune.backbones import Backbone, Graph, GraphBatch
from flytune.bayes.model import LabelBatch
from flytune.data import labelled, labels_of


class TrainingSet:
    """Structures with offset-corrected labels; index ``len(self) − 1`` is the newest.

    Graphs (neighbour lists) are built when a structure is added and reused by every
    minibatch. :meth:`state_dict` holds plain tensors, so the set can be saved with
    ``torch.save`` and rebuilt with :meth:`from_state_dict` (e.g. in a worker process).
    """

    def __init__(self, backbone: Backbone):
        self.backbone = backbone
        self.structures: list[Atoms] = []
        self._graphs: list[Graph] = []
        self._energy: list[float] = []
        self._forces: list[torch.Tensor] = []
        self._stress: list[torch.Tensor | None] = []

    def __len__(self) -> int:
        return len(self.structures)

    def add(self, atoms: Atoms, energy_offset: float = 0.0) -> None:
        """Add a labelled structure; ``energy_offset`` Δ is added to its reference energy."""
        labels = labels_of(atoms, where=f"structure {len(self)} ({atoms.get_chemical_formula()})")
        graph = self.backbone.graph(atoms)
        self.structures.append(labelled(atoms, labels.energy, labels.forces, labels.stress))
        self._graphs.append(graph)
        self._energy.append(labels.energy + energy_offset)
        self._forces.append(torch.as_tensor(labels.forces, dtype=torch.float64))
        self._stress.append(None if labels.stress is None else torch.as_tensor(labels.stress))

    def extend(self, structures: Sequence[Atoms], energy_offset: float = 0.0) -> None:
        for atoms in structures:
            self.add(atoms, energy_offset)

    def batch(self, indices: Sequence[int] | torch.Tensor) -> tuple[GraphBatch, LabelBatch]:
        """Collated graphs and labels of ``indices`` (repeats allowed)."""
        idx = [int(i) for i in indices]
        graphs = self.backbone.collate([self._graphs[i] for i in idx])
        stresses = [self._stress[i] for i in idx]
        labels = LabelBatch(
            energy=torch.tensor([self._energy[i] for i in idx], dtype=torch.float64),
            forces=torch.cat([self._forces[i] for i in idx]),
            stress=torch.stack(
                [s if s is not None else torch.zeros(3, 3, dtype=torch.float64) for s in stresses]
            ),
            has_stress=torch.tensor([s is not None for s in stresses]),
        )
        return graphs, labels

    def energies(self) -> np.ndarray:
        """Offset-corrected reference energies (eV)."""
        return np.asarray(self._energy)

    def state_dict(self, start: int = 0) -> dict:
        """Plain tensors of structures ``start..`` (all by default)."""
        structures = self.structures[start:]
        return {
            "numbers": [torch.as_tensor(a.numbers) for a in structures],
            "positions": [torch.as_tensor(a.positions) for a in structures],
            "cell": [torch.as_tensor(np.asarray(a.cell)) for a in structures],
            "pbc": [torch.as_tensor(a.pbc) for a in structures],
            "raw_energy": torch.as_tensor([a.calc.results["energy"] for a in structures], dtype=torch.float64),
            "energy": torch.as_tensor(self._energy[start:], dtype=torch.float64),
            "forces": list(self._forces[start:]),
            "stress": [s if s is not None else torch.full((3, 3), float("nan")) for s in self._stress[start:]],
        }

    def extend_from_state_dict(self, state: dict) -> None:
        """Append the structures of a :meth:`state_dict` (their energies exactly as saved)."""
        for i in range(len(state["numbers"])):
            stress = state["stress"][i]
            atoms = Atoms(
                numbers=state["numbers"][i].numpy(),
                positions=state["positions"][i].numpy(),
                cell=state["cell"][i].numpy(),
                pbc=state["pbc"][i].numpy(),
            )
            atoms = labelled(
                atoms,
                float(state["raw_energy"][i]),
                state["forces"][i].numpy(),
                None if torch.isnan(stress).any() else stress.numpy(),
            )
            self.add(atoms)
            self._energy[-1] = float(state["energy"][i])

    @classmethod
    def from_state_dict(cls, backbone: Backbone, state: dict) -> TrainingSet:
        out = cls(backbone)
        out.extend_from_state_dict(state)
        return out
