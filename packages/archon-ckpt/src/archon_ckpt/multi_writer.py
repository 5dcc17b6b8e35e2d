"""One Hugging Face safetensors checkpoint written by several ranks at once.

Each writer rank streams the tensors it holds (e.g. one pipeline stage's layers) into its own shard files in a
shared temporary directory; global rank 0 then names every shard ``model-0000i-of-0000n.safetensors``, writes
one ``model.safetensors.index.json`` over all of them and publishes the directory atomically. No tensor
crosses the network, so no rank ever holds more than its own part of the model. ``out_dir`` must be on a
filesystem every writer sees (as DCP checkpoints need); otherwise the save fails with an error saying so.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import torch.distributed as dist

from archon_ckpt.atomic import publish_directory, tmp_sibling
from archon_ckpt.safetensors_io import _is_dtensor, name_shards, parse_size, write_parts

__all__ = ["save_safetensors_multi_writer"]


def save_safetensors_multi_writer(
    named_tensors: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike,
    *,
    writers: dist.ProcessGroup | None,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
) -> list[Path]:
    """Write ``out_dir`` from the tensors of every rank in ``writers`` (collective over the whole world).

    ``writers``: the process group of writing ranks, which must contain global rank 0 (it publishes), passed
    by its members; None on every other rank, whose ``named_tensors`` are consumed only to take part in
    DTensor ``full_tensor()`` gathers (e.g. the other data-parallel ranks of a stage). Tensor names must be
    unique across writers. Returns the published files on global rank 0, [] elsewhere; every rank raises
    ``RuntimeError`` if any writer failed or the shards are not all visible to rank 0.
    """
    items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
    if writers is None:
        if dist.get_rank() == 0:
            raise ValueError("global rank 0 must be in the writers group: it publishes the directory")
        for _name, t in items:
            if _is_dtensor(t):
                t.full_tensor()
        _finish(None)
        return []
    leader = dist.get_rank(writers) == 0
    if leader != (dist.get_rank() == 0):
        raise ValueError("the writers group's rank 0 must be global rank 0")
    holder: list[str | None] = [str(tmp_sibling(out_dir)) if leader else None]
    if leader:
        Path(str(holder[0])).mkdir(parents=True)
    dist.broadcast_object_list(holder, src=0, group=writers)
    if holder[0] is None:
        raise RuntimeError("the writers group's rank 0 sent no directory name")
    tmp = Path(holder[0])
    mine: tuple[list, str | None]
    try:
        tmp.mkdir(parents=True, exist_ok=True)  # a writer on an unshared filesystem is caught below
        meta = dict(metadata) if metadata is not None else {"format": "pt"}
        prefix = f"w{dist.get_rank(writers):05d}"
        parts = write_parts(items, tmp, parse_size(max_shard_size), dtype, meta, prefix=prefix)
        mine = ([(p.name, names, nbytes) for p, names, nbytes in parts], None)
    except Exception as e:  # report it to rank 0 instead of leaving the other ranks in a collective
        mine = ([], f"rank {dist.get_rank()}: {type(e).__name__}: {e}")
    everyone: list = [None] * dist.get_world_size(writers)
    dist.all_gather_object(everyone, mine, group=writers)
    if not leader:
        _finish(None)
        return []
    written: list[Path] = []
    error = next((err for _, err in everyone if err is not None), None)
    if error is None:
        parts = [(tmp / name, names, nbytes) for got, _ in everyone for name, names, nbytes in got]
        missing = [p.name for p, _, _ in parts if not p.exists()]
        if missing:
            error = (
                f"shards {missing} written by other ranks are not in {tmp} on rank 0: {out_dir!r} must "
                "be on a filesystem shared by every writer rank"
            )
    if error is None:
        try:
            written = [Path(out_dir) / p.name for p in name_shards(tmp, parts)]
            publish_directory(tmp, out_dir)
        except Exception as e:
            error = f"rank 0: {type(e).__name__}: {e}"
    if error is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    _finish(error)
    return written


def _finish(error: str | None) -> None:
    """Every rank learns rank 0's outcome (this also holds everyone until the directory is published)."""
    holder = [error]
    dist.broadcast_object_list(holder, src=0)
    if holder[0] is not None:
        raise RuntimeError(f"multi-writer safetensors save failed: {holder[0]}")
