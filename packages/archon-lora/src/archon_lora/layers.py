"""LoRALinear: an nn.Linear with a trainable low-rank update ``scale * B @ A``.

LoRALinear subclasses nn.Linear and keeps the base ``weight``/``bias`` under their usual names, so base
checkpoints load into an injected model unchanged, and TP styles that check ``isinstance(m, nn.Linear)``
accept it. ``lora_A`` and ``lora_B`` are plain parameters on the same module, so FSDP2 shards them like any
other parameter and TP can place them (see ``archon_lora.parallel``).

Legend: N: any leading dims, I: in features, O: out features, R: LoRA rank.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from archon_lora.config import lora_scaling

__all__ = ["LoRALinear"]


class LoRALinear(nn.Linear):
    """``y = x @ W^T + b + scaling * dropout(x) @ A^T @ B^T`` with W, b frozen.

    ``lora_A``: [R, I], kaiming-uniform like peft; ``lora_B``: [O, R], zeros (the update starts at 0).
    """

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, bias: bool = True, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_lora(r, alpha, dropout, use_rslora)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                    use_rslora: bool = False) -> LoRALinear:
        """Wrap ``linear`` without copying: the new module holds the same weight/bias Parameter objects."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LoRALinear.from_linear needs an nn.Linear, got {type(linear).__name__}")
        if isinstance(linear, LoRALinear):
            raise TypeError("module already has LoRA; inject each module once")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new._init_lora(r, alpha, dropout, use_rslora)
        return new

    def _init_lora(self, r: int, alpha: float, dropout: float, use_rslora: bool) -> None:
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r, self.alpha, self.use_rslora = r, float(alpha), use_rslora
        self.scaling = lora_scaling(r, alpha, use_rslora)
        kw = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **kw))
        # A float, not an nn.Dropout submodule: TP's distribute_module runs its partition fn on every submodule.
        self.lora_dropout = float(dropout)
        self.merged = False
        self.lora_enabled = True
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A kaiming-uniform(a=sqrt(5)) as in peft and nn.Linear, B zeros."""
        if self.lora_A.is_meta:
            return
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def set_scaling(self, alpha: float, use_rslora: bool) -> None:
        """Change alpha / rsLoRA (e.g. to match a loaded adapter); refuses while merged."""
        if self.merged:
            raise ValueError("unmerge the LoRA weights before changing the scaling")
        self.alpha, self.use_rslora = float(alpha), use_rslora
        self.scaling = lora_scaling(self.r, alpha, use_rslora)

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` as an [O, I] tensor (DTensor when A/B are DTensors)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x_NI: torch.Tensor) -> torch.Tensor:
        y_NO = F.linear(x_NI, self.weight, self.bias)
        if self.merged or not self.lora_enabled:
            return y_NO
        if self.lora_dropout > 0:
            x_NI = F.dropout(x_NI, self.lora_dropout, self.training)
        h_NR = F.linear(x_NI, self.lora_A)
        return y_NO + F.linear(h_NR, self.lora_B) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (idempotent)."""
        if not self.merged:
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update from the base weight again (idempotent)."""
        if self.merged:
            self.weight.sub_(self.delta_weight().to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha:g}, rslora={self.use_rslora}"
