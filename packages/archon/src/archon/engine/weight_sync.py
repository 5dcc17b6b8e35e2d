"""Weight sync from a trainer of any layout to rollout servers: full HF-named tensors in bounded buckets.

`iter_full_hf_tensors` yields every HF tensor of the model whole, one at a time, whatever the layout: DTensor
parameters (FSDP2 / HSDP / TP / EP) are gathered per tensor with ``full_tensor()``; under pipeline parallelism
each stage's tensors are broadcast over the pp group to the stages that lack them, stage by stage; LoRA is folded
into the base weights. `hf_buckets` groups them into buckets of at most ``bucket_bytes`` (a larger tensor gets a
bucket of its own), so a trainer rank holds about one bucket of gathered weights at a time.

Two ways to ship them (both collective on every trainer rank; rank 0 talks to the servers):

- `DiskWeightSync`: an atomic HF directory (shards of one bucket each) + ``READY`` with the version, as
  `export_weights` writes, then ``/update_weights_from_disk`` on every server.
- `BroadcastWeightSync`: ``/init_weights_update_group`` once (trainer rank 0 + the servers), then per bucket
  ``/update_weights_from_distributed`` with names/dtypes/shapes while trainer rank 0 broadcasts each tensor.
  Generation is paused (``pause_mode``) for the whole update, so no sample sees half-updated weights; then
  ``/update_weight_version`` sets the new version.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from archon.engine.export import write_hf_dir
from archon.hf import _native_tensors
from archon.lora_integration import head_untied, lora_config_of
from archon.spec import get_model_spec
from archon_ckpt import atomic_write_text
from archon_lora import merged_state_dict
from archon_rl.weight_group import WeightGroup, init_weight_group
from torch.distributed.tensor import DTensor

__all__ = ["iter_full_hf_tensors", "hf_buckets", "DiskWeightSync", "BroadcastWeightSync", "dtype_name"]

Named = tuple[str, torch.Tensor]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _cast(t: torch.Tensor, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
    t = t.detach().to(device)
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def _stage_tensors(model, dtype: torch.dtype | None, device: torch.device) -> Iterator[Named]:
    """HF tensors of the model (this pipeline stage's only, under pp), gathered one at a time."""
    adapter = get_model_spec(model.args.model_type).state_dict_adapter(model.args)
    if lora_config_of(model) is not None:
        tied = model.args.tie_embeddings and not head_untied(model)
        native: Iterator[tuple[str, torch.Tensor]] = (
            (n, t) for n, t in merged_state_dict(model).items() if not (tied and n == "output.weight"))
    else:
        native = iter(_native_tensors(model).items())
    for name, t in native:
        if adapter.is_native_only(name):
            continue
        full = t.full_tensor() if isinstance(t, DTensor) else t
        yield from adapter.to_hf(name, _cast(full, dtype, device))


def iter_full_hf_tensors(model, *, dtype: torch.dtype | None = None,
                         device: torch.device | str = "cpu") -> Iterator[Named]:
    """Every (HF name, whole tensor) of ``model`` on ``device`` (collective: call on every trainer rank; every
    rank of a pp group receives every stage's tensors)."""
    device = torch.device(device)
    pipeline = getattr(model, "pipeline", None)
    if pipeline is None:
        yield from _stage_tensors(model, dtype, device)
        return
    group = pipeline.group
    me = dist.get_rank(group)
    obj_device = device if device.type == "cuda" else None
    for src in range(dist.get_world_size(group)):
        src_global = dist.get_global_rank(group, src)
        mine = _stage_tensors(model, dtype, device) if src == me else None
        while True:  # one tensor at a time: metadata, then the tensor; None ends this stage
            item = next(mine, None) if mine is not None else None
            meta = [None if item is None else (item[0], tuple(item[1].shape), item[1].dtype)] if src == me else [None]
            dist.broadcast_object_list(meta, src=src_global, group=group, device=obj_device)
            if meta[0] is None:
                break
            name, shape, dt = meta[0]
            t = item[1].contiguous() if item is not None else torch.empty(shape, dtype=dt, device=device)
            dist.broadcast(t, src=src_global, group=group)
            yield name, t


def hf_buckets(tensors: Iterable[Named], bucket_bytes: int) -> Iterator[list[Named]]:
    """Consecutive buckets of at most ``bucket_bytes`` (one tensor larger than that is a bucket alone)."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket size must be >= 1 byte, got {bucket_bytes}")
    bucket: list[Named] = []
    size = 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            out, bucket, size = bucket, [], 0
            yield out
            del out
        bucket.append((name, t))
        size += nbytes
        del t
    if bucket:
        yield bucket


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class DiskWeightSync:
    """Write ``root/v<version>`` (HF safetensors, one bucket per shard, ``READY`` last) and make every server
    load it. Keeps the ``keep_last`` newest directories it wrote itself and removes its older ones."""

    def __init__(self, client, root: str, *, dtype: torch.dtype = torch.bfloat16, bucket_mb: float = 512,
                 keep_last: int = 2) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.client, self.root, self.dtype = client, root, dtype
        self.bucket_bytes = max(1, int(bucket_mb * 2**20))
        self.keep_last = keep_last
        self._written: list[str] = []

    def push(self, model, version: int) -> str:
        """Collective on every trainer rank; returns the directory."""
        out = os.path.join(self.root, f"v{version:06d}")
        write_hf_dir(model, out, dtype=self.dtype, max_shard_size=self.bucket_bytes)
        if _is_rank0():
            atomic_write_text(os.path.join(out, "READY"), json.dumps({"version": version}))
            if self.client is not None:
                self.client.update_weights_from_disk(os.path.abspath(out), weight_version=str(version))
            self._written.append(out)
            for old in self._written[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
            self._written = self._written[-self.keep_last:]
        _barrier()
        return out


class BroadcastWeightSync:
    """Broadcast buckets from trainer rank 0 to every server over a `WeightGroup` (gloo on CPU, NCCL on GPU)."""

    def __init__(self, client, *, master_address: str, master_port: int, dtype: torch.dtype = torch.bfloat16,
                 bucket_mb: float = 512, backend: str = "gloo", group_name: str = "weight_update_group",
                 ranks_per_server: int = 1, device: torch.device | str | None = None,
                 pause_mode: str | None = "retract", timeout: float = 600.0) -> None:
        self.client, self.dtype, self.backend, self.group_name = client, dtype, backend, group_name
        self.master_address, self.master_port = master_address, master_port
        self.bucket_bytes = max(1, int(bucket_mb * 2**20))
        self.world_size = 1 + len(client.urls) * ranks_per_server if client is not None else 1
        self.ranks_per_server = ranks_per_server
        self.device = torch.device(device if device is not None else ("cuda" if backend == "nccl" else "cpu"))
        self.pause_mode, self.timeout = pause_mode, timeout
        self.group: WeightGroup | None = None

    def connect(self) -> None:
        """Form the group (collective on every trainer rank; only rank 0 joins it)."""
        if _is_rank0():
            joined = self.client.init_weights_update_group(
                self.master_address, self.master_port, self.world_size, group_name=self.group_name,
                backend=self.backend, ranks_per_server=self.ranks_per_server)
            self.group = init_weight_group(self.master_address, self.master_port, 0, self.world_size,
                                           backend=self.backend, group_name=self.group_name, timeout=self.timeout,
                                           device=self.device)
            joined.result(timeout=self.timeout)
        _barrier()

    def push(self, model, version: int) -> None:
        """Collective on every trainer rank."""
        rank0 = _is_rank0()
        if rank0 and self.group is None:
            raise RuntimeError("BroadcastWeightSync.push before connect()")
        if rank0 and self.pause_mode:
            self.client.pause_generation(self.pause_mode)
        try:
            for bucket in hf_buckets(iter_full_hf_tensors(model, dtype=self.dtype, device=self.device),
                                     self.bucket_bytes):
                if rank0:
                    self._send(bucket)
                del bucket
            if rank0:  # the version changes once every bucket has arrived
                self.client.update_weight_version(version)
        finally:
            if rank0 and self.pause_mode:
                self.client.continue_generation()
        _barrier()

    def _send(self, bucket: list[Named]) -> None:
        done = self.client.update_weights_from_distributed(
            [n for n, _ in bucket], [dtype_name(t.dtype) for _, t in bucket], [list(t.shape) for _, t in bucket],
            group_name=self.group_name)
        group = self.group
        assert group is not None  # rank 0 after connect()
        for _, t in bucket:
            group.broadcast(t.contiguous(), src=0)
        done.result(timeout=self.timeout)

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None
