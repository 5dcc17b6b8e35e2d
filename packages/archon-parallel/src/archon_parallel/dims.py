"""ParallelDims: the sizes of every parallel dimension, and the DeviceMeshes built from them once.

Rank layout. The dense ("attn") mesh orders dims outermost first as
``(pp, dp_replicate, dp_shard, cp, tp)``; tp ranks are adjacent. The expert ("ffn") mesh reshapes the
same ranks, in the same order, as ``(pp, edp, ep, ep_rep, etp)``:

- plain form (``archon:d2t2e2``): EP borrows ranks from dp_shard x cp only (innermost first: cp, then
  dp_shard), never from tp, dp_replicate or pp, so ``ep`` must divide ``dp_shard * cp``. The tp axis
  becomes ``etp`` when ``etp == tp`` (experts sharded like the dense MLP) or ``ep_rep`` when
  ``etp == 1`` (experts replicated over tp; every tp rank routes the same, all-gathered tokens).
- hybrid form (``archon:(attn:...|ffn:d..e..t..)``, MoE parallel folding): the stage's ranks are
  simply re-split as ``(edp, ep, etp)`` (``ep_rep == 1``), so EP may fold onto tp/cp ranks;
  ``ep * etp`` must divide ``dp_shard * cp * tp``.

Named meshes (``ParallelMeshes[name]``):

- ``pp``, ``dp_replicate``, ``dp_shard``, ``cp``, ``tp``: the axes of the dense mesh.
- ``dp`` = dp_replicate x dp_shard (flattened): ranks that see different data.
- ``dp_shard_cp`` = dp_shard x cp (flattened): the FSDP shard axis (params are sharded over cp too).
- ``dp_cp`` = dp_replicate x dp_shard x cp (flattened): the batch/loss mesh, ranks holding different
  tokens; reduce token counts and losses over it.
- ``fsdp``: the FSDP mesh: ``dp_shard_cp`` (1-D), or 2-D ``(dp_replicate, dp_shard_cp)`` for HSDP.
- ``ep``, ``etp``, ``edp``, ``ep_rep``: axes of the expert mesh (edp = data parallel for expert weights;
  ep_rep = ranks holding identical expert replicas and identical tokens, no reduction needed).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .allocation import parse_allocation

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["ParallelDims", "ParallelMeshes", "flatten_mesh"]

_DENSE_AXES = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
_EXPERT_AXES = ("pp", "edp", "ep", "ep_rep", "etp")


def flatten_mesh(mesh: DeviceMesh, name: str) -> DeviceMesh:
    """Flatten all axes of ``mesh`` (a slice of a root mesh) into one axis named ``name``.

    ``DeviceMesh._flatten`` is private but is the only way (torch 2.11..2.15) to get a flattened axis
    that stays attached to the root mesh, which FSDP2+TP and slicing by the new name need. Without it
    we fall back to a fresh 1-D mesh over the same ranks (usable for collectives, not for slicing).
    """
    if mesh.ndim == 1 and mesh.mesh_dim_names == (name,):
        return mesh
    flatten = getattr(mesh, "_flatten", None)
    if flatten is not None:
        return flatten(name)
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh(mesh.device_type, mesh.mesh.flatten(), mesh_dim_names=(name,))


@dataclass
class ParallelMeshes:
    """Meshes built once by ``ParallelDims.build_meshes``; ``meshes[name]`` returns one (see module doc).

    With ``world_size == 1`` every mesh is None and no process group is needed.
    """

    dense: DeviceMesh | None
    expert: DeviceMesh | None
    named: dict[str, DeviceMesh] = field(default_factory=dict)

    def __getitem__(self, name: str) -> DeviceMesh | None:
        if self.dense is None:
            return None
        if name not in self.named:
            raise KeyError(f"no mesh named {name!r}; known: {sorted(self.named)}")
        return self.named[name]

    def group(self, name: str):
        """The ProcessGroup of a 1-D named mesh, or None for world size 1."""
        mesh = self[name]
        return None if mesh is None else mesh.get_group()


@dataclass
class ParallelDims:
    """Degrees of every parallel dimension. ``dp_shard=-1`` fills it from ``world_size``.

    ``ep`` experts-parallel and ``etp`` expert-tensor-parallel fold onto the dense ranks (see module
    docstring); ``edp`` (derived) is the data-parallel degree of the expert weights.
    """

    dp_replicate: int = 1
    dp_shard: int = -1
    cp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1
    world_size: int = 1
    hybrid: bool = False
    """True for the hybrid attn/ffn form: experts fold onto any ranks of a stage (see module doc)."""
    _meshes: ParallelMeshes | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("dp_replicate", "cp", "tp", "pp", "ep", "etp", "world_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        others = self.dp_replicate * self.cp * self.tp * self.pp
        if self.dp_shard == -1:
            if self.world_size % others != 0:
                raise ValueError(f"world size {self.world_size} is not divisible by dp_replicate*cp*tp*pp = "
                                 f"{others}; change the degrees or the number of ranks")
            self.dp_shard = self.world_size // others
        if not isinstance(self.dp_shard, int) or self.dp_shard < 1:
            raise ValueError(f"dp_shard must be an int >= 1 or -1 (fill), got {self.dp_shard!r}")
        if others * self.dp_shard != self.world_size:
            raise ValueError(f"dp_replicate*dp_shard*cp*tp*pp = {others * self.dp_shard} does not equal the "
                             f"world size {self.world_size}; the degrees must multiply to the number of ranks")
        if self.hybrid:
            stage = self.dp_shard * self.cp * self.tp
            if stage % (self.ep * self.etp) != 0:
                raise ValueError(f"ep*etp = {self.ep * self.etp} must divide dp_shard*cp*tp = {stage}: expert "
                                 f"groups fold onto the ranks of one replica of one pipeline stage")
        else:
            if (self.dp_shard * self.cp) % self.ep != 0:
                raise ValueError(f"ep {self.ep} must divide dp_shard*cp = {self.dp_shard * self.cp}: expert "
                                 f"parallelism borrows dp_shard and cp ranks (never tp, dp_replicate or pp)")
            if self.etp not in (1, self.tp):
                raise ValueError(f"etp {self.etp} must be 1 (experts replicated over tp) or tp = {self.tp}; "
                                 f"use the hybrid attn/ffn form for other expert layouts")

    @classmethod
    def from_allocation(cls, text: str, world_size: int) -> ParallelDims:
        """Build from an allocation string's archon part; its size must equal ``world_size``."""
        train = parse_allocation(text).train
        if train.world_size != world_size:
            raise ValueError(f"allocation {text!r} needs {train.world_size} ranks but the world size is "
                             f"{world_size}; change the sizes or launch {train.world_size} ranks")
        a = train.attn
        if train.ffn is None:
            ep, etp = a.get("e", 1), 1
        else:
            ep, etp = train.ffn.get("e", 1), train.ffn.get("t", 1)
        return cls(dp_replicate=a.get("r", 1), dp_shard=a.get("d", 1), cp=a.get("c", 1), tp=a.get("t", 1),
                   pp=a.get("p", 1), ep=ep, etp=etp, world_size=world_size, hybrid=train.hybrid)

    # -- derived sizes ----------------------------------------------------------------------------
    @property
    def ep_rep(self) -> int:
        """Ranks holding the same experts and the same tokens (tp ranks when etp == 1, plain form)."""
        return 1 if self.hybrid else self.tp // self.etp

    @property
    def edp(self) -> int:
        """Data-parallel degree of expert weights (FSDP axis of the experts)."""
        return self.world_size // (self.pp * self.ep * self.ep_rep * self.etp)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def dp_cp(self) -> int:
        """Number of ranks holding different tokens (batch/loss reduction size)."""
        return self.dp * self.cp

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    @property
    def dp_replicate_enabled(self) -> bool:
        return self.dp_replicate > 1

    @property
    def dp_shard_enabled(self) -> bool:
        return self.dp_shard > 1

    @property
    def fsdp_enabled(self) -> bool:
        """FSDP wraps whenever params are sharded over dp_shard or cp, or replicated (HSDP) over dp."""
        return self.dp_shard * self.cp > 1 or self.dp_replicate > 1

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
    def ep_enabled(self) -> bool:
        return self.ep > 1

    @property
    def etp_enabled(self) -> bool:
        return self.etp > 1

    # -- meshes -----------------------------------------------------------------------------------
    def build_meshes(self, device_type: str = "cpu") -> ParallelMeshes:
        """Build (once; later calls return the same object) the dense and expert meshes by name."""
        if self._meshes is not None:
            return self._meshes
        if self.world_size == 1:
            self._meshes = ParallelMeshes(dense=None, expert=None)
            return self._meshes
        import torch.distributed as dist
        from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

        if not dist.is_initialized() or dist.get_world_size() != self.world_size:
            got = dist.get_world_size() if dist.is_initialized() else "no process group"
            raise ValueError(f"ParallelDims.world_size is {self.world_size} but torch.distributed has {got}; "
                             f"initialise the process group with the same world size")
        sizes = (self.pp, self.dp_replicate, self.dp_shard, self.cp, self.tp)
        dense = init_device_mesh(device_type, sizes, mesh_dim_names=_DENSE_AXES)
        named: dict[str, DeviceMesh] = {axis: dense[axis] for axis in _DENSE_AXES}
        named["dp"] = flatten_mesh(dense["dp_replicate", "dp_shard"], "dp")
        named["dp_shard_cp"] = flatten_mesh(dense["dp_shard", "cp"], "dp_shard_cp")
        named["dp_cp"] = flatten_mesh(dense["dp_replicate", "dp_shard", "cp"], "dp_cp")
        named["fsdp"] = self._fsdp_mesh(dense, named)
        ranks = torch.arange(self.world_size).view(self.pp, self.edp, self.ep, self.ep_rep, self.etp)
        expert = DeviceMesh(device_type, ranks, mesh_dim_names=_EXPERT_AXES)
        for axis in ("edp", "ep", "ep_rep", "etp"):
            named[axis] = expert[axis]
        self._meshes = ParallelMeshes(dense=dense, expert=expert, named=named)
        return self._meshes

    def _fsdp_mesh(self, dense: DeviceMesh, named: dict[str, DeviceMesh]) -> DeviceMesh:
        if self.dp_replicate == 1:
            return named["dp_shard_cp"]
        if self.cp == 1:
            return dense["dp_replicate", "dp_shard"]
        # HSDP over a flattened (dp_shard, cp) axis: torch >= 2.11 warns that slicing flattened axes from
        # the root will be deprecated, but it is the one way that keeps the mesh attached to the root.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return dense["dp_replicate", "dp_shard_cp"]

    def __str__(self) -> str:
        parts = [f"{k}={getattr(self, k)}" for k in ("dp_replicate", "dp_shard", "cp", "tp", "pp", "ep", "etp")]
        return f"ParallelDims({', '.join(parts)}, world_size={self.world_size}, hybrid={self.hybrid})"
