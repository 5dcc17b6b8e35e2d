"""How the trainer's new weights reach the rollout servers after a step: strategy objects built once.

- `DiskWeightSync`: every trainer rank takes part in `engine.export_weights` (full HF tensors gathered from
  any layout, written atomically with a READY file), then rank 0 asks every server to
  `/update_weights_from_disk`. The newest two versions are kept; older ones this run wrote are removed.
- `BroadcastWeightSync`: trainer rank 0 and the servers form a torch.distributed group once
  (`/init_weights_update_group`); after a step the full tensors are gathered bucket by bucket
  (`rollout.weight_bucket_mb`) and broadcast from rank 0 while `/update_weights_from_distributed` is open.

Both are collective over the trainer's ranks; only rank 0 talks to the servers.
"""

from __future__ import annotations

import os
import shutil

import torch
import torch.distributed as dist

__all__ = ["DiskWeightSync", "BroadcastWeightSync", "serving_dtype"]


def serving_dtype(rollout_dtype: str, actor_dtype: str) -> str:
    """`rollout.dtype` resolved: auto follows the actor's compute dtype."""
    name = actor_dtype if rollout_dtype == "auto" else rollout_dtype
    return {"bf16": "bfloat16", "fp32": "float32"}.get(name, name)


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


class DiskWeightSync:
    """Export to ``weight_dir/v<version>`` and load it on every server."""

    def __init__(self, engine, weight_dir: str, dtype: str, keep: int = 2) -> None:
        self.engine = engine
        self.weight_dir = os.path.abspath(weight_dir)
        self.dtype = dtype
        self.keep = keep
        self._written: list[str] = []

    def export(self, version: int) -> str:
        """Write the current weights as ``weight_dir/v<version>`` (collective); returns the directory."""
        out = os.path.join(self.weight_dir, f"v{version:06d}")
        self.engine.export_weights(out, dtype=getattr(torch, self.dtype))
        self._written.append(out)
        return out

    def push(self, client, version: int, recover=None) -> None:
        """Export and load on the servers (collective over trainer ranks; rank 0 calls ``client``). If loading
        fails, ``recover()`` may return a client over the servers still alive (or raise)."""
        path = self.export(version)
        if _is_rank0():
            try:
                client.update_weights_from_disk(path, weight_version=version)
            except Exception:
                if recover is None:
                    raise
                recover().update_weights_from_disk(path, weight_version=version)
            while len(self._written) > self.keep:
                shutil.rmtree(self._written.pop(0), ignore_errors=True)

    def connect(self, client) -> None:
        """Nothing to set up: every server reads the same filesystem."""

    def close(self) -> None:
        pass


class BroadcastWeightSync:
    """A weight-update group of trainer rank 0 and the servers (gloo on CPU, NCCL across GPUs)."""

    def __init__(self, engine, dtype: str, bucket_mb: int, *, num_servers: int, host: str = "127.0.0.1",
                 timeout_s: float = 600.0) -> None:
        self.engine = engine
        self.dtype = dtype
        self.bucket_bytes = bucket_mb * 2**20
        self.num_servers = num_servers
        self.host = host
        self.timeout_s = timeout_s
        self.group = None
        self.backend = "nccl" if engine.device.type == "cuda" else "gloo"

    def connect(self, client) -> None:
        """Rank 0 hosts the group's store and joins as rank 0 while the servers join (collective-free)."""
        if not _is_rank0():
            return
        from archon_rl.weight_group import init_weight_group

        from archon.rl.servers import free_port

        port = free_port(self.host)
        world = 1 + self.num_servers
        fut = client.init_weights_update_group(self.host, port, world, backend=self.backend)
        self.group = init_weight_group(self.host, port, 0, world, backend=self.backend, timeout=self.timeout_s,
                                       device=self.engine.device if self.backend == "nccl" else "cpu")
        fut.result(timeout=self.timeout_s)

    def push(self, client, version: int, recover=None) -> None:  # noqa: ARG002 - a lost member breaks the group
        """Gather full HF tensors bucket by bucket on every rank; rank 0 broadcasts each bucket to the servers."""
        from archon.rl.weight_buckets import hf_weight_buckets

        dtype = getattr(torch, self.dtype)
        for bucket in hf_weight_buckets(self.engine.model, dtype, self.bucket_bytes):
            if not _is_rank0():
                continue
            names = [n for n, _ in bucket]
            fut = client.update_weights_from_distributed(
                names, [self.dtype] * len(names), [list(t.shape) for _, t in bucket], weight_version=version)
            dev = self.group.device
            for _, t in bucket:
                self.group.broadcast(t.to(dev).contiguous(), src=0)
            fut.result(timeout=self.timeout_s)

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None
