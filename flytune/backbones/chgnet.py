"""CHGNet adapter (the pretrained weights shipped inside the ``chgnet`` wheel, or a
CHGNet file).

Structures become CHGNet's own ``CrystalGraph`` (its graph converter: atom graph within
5 Å, bond graph within 3 Å); a molecule is put in a box wide enough that no periodic
image is within the atom-graph cutoff. The batched graph is assembled inside
:meth:`CHGNetBackbone.forward`, because CHGNet's radial basis (learnable frequencies) is
one of the fine-tuned parameters. Energies, forces −∂E/∂r and stress (1/V)·∂E/∂ε come
from CHGNet's own ``_compute`` (autograd, graph kept), on the total-energy scale:

    E = n_atoms · (e_CHGNet + e_AtomRef)        (CHGNet predicts energy per atom).

The σ head reads the per-atom features before CHGNet's last convolution (64, rotation
invariant). The per-element reference energies (``AtomRef``) stay fixed, as the atomic
reference energies of the other backbones do, and so does the magnetic-moment head,
which plays no part in the energy.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from ase import Atoms, units

from flytune.backbones.base import Backbone, BackboneOutput, Graph, GraphBatch, structure_index
from flytune.errors import FlytuneError

#: names of the weights shipped inside the chgnet wheel ("chgnet" is the newest)
BUNDLED = {"chgnet": "0.3.0", "chgnet-0.3.0": "0.3.0", "chgnet-0.2.0": "0.2.0", "chgnet-r2scan": "r2scan"}
#: suffix of CHGNet's own model files (``CHGNet.from_file``)
FILE_SUFFIX = ".pth.tar"
#: parameters that do not enter the energy, or are per-element reference energies
_FROZEN = ("composition_model.", "site_wise.")


def is_chgnet(spec: str) -> bool:
    return spec.lower() in BUNDLED or spec.endswith(FILE_SUFFIX)


class CHGNetBackbone(Backbone):
    """A CHGNet model exposed as a :class:`Backbone`."""

    family: ClassVar[str] = "chgnet"

    def __init__(self, spec: str = "chgnet"):
        super().__init__()
        from chgnet.model import CHGNet

        name = spec.lower()
        if name not in BUNDLED and not os.path.isfile(spec):
            raise FlytuneError(
                f"CHGNet model {spec!r} not found; give one shipped with chgnet "
                f"({', '.join(BUNDLED)}) or the path of a CHGNet file ({FILE_SUFFIX})"
            )
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # CHGNet prints its size on loading
                if name in BUNDLED:
                    model = CHGNet.load(model_name=BUNDLED[name], use_device="cpu", verbose=False)
                else:
                    model = CHGNet.from_file(spec)
        except Exception as exc:  # a corrupt or foreign file
            raise FlytuneError(f"cannot load CHGNet model {spec!r}: {exc}") from exc
        if model.composition_model is None:
            raise FlytuneError(f"CHGNet model {spec!r} has no composition model (AtomRef)")
        model.graph_converter.set_isolated_atom_response("ignore")
        # CHGNet turns the (strained) cell volumes into a constant on purpose
        warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad", module="chgnet")
        for name, p in model.named_parameters():
            if name.startswith(_FROZEN):
                p.requires_grad_(False)
        self.model = model
        self.spec = spec
        self.cutoff = float(model.graph_converter.atom_graph_cutoff)
        self.feature_dim = int(model.atom_embedding.embedding.embedding_dim)
        self._known = frozenset(range(1, int(model.composition_model.max_num_elements) + 1))

    @property
    def atomic_numbers(self) -> frozenset[int]:
        return self._known

    def _graph(self, atoms: Atoms) -> dict[str, Any]:
        from pymatgen.io.ase import AseAtomsAdaptor

        if not atoms.pbc.all():  # a molecule: a box with no image within the cutoff
            atoms = atoms.copy()
            extent = atoms.positions.max(axis=0) - atoms.positions.min(axis=0)
            atoms.set_cell(extent + 2 * self.cutoff + 1.0)
            atoms.center()
            atoms.pbc = True
        structure = AseAtomsAdaptor.get_structure(atoms)
        return {"crystal_graph": self.model.graph_converter(structure)}

    def collate(self, graphs: Sequence[Graph]) -> GraphBatch:
        n_atoms = [g.n_atoms for g in graphs]
        return GraphBatch(
            data={"crystal_graphs": [g.data["crystal_graph"] for g in graphs], "num_atoms": torch.as_tensor(n_atoms)},
            structure_index=structure_index(n_atoms),
            periodic=torch.as_tensor([g.periodic for g in graphs]),
        )

    def forward(
        self, batch: GraphBatch, *, create_graph: bool = False, functional: bool = False
    ) -> BackboneOutput:
        from chgnet.model.model import BatchedGraph

        device = self.device
        model = self.model
        graphs = [g.to(device) for g in batch.data["crystal_graphs"]]
        any_periodic = bool(batch.periodic.any())
        batched = BatchedGraph.from_graphs(
            graphs,
            bond_basis_expansion=model.bond_basis_expansion,
            angle_basis_expansion=model.angle_basis_expansion,
            compute_stress=any_periodic,
        )
        out = model._compute(batched, compute_force=True, compute_stress=any_periodic, return_atom_feas=True)
        n_atoms = batch.data["num_atoms"].to(device)
        per_atom = out["e"] + model.composition_model(graphs)
        energy = per_atom * n_atoms if model.is_intensive else per_atom
        forces = torch.cat(out["f"])
        stress = torch.stack(out["s"]) * units.GPa if any_periodic else None
        features = torch.cat(out["atom_fea"])
        if not create_graph:  # CHGNet always keeps the force graph; drop it
            energy, forces, features = energy.detach(), forces.detach(), features.detach()
            stress = None if stress is None else stress.detach()
        return BackboneOutput(energy=energy, forces=forces, stress=stress, features=features)

    def export(self, params: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
        """A CHGNet file with ``params`` (``CHGNet.from_file(path)`` loads it, and
        ``chgnet.model.dynamics.CHGNetCalculator(model=...)`` runs it in ASE)."""
        path = Path(str(Path(path).with_suffix("")) + FILE_SUFFIX)
        state = dict(self.model.state_dict())
        state.update({k.removeprefix("model."): v.detach().cpu() for k, v in params.items() if k.startswith("model.")})
        torch.save({"model": {"state_dict": state, "model_args": self.model.model_args}}, path)
        return path

    def random_parameters(self, seed: int) -> dict[str, torch.Tensor]:
        from chgnet.model import CHGNet

        with torch.random.fork_rng():
            torch.manual_seed(seed)
            fresh = CHGNet(**self.model.model_args)
        fresh_params = dict(fresh.named_parameters())
        return {
            name: fresh_params[name.removeprefix("model.")].detach().clone()
            for name in self.trainable_parameters()
        }
