"""`actor.archon.dp_layout: zero1`: full model replicas on every data-parallel rank, gradients summed by one
bucketed all-reduce per step, and the AdamW state sharded over the ranks (ZeRO-1, AReaL's layout).

Pieces: `apply_replicas` (the build: activation checkpointing and compile, no FSDP wrapping),
`build_zero1_optimizer` (`torch.distributed.optim.ZeroRedundancyOptimizer` around AdamW: each rank steps
the parameters it owns, then broadcasts them) and `Zero1OptimizerState` (DCP checkpoint of the sharded
state without consolidation). The gradient sum is `archon_parallel.replicate.all_reduce_grads`.
"""

from __future__ import annotations

from typing import Any

import torch
from archon_ckpt import clean_fqn
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.optim import ZeroRedundancyOptimizer


def apply_replicas(model: nn.Module, plan, *, ac: str, compile) -> None:
    """What `parallelize` does for a pure data-parallel model minus FSDP: AC, then per-block compile
    (`compile`: an `archon_parallel.CompileConfig`). (validate_engine allows zero1 only without
    tp / cp / pp / ep, so nothing else applies.)"""
    from archon_parallel.checkpointing import apply_ac
    from archon_parallel.compile import apply_compile

    apply_ac(model, plan, ac, compiled=compile.enabled)
    apply_compile(model, plan, compile)


def build_zero1_optimizer(groups: list[dict[str, Any]], group, **adamw_kwargs: Any) -> ZeroRedundancyOptimizer:
    """AdamW over `groups` with its state sharded over the process group `group` (whole parameters per rank,
    greedy by size). Parameters are not flattened into buckets (`parameters_as_bucket_view=False`), so
    engine offload can move each parameter on its own."""
    return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, process_group=group,
                                   parameters_as_bucket_view=False, **adamw_kwargs)


def local_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that holds state tensors: ZeRO's per-rank AdamW, or the optimizer itself."""
    return optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer


class Zero1OptimizerState(Stateful):
    """A ZeroRedundancyOptimizer's state in the FQN-keyed layout of `get_optimizer_state_dict`
    (`state.<fqn>.exp_avg`, ..., `param_groups`).

    Each rank contributes only the parameters it owns, so DCP writes every entry once and in parallel with
    no consolidation on rank 0; the keys are those `OptimizerState` writes for FSDP or one rank. On load each
    rank reads the entries of the parameters it owns now, wherever they were written, so a checkpoint
    resumes at another dp size or layout too."""

    rank_subset = True
    """For `archon_ckpt.Checkpointer.load`: other ranks' entries in the checkpoint are expected here."""

    def __init__(self, model: nn.Module, optimizer: ZeroRedundancyOptimizer) -> None:
        if not isinstance(optimizer, ZeroRedundancyOptimizer):
            raise TypeError(f"Zero1OptimizerState needs a ZeroRedundancyOptimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.fqn = {p: clean_fqn(n) for n, p in model.named_parameters()}

    def _owned(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.optim.param_groups for p in g["params"]]

    @torch.no_grad()
    def _init_state(self) -> None:
        """A fresh optimizer has no state tensors for DCP to load into: create them with a zero-lr step on
        zero gradients (AdamW leaves the parameters unchanged at lr 0)."""
        local = self.optimizer.optim
        owned = self._owned()
        if all(local.state.get(p) for p in owned):
            return
        grads = [p.grad for p in owned]
        lrs = [g["lr"] for g in local.param_groups]
        for p in owned:
            p.grad = torch.zeros_like(p)
        for g in local.param_groups:
            g["lr"] = 0.0
        local.step()
        for p, grad in zip(owned, grads):
            p.grad = grad
        for g, lr in zip(local.param_groups, lrs):
            g["lr"] = lr

    def state_dict(self) -> dict[str, Any]:
        self._init_state()
        local = self.optimizer.optim
        state = {self.fqn[p]: dict(local.state[p]) for p in self._owned()}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [self.fqn[p] for p in g["params"]]}
                  for g in self.optimizer.param_groups]
        return {"state": state, "param_groups": groups}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        local = self.optimizer.optim
        for p in self._owned():
            saved = state_dict["state"].get(self.fqn[p])
            if saved is None:
                raise ValueError(f"zero1 optimizer checkpoint has no state for {self.fqn[p]!r}; was it saved with "
                                 "a different model or data-parallel size?")
            for k, v in saved.items():
                cur = local.state[p].get(k)
                if isinstance(cur, torch.Tensor) and isinstance(v, torch.Tensor):
                    if cur is not v:  # DCP normally loads in place into the tensors state_dict() returned
                        cur.copy_(v)
                else:
                    local.state[p][k] = v
        by_fqn = {f: g for g in state_dict["param_groups"] for f in g["params"]}
        for g in self.optimizer.param_groups:
            saved_group = by_fqn.get(self.fqn[g["params"][0]]) if g["params"] else None
            if saved_group is None:
                raise ValueError("zero1 optimizer checkpoint has no param group for "
                                 f"{self.fqn[g['params'][0]] if g['params'] else 'an empty group'!r}")
            g.update({k: v for k, v in saved_group.items() if k != "params"})
        for g, lg in zip(self.optimizer.param_groups, local.param_groups):
            lg.update({k: v for k, v in g.items() if k != "params"})

