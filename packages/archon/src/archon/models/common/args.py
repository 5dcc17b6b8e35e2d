"""Model arguments shared by the Qwen family, read from Hugging Face configs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from archon.models.common.rope import RopeConfig


@dataclass
class ModelArgs:
    """Architecture of a Qwen-family decoder. Built from an HF config with `from_hf_config`."""

    vocab_size: int = 151936
    dim: int = 1024
    n_layers: int = 2
    n_heads: int = 16
    n_kv_heads: int = 8
    head_dim: int = 64
    ffn_dim: int = 3072
    norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    max_position_embeddings: int = 32768
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = False
    initializer_range: float = 0.02
    # Mixture of experts (0 experts = dense).
    num_experts: int = 0
    top_k: int = 0
    moe_inter_dim: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.0
    model_type: str = "qwen3"

    def is_moe_layer(self, layer_id: int) -> bool:
        return (
            self.num_experts > 0
            and layer_id not in self.mlp_only_layers
            and (layer_id + 1) % self.decoder_sparse_step == 0
        )

    @classmethod
    def common_from_hf(cls, cfg: Any, **overrides: Any) -> ModelArgs:
        if getattr(cfg, "use_sliding_window", False):
            raise ValueError(
                f"{cfg.model_type}: sliding-window attention (use_sliding_window=True) is not supported; "
                "set use_sliding_window=False in config.json"
            )
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {cfg.hidden_act!r} is not supported (only 'silu')")
        n_heads = cfg.num_attention_heads
        kwargs: dict[str, Any] = dict(
            vocab_size=cfg.vocab_size,
            dim=cfg.hidden_size,
            n_layers=cfg.num_hidden_layers,
            n_heads=n_heads,
            n_kv_heads=getattr(cfg, "num_key_value_heads", None) or n_heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads,
            ffn_dim=cfg.intermediate_size,
            norm_eps=cfg.rms_norm_eps,
            rope=RopeConfig.from_hf(cfg),
            max_position_embeddings=cfg.max_position_embeddings,
            tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            initializer_range=getattr(cfg, "initializer_range", 0.02),
            model_type=cfg.model_type,
        )
        kwargs.update(overrides)
        return cls(**kwargs)
