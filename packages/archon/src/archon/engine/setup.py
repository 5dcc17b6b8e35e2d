"""`EngineSetup`: one engine's configuration resolved and checked once, before any process group or model exists.

`resolve_setup` parses the allocation mode into `ParallelDims`, resolves the device and dtype, reads the HF
config once and runs every rule of `archon.config.validate` against them. The engine, the model builder and the
layout / runner / head objects are built from the result; none of them parses or re-reads the config.

`actor.mb_max_tokens` has one meaning: the tokens of one micro-batch on one rank. `EngineSetup.micro_batches`
converts it for this engine's runner (x cp, tree tokens, a multiple of pp) in one place,
`archon.engine.micro_batches.MicroBatchBudget`, whose `plan` is the only micro-batch planner the engine calls.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from archon.config.schema import ActorConfig
from archon.engine.micro_batches import MicroBatchBudget
from archon.lora_integration import validate_lora
from archon_parallel.dims import ParallelDims

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}


@dataclass(frozen=True)
class EngineSetup:
    """The resolved configuration of one engine (one role: actor / critic / reference)."""

    cfg: ActorConfig
    """The role's config, checked against everything below."""
    allocation_mode: str
    """The allocation string as given (`archon:d2t2`, `sglang:d4+archon:d2`, ...)."""
    dims: ParallelDims
    """The parallel degrees of the trainer part of the allocation."""
    device: torch.device
    """This rank's device."""
    dtype: torch.dtype
    """The compute dtype (`actor.dtype`)."""
    head: str
    """"lm" (logprobs) or "value" (critic)."""
    total_steps: int
    """Optimizer steps the LR schedule spans."""
    hf_config: Any
    """The model's HF config, read once from `cfg.path` (None when `cfg.path` is empty)."""

    @property
    def world_size(self) -> int:
        return self.dims.world_size

    @property
    def mb_max_tokens(self) -> int:
        """Tokens of one micro-batch on one rank (`micro_batches` converts it for the runner)."""
        return self.cfg.mb_max_tokens

    @property
    def micro_batches(self) -> MicroBatchBudget:
        """`mb_max_tokens` in this engine's runner's units, and the planner that splits a batch by it."""
        return MicroBatchBudget.from_config(self.cfg, self.dims)

    @property
    def ac_mode(self) -> str:
        """Activation checkpointing as `archon_parallel.checkpointing` takes it: `actor.archon.ac_mode`, "full"
        for `gradient_checkpointing` without one, "selective:N" for `ac_selective_every` N > 1."""
        a = self.cfg.archon
        if self.cfg.gradient_checkpointing and a.ac_mode == "none":
            return "full"
        if a.ac_mode == "selective" and a.ac_selective_every > 1:
            return f"selective:{a.ac_selective_every}"
        return a.ac_mode

    @property
    def attn_impl(self) -> str:
        """`actor.archon.attn_impl` resolved: auto = varlen on CUDA, sdpa elsewhere."""
        name = self.cfg.archon.attn_impl
        if name == "auto":
            return "varlen" if self.device.type == "cuda" else "sdpa"
        return name


def launch_world_size() -> int:
    """Ranks of this launch: the process group's size when one exists, else torchrun's WORLD_SIZE (1 alone)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(device)


def resolve_setup(cfg: ActorConfig, *, allocation_mode: str = "archon:d1", total_steps: int = 1,
                  device: str = "auto", head: str = "lm", world_size: int | None = None) -> EngineSetup:
    """Resolve and check `cfg` for an engine on `world_size` ranks (default: this launch's); creates no process
    group and no model. Raises ValueError naming the rule or key at fault."""
    from archon.config.validate import validate_engine

    if head not in ("lm", "value"):
        raise ValueError(f"head must be 'lm' or 'value', got {head!r}")
    dtype = _DTYPES.get(cfg.dtype)
    if dtype is None:
        raise ValueError(f"actor.dtype {cfg.dtype!r} is not one of {sorted(_DTYPES)}")
    dev = resolve_device(device)
    dims = ParallelDims.from_allocation(allocation_mode, launch_world_size() if world_size is None else world_size)
    hf_config = None
    if cfg.path:
        from archon.hf import load_hf_config

        hf_config = load_hf_config(cfg.path)
    validate_engine(cfg, dims, dev, hf_config=hf_config)
    if cfg.lora.enabled:
        validate_lora(cfg.lora, dims)
    return EngineSetup(cfg=cfg, allocation_mode=allocation_mode, dims=dims, device=dev, dtype=dtype, head=head,
                       total_steps=total_steps, hf_config=hf_config)
