"""Merge / unmerge, merged and adapter-only state dicts, trainable parameters, adapter on/off.

State-dict helpers return full (unsharded) tensors: DTensor parameters are gathered with
``full_tensor()``, a collective, so under FSDP2/TP every rank must call them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from archon_lora.experts import ExpertLoRA
from archon_lora.inject import SAVED_MODULE_ATTR, lora_modules
from archon_lora.layers import LoRALinear

__all__ = [
    "merge_lora", "unmerge_lora", "merged_state_dict", "lora_state_dict", "trainable_parameters",
    "lora_disabled", "clean_name",
]

_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def clean_name(name: str) -> str:
    """Drop wrapper components (activation checkpointing, torch.compile) from a parameter path."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _full(t: torch.Tensor) -> torch.Tensor:
    full_tensor = getattr(t, "full_tensor", None)  # DTensor
    return (full_tensor() if full_tensor is not None else t).detach()


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA update into its base weight in place (forward then skips the LoRA branch)."""
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo ``merge_lora`` (exact up to floating-point rounding of add then subtract)."""
    for m in lora_modules(model).values():
        m.unmerge()


def _lora_param_names(module: nn.Module) -> list[str]:
    if isinstance(module, LoRALinear):
        return ["lora_A", "lora_B"]
    assert isinstance(module, ExpertLoRA)
    return [f"lora_{ab}_{w}" for w in module.lora_targets for ab in ("A", "B")]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter-only state dict with native names: LoRA pairs plus ``modules_to_save`` copies, full tensors.

    Keys: ``<module>.lora_A`` / ``<module>.lora_B`` for linears, ``<module>.lora_A_w1`` ... for experts,
    ``<module>.<param>`` for saved modules.
    """
    out: dict[str, torch.Tensor] = {}
    for path, module in model.named_modules():
        if isinstance(module, (LoRALinear, ExpertLoRA)):
            for name in _lora_param_names(module):
                out[clean_name(f"{path}.{name}")] = _full(getattr(module, name))
        elif getattr(module, SAVED_MODULE_ATTR, False):
            for name, p in module.named_parameters():
                out[clean_name(f"{path}.{name}")] = _full(p)
    return out


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full base state dict with every LoRA update folded in and no LoRA keys; ``model`` is not modified."""
    lora_keys: set[str] = set()
    deltas: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for path, module in lora_modules(model).items():
            lora_keys.update(clean_name(f"{path}.{n}") for n in _lora_param_names(module))
            if module.merged:
                continue
            if isinstance(module, LoRALinear):
                a, b = _full(module.lora_A), _full(module.lora_B)
                deltas[clean_name(f"{path}.weight")] = (b @ a) * module.scaling
            else:
                for w in module.lora_targets:
                    a, b = (_full(t) for t in module.lora_pair(w))
                    deltas[clean_name(f"{path}.{w}")] = torch.bmm(b, a) * module.scaling
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        key = clean_name(key)
        if key in lora_keys:
            continue
        value = _full(value)
        if key in deltas:
            value = value + deltas[key].to(value.dtype)
        out[key] = value
    return out


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters with ``requires_grad`` in ``named_parameters`` order (same on every rank by construction)."""
    return [p for p in model.parameters() if p.requires_grad]


@contextmanager
def lora_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model without LoRA updates (e.g. reference log-probs in RL).

    ``modules_to_save`` copies stay in effect: their original weights are not kept.
    """
    modules = list(lora_modules(model).values())
    if any(m.merged for m in modules):
        raise ValueError("LoRA is merged into the base weights; call unmerge_lora(model) before disabling it")
    previous = [m.lora_enabled for m in modules]
    for m in modules:
        m.lora_enabled = False
    try:
        yield
    finally:
        for m, flag in zip(modules, previous):
            m.lora_enabled = flag
