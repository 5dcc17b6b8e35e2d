"""Weight export for inference engines: an HF safetensors directory plus a ready file with the version."""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist


def export_hf_weights(engine, out_dir: str, *, dtype: torch.dtype | None = torch.bfloat16, merged: bool = True) -> None:
    """Write `out_dir` atomically (collective on every rank); `out_dir/READY` names the weight version last.

    A LoRA engine writes the base weights with the adapter folded in (`merged=True`) or the PEFT adapter alone.
    """
    from archon.hf import save_pretrained
    from archon.lora_integration import lora_config_of
    from archon_ckpt import atomic_write_text

    if lora_config_of(engine.model) is None:
        save_pretrained(engine.model, out_dir, dtype=dtype)
    elif merged:
        _save_merged(engine.model, out_dir, dtype)
    else:
        engine.save_adapter(out_dir)
    if not dist.is_initialized() or dist.get_rank() == 0:
        atomic_write_text(os.path.join(out_dir, "READY"), json.dumps({"version": engine.version}))
    if dist.is_initialized():
        dist.barrier()


def _save_merged(model, out_dir: str, dtype: torch.dtype | None) -> None:
    from archon.hf import hf_config_dict
    from archon.lora_integration import head_untied, iter_merged_hf_tensors
    from archon_ckpt import atomic_write_text, save_safetensors_sharded

    cfg = hf_config_dict(model)
    if head_untied(model):  # a trained lm_head copy: the export carries its own lm_head tensor
        cfg["tie_word_embeddings"] = False
    if dtype is not None:
        cfg["dtype"] = str(dtype).removeprefix("torch.")
    save_safetensors_sharded(iter_merged_hf_tensors(model, dtype), out_dir)
    if not (dist.is_initialized() and dist.get_rank() != 0):
        atomic_write_text(os.path.join(out_dir, "config.json"), json.dumps(cfg, indent=2, sort_keys=True, default=str))


def read_ready_version(out_dir: str) -> int | None:
    """The weight version of a finished export, or None if the directory is not complete."""
    path = os.path.join(out_dir, "READY")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return int(json.load(f)["version"])
