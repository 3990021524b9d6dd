"""Parallelism degrees → one validated DeviceMesh.

``ParallelDims`` turns the five degrees of ``[parallelism]`` into a single 5-D device mesh
with dims ``pp, dp_replicate, dp_shard, cp, tp`` (outermost to innermost: TP talks the most,
so its ranks are adjacent). Every dim is always present, with size 1 when that parallelism
is off, so code can ask for ``get_mesh("tp")`` without first checking which dims exist; the
``*_enabled`` properties say which ones actually do something. Three flattened views are
built on top:

- ``dp``          = dp_replicate × dp_shard      ranks that see different data (data loading)
- ``dp_shard_cp`` = dp_shard × cp                ranks FSDP shards parameters over
- ``dp_cp``       = dp_replicate × dp_shard × cp ranks the loss is averaged over

With expert parallelism (``ep`` > 1) two more views split ``dp_shard_cp`` in two, as
TorchTitan does (EP borrows its ranks from dp_shard × cp, so it needs no extra GPUs):

- ``ep``              = the inner ``ep`` ranks of dp_shard_cp: MoE routed experts are split
                        over them and tokens travel between them by all-to-all
- ``dp_shard_mod_ep`` = the outer dp_shard × cp / ep ranks: FSDP shards the routed experts
                        over these only (each holds the same experts)

Since torch 2.11 slicing a flattened dim out of the root mesh (``world_mesh["dp"]``) is
deprecated, so the views are kept here and handed out by :meth:`ParallelDims.get_mesh`.

A mesh needs a process group even on one process: ``init_distributed`` always creates one
(a 1-rank group when not launched by torchrun), and ``build_mesh`` creates that 1-rank group
itself if nobody did, so a single-process run goes through exactly the same code.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from torchtitan.config import ConfigError

__all__ = ["ParallelDims", "MESH_DIM_NAMES", "FLATTENED_MESH_DIMS"]

MESH_DIM_NAMES = ("pp", "dp_replicate", "dp_shard", "cp", "tp")

# Flattened view name -> the mesh dims it is made of (contiguous, in mesh order).
FLATTENED_MESH_DIMS: dict[str, tuple[str, ...]] = {
    "dp": ("dp_replicate", "dp_shard"),
    "dp_shard_cp": ("dp_shard", "cp"),
    "dp_cp": ("dp_replicate", "dp_shard", "cp"),
}

# The TOML option behind each degree, for error messages.
_OPTION = {
    "dp_replicate": "parallelism.data_parallel_replicate_degree",
    "dp_shard": "parallelism.data_parallel_shard_degree",
    "cp": "parallelism.context_parallel_degree",
    "tp": "parallelism.tensor_parallel_degree",
    "pp": "parallelism.pipeline_parallel_degree",
    "ep": "parallelism.expert_parallel_degree",
}


@dataclass
class ParallelDims:
    """The degree of each parallelism; their product must equal the world size.

    ``dp_shard=-1`` takes whatever the other degrees leave of the world size.
    """

    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    pp: int
    world_size: int
    enable_loss_parallel: bool = True
    ep: int = 1  # expert parallel: borrowed from dp_shard × cp, not a factor of world_size

    def __post_init__(self) -> None:
        self._validate()
        # Plain attributes, not dataclass fields: meshes hold process groups and must not be
        # compared, copied or serialised with the degrees.
        self._world_mesh: DeviceMesh | None = None
        self._meshes: dict[str, DeviceMesh] = {}

    def _validate(self) -> None:
        if self.world_size < 1:
            raise ConfigError(f"world size must be >= 1, got {self.world_size}")
        degrees = self._degrees()
        for name, value in degrees.items():
            if name == "dp_shard" and value == -1:
                continue
            if value < 1:
                allowed = " (or -1 for 'the rest')" if name == "dp_shard" else ""
                raise ConfigError(f"{_OPTION[name]} must be >= 1{allowed}, got {value}")
        others = self.dp_replicate * self.cp * self.tp * self.pp
        if self.dp_shard == -1:
            if self.world_size % others != 0:
                raise ConfigError(
                    f"world size {self.world_size} is not divisible by dp_replicate({self.dp_replicate}) "
                    f"× cp({self.cp}) × tp({self.tp}) × pp({self.pp}) = {others}, so "
                    f"{_OPTION['dp_shard']}=-1 has no solution; choose degrees whose product divides "
                    f"{self.world_size}"
                )
            self.dp_shard = self.world_size // others
            self._validate_ep()
            return
        product = others * self.dp_shard
        if product != self.world_size:
            terms = " × ".join(f"{n}({v})" for n, v in self._degrees().items())
            if self.world_size % others == 0:
                fix = f"set {_OPTION['dp_shard']} to {self.world_size // others} or -1"
            else:
                fix = f"choose degrees whose product is {self.world_size}"
            raise ConfigError(
                f"parallelism degrees {terms} = {product} ≠ world size {self.world_size}; {fix}"
            )
        self._validate_ep()

    def _validate_ep(self) -> None:
        """EP takes its ranks from dp_shard × cp; under TP each TP group routes the same
        tokens, and EP must be at least TP (TorchTitan's rule, kept so that an expert-TP
        layout can later split the routed tokens over tp without changing the meshes)."""
        if self.ep < 1:
            raise ConfigError(f"{_OPTION['ep']} must be >= 1, got {self.ep}")
        if self.ep == 1:
            return
        borrowed = self.dp_shard * self.cp
        if borrowed % self.ep != 0:
            raise ConfigError(
                f"{_OPTION['ep']} {self.ep} must divide data_parallel_shard_degree × "
                f"context_parallel_degree = {self.dp_shard} × {self.cp} = {borrowed} (EP borrows those ranks)"
            )
        if self.tp > 1 and self.ep < self.tp:
            raise ConfigError(
                f"{_OPTION['ep']} {self.ep} must be >= {_OPTION['tp']} {self.tp} when both are used"
            )

    def _degrees(self) -> dict[str, int]:
        return {
            "dp_replicate": self.dp_replicate,
            "dp_shard": self.dp_shard,
            "cp": self.cp,
            "tp": self.tp,
            "pp": self.pp,
        }

    # ---- the mesh -------------------------------------------------------------------
    def build_mesh(self, device_type: str) -> DeviceMesh:
        """Build (once) and return the 5-D world mesh; also builds the flattened views."""
        if self._world_mesh is not None:
            return self._world_mesh
        if not dist.is_initialized():
            if self.world_size != 1:
                raise RuntimeError(
                    f"no process group for world size {self.world_size}: call "
                    "torchtitan.distributed.utils.init_distributed() before build_mesh()"
                )
            from torchtitan.distributed.utils import init_single_process_group

            init_single_process_group(device_type)
        if dist.get_world_size() != self.world_size:
            raise ValueError(
                f"ParallelDims.world_size {self.world_size} ≠ process group size {dist.get_world_size()}"
            )
        shape = tuple(getattr(self, name) for name in MESH_DIM_NAMES)
        mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIM_NAMES)
        self._meshes = {name: mesh[name] for name in MESH_DIM_NAMES}
        for flat_name, dims in FLATTENED_MESH_DIMS.items():
            self._meshes[flat_name] = mesh[dims]._flatten(flat_name)
        if self.ep > 1:
            # dp_shard_cp = dp_shard_mod_ep (outer) × ep (inner): an EP group is a block of
            # consecutive dp_shard_cp ranks, so its all-to-alls stay as local as possible.
            split = self._meshes["dp_shard_cp"]._unflatten(
                0, (self.dp_shard * self.cp // self.ep, self.ep), ("dp_shard_mod_ep", "ep")
            )
            self._meshes["ep"] = split["ep"]
            self._meshes["dp_shard_mod_ep"] = split["dp_shard_mod_ep"]
        self._world_mesh = mesh
        return mesh

    @property
    def world_mesh(self) -> DeviceMesh:
        if self._world_mesh is None:
            raise RuntimeError("ParallelDims.build_mesh() has not been called yet")
        return self._world_mesh

    def get_mesh(self, dims: str | tuple[str, ...]) -> DeviceMesh:
        """A sub-mesh by name: a mesh dim, a flattened view, or a tuple of them (e.g. HSDP's
        ``("dp_replicate", "dp_shard_cp")``)."""
        mesh = self.world_mesh
        if isinstance(dims, str):
            if dims not in self._meshes:
                known = ", ".join(self._meshes)
                raise KeyError(f"no mesh dim {dims!r}; known: {known}")
            return self._meshes[dims]
        if len(dims) == 1:
            return self.get_mesh(dims[0])
        key = "+".join(dims)
        if key not in self._meshes:
            if any(d in ("ep", "dp_shard_mod_ep") for d in dims):
                # Views unflattened from dp_shard_cp are not known to the root mesh by name:
                # join the 1-D meshes (the same ranks, the same process groups).
                self._meshes[key] = DeviceMesh._concatenate([self.get_mesh(d) for d in dims])
                return self._meshes[key]
            with warnings.catch_warnings():
                # Slicing flattened dims from the root is the only way to get a 2-D
                # (replicate, shard) mesh on torch 2.11; the warning is about a future API.
                warnings.filterwarnings("ignore", message="Slicing a flattened dim")
                self._meshes[key] = mesh[dims]
        return self._meshes[key]

    def dp_rank_and_size(self, world_mesh: DeviceMesh | None = None) -> tuple[int, int]:
        """This rank's index among the data-parallel ranks and their number (for the loader).

        TP, CP and PP ranks of one data-parallel group get the same index, hence the same data.
        """
        mesh = world_mesh if world_mesh is not None else self._world_mesh
        if mesh is None or mesh.mesh_dim_names is None:
            return 0, 1
        names = mesh.mesh_dim_names
        rank, size = 0, 1
        for name in ("dp_replicate", "dp_shard"):
            if name in names:
                dim_size = mesh.size(names.index(name))
                rank = rank * dim_size + mesh.get_local_rank(name)
                size *= dim_size
        return rank, size

    # ---- what is on ----------------------------------------------------------------
    @property
    def dp_enabled(self) -> bool:
        return self.dp_replicate > 1 or self.dp_shard > 1

    @property
    def dp_replicate_enabled(self) -> bool:
        return self.dp_replicate > 1

    @property
    def dp_shard_enabled(self) -> bool:
        return self.dp_shard > 1

    @property
    def fsdp_enabled(self) -> bool:
        """FSDP shards over dp_shard × cp: CP ranks hold different tokens, so they reduce
        gradients like data-parallel ranks do."""
        return self.dp_shard > 1 or self.cp > 1

    @property
    def cp_enabled(self) -> bool:
        return self.cp > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def dp_cp_enabled(self) -> bool:
        return self.dp_enabled or self.cp_enabled

    @property
    def loss_parallel_enabled(self) -> bool:
        return self.tp > 1 and self.enable_loss_parallel

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1

    @property
    def dp_degree(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def non_data_parallel_size(self) -> int:
        return self.cp * self.tp * self.pp

    @property
    def seq_len_divisor(self) -> int:
        """Sequence parallel splits the sequence over tp ranks; CP load balancing splits it
        into 2 × cp chunks."""
        return self.tp * (self.cp * 2 if self.cp > 1 else 1)
