"""MACE adapter: any MACE model file the user brings (e.g. MACE-MP-0 medium).

Graphs are built with MACE's own data pipeline (``config_from_atoms`` →
``AtomicData.from_config``, batched with MACE's ``Batch``), and the model's own
forward computes energies, forces and (periodic) stress; ``training=True`` keeps the
force graph for differentiation with respect to the weights. The σ head reads the
invariant (l = 0) channels of every interaction layer's node features, as in the
paper (256 for MACE-MP medium).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from ase import Atoms

from flytune.backbones.base import Backbone, BackboneOutput, Graph, GraphBatch
from flytune.errors import FlytuneError

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class MACEBackbone(Backbone):
    """A MACE model file exposed as a :class:`Backbone`."""

    family: ClassVar[str] = "mace"

    def __init__(self, path: str, dtype: str = "float32", head: str | None = None):
        super().__init__()
        from e3nn import o3

        if not os.path.isfile(path):
            raise FlytuneError(f"MACE model file {path!r} not found; give the path of a MACE .model file")
        if dtype not in _DTYPES:
            raise FlytuneError(f"dtype {dtype!r} is not supported; use 'float32' or 'float64'")
        try:
            # a MACE .model file is a pickled torch module: trusted user input by design
            model = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise FlytuneError(f"cannot load MACE model {path!r}: {exc}") from exc
        if not hasattr(model, "interactions") or not hasattr(model, "atomic_numbers"):
            raise FlytuneError(f"{path!r} is not a MACE model (no interaction blocks)")
        self.model = model.to(_DTYPES[dtype])
        self.spec = path
        self.dtype = _DTYPES[dtype]
        self.cutoff = float(model.r_max)
        heads = list(getattr(model, "heads", ["Default"]))
        if head is None:
            head = heads[-1] if len(heads) > 1 else heads[0]
        if head not in heads:
            raise FlytuneError(f"MACE model {path!r} has no head {head!r}; choose one of {heads}")
        self.head = head
        self._heads = heads
        self._known = frozenset(int(z) for z in model.atomic_numbers)
        irreps_out = o3.Irreps(str(model.products[0].linear.irreps_out))
        self._l_max = irreps_out.lmax
        self._n_invariant = irreps_out.dim // (self._l_max + 1) ** 2
        self._n_layers = int(model.num_interactions)
        self.feature_dim = self._n_invariant * self._n_layers

    def export(self, params: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
        """A whole MACE ``.model`` file with ``params`` (``mace.calculators.MACECalculator(
        model_paths=[...])`` loads several as a committee; ``mace_create_lammps_model``
        converts one for LAMMPS)."""
        path = Path(path).with_suffix(".model")
        model = copy.deepcopy(self.model)
        state = dict(model.state_dict())
        state.update({k.removeprefix("model."): v.detach().cpu() for k, v in params.items() if k.startswith("model.")})
        model.load_state_dict(state)
        torch.save(model, path)
        return path

    @property
    def atomic_numbers(self) -> frozenset[int]:
        return self._known

    def _graph(self, atoms: Atoms) -> dict[str, Any]:
        from mace import data as mace_data
        from mace.tools import torch_tools
        from mace.tools.utils import AtomicNumberTable

        z_table = AtomicNumberTable(sorted(self._known))
        with torch_tools.default_dtype(self.dtype):
            config = mace_data.config_from_atoms(atoms, head_name=self.head)
            graph = mace_data.AtomicData.from_config(
                config, z_table=z_table, cutoff=self.cutoff, heads=self._heads
            )
        return {"atomic_data": graph}

    def collate(self, graphs: Sequence[Graph]) -> GraphBatch:
        from mace.tools.torch_geometric import Batch

        batch = Batch.from_data_list([g.data["atomic_data"] for g in graphs])
        tensors = batch.to_dict()
        return GraphBatch(
            data=tensors,
            structure_index=tensors["batch"],
            periodic=torch.as_tensor([g.periodic for g in graphs]),
        )

    def forward(
        self, batch: GraphBatch, *, create_graph: bool = False, functional: bool = False
    ) -> BackboneOutput:
        # MACE takes autograd.grad inside its forward: no functional path (supports_vmap
        # is False), members are evaluated one after another
        from mace.modules.utils import extract_invariant

        batch = batch.to(self.device)
        data = dict(batch.data)
        # MACE sets requires_grad on positions in place: give it a fresh leaf
        data["positions"] = data["positions"].detach().clone()
        if "cell" in data:
            data["cell"] = data["cell"].detach().clone()
        any_periodic = bool(batch.periodic.any())
        out = self.model(
            data,
            training=create_graph,
            compute_force=True,
            compute_stress=any_periodic,
        )
        features = extract_invariant(
            out["node_feats"],
            num_layers=self._n_layers,
            num_features=self._n_invariant,
            l_max=self._l_max,
        )
        return BackboneOutput(
            energy=out["energy"],
            forces=out["forces"],
            stress=out["stress"] if any_periodic else None,
            features=features,
        )

    def random_parameters(self, seed: int) -> dict[str, torch.Tensor]:
        from mace.tools.scripts_utils import extract_config_mace_model

        config = extract_config_mace_model(self.model)
        if "error" in config:
            raise FlytuneError(f"cannot re-initialise MACE model {self.spec!r}: {config['error']}")
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            fresh = type(self.model)(**config).to(self.dtype)
        fresh_params = dict(fresh.named_parameters())
        return {
            name: fresh_params[name.removeprefix("model.")].detach().clone()
            for name in self.trainable_parameters()
        }
