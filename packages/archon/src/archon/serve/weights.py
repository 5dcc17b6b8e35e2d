"""Weight updates of a served model, always copied in place into its existing tensors (under ``no_grad``), so a
backend that captured the tensors' addresses (CUDA graphs) stays valid.

- `load_from_disk`: an HF directory through `archon.hf.load_hf_weights`, which validates every tensor (names,
  shapes) before copying any: a bad directory leaves the old weights.
- `receive_broadcast`: tensors named by HF names arrive by `broadcast(src=0)` over a `WeightGroup`. Names,
  shapes and dtypes are checked before the first receive; a bad list is still received (into a scratch buffer),
  so the trainer never blocks, and nothing is applied.
"""

from __future__ import annotations

import json
import os

import torch
from archon_rl.weight_group import WeightGroup, dtype_from_str

from archon.hf import _native_tensors, load_hf_weights
from archon.spec import get_model_spec

__all__ = ["hf_targets", "load_from_disk", "receive_broadcast", "ready_version"]


def hf_targets(model) -> dict[str, torch.Tensor]:
    """Every HF tensor name of ``model`` -> the native tensor (or the slice of a stacked expert tensor) it fills."""
    adapter = get_model_spec(model.args.model_type).state_dict_adapter(model.args)
    out: dict[str, torch.Tensor] = {}
    for name, t in _native_tensors(model).items():
        if adapter.is_native_only(name):
            continue
        keys, _ = adapter.hf_sources(name)
        if len(keys) == 1:
            out[keys[0]] = t
        else:  # stacked experts: HF key j is row j of the native tensor
            out.update({k: t[j] for j, k in enumerate(keys)})
    if model.args.tie_embeddings and "lm_head.weight" not in out and "model.embed_tokens.weight" in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]  # the tied head is the embedding itself
    return out


def ready_version(path: str) -> str | None:
    """The version named by ``path/READY`` (written by `export_weights`), or None."""
    try:
        with open(os.path.join(path, "READY")) as f:
            return str(json.load(f)["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@torch.no_grad()
def load_from_disk(model, path: str) -> None:
    if not os.path.isdir(path):
        raise ValueError(f"model_path {path!r} is not a directory")
    load_hf_weights(model, path)


@torch.no_grad()
def receive_broadcast(model, group: WeightGroup, names: list[str], dtypes: list[str],
                      shapes: list[list[int]]) -> None:
    """Receive ``names`` in order from rank 0 and copy each into the model; ValueError (after draining every
    broadcast) if the metadata does not match the model."""
    problems: list[str] = []
    if not (len(names) == len(dtypes) == len(shapes)):
        raise ValueError(f"names, dtypes and shapes must have the same length, got {len(names)}, {len(dtypes)}, "
                         f"{len(shapes)}")  # nothing can be received reliably: the trainer must not broadcast
    targets = hf_targets(model)
    parsed: list[torch.dtype] = []
    for name, dt, shape in zip(names, dtypes, shapes):
        try:
            parsed.append(dtype_from_str(dt))
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        t = targets.get(name)
        if t is None:
            problems.append(f"{name!r} is not a tensor of this model")
        elif list(t.shape) != list(shape):
            problems.append(f"{name!r} has shape {list(shape)}, the model's is {list(t.shape)}")
    for name, dt, shape in zip(names, parsed, shapes):
        dst = None if problems else targets[name]
        if dst is not None and dst.dtype == dt and dst.device == group.device and dst.is_contiguous():
            group.broadcast(dst, src=0)  # straight into the parameter: no staging copy
            continue
        buf = torch.empty(tuple(shape), dtype=dt, device=group.device)
        group.broadcast(buf, src=0)
        if dst is not None:
            dst.copy_(buf)
    if problems:
        raise ValueError("weights not updated: " + "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else ""))
