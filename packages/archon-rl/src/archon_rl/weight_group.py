"""The trainer <-> rollout-server weight broadcast group, independent of any global process group.

`/init_weights_update_group` joins the trainer (rank 0) and the servers (``rank_offset ...``) in a group of
``world_size`` ranks; the trainer may already run under torchrun with its own default group, and a server has
none. So the group is built from its own `TCPStore` (hosted by rank 0 at ``master_address:master_port``) and a
c10d backend object constructed directly (`ProcessGroupGloo` / `ProcessGroupNCCL`, public classes of
`torch.distributed`), never `init_process_group`. Collectives run through the backend object's own methods.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

__all__ = ["WeightGroup", "init_weight_group", "DTYPES", "dtype_from_str"]

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}
"""The dtype strings of `/update_weights_from_distributed` (SGLang sends e.g. ``"bfloat16"``)."""


def dtype_from_str(name: str) -> torch.dtype:
    key = name.removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[key]


class WeightGroup:
    """A broadcast group of ``world_size`` ranks (trainer = rank 0)."""

    def __init__(self, store: dist.Store, backend_pg, rank: int, world_size: int, backend: str,
                 device: torch.device) -> None:
        self._store, self._pg = store, backend_pg
        self.rank, self.world_size, self.backend, self.device = rank, world_size, backend, device

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        """In-place broadcast of ``tensor`` (contiguous, on ``device``) from rank ``src``."""
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        opts.rootTensor = 0
        self._pg.broadcast([tensor], opts).wait()

    def barrier(self) -> None:
        self.broadcast(torch.zeros(1, device=self.device))

    def close(self) -> None:
        shutdown = getattr(self._pg, "shutdown", None)  # NCCL communicators are freed explicitly
        if shutdown is not None:
            try:
                shutdown()
            except Exception:  # a peer already gone: nothing left to free here
                pass
        self._pg = None
        self._store = None


def init_weight_group(master_address: str, master_port: int, rank: int, world_size: int, *,
                      backend: str = "gloo", group_name: str = "weight_update_group", timeout: float = 300.0,
                      device: torch.device | str | None = None) -> WeightGroup:
    """Join the group as ``rank``; rank 0 hosts the store. Blocks until all ``world_size`` ranks have joined."""
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"weight update backend must be gloo or nccl, got {backend!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside the group of {world_size}")
    td = datetime.timedelta(seconds=timeout)
    store = dist.TCPStore(master_address, int(master_port), world_size, rank == 0, timeout=td)
    prefixed = dist.PrefixStore(f"{group_name}/", store)
    if backend == "gloo":
        pg = dist.ProcessGroupGloo(prefixed, rank, world_size, td)
        dev = torch.device(device) if device is not None else torch.device("cpu")
    else:
        dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
        opts = dist.ProcessGroupNCCL.Options()
        try:
            opts._timeout = td  # private-named field of Backend.Options; the default (10 min) is kept otherwise
        except AttributeError:
            pass
        pg = dist.ProcessGroupNCCL(prefixed, rank, world_size, opts)
    group = WeightGroup(store, pg, rank, world_size, backend, dev)
    group.barrier()  # every rank has joined (NCCL creates its communicator lazily on the first collective)
    return group
