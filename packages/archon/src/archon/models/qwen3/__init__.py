"""Qwen3: per-head RMSNorm on q and k before RoPE, decoupled head_dim, optional attention bias."""

from typing import Any

from archon.models.common.args import ModelArgs


def qwen3_args(cfg: Any) -> ModelArgs:
    bias = bool(getattr(cfg, "attention_bias", False))
    return ModelArgs.common_from_hf(cfg, qkv_bias=bias, o_bias=bias, qk_norm=True)
