"""Rotary position embeddings (RoPE) with the scaling types Qwen checkpoints use.

T: packed tokens, H: heads, Dh: head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass
class RopeConfig:
    """RoPE parameters in the HF `rope_parameters` form (`rope_type`, `rope_theta`, scaling keys)."""

    theta: float = 10000.0
    rope_type: str = "default"
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_hf(cls, cfg: Any) -> RopeConfig:
        """Read `rope_parameters` (transformers >= 5) or `rope_theta` + `rope_scaling` (older configs)."""
        params = dict(getattr(cfg, "rope_parameters", None) or {})
        legacy = getattr(cfg, "rope_scaling", None)
        if legacy:
            params = {**legacy, **params}
        theta = params.pop("rope_theta", None) or getattr(cfg, "rope_theta", None) or 10000.0
        rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope scaling type {rope_type!r} is not supported; supported types: {SUPPORTED_ROPE_TYPES}. "
                "Remove `rope_scaling` / set rope_parameters.rope_type to one of these."
            )
        return cls(theta=float(theta), rope_type=rope_type, params=params)


def rope_inv_freq(cfg: RopeConfig, head_dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [Dh/2] (fp32, CPU) and the attention factor applied to cos/sin."""
    dim = head_dim
    inv_freq = 1.0 / (cfg.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    p = cfg.params
    if cfg.rope_type == "default":
        return inv_freq, 1.0
    if cfg.rope_type == "linear":
        return inv_freq / float(p["factor"]), 1.0
    if cfg.rope_type == "llama3":
        factor, low, high = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
        old_ctx = float(p["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    return _yarn(cfg, dim, max_position_embeddings)


def _yarn(cfg: RopeConfig, dim: int, max_pos: int) -> tuple[torch.Tensor, float]:
    p = cfg.params
    base = cfg.theta
    orig = p.get("original_max_position_embeddings") or max_pos
    factor = p.get("factor") or max_pos / orig

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn_factor = p.get("attention_factor")
    if attn_factor is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attn_factor = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
        else:
            attn_factor = mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def corr_dim(rot: float) -> float:
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extra, inter = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp
    return inter * (1 - keep) + extra * keep, float(attn_factor)


def rope_cos_sin(inv_freq: torch.Tensor, position_ids_T: torch.Tensor, attn_factor: float, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [T, Dh] for the given positions, computed in fp32 and cast to `dtype`."""
    freqs_TF = position_ids_T.float()[:, None] * inv_freq.float()[None, :]
    emb_TD = torch.cat((freqs_TF, freqs_TF), dim=-1)
    return (emb_TD.cos() * attn_factor).to(dtype), (emb_TD.sin() * attn_factor).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x_THD: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor) -> torch.Tensor:
    return x_THD * cos_TD[:, None, :] + _rotate_half(x_THD) * sin_TD[:, None, :]
