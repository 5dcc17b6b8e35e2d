"""Qwen2: q/k/v projections carry a bias; no q/k norm."""

from typing import Any

from archon.models.common.args import ModelArgs


def qwen2_args(cfg: Any) -> ModelArgs:
    return ModelArgs.common_from_hf(cfg, qkv_bias=True, o_bias=False, qk_norm=False)
