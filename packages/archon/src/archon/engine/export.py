"""Weight export for inference engines: an HF safetensors directory plus a ready file with the version."""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist


def export_hf_weights(engine, out_dir: str, *, dtype: torch.dtype | None = torch.bfloat16) -> None:
    """Write `out_dir` atomically (collective on every rank); `out_dir/READY` names the weight version last."""
    from archon_ckpt import atomic_write_text

    from archon.hf import save_pretrained

    save_pretrained(engine.model, out_dir, dtype=dtype)
    if not dist.is_initialized() or dist.get_rank() == 0:
        atomic_write_text(os.path.join(out_dir, "READY"), json.dumps({"version": engine.version}))
    if dist.is_initialized():
        dist.barrier()


def read_ready_version(out_dir: str) -> int | None:
    """The weight version of a finished export, or None if the directory is not complete."""
    path = os.path.join(out_dir, "READY")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return int(json.load(f)["version"])
