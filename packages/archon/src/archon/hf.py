"""Hugging Face interop: `from_pretrained` / `save_pretrained` for Archon models.

Weights are read one tensor at a time from (sharded) safetensors and validated in full before anything is
copied, so a bad checkpoint never leaves a half-loaded model. DTensor (FSDP2/TP) parameters receive only
their local shard.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from archon.models.common.decoder import Decoder
from archon.spec import get_model_spec


def load_hf_config(path_or_config: Any):
    """An HF config object from a directory, a config.json path, a dict, or a config object."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(path_or_config, PretrainedConfig):
        return path_or_config
    if isinstance(path_or_config, dict):
        d = dict(path_or_config)
        return AutoConfig.for_model(d.pop("model_type"), **d)
    path = os.fspath(path_or_config)
    if os.path.isfile(path):
        path = os.path.dirname(path) or "."
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path!r} has no config.json; pass an HF model directory or an HF config")
    from archon.errors import UserError, read_json_file

    file = os.path.join(path, "config.json")
    raw = read_json_file(file)  # names the file and line of a syntax error
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise UserError(f"{file}: not an HF model config (a JSON object with a model_type)")
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{file}: transformers cannot read this config: {str(e).splitlines()[0]}") from None


def build_model(hf_config: Any, *, head: str = "lm", device: str | torch.device = "meta",
                dtype: torch.dtype = torch.float32) -> Decoder:
    """Build the registered model for `hf_config` on `device` (default meta: no memory, materialise later)."""
    spec = get_model_spec(hf_config.model_type)
    args = spec.args_from_hf(hf_config)
    with torch.device(device):
        model = spec.model_cls(args, head=head)
    model.to(dtype=dtype)
    model.hf_config = hf_config.to_dict()
    return model


def from_pretrained(path_or_config: Any, *, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", head: str = "lm", seed: int = 0) -> Decoder:
    """Load an HF checkpoint directory (single or sharded safetensors), or random-init from an HF config
    (object, dict, or a directory / config.json without weights): the same weights `archon train` draws
    from that config with `actor.seed=seed` (fp32 init, then cast)."""
    hf_config = load_hf_config(path_or_config)
    model = build_model(hf_config, head=head, device="meta", dtype=dtype)
    model.to_empty(device=device)
    model.init_buffers()
    if isinstance(path_or_config, (str, os.PathLike)) and _has_safetensors(path_or_config):
        load_hf_weights(model, path_or_config)
        return model
    full = build_model(hf_config, head=head, device="meta", dtype=torch.float32)
    full.to_empty(device="cpu")
    full.init_weights(seed=seed)
    with torch.no_grad():
        model.load_state_dict(full.state_dict())
    return model


def _has_safetensors(path: str | os.PathLike) -> bool:
    d = os.fspath(path)
    d = d if os.path.isdir(d) else os.path.dirname(d) or "."
    return any(name.endswith(".safetensors") for name in os.listdir(d))


def _native_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters())  # de-duplicates tied weights
    persistent = set(model.state_dict().keys())
    named.update({n: b for n, b in model.named_buffers() if n in persistent})
    return named


def load_hf_weights(model: Decoder, path: str | os.PathLike, *, strict: bool = True, source_for=None) -> None:
    """Copy HF safetensors weights into `model` (plain or DTensor parameters).

    Everything is validated first (missing / unexpected tensors, shapes): a bad checkpoint raises
    ValueError naming the key and file, and nothing is loaded. `source_for(native_name)`, if given, decides
    first: an `HFSource`, None (the tensor is not in the checkpoint), or NotImplemented for the model's own
    mapping (LoRA uses it for its factors and for a trainable copy of a tied head).
    """
    from archon_ckpt import HFSource, SafetensorsReader, load_into_module

    adapter = get_model_spec(model.args.model_type).state_dict_adapter(model.args)
    tied_head = model.args.tie_embeddings and model.output is not None

    def native_to_hf(name: str):
        if source_for is not None and (source := source_for(name)) is not NotImplemented:
            return source
        if adapter.is_native_only(name) or (tied_head and name == "output.weight"):
            return None
        keys, combine = adapter.hf_sources(name)
        return HFSource(tuple(keys), combine if len(keys) > 1 else None)

    ignore = [r"rotary_emb\.inv_freq$"] + ([r"^lm_head\.weight$"] if tied_head else [])
    load_into_module(model, SafetensorsReader(path), native_to_hf=native_to_hf, strict=strict,
                     ignore_unexpected=ignore)


def iter_hf_tensors(model: Decoder, dtype: torch.dtype | None = None):
    """Yield (hf_name, full tensor) one at a time; DTensors are gathered (collective: call on all ranks)."""
    from torch.distributed.tensor import DTensor

    adapter = get_model_spec(model.args.model_type).state_dict_adapter(model.args)
    for name, t in _native_tensors(model).items():
        if adapter.is_native_only(name):
            continue
        full = t.full_tensor() if isinstance(t, DTensor) else t
        full = full.detach().to("cpu")
        if dtype is not None and full.is_floating_point():
            full = full.to(dtype)
        yield from adapter.to_hf(name, full)


def hf_config_dict(model: Decoder) -> dict[str, Any]:
    cfg = dict(model.hf_config or {})
    if not cfg:
        raise ValueError("model has no HF config attached; build it with archon.from_pretrained")
    spec = get_model_spec(model.args.model_type)
    if model.head_kind == "value":
        cfg.update(architectures=[spec.hf_value_model], num_labels=1,
                   id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    else:
        cfg["architectures"] = [spec.hf_causal_lm]
    return cfg


def save_pretrained(model: Decoder, out_dir: str | os.PathLike, *, max_shard_size: str | int = "5GB",
                    dtype: torch.dtype | None = None) -> None:
    """Write an HF directory (config.json + safetensors, sharded with an index when large).

    Collective when the model is sharded: call on every rank; rank 0 writes.
    """
    cfg = hf_config_dict(model)
    if dtype is not None:
        cfg["dtype"] = str(dtype).removeprefix("torch.")
    write_hf_directory(iter_hf_tensors(model, dtype), cfg, out_dir, max_shard_size=max_shard_size)


def write_hf_directory(tensors, cfg: dict, out_dir: str | os.PathLike, *, max_shard_size: str | int = "5GB",
                       pipeline_group=None) -> None:
    """Write (HF name, tensor) pairs as safetensors shards, then `cfg` as config.json (collective).

    Rank 0 writes everything, or with `pipeline_group` (the pp group of a pipelined model) the pp group holding
    rank 0 writes: each of its ranks streams its own stages' tensors into its own shards of one directory and
    rank 0 writes one index over all of them, so no weight moves between stages; other data-parallel replicas
    only take part in their stage's DTensor gathers. config.json comes last: a directory with one is complete.
    """
    import torch.distributed as dist
    from archon_ckpt import atomic_write_text, save_safetensors_multi_writer, save_safetensors_sharded

    if pipeline_group is None:
        save_safetensors_sharded(tensors, out_dir, max_shard_size=max_shard_size)
    else:
        writes = 0 in dist.get_process_group_ranks(pipeline_group)
        save_safetensors_multi_writer(tensors, out_dir, writers=pipeline_group if writes else None,
                                      max_shard_size=max_shard_size)
    if not (dist.is_initialized() and dist.get_rank() != 0):
        atomic_write_text(os.path.join(out_dir, "config.json"), json.dumps(cfg, indent=2, sort_keys=True, default=str))
