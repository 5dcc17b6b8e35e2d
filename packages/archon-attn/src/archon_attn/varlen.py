"""Packed-document ("varlen") attention: FlashAttention varlen on CUDA, a dense-mask path on CPU.

CUDA kernels, picked by feature detection (never by version string):
1. `torch.nn.attention.varlen.varlen_attn` (public, torch >= 2.10). Its keyword set changed across
   releases (`is_causal` -> `window_size`, later `scale`, `enable_gqa`), so we read its signature.
2. Fallback: the ATen flash varlen ops wrapped as a `torch.library.custom_op` with a registered
   autograd, so torch.compile traces it as one opaque op.
Other inputs (CPU, fp32) take the dense block-diagonal SDPA path (`dense_mask_attention`).

A micro-batch of exactly one document (a static shape property, so it is a compile guard, not a
branch on data) needs no varlen kernel: it goes to causal SDPA, which on Hopper picks cuDNN's
attention, measured about 2x faster than the bundled FlashAttention-2 varlen kernel on one 4K sequence.

Legend: T packed tokens, H query heads, G key/value heads, D head dim.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
import math

import torch
import torch.nn.functional as F

from archon_attn.backend import AttentionBackend, check_qkv, register_attention_backend
from archon_attn.meta import AttnMeta, to_device
from archon_attn.sdpa import dense_mask_attention, repeat_kv

__all__ = ["VarlenBackend", "causal_sdpa_one_document", "flash_prefix_attention", "flash_varlen_attention",
           "has_public_varlen_attn"]

log = logging.getLogger(__name__)

try:
    from torch.nn.attention.varlen import varlen_attn as _public_varlen_attn

    _PUBLIC_PARAMS = frozenset(inspect.signature(_public_varlen_attn).parameters)
except ImportError:  # torch without the public varlen API: use the ATen custom op below
    _public_varlen_attn = None
    _PUBLIC_PARAMS = frozenset()

_FLASH_DTYPES = (torch.float16, torch.bfloat16)


def has_public_varlen_attn() -> bool:
    """Whether this torch has `torch.nn.attention.varlen.varlen_attn` with a causal switch."""
    return _public_varlen_attn is not None and bool({"window_size", "is_causal"} & _PUBLIC_PARAMS)


def _public_flash(q_THD, k_TGD, v_TGD, cu_seqlens, max_seqlen, scale, cu_k=None, max_k=None):
    H, D = q_THD.shape[1], q_THD.shape[2]
    kwargs: dict = {}
    # torch 2.10 spelled causal as is_causal=True; later releases as window_size=(-1, 0).
    if "window_size" in _PUBLIC_PARAMS:
        kwargs["window_size"] = (-1, 0)
    else:
        kwargs["is_causal"] = True
    if "scale" in _PUBLIC_PARAMS:
        kwargs["scale"] = scale
    elif scale != 1.0 / math.sqrt(D):
        q_THD = q_THD * (scale * math.sqrt(D))
    if k_TGD.shape[1] != H:
        if "enable_gqa" in _PUBLIC_PARAMS:
            kwargs["enable_gqa"] = True
        else:
            k_TGD, v_TGD = repeat_kv(k_TGD, H), repeat_kv(v_TGD, H)
    cu_k = cu_seqlens if cu_k is None else cu_k
    max_k = max_seqlen if max_k is None else max_k
    return _public_varlen_attn(q_THD, k_TGD, v_TGD, cu_seqlens, cu_k, max_seqlen, max_k, **kwargs)


# --- ATen fallback. Private ops: aten::_flash_attention_forward/backward (schemas as of torch 2.11-2.15);
# only used where the public varlen_attn is missing. GQA is native in the flash kernel (H % G == 0).
# Queries and keys have their own boundaries (cu_q, cu_k): causal masking is bottom-right aligned, so a
# document whose keys are longer than its queries (a cached prefix first) sees the whole prefix.
@torch.library.custom_op("archon_attn::flash_varlen_fwd", mutates_args=())
def _aten_flash_fwd(q_THD: torch.Tensor, k_TGD: torch.Tensor, v_TGD: torch.Tensor, cu_q: torch.Tensor,
                    cu_k: torch.Tensor, max_q: int, max_k: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    o_THD, lse_HT, _rng, _unused, _debug = torch.ops.aten._flash_attention_forward(
        q_THD, k_TGD, v_TGD, cu_q, cu_k, max_q, max_k, 0.0, True, False, scale=scale)
    return o_THD, lse_HT


@_aten_flash_fwd.register_fake
def _(q_THD, k_TGD, v_TGD, cu_q, cu_k, max_q, max_k, scale):
    T, H, _ = q_THD.shape
    return torch.empty_like(q_THD), q_THD.new_empty((H, T), dtype=torch.float32)


@torch.library.custom_op("archon_attn::flash_varlen_bwd", mutates_args=())
def _aten_flash_bwd(do_THD: torch.Tensor, q_THD: torch.Tensor, k_TGD: torch.Tensor, v_TGD: torch.Tensor,
                    o_THD: torch.Tensor, lse_HT: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int,
                    max_k: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rng_state = torch.zeros(2, dtype=torch.uint64, device=q_THD.device)  # dropout is 0: never read
    unused = torch.empty(0, device=q_THD.device)
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        do_THD.contiguous(), q_THD, k_TGD, v_TGD, o_THD, lse_HT, cu_q, cu_k, max_q, max_k,
        0.0, True, rng_state, unused, scale=scale)
    return dq, dk, dv


@_aten_flash_bwd.register_fake
def _(do_THD, q_THD, k_TGD, v_TGD, o_THD, lse_HT, cu_q, cu_k, max_q, max_k, scale):
    return torch.empty_like(q_THD), torch.empty_like(k_TGD), torch.empty_like(v_TGD)


def _setup_context(ctx, inputs, output):
    q_THD, k_TGD, v_TGD, cu_q, cu_k, max_q, max_k, scale = inputs
    o_THD, lse_HT = output
    ctx.save_for_backward(q_THD, k_TGD, v_TGD, o_THD, lse_HT, cu_q, cu_k)
    ctx.max_q, ctx.max_k, ctx.scale = max_q, max_k, scale


def _backward(ctx, do_THD, _dlse):
    q_THD, k_TGD, v_TGD, o_THD, lse_HT, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = _aten_flash_bwd(do_THD, q_THD, k_TGD, v_TGD, o_THD, lse_HT, cu_q, cu_k, ctx.max_q, ctx.max_k,
                                 ctx.scale)
    return dq, dk, dv, None, None, None, None, None


_aten_flash_fwd.register_autograd(_backward, setup_context=_setup_context)


def flash_varlen_attention(q_THD: torch.Tensor, k_TGD: torch.Tensor, v_TGD: torch.Tensor, meta: AttnMeta, *,
                           scale: float | None = None, impl: str = "auto") -> torch.Tensor:
    """FlashAttention varlen (CUDA, fp16/bf16). impl: "auto" (public API if present) | "public" | "aten"."""
    scale = 1.0 / math.sqrt(q_THD.shape[-1]) if scale is None else scale
    cu_seqlens = meta.cu_seqlens.to(device=q_THD.device, dtype=torch.int32)
    max_seqlen = meta.max_seqlen if meta.seqlen_bound is None else meta.seqlen_bound  # a bound is enough
    if impl == "auto":
        impl = "public" if has_public_varlen_attn() else "aten"
    if impl == "public":
        if not has_public_varlen_attn():
            raise ValueError("torch.nn.attention.varlen.varlen_attn is not available in this torch; use impl='aten'")
        return _public_flash(q_THD, k_TGD, v_TGD, cu_seqlens, max_seqlen, scale)
    if impl == "aten":
        return _aten_flash_fwd(q_THD.contiguous(), k_TGD.contiguous(), v_TGD.contiguous(), cu_seqlens, cu_seqlens,
                               max_seqlen, max_seqlen, scale)[0]
    raise ValueError(f"flash varlen impl must be 'auto', 'public' or 'aten', got {impl!r}")


def flash_prefix_attention(q_QHD: torch.Tensor, k_KGD: torch.Tensor, v_KGD: torch.Tensor, *,
                           scale: float | None = None, seg_q: list[int] | None = None,
                           seg_k: list[int] | None = None) -> torch.Tensor:
    """Documents of queries over at least as many keys each: a document's first K - Q keys (a cached
    prefix) are all visible, its last Q causally (bottom-right aligned causal mask). One document unless
    ``seg_q`` / ``seg_k`` (host lists) give each document's query and key counts. FlashAttention varlen
    (CUDA, fp16/bf16), no mask tensor; GQA is native except through a public `varlen_attn` without
    `enable_gqa` (torch 2.11), which gets the K/V heads repeated."""
    Q, K = q_QHD.shape[0], k_KGD.shape[0]
    seg_q = [Q] if seg_q is None else seg_q
    seg_k = [K] if seg_k is None else seg_k
    if len(seg_q) != len(seg_k) or sum(seg_q) != Q or sum(seg_k) != K:
        raise ValueError(f"prefix attention segments do not match: queries {seg_q} (of {Q}), keys {seg_k} (of {K})")
    if any(k < q for q, k in zip(seg_q, seg_k)):
        raise ValueError(f"prefix attention needs at least as many keys as queries per document: {seg_q} vs {seg_k}")
    scale = 1.0 / math.sqrt(q_QHD.shape[-1]) if scale is None else scale
    if len(seg_q) == 1:
        step = torch.arange(2, dtype=torch.int32, device=q_QHD.device)  # built on the device: no host copy
        cu_q, cu_k = step * Q, step * K
    else:
        cu_q, cu_k = _segment_bounds(tuple(seg_q), tuple(seg_k), q_QHD.device)
    max_q, max_k = max(seg_q), max(seg_k)
    if has_public_varlen_attn():
        return _public_flash(q_QHD, k_KGD, v_KGD, cu_q, max_q, scale, cu_k=cu_k, max_k=max_k)
    return _aten_flash_fwd(q_QHD.contiguous(), k_KGD.contiguous(), v_KGD.contiguous(), cu_q, cu_k, max_q, max_k,
                           scale)[0]


@functools.lru_cache(maxsize=16)
def _segment_bounds(seg_q: tuple[int, ...], seg_k: tuple[int, ...], device: torch.device
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 cu_q, cu_k on ``device`` from per-document counts, one non-blocking copy; cached because every
    layer of a DTA unit asks for the same bounds."""
    bounds = [[0, *itertools.accumulate(seg_q)], [0, *itertools.accumulate(seg_k)]]
    cu = to_device(torch.tensor(bounds, dtype=torch.int32), device)
    return cu[0], cu[1]


def causal_sdpa_one_document(q_THD: torch.Tensor, k_TGD: torch.Tensor, v_TGD: torch.Tensor, *,
                             scale: float | None = None) -> torch.Tensor:
    """Causal attention over one document as a [1, H, T, D] SDPA call (GQA native, no copies of k/v)."""
    H, G = q_THD.shape[1], k_TGD.shape[1]
    q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (q_THD, k_TGD, v_TGD))
    o_1HTD = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=H != G)
    return o_1HTD[0].transpose(0, 1)


class VarlenBackend(AttentionBackend):
    """Packed documents via cu_seqlens. CUDA fp16/bf16: FlashAttention varlen; otherwise (CPU, fp32)
    the dense block-diagonal SDPA reference path, with a one-time log line saying so.
    `one_document_sdpa`: send single-document micro-batches to causal SDPA (cuDNN on Hopper)."""

    name = "varlen"

    def __init__(self, impl: str = "auto", one_document_sdpa: bool = True) -> None:
        if impl not in ("auto", "public", "aten"):
            raise ValueError(f"VarlenBackend impl must be 'auto', 'public' or 'aten', got {impl!r}")
        self.impl = impl
        self.one_document_sdpa = one_document_sdpa
        self._logged_fallback = False

    def __call__(self, q_THD: torch.Tensor, k_TGD: torch.Tensor, v_TGD: torch.Tensor, meta: AttnMeta, *,
                 scale: float | None = None) -> torch.Tensor:
        check_qkv(q_THD, k_TGD, v_TGD, meta)
        if q_THD.is_cuda and q_THD.dtype in _FLASH_DTYPES:
            if self.one_document_sdpa and meta.num_docs == 1:
                return causal_sdpa_one_document(q_THD, k_TGD, v_TGD, scale=scale)
            return flash_varlen_attention(q_THD, k_TGD, v_TGD, meta, scale=scale, impl=self.impl)
        if not self._logged_fallback and not torch.compiler.is_compiling():  # logging does not trace
            log.info("varlen attention: no flash kernel for %s/%s, using the dense-mask SDPA path",
                     q_THD.device.type, q_THD.dtype)
            self._logged_fallback = True
        return dense_mask_attention(q_THD, k_TGD, v_TGD, meta, scale=scale)


register_attention_backend("varlen", VarlenBackend)
