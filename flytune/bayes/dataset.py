r"""The labelled structures D seen so far, with graphs built once per structure, and the
energy offset that puts the reference's energy zero on the backbone's (method §7):

    Δ = Ê_pretrained(x₀) − E_ref(x₀),        label energy of x_i = E_ref(x_i) + Δ,

with x₀ the first structure. One Δ holds for one composition only, so structures of
another composition are refused.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from ase import Atoms

from flytune.backbones import Backbone, Graph, GraphBatch
from flytune.bayes.model import LabelBatch
from flytune.data import labelled, labels_of, same_composition
from flytune.errors import FlytuneError


class TrainingSet:
    """Structures with offset-corrected labels; index ``len(self) − 1`` is the newest.

    ``energy_offset`` Δ (eV): given, or ``None`` to take it from the first structure
    added (:meth:`set_energy_offset`). ``one_composition``: refuse structures whose
    composition differs from the first one's (turn it off only with an offset that holds
    for every composition, e.g. 0 for a reference on the backbone's own zero). Graphs (neighbour lists) are built when a
    structure is added and reused by every minibatch. :meth:`state_dict` holds plain
    tensors, so the set can be saved with ``torch.save`` and rebuilt with
    :meth:`from_state_dict` (e.g. in a worker process).
    """

    def __init__(self, backbone: Backbone, energy_offset: float | None = None, one_composition: bool = True):
        self.backbone = backbone
        self.energy_offset = energy_offset
        self.one_composition = one_composition
        self.structures: list[Atoms] = []
        self._graphs: list[Graph] = []
        self._energy: list[float] = []
        self._forces: list[torch.Tensor] = []
        self._stress: list[torch.Tensor | None] = []

    def __len__(self) -> int:
        return len(self.structures)

    # -- the energy offset -----------------------------------------------------------
    def pretrained_energy(self, atoms: Atoms) -> float:
        """Ê_pretrained(x): energy of the backbone with its pretrained weights (eV)."""
        return float(self.backbone(self.backbone.batch([atoms])).energy.detach()[0])

    def set_energy_offset(self, atoms: Atoms) -> float:
        """Δ = Ê_pretrained(x₀) − E_ref(x₀) from the labelled structure ``atoms``."""
        reference = labels_of(atoms, where="first labelled structure").energy
        self.energy_offset = self.pretrained_energy(atoms) - reference
        return self.energy_offset

    def check_composition(self, atoms: Atoms, fix: str = "fine-tune on structures with one composition") -> None:
        """Refuse a structure whose composition differs from the data's (Δ would not hold)."""
        if self.one_composition and self.structures and not same_composition([self.structures[0], atoms]):
            raise FlytuneError(
                f"the composition changed from {self.structures[0].get_chemical_formula()} to "
                f"{atoms.get_chemical_formula()}: the energy offset holds for one composition only; {fix}"
            )

    # -- adding ------------------------------------------------------------------------
    def add(self, atoms: Atoms) -> None:
        """Add a labelled structure (raw reference energy); Δ is added to its energy.
        The first structure sets Δ if it is not set yet."""
        labels = labels_of(atoms, where=f"structure {len(self)} ({atoms.get_chemical_formula()})")
        self.check_composition(atoms)
        if self.energy_offset is None:
            self.set_energy_offset(atoms)
        self._append(atoms, labels.energy + self.energy_offset)

    def _append(self, atoms: Atoms, energy: float) -> None:
        labels = labels_of(atoms)
        graph = self.backbone.graph(atoms)
        self.structures.append(labelled(atoms, labels.energy, labels.forces, labels.stress))
        self._graphs.append(graph)
        self._energy.append(energy)
        self._forces.append(torch.as_tensor(labels.forces, dtype=torch.float64))
        self._stress.append(None if labels.stress is None else torch.as_tensor(labels.stress))

    def extend(self, structures: Sequence[Atoms]) -> None:
        for atoms in structures:
            self.add(atoms)

    # -- minibatches -------------------------------------------------------------------
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

    # -- state -------------------------------------------------------------------------
    def state_dict(self, start: int = 0, stop: int | None = None) -> dict:
        """Plain tensors of structures ``start..stop`` (all by default); Δ is not part of
        it (an ensemble file keeps it beside, as ``energy_offset``)."""
        structures = self.structures[start:stop]
        return {
            "numbers": [torch.as_tensor(a.numbers) for a in structures],
            "positions": [torch.as_tensor(a.positions) for a in structures],
            "cell": [torch.as_tensor(np.asarray(a.cell)) for a in structures],
            "pbc": [torch.as_tensor(a.pbc) for a in structures],
            "raw_energy": torch.as_tensor([a.calc.results["energy"] for a in structures], dtype=torch.float64),
            "energy": torch.as_tensor(self._energy[start:stop], dtype=torch.float64),
            "forces": list(self._forces[start:stop]),
            "stress": [s if s is not None else torch.full((3, 3), float("nan")) for s in self._stress[start:stop]],
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
            self._append(atoms, float(state["energy"][i]))

    @classmethod
    def from_state_dict(cls, backbone: Backbone, state: dict, energy_offset: float | None = None) -> TrainingSet:
        out = cls(backbone, energy_offset)
        out.extend_from_state_dict(state)
        return out
