"""LoRA on grouped MoE experts: one low-rank pair per expert for each 3-D expert weight.

A grouped-expert module holds ``w1`` [E, I, D] (gate), ``w3`` [E, I, D] (up), ``w2`` [E, D, I] (down) and
runs ``w2 @ (silu(w1 @ x) * (w3 @ x))`` on tokens already permuted so that each expert's tokens are
contiguous (``counts_E`` [E]). For a weight ``w`` [E, O, In] we add ``lora_A_w`` [E, R, In]
and ``lora_B_w`` [E, O, R]; the update for expert e is ``scaling * B[e] @ A[e]``, computed with the same
grouped GEMM and the same token order as the base weight, so it composes with any dispatcher.

``add_expert_lora`` swaps the module's class to a cached subclass that adds these parameters and a
LoRA-aware forward (the technique FSDP2's ``fully_shard`` uses), so base parameter names do not change.

Legend: T: tokens (grouped by expert), E: experts, D: model dim, I: expert hidden dim, R: LoRA rank,
In/O: in/out features of one expert weight.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from archon_moe import GroupedExperts, grouped_mm, local_tensor, uses_grouped_kernel
from torch import nn

from archon_lora.config import lora_scaling

__all__ = ["ExpertLoRA", "add_expert_lora", "is_grouped_experts"]

_EXPERT_PARAMS = ("w1", "w2", "w3")


def is_grouped_experts(module: nn.Module) -> bool:
    """True for ``archon_moe.GroupedExperts`` and any module with its 3-D ``w1``/``w2``/``w3`` layout."""
    if isinstance(module, GroupedExperts):
        return True
    ws = [getattr(module, n, None) for n in _EXPERT_PARAMS]
    return all(isinstance(w, torch.Tensor) and w.dim() == 3 for w in ws)


class ExpertLoRA(nn.Module):
    """Mixin placed before a grouped-experts class; adds ``lora_A_<w>`` / ``lora_B_<w>`` per adapted weight."""

    lora_targets: tuple[str, ...]
    r: int
    alpha: float
    use_rslora: bool
    scaling: float
    merged: bool
    lora_enabled: bool

    def _init_expert_lora(self, r: int, alpha: float, targets: Sequence[str], dropout: float,
                          use_rslora: bool) -> None:
        self.lora_targets = tuple(t for t in _EXPERT_PARAMS if t in targets)
        self.r, self.alpha, self.use_rslora = r, float(alpha), use_rslora
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.merged, self.lora_enabled = False, True
        # A float, not an nn.Dropout submodule: TP's distribute_module runs its partition fn on every submodule.
        self.lora_dropout = float(dropout)
        for name in _EXPERT_PARAMS:
            getattr(self, name).requires_grad_(False)
        for name in self.lora_targets:
            w_EOIn = getattr(self, name)
            num_experts, out_dim, in_dim = w_EOIn.shape
            kw = {"device": w_EOIn.device, "dtype": w_EOIn.dtype}
            setattr(self, f"lora_A_{name}", nn.Parameter(torch.empty(num_experts, r, in_dim, **kw)))
            setattr(self, f"lora_B_{name}", nn.Parameter(torch.empty(num_experts, out_dim, r, **kw)))
        self.reset_lora_parameters()

    def lora_pair(self, name: str) -> tuple[nn.Parameter, nn.Parameter]:
        return getattr(self, f"lora_A_{name}"), getattr(self, f"lora_B_{name}")

    def reset_lora_parameters(self) -> None:
        """Per expert: A kaiming-uniform(a=sqrt(5)) over its [R, In] slice (as peft), B zeros."""
        for name in self.lora_targets:
            a_ERIn, b_EOR = self.lora_pair(name)
            if a_ERIn.is_meta:
                continue
            with torch.no_grad():
                bound = 1.0 / math.sqrt(a_ERIn.shape[-1])  # kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in))
                a_ERIn.uniform_(-bound, bound)
                b_EOR.zero_()

    def set_scaling(self, alpha: float, use_rslora: bool) -> None:
        if self.merged:
            raise ValueError("unmerge the LoRA weights before changing the scaling")
        self.alpha, self.use_rslora = float(alpha), use_rslora
        self.scaling = lora_scaling(self.r, alpha, use_rslora)

    def delta_weight(self, name: str) -> torch.Tensor:
        """``scaling * B[e] @ A[e]`` for every expert, shaped like the base weight [E, O, In]."""
        a_ERIn, b_EOR = self.lora_pair(name)
        return torch.bmm(b_EOR, a_ERIn) * self.scaling

    def _proj(self, name: str, x_TIn: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        # Local shards, like GroupedExperts.forward: under EP the LoRA pairs are sharded on the expert
        # dim together with the base weights, so counts_E covers the same local experts.
        y_TO = grouped_mm(x_TIn, local_tensor(getattr(self, name)), counts_E)
        if name not in self.lora_targets or self.merged or not self.lora_enabled:
            return y_TO
        a_ERIn, b_EOR = (local_tensor(t) for t in self.lora_pair(name))
        if uses_grouped_kernel(x_TIn):
            a_ERIn, b_EOR = _pad_rank(a_ERIn, b_EOR)
        if self.lora_dropout > 0:
            x_TIn = F.dropout(x_TIn, self.lora_dropout, self.training)
        h_TR = grouped_mm(x_TIn, a_ERIn, counts_E)
        return y_TO + grouped_mm(h_TR, b_EOR, counts_E) * self.scaling

    def forward(self, x_TD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Tokens sorted by expert [T, D] and rows per (local) expert [E] -> [T, D], as GroupedExperts."""
        if counts_E.shape[0] != local_tensor(self.w1).shape[0]:
            raise ValueError(f"got counts for {counts_E.shape[0]} experts but {local_tensor(self.w1).shape[0]} "
                             "local experts")
        h_TI = F.silu(self._proj("w1", x_TD, counts_E)) * self._proj("w3", x_TD, counts_E)
        return self._proj("w2", h_TI, counts_E)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            for name in self.lora_targets:
                w = getattr(self, name)
                w.add_(self.delta_weight(name).to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            for name in self.lora_targets:
                w = getattr(self, name)
                w.sub_(self.delta_weight(name).to(w.dtype))
            self.merged = False


def _pad_rank(a_ERIn: torch.Tensor, b_EOR: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad the rank dim to a 16-byte multiple: the CUDA grouped GEMM needs 16-byte aligned strides
    (r=4 in bf16 is 8 bytes). Zero rows of A and zero columns of B leave the product unchanged."""
    per_16b = 16 // a_ERIn.element_size()
    pad = -a_ERIn.shape[1] % per_16b
    if pad == 0:
        return a_ERIn, b_EOR
    return F.pad(a_ERIn, (0, 0, 0, pad)), F.pad(b_EOR, (0, pad))


_LORA_CLASSES: dict[type, type] = {}


def add_expert_lora(module: nn.Module, r: int, alpha: float, targets: Sequence[str] = _EXPERT_PARAMS,
                    dropout: float = 0.0, use_rslora: bool = False) -> ExpertLoRA:
    """Give ``module`` (grouped experts) per-expert LoRA on ``targets`` in place; returns the same object."""
    if not is_grouped_experts(module):
        raise TypeError(f"{type(module).__name__} has no 3-D w1/w2/w3 expert weights")
    if isinstance(module, ExpertLoRA):
        raise ValueError("module already has expert LoRA; inject each module once")
    if r < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {r}")
    cls = type(module)
    if cls not in _LORA_CLASSES:
        _LORA_CLASSES[cls] = type(f"LoRA{cls.__name__}", (ExpertLoRA, cls), {})
    module.__class__ = _LORA_CLASSES[cls]
    assert isinstance(module, ExpertLoRA)
    module._init_expert_lora(r, alpha, targets, dropout, use_rslora)
    return module
