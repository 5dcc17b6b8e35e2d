"""Configuration of one MoE layer."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MoEArgs"]

_SCORE_FUNCS = ("softmax", "sigmoid")


@dataclass
class MoEArgs:
    """Hyper-parameters of a token-choice top-k MoE layer (Qwen3-MoE / DeepSeek-V3 style)."""

    dim: int
    """Model (hidden) dimension D."""
    moe_inter_dim: int
    """Intermediate dimension I of each routed expert's SwiGLU MLP."""
    num_experts: int
    """Number of routed experts E."""
    top_k: int
    """Experts per token K."""
    score_func: str = "softmax"
    """"softmax" (over all experts, Qwen) or "sigmoid" (per expert, DeepSeek-V3)."""
    norm_topk_prob: bool = True
    """Renormalise the K selected scores to sum to 1."""
    route_scale: float = 1.0
    """Routed scaling factor multiplied into the final routing weights."""
    gate_fp32: bool = True
    """Run the gate GEMM in fp32 (HF Qwen3-MoE runs it in the hidden dtype; set False to match it in bf16)."""
    aux_loss_coef: float = 0.0
    """Coefficient of the load-balancing auxiliary loss (0 disables it)."""
    aux_free_bias: bool = False
    """Aux-loss-free balancing: a per-expert bias added to the scores for the top-k selection only."""
    aux_free_update_rate: float = 1e-3
    """Step size u of the bias update ``bias += u * sign(mean_load - load)``."""
    num_shared_experts: int = 0
    """Number of always-on shared experts (fused into one SwiGLU MLP of width num * shared_inter_dim)."""
    shared_inter_dim: int | None = None
    """Intermediate dimension of each shared expert (default: moe_inter_dim)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("dim", "moe_inter_dim", "num_experts", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"MoEArgs.{name} must be >= 1, got {getattr(self, name)}")
        if self.top_k > self.num_experts:
            raise ValueError(
                f"MoEArgs.top_k ({self.top_k}) must be <= num_experts ({self.num_experts}); lower top_k"
            )
        if self.score_func not in _SCORE_FUNCS:
            raise ValueError(f"MoEArgs.score_func must be one of {_SCORE_FUNCS}, got {self.score_func!r}")
        if self.aux_loss_coef < 0:
            raise ValueError(f"MoEArgs.aux_loss_coef must be >= 0, got {self.aux_loss_coef}")
        if self.aux_free_update_rate < 0:
            raise ValueError(f"MoEArgs.aux_free_update_rate must be >= 0, got {self.aux_free_update_rate}")
        if self.num_shared_experts < 0:
            raise ValueError(f"MoEArgs.num_shared_experts must be >= 0, got {self.num_shared_experts}")
        if self.shared_inter_dim is not None and self.shared_inter_dim < 1:
            raise ValueError(f"MoEArgs.shared_inter_dim must be >= 1 or None, got {self.shared_inter_dim}")
