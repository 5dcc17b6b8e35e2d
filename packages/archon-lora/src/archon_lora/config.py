"""LoRA hyper-parameters, validated once."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["LoRAConfig", "lora_scaling"]


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """Scale applied to ``B @ A``: ``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA (same as peft)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


@dataclass
class LoRAConfig:
    """Which modules get LoRA and how.

    Target names match a module whose dotted path equals the name or ends with ``"." + name``, so a leaf
    name (``"q_proj"``) hits every layer and a longer suffix (``"layers.0.attn.wq"``) hits one module.
    """

    r: int = 8
    """Rank of the low-rank update."""
    alpha: float = 16.0
    """Numerator of the scaling (peft's ``lora_alpha``)."""
    dropout: float = 0.0
    """Dropout probability on the LoRA branch input (peft's ``lora_dropout``)."""
    use_rslora: bool = False
    """Scale by ``alpha / sqrt(r)`` (rank-stabilised LoRA) instead of ``alpha / r``."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Names of nn.Linear modules (get ``LoRALinear``) or grouped-expert modules (get ``ExpertLoRA``)."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules replaced by a fully trainable copy and saved whole in the adapter (e.g. ``["lm_head"]``)."""
    expert_params: list[str] = field(default_factory=lambda: ["w1", "w2", "w3"])
    """Which 3-D weights of a targeted grouped-expert module get a per-expert low-rank pair."""

    def __post_init__(self) -> None:
        self.target_modules = list(self.target_modules)
        self.modules_to_save = list(self.modules_to_save)
        self.expert_params = list(self.expert_params)
        self.validate()

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.alpha, self.use_rslora)

    def validate(self) -> None:
        """Reject invalid values with a message that says what to change."""
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"LoRA rank r must be a positive int, got {self.r!r}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be a positive finite number, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            raise ValueError("target_modules is empty; name at least one module, e.g. ['q_proj', 'v_proj']")
        overlap = sorted(set(self.target_modules) & set(self.modules_to_save))
        if overlap:
            raise ValueError(
                f"modules {overlap} are both in target_modules and modules_to_save; a module either gets "
                "a low-rank adapter or is saved whole, remove it from one list"
            )
        bad = sorted(set(self.expert_params) - {"w1", "w2", "w3"})
        if bad:
            raise ValueError(f"expert_params {bad} unknown; choose from ['w1', 'w2', 'w3']")
