"""Weight export for inference engines: an HF safetensors directory plus a ready file with the version."""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist


def export_hf_weights(engine, out_dir: str, *, dtype: torch.dtype | None = torch.bfloat16, merged: bool = True,
                      extra_files=None) -> None:
    """Write `out_dir` atomically (collective on every rank); `out_dir/READY` names the weight version last.

    ``extra_files(out_dir)`` (rank 0, before READY) adds files such as the tokenizer.
    A LoRA engine writes the base weights with the adapter folded in (`merged=True`) or the PEFT adapter alone.
    Under pipeline parallelism every stage writes its own shards (see `write_hf_dir`).
    """
    from archon.lora_integration import lora_config_of
    from archon_ckpt import atomic_write_text

    if lora_config_of(engine.model) is not None and not merged:
        engine.save_adapter(out_dir)
    else:
        write_hf_dir(engine.model, out_dir, dtype=dtype)
    if not dist.is_initialized() or dist.get_rank() == 0:
        if extra_files is not None:
            extra_files(out_dir)
        atomic_write_text(os.path.join(out_dir, "READY"), json.dumps({"version": engine.version}))
    if dist.is_initialized():
        dist.barrier()


def write_hf_dir(model, out_dir: str, *, dtype: torch.dtype | None, max_shard_size: str | int = "5GB") -> None:
    """HF safetensors + config.json of the whole model, LoRA folded in (collective on every rank); under
    pipeline parallelism every stage writes its own shards (`archon.hf.write_hf_directory`). `out_dir` must
    then be on a filesystem that every stage's writer sees."""
    from archon.hf import write_hf_directory

    tensors, cfg = _hf_tensors_and_config(model, dtype)
    pipeline = getattr(model, "pipeline", None)
    write_hf_directory(tensors, cfg, out_dir, max_shard_size=max_shard_size,
                       pipeline_group=pipeline.group if pipeline is not None else None)


def _hf_tensors_and_config(model, dtype: torch.dtype | None):
    from archon.hf import hf_config_dict, iter_hf_tensors
    from archon.lora_integration import head_untied, iter_merged_hf_tensors, lora_config_of

    cfg = hf_config_dict(model)
    if dtype is not None:
        cfg["dtype"] = str(dtype).removeprefix("torch.")
    if lora_config_of(model) is None:
        return iter_hf_tensors(model, dtype), cfg
    if head_untied(model):  # a trained lm_head copy: the export carries its own lm_head tensor
        cfg["tie_word_embeddings"] = False
    return iter_merged_hf_tensors(model, dtype), cfg


def sampler_state_dict(model, device: torch.device) -> dict[str, torch.Tensor]:
    """The full native state dict (LoRA folded in) on every rank, for an embedded sampler (collective).

    Under pipeline parallelism each pp rank's stage tensors are broadcast over its pp group in turn, so every
    rank ends with every layer (as every rank does without pipelining)."""
    from archon.lora_integration import lora_config_of
    from torch.distributed.tensor import DTensor

    if lora_config_of(model) is not None:
        from archon_lora import merged_state_dict

        local = {k: v.detach() for k, v in merged_state_dict(model).items()}
    else:
        local = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach() for k, v in model.state_dict().items()}
    pipeline = getattr(model, "pipeline", None)
    return local if pipeline is None else _from_every_stage(local, pipeline.group, device)


def _from_every_stage(local: dict[str, torch.Tensor], group, device: torch.device) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    me = dist.get_rank(group)
    obj_device = device if device.type == "cuda" else None
    for src in range(dist.get_world_size(group)):
        src_global = dist.get_global_rank(group, src)
        meta = [[(k, v.shape, v.dtype) for k, v in local.items()] if src == me else None]
        dist.broadcast_object_list(meta, src=src_global, group=group, device=obj_device)
        entries = meta[0]
        assert entries is not None  # filled by the broadcast from `src`
        for name, shape, dt in entries:
            if name in out:
                raise RuntimeError(f"pipeline stages {src} and an earlier one both hold {name!r}")
            t = local[name].to(device).contiguous() if src == me else torch.empty(shape, dtype=dt, device=device)
            dist.broadcast(t, src=src_global, group=group)
            out[name] = t if src != me else local[name]
    return out


def read_ready_version(out_dir: str) -> int | None:
    """The weight version of a finished export, or None if the directory is not complete."""
    path = os.path.join(out_dir, "READY")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return int(json.load(f)["version"])
