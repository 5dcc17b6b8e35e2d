"""Put LoRA into a model by target module names; freeze everything else.

Targets are matched on dotted module paths: a module matches a target when its path equals the target or
ends with ``"." + target``. HF leaf names are translated to the model's native leaf names through
``name_aliases`` (e.g. ``{"q_proj": "wq"}``), so one config serves HF-named and natively named models.
"""

from __future__ import annotations

import copy

from torch import nn

from archon_lora.config import LoRAConfig
from archon_lora.experts import ExpertLoRA, add_expert_lora, is_grouped_experts
from archon_lora.layers import LoRALinear

__all__ = ["inject_lora", "lora_modules", "init_lora_weights", "SAVED_MODULE_ATTR"]

SAVED_MODULE_ATTR = "_archon_lora_saved"
"""Attribute set to True on modules that ``modules_to_save`` turned into trainable copies."""


def _matches(path: str, target: str) -> bool:
    return path == target or path.endswith("." + target)


def _resolve(target: str, aliases: dict[str, str]) -> str:
    head, _, leaf = target.rpartition(".")
    leaf = aliases.get(leaf, leaf)
    return f"{head}.{leaf}" if head else leaf


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, new)


def _available(model: nn.Module) -> list[str]:
    leaves = {path.rpartition(".")[2] for path, m in model.named_modules()
              if path and (isinstance(m, nn.Linear) or is_grouped_experts(m))}
    return sorted(leaves)


def inject_lora(model: nn.Module, config: LoRAConfig, name_aliases: dict[str, str] | None = None) -> nn.Module:
    """Add LoRA to ``model`` in place and return it.

    Every matched nn.Linear becomes a ``LoRALinear`` sharing the original weight (no copy); every matched
    grouped-expert module gets per-expert low-rank pairs. Modules in ``config.modules_to_save`` are
    replaced by a trainable deep copy (this unties weights shared with them, e.g. a tied lm_head). All
    other parameters are frozen. Works on the meta device (call ``init_lora_weights`` after ``to_empty``).
    """
    aliases = dict(name_aliases or {})
    targets = {t: _resolve(t, aliases) for t in config.target_modules}
    saves = {t: _resolve(t, aliases) for t in config.modules_to_save}
    named = [(p, m) for p, m in model.named_modules() if p]

    hits: dict[str, list[str]] = {t: [] for t in targets}
    for path, module in named:
        for t, native in targets.items():
            if _matches(path, native):
                if not (isinstance(module, nn.Linear) or is_grouped_experts(module)):
                    raise TypeError(
                        f"target {t!r} matched {path!r} of type {type(module).__name__}; LoRA supports "
                        "nn.Linear and grouped-expert modules only, narrow the target name"
                    )
                hits[t].append(path)
    unknown = [t for t, paths in hits.items() if not paths]
    if unknown:
        raise ValueError(
            f"target modules {unknown} match no module of {type(model).__name__} "
            f"(aliases applied: {aliases or 'none'}); available linear/expert leaf names: {_available(model)}"
        )

    save_hits: dict[str, list[str]] = {t: [p for p, _ in named if _matches(p, n)] for t, n in saves.items()}
    missing = [t for t, paths in save_hits.items() if not paths]
    if missing:
        leaves = sorted({p.rpartition(".")[2] for p, _ in named})
        raise ValueError(f"modules_to_save {missing} match no module; available leaf names: {leaves}")

    for p in model.parameters():
        p.requires_grad_(False)

    for path in sorted({p for paths in hits.values() for p in paths}):
        module = model.get_submodule(path)
        if isinstance(module, nn.Linear):
            if isinstance(module, LoRALinear):
                raise ValueError(f"{path!r} already has LoRA; inject each module once")
            new = LoRALinear.from_linear(module, config.r, config.alpha, config.dropout, config.use_rslora)
            _set_submodule(model, path, new)
        else:
            add_expert_lora(module, config.r, config.alpha, config.expert_params, config.dropout,
                            config.use_rslora)

    for path in sorted({p for paths in save_hits.values() for p in paths}):
        trainable = copy.deepcopy(model.get_submodule(path))
        for p in trainable.parameters():
            p.requires_grad_(True)
        setattr(trainable, SAVED_MODULE_ATTR, True)
        _set_submodule(model, path, trainable)
    return model


def lora_modules(model: nn.Module) -> dict[str, LoRALinear | ExpertLoRA]:
    """Path -> module for every LoRA-carrying module of ``model`` (in ``named_modules`` order)."""
    return {p: m for p, m in model.named_modules() if isinstance(m, (LoRALinear, ExpertLoRA))}


def init_lora_weights(model: nn.Module) -> None:
    """Re-initialise every LoRA pair (A kaiming-uniform, B zero); call after ``to_empty`` for meta builds."""
    for m in lora_modules(model).values():
        m.reset_lora_parameters()
