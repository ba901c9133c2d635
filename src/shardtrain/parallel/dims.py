"""The one owner of a run's parallel layout: how its ranks divide into data, context, tensor and pipeline groups.

``dp_replicate x dp_shard x cp x tp x pp = world_size``, laid out row-major in the order
``pp, dp_replicate, dp_shard, cp, tp`` (tensor parallel innermost, so that its ranks are
neighbours on one node; pipeline outermost, as in torchtitan's ``parallel_dims.py``).

A strategy says which degrees it uses (``Strategy.make_parallel_dims``): DDP replicates over every
rank, FSDP's ``FULL_SHARD`` shards over every rank, ``HYBRID_SHARD`` is ``dp_replicate x
dp_shard``, ``NO_SHARD`` is ``dp_replicate``. The Engine checks the degrees against the world
size before any process starts, then builds the device mesh once, on first use, and hands it
to the strategy; everything that needs a group (FSDP's mesh, the samplers' data-parallel rank)
asks here rather than assuming that world rank means data rank.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from shardtrain.errors import ConfigError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

#: Mesh dimensions, outermost first.
MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
#: Dimensions every mesh has, even of size 1, so that data-parallel sub-meshes always exist.
DATA_PARALLEL_DIMS = ("dp_replicate", "dp_shard")


@dataclass(frozen=True, kw_only=True, slots=True)
class ParallelDims:
    """Degrees of parallelism for a run of ``world_size`` ranks.

    Args:
        world_size: ranks in the run (devices x num_nodes).
        dp_replicate: data-parallel replicas (each holds whole parameters, or a whole shard group).
        dp_shard: ranks that shard parameters among themselves (FSDP, ZeRO); ``-1``: whatever the
            other degrees leave.
        cp: context-parallel degree (the sequence split over ranks).
        tp: tensor-parallel degree.
        pp: pipeline-parallel degree (stages).
        ep: expert-parallel degree: ranks among which each mixture-of-experts layer's experts are divided. Not a
            dimension of its own: it divides ``dp_shard``, whose ranks it splits into ``dp_shard_mod_ep x ep``
            (``expert_mesh``), as torchtitan borrows expert-parallel ranks from data parallelism.
    """

    world_size: int
    dp_replicate: int = 1
    dp_shard: int = -1
    cp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if not isinstance(value, int) or isinstance(value, bool) or (value < 1 and item.name != "dp_shard"):
                raise ConfigError(f"parallel degree {item.name} must be a whole number >= 1, got {value!r}")
        if self.dp_shard == -1:
            others = self.dp_replicate * self.cp * self.tp * self.pp
            if self.world_size % others:
                raise ConfigError(
                    f"the {self.world_size} ranks of the run cannot be split into {self._describe(dp_shard='?')}: "
                    f"{self.world_size} is not a multiple of {others}; choose degrees whose product divides it"
                )
            object.__setattr__(self, "dp_shard", self.world_size // others)
        elif self.dp_shard < 1:
            raise ConfigError(
                f"parallel degree dp_shard must be a whole number >= 1 or -1 (the rest), got {self.dp_shard}"
            )
        if self.dp_shard % self.ep:
            raise ConfigError(
                f"expert_parallel_size={self.ep} does not divide the {self.dp_shard} data-parallel ranks that shard "
                f"parameters ({self._describe()}): expert parallelism divides the experts among data-parallel ranks; "
                f"choose an expert_parallel_size that divides {self.dp_shard}"
            )
        if self.product != self.world_size:
            raise ConfigError(
                f"parallel degrees {self._describe()} make {self.product} ranks, but the run has {self.world_size} "
                f"(devices x num_nodes); choose degrees whose product is {self.world_size}, or change devices/num_nodes"
            )

    # ---------------------------------------------------------------- degrees
    @property
    def degrees(self) -> dict[str, int]:
        """Each mesh dimension's degree, outermost first."""
        return {name: getattr(self, name) for name in MESH_DIMS}

    @property
    def product(self) -> int:
        return self.dp_replicate * self.dp_shard * self.cp * self.tp * self.pp

    @property
    def data_parallel_size(self) -> int:
        """How many different batches one step reads: replicas x shard ranks."""
        return self.dp_replicate * self.dp_shard

    @property
    def shards_parameters(self) -> bool:
        return self.dp_shard > 1

    # ---------------------------------------------------------------- ranks
    def coordinates(self, global_rank: int) -> dict[str, int]:
        """This rank's index along each mesh dimension (row-major in ``MESH_DIMS`` order)."""
        if not 0 <= global_rank < self.world_size:
            raise ValueError(f"rank {global_rank} is outside a run of {self.world_size} ranks")
        out: dict[str, int] = {}
        remainder = global_rank
        for name in reversed(MESH_DIMS):
            degree = getattr(self, name)
            out[name] = remainder % degree
            remainder //= degree
        return {name: out[name] for name in MESH_DIMS}

    def data_parallel_rank(self, global_rank: int) -> int:
        """Which of the ``data_parallel_size`` batches of a step this rank reads."""
        at = self.coordinates(global_rank)
        return at["dp_replicate"] * self.dp_shard + at["dp_shard"]

    # ---------------------------------------------------------------- mesh
    def mesh_dims(self) -> dict[str, int]:
        """The dimensions of the device mesh: the data-parallel ones always, the others when used."""
        return {name: degree for name, degree in self.degrees.items() if degree > 1 or name in DATA_PARALLEL_DIMS}

    def build_mesh(self, device_type: str) -> "DeviceMesh":
        """The world's device mesh with named dimensions (``mesh["dp_shard"]``, ``mesh["tp"]``, ...).

        Needs the process group; every rank must call it (the Engine does, once, on first use)."""
        from torch.distributed.device_mesh import init_device_mesh

        dims = self.mesh_dims()
        return init_device_mesh(device_type, tuple(dims.values()), mesh_dim_names=tuple(dims))

    def expert_mesh(self, mesh: "DeviceMesh") -> "DeviceMesh":
        """``mesh`` with ``dp_shard`` split into ``("dp_shard_mod_ep", "ep")``: ``["ep"]`` is a rank's
        expert-parallel group (neighbouring data-parallel ranks), ``["dp_shard_mod_ep"]`` the ranks holding the
        same experts, over which FSDP shards them. Collective: every rank calls it, once (it makes process groups)."""
        return mesh._unflatten("dp_shard", (self.dp_shard // self.ep, self.ep), ("dp_shard_mod_ep", "ep"))

    def _describe(self, **shown: object) -> str:
        values = {**self.degrees, **shown}
        return " x ".join(f"{name}={values[name]}" for name in MESH_DIMS)
