"""The attention-backend strategy interface and its registry.

Legend: T packed tokens, H query heads, G key/value heads (H % G == 0), D head dim.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from archon_attn.meta import AttnMeta

__all__ = ["AttentionBackend", "get_attention_backend", "register_attention_backend", "check_qkv"]


class AttentionBackend(ABC):
    """Causal attention inside each document of a packed batch, never across documents.

    `backend(q_THD, k_TGD, v_TGD, meta, scale=None) -> o_THD`. Query head h uses key/value head
    h // (H // G) (grouped-query attention). `scale` defaults to 1/sqrt(D).
    """

    name: str = "abstract"

    @abstractmethod
    def __call__(self, q_THD: torch.Tensor, k_TGD: torch.Tensor, v_TGD: torch.Tensor, meta: AttnMeta, *,
                 scale: float | None = None) -> torch.Tensor: ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def check_qkv(q_THD: torch.Tensor, k_TGD: torch.Tensor, v_TGD: torch.Tensor, meta: AttnMeta | None = None) -> None:
    """Raise ValueError unless q/k/v are packed [T, heads, D] tensors that fit together (and `meta`)."""
    if q_THD.dim() != 3 or k_TGD.dim() != 3 or v_TGD.dim() != 3:
        raise ValueError(
            f"q/k/v must be packed [T, heads, head_dim], got {tuple(q_THD.shape)}, {tuple(k_TGD.shape)}, "
            f"{tuple(v_TGD.shape)}"
        )
    if k_TGD.shape != v_TGD.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k_TGD.shape)} and {tuple(v_TGD.shape)}")
    T, H, D = q_THD.shape
    if k_TGD.shape[0] != T or k_TGD.shape[2] != D:
        raise ValueError(f"k/v shape {tuple(k_TGD.shape)} does not match q shape {tuple(q_THD.shape)}")
    G = k_TGD.shape[1]
    if G == 0 or H % G != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({G})")
    if meta is not None and not torch.compiler.is_compiling() and meta.num_tokens != T:
        raise ValueError(f"meta describes {meta.num_tokens} tokens (cu_seqlens[-1]) but q has {T}")


_REGISTRY: dict[str, Callable[..., AttentionBackend]] = {}


def register_attention_backend(name: str, factory: Callable[..., AttentionBackend]) -> None:
    """Make `get_attention_backend(name, **kwargs)` return `factory(**kwargs)`."""
    _REGISTRY[name] = factory


def get_attention_backend(name: str, **kwargs) -> AttentionBackend:
    """Backend for config value `attn_impl`: "sdpa" | "varlen" | "flex" (plus any registered)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown attention backend {name!r}; valid attn_impl values: {sorted(_REGISTRY)}")
    return _REGISTRY[name](**kwargs)
