"""SevenNet adapter (``7net-0`` as shipped in the ``sevenn`` wheel, or any checkpoint).

The SevenNet model is run module by module up to the total energy; its own
force/stress module is replaced by an out-of-place autograd step so that the force
computation can be differentiated again (training) and evaluated with
``torch.func.functional_call``. Energies are differentiated with respect to the edge
vectors r_ij = r_j − r_i + shift, which gives forces and the virial in one pass:

    F_i = Σ_{edges i→j} ∂E/∂r_ij − Σ_{edges j→i} ∂E/∂r_ji,
    σ_s = (1/V_s) Σ_{edges of s} r_ij ⊗ ∂E/∂r_ij        (ASE sign convention).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from ase import Atoms
from sevenn.nn.convolution import IrrepsConvolution

from flytune.backbones.base import Backbone, BackboneOutput, Graph, GraphBatch, structure_index
from flytune.errors import FlytuneError

#: checkpoints shipped inside the sevenn wheel (names are case-insensitive, "sevennet-"
#: may stand for "7net-"); other sevenn names would need a download and are refused
BUNDLED = ("7net-0", "7net-0_11jul2024", "7net-0_11july2024", "7net-0_22may2024", "7net-l3i5", "7net-mf-0")


def is_bundled(spec: str) -> bool:
    name = spec.lower()
    return (name.replace("sevennet-", "7net-", 1) if name.startswith("sevennet-") else name) in BUNDLED


#: one-pass (vmap) prediction only up to this many edges: it wins on small graphs, where
#: the time goes into per-operator overhead, and loses on large ones. Measured on 2 CPU
#: cores, SevenNet-0, 8 members, one pass over one member: ethanol (72 edges) 3.2x (loop
#: 6.7x); Si8 (224 edges) 5.7x; Si16 (448) 7.9x; Si32 (896) 10.8x; Si64 (1792) 13.5x
#: (loop 6.1x)
ONE_PASS_MAX_EDGES = 300

# the total-energy reduction is done here (see SevenNetBackbone.forward) and so is the
# force/stress step
_SKIPPED_MODULES = ("reduce_total_enegy", "force_output")
_READOUT_START = "reduce_input_to_hidden"


def _quiet_sevenn():
    warnings.filterwarnings("ignore", message=".*cuEquivariance.*")
    warnings.filterwarnings("ignore", message=".*accelerator.*")


class SevenNetBackbone(Backbone):
    """A SevenNet model exposed as a :class:`Backbone` (NequIP family)."""

    family: ClassVar[str] = "nequip"

    def __init__(self, spec: str = "7net-0", modal: str | None = None):
        super().__init__()
        import sevenn.util

        _quiet_sevenn()
        if not is_bundled(spec) and not os.path.isfile(spec):
            raise FlytuneError(
                f"SevenNet checkpoint {spec!r} not found; give a model shipped with sevenn "
                f"({', '.join(BUNDLED)}) or the path of a SevenNet checkpoint (.pth)"
            )
        try:
            checkpoint = sevenn.util.load_checkpoint(spec)
            model = checkpoint.build_model()
        except Exception as exc:  # a corrupt or foreign file
            raise FlytuneError(f"cannot load SevenNet checkpoint {spec!r}: {exc}") from exc
        model.set_is_batch_data(True)
        if model.modal_map and modal not in model.modal_map:
            raise FlytuneError(
                f"SevenNet model {spec!r} is multi-fidelity; choose modal= one of "
                f"{sorted(model.modal_map)}"
            )
        names = list(model._modules)
        if _READOUT_START not in names:
            raise FlytuneError(f"SevenNet model {spec!r} has no '{_READOUT_START}' readout block")
        self.spec = spec
        self.modal = modal
        self.model = model
        self.cutoff = float(model.cutoff)
        self._config = checkpoint.config
        self._modules_to_run = [n for n in names if n not in _SKIPPED_MODULES]
        self._feature_before = _READOUT_START
        irreps_in = model._modules[_READOUT_START].irreps_in
        scalar_slices = [sl for (mul, ir), sl in zip(irreps_in, irreps_in.slices()) if ir.l == 0]
        self._scalar_index = torch.cat([torch.arange(sl.start, sl.stop) for sl in scalar_slices])
        self.feature_dim = int(self._scalar_index.numel())
        self._z_to_type = model.z_to_onehot_tensor
        self._known = frozenset(int(z) for z in model.type_map)
        self.dtype = next(p for p in model.parameters()).dtype
        self._energy_constant = float(getattr(model._modules.get("reduce_total_enegy"), "constant", 1.0))
        # the out-of-place path (_convolve) covers sevenn's e3nn convolution; other
        # convolution kernels (cuEquivariance, flashTP) are run as they are, with a loop
        self.supports_vmap = all(
            isinstance(m, IrrepsConvolution) for m in model.children() if "Convolution" in type(m).__name__
        )

    @property
    def atomic_numbers(self) -> frozenset[int]:
        return self._known

    def one_pass(self, batch: GraphBatch) -> bool:
        return self.supports_vmap and batch.data["edge_index"].shape[1] <= ONE_PASS_MAX_EDGES

    def _graph(self, atoms: Atoms) -> dict[str, Any]:
        from sevenn.train.dataload import unlabeled_atoms_to_graph

        g = unlabeled_atoms_to_graph(atoms, self.cutoff)
        return {
            "atomic_numbers": torch.as_tensor(np.asarray(g["atomic_numbers"]), dtype=torch.long),
            "edge_index": torch.as_tensor(np.asarray(g["edge_index"]), dtype=torch.long),
            "edge_vec": torch.as_tensor(np.asarray(g["edge_vec"]), dtype=self.dtype),
            "cell_volume": torch.tensor(float(atoms.cell.volume), dtype=self.dtype),
        }

    def collate(self, graphs: Sequence[Graph]) -> GraphBatch:
        n_atoms = [g.n_atoms for g in graphs]
        offsets = np.concatenate([[0], np.cumsum(n_atoms)[:-1]])
        data = {
            "atomic_numbers": torch.cat([g.data["atomic_numbers"] for g in graphs]),
            "edge_index": torch.cat(
                [g.data["edge_index"] + int(o) for g, o in zip(graphs, offsets)], dim=1
            ),
            "edge_vec": torch.cat([g.data["edge_vec"] for g in graphs]),
            "cell_volume": torch.stack([g.data["cell_volume"] for g in graphs]),
            "num_atoms": torch.as_tensor(n_atoms),
        }
        return GraphBatch(
            data=data,
            structure_index=structure_index(n_atoms),
            periodic=torch.as_tensor([g.periodic for g in graphs]),
        )

    def _energy(self, edge_vec: torch.Tensor, batch: GraphBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(S,) energies and (A, F) invariant features as functions of the edge vectors.

        Out of place throughout (the one-hot encoding replaces ``_preprocess``, which sets
        ``requires_grad`` in place, and :func:`_convolve` replaces the convolutions'
        in-place scatter), so it can run under ``torch.func.grad`` and ``vmap``.
        """
        src = batch.data
        model = self.model
        data: dict[str, Any] = {
            "atomic_numbers": src["atomic_numbers"],
            "x": model._atomic_numbers_to_onehot(src["atomic_numbers"]),
            "edge_index": src["edge_index"],
            "edge_vec": edge_vec,
            "cell_volume": src["cell_volume"],
            "num_atoms": src["num_atoms"],
            "batch": batch.structure_index,
        }
        if self.modal is not None:
            data["data_modality"] = [self.modal] * batch.n_structures
            model._eval_modal_map(data)
        features = None
        for name in self._modules_to_run:
            module = model._modules[name]
            if name == self._feature_before:
                features = data["x"][:, self._scalar_index.to(data["x"].device)]
            data = _convolve(module, data) if isinstance(module, IrrepsConvolution) else module(data)
        assert features is not None
        # per-structure sums over contiguous slices: the same float32 reduction as the
        # stock calculator's torch.sum, so batched energies equal single-structure ones
        atomic_energy = data["atomic_energy"].squeeze(-1)
        n_atoms_per = src["num_atoms"].tolist()
        energy = torch.stack([e.sum() for e in torch.split(atomic_energy, n_atoms_per)])
        return energy * self._energy_constant, features

    def forward(
        self, batch: GraphBatch, *, create_graph: bool = False, functional: bool = False
    ) -> BackboneOutput:
        batch = batch.to(self.device)
        edge_vec = batch.data["edge_vec"].detach()
        if functional:  # torch.func.grad: composable with vmap over parameters

            def total_energy(r: torch.Tensor):
                energy, features = self._energy(r, batch)
                return energy.sum(), (energy, features)

            grad, (energy, features) = torch.func.grad(total_energy, has_aux=True)(edge_vec)
        else:  # torch.autograd.grad: the force graph can be kept for training
            edge_vec = edge_vec.requires_grad_(True)
            energy, features = self._energy(edge_vec, batch)
            (grad,) = torch.autograd.grad(energy.sum(), edge_vec, create_graph=create_graph)
        forces, stress = _forces_and_stress(grad, edge_vec.detach(), batch)
        return BackboneOutput(energy=energy, forces=forces, stress=stress, features=features)

    def save_checkpoint(self, path: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write the current weights (or ``state_dict``, the SevenNet model's) as a SevenNet
        checkpoint (``.pth``) that sevenn and flytune load (``backbone = "path.pth"``):
        the pretrained checkpoint's dict with the new ``model_state_dict``.

        The checkpoint is stamped with the installed sevenn version: the weights are
        already in its layout, so sevenn must not apply its upgrade of old checkpoints
        (sorted convolution weights, flipped Wigner-3j signs) a second time.
        """
        import sevenn
        import sevenn.util

        checkpoint = sevenn.util.load_checkpoint(self.spec).get_checkpoint_dict()
        checkpoint["config"] = {**checkpoint["config"], "version": sevenn.__version__}
        state = state_dict if state_dict is not None else self.model.state_dict()
        checkpoint["model_state_dict"] = {k: v.detach().cpu().clone() for k, v in state.items()}
        checkpoint["optimizer_state_dict"] = checkpoint["scheduler_state_dict"] = None
        torch.save(checkpoint, path)

    def export(self, params: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
        """A SevenNet checkpoint with ``params`` (``sevenn.calculator.SevenNetCalculator(model=path)``
        loads it, ``sevenn get_model`` deploys it to LAMMPS)."""
        path = Path(path).with_suffix(".pth")
        state = dict(self.model.state_dict())
        state.update({k.removeprefix("model."): v for k, v in params.items() if k.startswith("model.")})
        self.save_checkpoint(path, state)
        return path

    def random_parameters(self, seed: int) -> dict[str, torch.Tensor]:
        from sevenn.model_build import build_E3_equivariant_model

        with torch.random.fork_rng():
            torch.manual_seed(seed)
            fresh = build_E3_equivariant_model(dict(self._config))
        fresh_params = dict(fresh.named_parameters())
        return {
            name: fresh_params[name.removeprefix("model.")].detach().clone()
            for name in self.trainable_parameters()
        }


def _convolve(module, data: dict[str, Any]) -> dict[str, Any]:
    """``IrrepsConvolution.forward`` with an out-of-place message sum (``index_add``)
    instead of sevenn's in-place ``scatter_reduce_``, which ``vmap`` cannot batch."""
    weight = module.weight_nn(data[module.key_weight_input])
    x = data[module.key_x]
    edge_src = data[module.key_edge_idx][1]
    edge_dst = data[module.key_edge_idx][0]
    message = module.convolution(x.index_select(0, edge_src), data[module.key_filter], weight)
    zeros = torch.zeros((x.shape[0], *message.shape[1:]), dtype=x.dtype, device=x.device)
    data[module.key_x] = zeros.index_add(0, edge_dst, message).div(module.denominator)
    return data


def _forces_and_stress(
    grad: torch.Tensor, edge_vec: torch.Tensor, batch: GraphBatch
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forces and stress from g_ij = ∂E/∂r_ij (see the module docstring)."""
    src_idx, dst_idx = batch.data["edge_index"][0], batch.data["edge_index"][1]
    zeros = torch.zeros(batch.structure_index.shape[0], 3, dtype=grad.dtype, device=grad.device)
    forces = zeros.index_add(0, src_idx, grad) - zeros.index_add(0, dst_idx, grad)
    if not bool(batch.periodic.any()):
        return forces, None
    edge_structure = batch.structure_index[src_idx]
    virial = torch.zeros(batch.n_structures, 3, 3, dtype=grad.dtype, device=grad.device).index_add(
        0, edge_structure, edge_vec.unsqueeze(2) * grad.unsqueeze(1)
    )
    volume = batch.data["cell_volume"]
    volume = torch.where(batch.periodic, volume, torch.ones_like(volume))
    return forces, virial / volume.view(-1, 1, 1)

