"""The kernels of a fused decode step, as a strategy object chosen once per engine.

A decode step of a small model is bound by kernel launches, not bandwidth: eagerly each RMSNorm is eight
kernels, RoPE six, the cache write and attention ten, so a 28-layer step launches well over a thousand kernels
for ~30 MB of weights per layer. A fused decode step (the model's modules driven block by block, see
``archon.rl.decoder_step_fn``) calls five fused ops per layer instead:

- ``add_rms_norm``: the residual add and the next RMSNorm in one pass;
- ``qk_norm_rope``: per-head q/k RMSNorm (Qwen3; skipped for Qwen2) and rotary embedding;
- ``attend_and_store``: write the new K/V into the slot cache and attend over the row's slot;
- ``silu_mul``: SwiGLU's gate.

`TorchDecodeKernels` is the reference: the model's own eager math (same rounding points), used on CPU and
in tests. `archon_rl.triton_decode.TritonDecodeKernels` runs each op as one Triton kernel (CUDA). The Triton
kernels compute in fp32 and round where the eager ops round, except attention scores (kept in fp32).

T: tokens, D: model dim, H: query heads, G: kv heads, R = H / G, Dh: head dim, N: slots, S: slot length, B: rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from archon_rl.prefix_cache import CascadeShape, PrefixStore, masked_attention, merge_attention

__all__ = ["DECODE_KERNELS", "DecodeKernels", "TorchDecodeKernels", "select_decode_kernels", "triton_runs_here"]

DECODE_KERNELS = ("auto", "triton", "torch", "none")


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rope(x: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos_TD[:, None, :] + torch.cat((-x2, x1), dim=-1) * sin_TD[:, None, :]


class DecodeKernels:
    """The fused ops of a decode step; this base class computes them eagerly (the reference)."""

    name = "torch"

    def rms_norm(self, x_TD: torch.Tensor, w_D: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None
                 ) -> torch.Tensor:
        """``w * norm(x)`` in fp32, normalised values rounded to x's dtype (the model's RMSNorm), then cast to
        ``out_dtype`` if given (what autocast casts a matmul input to)."""
        y = _rms(x_TD, w_D, eps)
        return y if out_dtype is None else y.to(out_dtype)

    def add_rms_norm(self, h_TD: torch.Tensor, d_TD: torch.Tensor, w_D: torch.Tensor, eps: float,
                     out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h + d, rms_norm(h + d))``: a residual add and the next block's (or the final) norm."""
        h_TD = h_TD + d_TD
        y = _rms(h_TD, w_D, eps)
        return h_TD, y if out_dtype is None else y.to(out_dtype)

    def qk_norm_rope(self, q_THD: torch.Tensor, k_TGD: torch.Tensor, qw_D: torch.Tensor | None,
                     kw_D: torch.Tensor | None, eps: float, cos_TD: torch.Tensor, sin_TD: torch.Tensor,
                     out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head RMSNorm (when the weights are given) then RoPE, cast to ``out_dtype``."""
        if qw_D is not None and kw_D is not None:
            q_THD, k_TGD = _rms(q_THD, qw_D, eps), _rms(k_TGD, kw_D, eps)
        return _rope(q_THD, cos_TD, sin_TD).to(out_dtype), _rope(k_TGD, cos_TD, sin_TD).to(out_dtype)

    def silu_mul(self, a_TF: torch.Tensor, b_TF: torch.Tensor) -> torch.Tensor:
        return F.silu(a_TF) * b_TF

    def attend_and_store(self, q_BHD: torch.Tensor, k_BGD: torch.Tensor, v_BGD: torch.Tensor,
                         k_NGSD: torch.Tensor, v_NGSD: torch.Tensor, pos_B: torch.Tensor, kv_len: int,
                         scale: float) -> torch.Tensor:
        """Store row b's new K/V at ``pos_B[b]`` of slot b, then attend over the slot's positions ``<= pos_B[b]``
        (all below ``kv_len``): output [B, H, Dh] in q's dtype."""
        B, H, D = q_BHD.shape
        _store(k_BGD, v_BGD, k_NGSD, v_NGSD, pos_B)
        q_BGRD = q_BHD.to(k_NGSD.dtype).view(B, k_NGSD.shape[1], -1, D)
        scores = torch.matmul(q_BGRD * scale, k_NGSD[:B, :, :kv_len].transpose(-1, -2)).float()
        valid_B1S = torch.arange(kv_len, device=q_BHD.device)[None, :] <= pos_B[:, None]
        scores = scores.masked_fill(~valid_B1S[:, None, None, :], float("-inf"))
        o = torch.matmul(scores.softmax(-1).to(v_NGSD.dtype), v_NGSD[:B, :, :kv_len])
        return o.reshape(B, H, D).to(q_BHD.dtype)

    def attend_cascade(self, q_BHD: torch.Tensor, k_BGD: torch.Tensor, v_BGD: torch.Tensor, k_NGSD: torch.Tensor,
                       v_NGSD: torch.Tensor, pos_B: torch.Tensor, kv_len: int, scale: float, store: PrefixStore,
                       layer: int, shape: CascadeShape) -> torch.Tensor:
        """`attend_and_store` for rows that may share a prefix held once in ``store`` (its tables set for this
        step): such a row attends to its entry's prefix and to its own positions ``[plen, pos]``, merged by
        log-sum-exp; the own part is read from ``shape.own_lo`` on."""
        B, H, D = q_BHD.shape
        _store(k_BGD, v_BGD, k_NGSD, v_NGSD, pos_B)
        q_BGRD = q_BHD.to(k_NGSD.dtype).view(B, k_NGSD.shape[1], -1, D)
        lo = shape.own_lo
        pos_S = torch.arange(lo, kv_len, device=pos_B.device)[None, :]
        valid = ((pos_S <= pos_B[:, None]) & (pos_S >= store.plen[:B, None]))[:, None, None, :]
        own, own_lse = masked_attention(q_BGRD, k_NGSD[:B, :, lo:kv_len], v_NGSD[:B, :, lo:kv_len], valid, scale)
        pre, pre_lse = store.attention(layer, q_BGRD, shape, scale)
        return merge_attention(pre, pre_lse, own, own_lse).reshape(B, H, D).to(q_BHD.dtype)


def _store(k_BGD: torch.Tensor, v_BGD: torch.Tensor, k_NGSD: torch.Tensor, v_NGSD: torch.Tensor,
           pos_B: torch.Tensor) -> None:
    """Row b's new K/V into slot b at ``pos_B[b]``: one ``index_copy_`` each over a flat [N * G * S, D] view."""
    B = pos_B.numel()
    G, S, D = k_NGSD.shape[1:]
    rows = ((torch.arange(B, device=pos_B.device)[:, None] * G + torch.arange(G, device=pos_B.device)) * S
            + pos_B[:, None]).reshape(-1)
    k_NGSD.view(-1, D).index_copy_(0, rows, k_BGD.reshape(-1, D).to(k_NGSD.dtype))
    v_NGSD.view(-1, D).index_copy_(0, rows, v_BGD.reshape(-1, D).to(v_NGSD.dtype))


class TorchDecodeKernels(DecodeKernels):
    """The eager reference (CPU, tests, or CUDA without Triton)."""


def _triton_interpreted() -> bool:
    """``TRITON_INTERPRET`` is set: Triton kernels run in its interpreter, on CPU tensors."""
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_runs_here() -> bool:
    """Whether Triton kernels run in this process: Triton imports, and CUDA is there or the interpreter is on."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or _triton_interpreted()


def select_decode_kernels(name: str, device: torch.device) -> DecodeKernels | None:
    """The fused-op strategy for ``name`` on ``device``: "triton" (CUDA; an error where Triton cannot run),
    "torch" (the eager reference, for tests), "none" (None: no fused step, the model's own forward per decode
    step) or "auto": Triton on CUDA when it imports, else none (the exact CPU path)."""
    if name not in DECODE_KERNELS:
        raise ValueError(f"rollout engine kernels must be one of {list(DECODE_KERNELS)}, got {name!r}")
    if name == "none":
        return None
    if name == "torch":
        return TorchDecodeKernels()
    if name == "auto" and device.type != "cuda":
        return None
    try:
        from archon_rl.triton_decode import TritonDecodeKernels
    except ImportError as ex:
        if name == "triton":
            raise ValueError(f"rollout engine kernels 'triton' need the triton package ({ex})") from ex
        return None
    if name == "triton" and device.type != "cuda" and not _triton_interpreted():
        raise ValueError("rollout engine kernels 'triton' run on CUDA (or on CPU under TRITON_INTERPRET=1)")
    return TritonDecodeKernels()
