"""Stateful wrappers for what a training checkpoint holds.

Each wrapper implements DCP's ``Stateful`` protocol (``state_dict`` / ``load_state_dict``), so
``Checkpointer`` (or plain ``torch.distributed.checkpoint``) can save and reshard it. Model and
optimizer go through ``torch.distributed.checkpoint.state_dict`` which understands FSDP2 / TP
DTensors, wrapper prefixes (``_orig_mod.``) and a changed world size on load.
"""

from __future__ import annotations

import io
import random
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from archon_ckpt.safe_load import safe_torch_load

__all__ = ["ModelState", "OptimizerState", "RNGState", "SchedulerState"]


class ModelState(Stateful):
    """Model parameters and persistent buffers (e.g. MoE aux-free biases), with clean FQNs.

    Loading is strict: a key missing from the checkpoint or a shape mismatch is an error.
    """

    def __init__(self, model: nn.Module, *, options: StateDictOptions | None = None) -> None:
        self.model = model
        self.options = options or StateDictOptions(strict=True)

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model, options=self.options)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state_dict, options=self.options)


class OptimizerState(Stateful):
    """Optimizer state (moments, step counts, param groups) keyed by parameter FQN.

    Keyed by FQN rather than by parameter index, so it reshards across world sizes and layouts.
    A fresh optimizer is initialised lazily by ``get_optimizer_state_dict`` so it can be loaded
    into in place.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        options: StateDictOptions | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.options = options or StateDictOptions(strict=True)

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer, options=self.options)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state_dict, options=self.options)


class SchedulerState(Stateful):
    """Any object with ``state_dict()`` / ``load_state_dict()`` (LR schedulers, data samplers)."""

    def __init__(self, scheduler: Any) -> None:
        if not (hasattr(scheduler, "state_dict") and hasattr(scheduler, "load_state_dict")):
            raise TypeError(f"{type(scheduler).__name__} has no state_dict()/load_state_dict()")
        self.scheduler = scheduler

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state_dict)


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class RNGState(Stateful):
    """Per-rank random generator states: torch CPU, CUDA (all visible devices), python, numpy.

    Each rank saves under its own key ``rank{r}``, so a resume on the same world size restores
    every rank's streams exactly (dropout masks, sampling). When the world size changed the saved
    streams do not map onto the new ranks; ``Checkpointer.load`` then skips this entry (see
    ``loadable_from``) and the generators keep their current state.
    """

    def __init__(self, *, include_cuda: bool = True) -> None:
        self.include_cuda = include_cuda

    def _cuda_on(self) -> bool:
        return self.include_cuda and torch.cuda.is_available() and torch.cuda.is_initialized()

    def state_dict(self) -> dict[str, Any]:
        rank, world = _rank_and_world()
        entry: dict[str, Any] = {
            "world_size": world,
            "torch_cpu": torch.get_rng_state(),
            "python": random.getstate(),
        }
        if self._cuda_on():
            entry["torch_cuda"] = torch.cuda.get_rng_state_all()
        try:
            import numpy as np
        except ImportError:
            pass
        else:
            kind, keys, pos, has_gauss, cached = np.random.get_state()
            entry["numpy"] = (kind, np.asarray(keys).tolist(), pos, has_gauss, cached)  # plain types: loads weights_only
        # One opaque blob per rank: its content (CUDA or not, numpy or not) may differ between
        # save and load without changing the checkpoint's key set.
        buf = io.BytesIO()
        torch.save(entry, buf)
        return {f"rank{rank}": buf.getvalue()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        rank, _ = _rank_and_world()
        # weights_only: a hostile blob cannot run code (older checkpoints hold a numpy array: allowed too)
        entry = safe_torch_load(state_dict[f"rank{rank}"], f"RNG state of rank {rank}")
        torch.set_rng_state(entry["torch_cpu"])
        random.setstate(entry["python"])
        if "torch_cuda" in entry and self._cuda_on():
            states = entry["torch_cuda"]
            if len(states) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(states)
        if "numpy" in entry:
            try:
                import numpy as np
            except ImportError:
                pass
            else:
                kind, keys, *rest = entry["numpy"]
                np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))

    @staticmethod
    def loadable_from(saved_keys: set[str], prefix: str) -> bool:
        """True when the checkpoint has exactly one RNG entry per current rank (same world size)."""
        _, world = _rank_and_world()
        ranks = {k[len(prefix):].split(".", 1)[0] for k in saved_keys if k.startswith(prefix)}
        return ranks == {f"rank{r}" for r in range(world)}
