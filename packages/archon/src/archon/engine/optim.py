"""AdamW (fused where the device has it) and warmup + constant / linear / cosine LR schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

SCHEDULES = ("constant", "linear", "cosine")


def build_optimizer(model: nn.Module, cfg, device_type: str) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (no weight decay on 1-D ones). A data-parallel layout may wrap the
    same groups and arguments differently (`archon.engine.dp_layout`)."""
    return torch.optim.AdamW(param_groups(model, cfg), **adamw_kwargs(cfg, device_type))


def param_groups(model: nn.Module, cfg) -> list[dict]:
    """The trainable parameters in AdamW groups: weight decay on >= 2-D ones only, one group per mesh."""
    # foreach/fused kernels cannot mix DTensors of different meshes with plain tensors: group by mesh too.
    buckets: dict = {}
    for _name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        mesh = getattr(p, "device_mesh", None)
        key = (p.dim() >= 2, id(mesh) if mesh is not None else None)
        buckets.setdefault(key, []).append(p)
    return [{"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0}
            for (decay, _), ps in buckets.items()]


def adamw_kwargs(cfg, device_type: str) -> dict:
    """AdamW's arguments for `cfg` (an OptimizerConfig): fused kernels on CUDA, foreach elsewhere."""
    kwargs: dict = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if device_type == "cuda":
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = True
    return kwargs


def lr_lambda(kind: str, total_steps: int, warmup_steps: int, min_lr_ratio: float):
    if kind not in SCHEDULES:
        raise ValueError(f"lr_scheduler_type {kind!r} is not one of {SCHEDULES}")

    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if kind == "linear":
            return 1.0 - (1.0 - min_lr_ratio) * progress
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def build_scheduler(opt: torch.optim.Optimizer, cfg, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = int(cfg.warmup_steps_proportion * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.lr_scheduler_type, total_steps, warmup,
                                                            cfg.min_lr_ratio))
