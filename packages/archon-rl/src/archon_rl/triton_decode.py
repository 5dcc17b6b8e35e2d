"""`DecodeKernels` as Triton kernels: one launch per fused op (CUDA; on CPU only under ``TRITON_INTERPRET=1``).

Every kernel computes in fp32 and rounds to the storage dtype where the eager reference
(`archon_rl.decode_kernels.DecodeKernels`) rounds, so in fp32 the two agree to summation order and in bf16
they differ by at most a rounding of the same values. The one exception is attention: scores stay in fp32
(eagerly they are rounded to bf16 by the QK matmul), with an online softmax over blocks of the slot.

Grids: norms, q/k norm + RoPE one program per token; attention one program per
(row, kv head), its R = H / G query heads padded to 16 rows for ``tl.dot``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from archon_rl.decode_kernels import DecodeKernels

__all__ = ["TritonDecodeKernels"]

_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _tl(dtype: torch.dtype):
    try:
        return _TL_DTYPE[dtype]
    except KeyError:
        raise ValueError(f"fused decode kernels support float32/bfloat16/float16, got {dtype}") from None


@triton.jit
def _add_rms_norm_kernel(h_ptr, d_ptr, hout_ptr, y_ptr, w_ptr, eps, D, stride_h, stride_d, stride_ho, stride_y,
                         HAS_ADD: tl.constexpr, H_DT: tl.constexpr, Y_DT: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    o = tl.arange(0, BLOCK)
    m = o < D
    x = tl.load(h_ptr + t * stride_h + o, mask=m, other=0.0).to(tl.float32)
    if HAS_ADD:
        x = x + tl.load(d_ptr + t * stride_d + o, mask=m, other=0.0).to(tl.float32)
        x = x.to(H_DT).to(tl.float32)
        tl.store(hout_ptr + t * stride_ho + o, x.to(H_DT), mask=m)
    r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    n = (x * r).to(H_DT).to(tl.float32)
    w = tl.load(w_ptr + o, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + t * stride_y + o, (w * n).to(Y_DT), mask=m)


@triton.jit
def _norm_rope_heads(src, dst, w_ptr, n, cos, sin, d, dm, rot, eps, D, BLOCK_N: tl.constexpr, HAS_NORM: tl.constexpr,
                     IN_DT: tl.constexpr, NORM_DT: tl.constexpr, ROPE_DT: tl.constexpr, OUT_DT: tl.constexpr):
    """The ``n`` heads [n, D] of one token at ``src``: RMSNorm per head (HAS_NORM), RoPE, stored at ``dst``."""
    h = tl.arange(0, BLOCK_N)
    m = (h < n)[:, None] & dm[None, :]
    off = h[:, None] * D
    x = tl.load(src + off + d[None, :], mask=m, other=0.0).to(tl.float32)
    xr = tl.load(src + off + rot[None, :], mask=m, other=0.0).to(tl.float32)
    if HAS_NORM:
        r = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
        w = tl.load(w_ptr + d, mask=dm, other=0.0).to(tl.float32)
        wr = tl.load(w_ptr + rot, mask=dm, other=0.0).to(tl.float32)
        x = (w[None, :] * (x * r[:, None]).to(IN_DT).to(tl.float32)).to(NORM_DT).to(tl.float32)
        xr = (wr[None, :] * (xr * r[:, None]).to(IN_DT).to(tl.float32)).to(NORM_DT).to(tl.float32)
    xr = tl.where((d < D // 2)[None, :], -xr, xr)
    a = (x * cos[None, :]).to(ROPE_DT).to(tl.float32)
    b = (xr * sin[None, :]).to(ROPE_DT).to(tl.float32)
    tl.store(dst + off + d[None, :], (a + b).to(ROPE_DT).to(OUT_DT), mask=m)


@triton.jit
def _qk_norm_rope_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, eps, H, G, D,
                         stride_q, stride_k, stride_qo, stride_ko, stride_cos, stride_sin,
                         BLOCK_H: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, HAS_NORM: tl.constexpr,
                         IN_DT: tl.constexpr, NORM_DT: tl.constexpr, ROPE_DT: tl.constexpr, OUT_DT: tl.constexpr):
    t = tl.program_id(0)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    rot = (d + D // 2) % D
    cos = tl.load(cos_ptr + t * stride_cos + d, mask=dm, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + t * stride_sin + d, mask=dm, other=0.0).to(tl.float32)
    _norm_rope_heads(q_ptr + t * stride_q, qo_ptr + t * stride_qo, qw_ptr, H, cos, sin, d, dm, rot, eps, D, BLOCK_H,
                     HAS_NORM, IN_DT, NORM_DT, ROPE_DT, OUT_DT)
    _norm_rope_heads(k_ptr + t * stride_k, ko_ptr + t * stride_ko, kw_ptr, G, cos, sin, d, dm, rot, eps, D, BLOCK_G,
                     HAS_NORM, IN_DT, NORM_DT, ROPE_DT, OUT_DT)


@triton.jit
def _silu_mul_kernel(a_ptr, b_ptr, o_ptr, F, stride_a, stride_b, stride_o, A_DT: tl.constexpr, O_DT: tl.constexpr,
                     BLOCK: tl.constexpr):
    t = tl.program_id(0)
    o = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = o < F
    a = tl.load(a_ptr + t * stride_a + o, mask=m, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + t * stride_b + o, mask=m, other=0.0).to(tl.float32)
    s = (a / (1.0 + tl.exp(-a))).to(A_DT).to(tl.float32)
    tl.store(o_ptr + t * stride_o + o, (s * b).to(O_DT), mask=m)


@triton.jit
def _attend_span(q, k_ptr, v_ptr, stride_s, lo, hi, d, dm, m_i, l_i, acc, BLOCK_S: tl.constexpr, C_DT: tl.constexpr,
                 PREC: tl.constexpr):
    """Online softmax of the query rows ``q`` over the K/V rows ``[lo, hi)`` at ``k_ptr`` / ``v_ptr``: the
    running max ``m_i``, sum ``l_i`` and unnormalised output ``acc`` updated block by block."""
    s_off = tl.arange(0, BLOCK_S)
    for start in range(lo, hi, BLOCK_S):
        s = start + s_off
        sm = s < hi
        km = sm[:, None] & dm[None, :]
        k = tl.load(k_ptr + s[:, None] * stride_s + d[None, :], mask=km, other=0.0)
        v = tl.load(v_ptr + s[:, None] * stride_s + d[None, :], mask=km, other=0.0)
        sc = tl.dot(q, tl.trans(k), input_precision=PREC)
        sc = tl.where(sm[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(C_DT), v, input_precision=PREC)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _attend_store_kernel(q_ptr, kn_ptr, vn_ptr, kc_ptr, vc_ptr, pos_ptr, o_ptr, scale, D,
                         stride_qb, stride_qh, stride_knb, stride_kng, stride_vnb, stride_vng,
                         stride_cn, stride_cg, stride_cs, stride_ob, stride_oh,
                         plen_ptr, at_ptr, n_table, po_ptr, plse_ptr, stride_lb,
                         R: tl.constexpr, R_PAD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                         C_DT: tl.constexpr, O_DT: tl.constexpr, PREC: tl.constexpr, HAS_PREFIX: tl.constexpr):
    b = tl.program_id(0)
    g = tl.program_id(1)
    pos = tl.load(pos_ptr + b)
    r = tl.arange(0, R_PAD)
    d = tl.arange(0, BLOCK_D)
    rm = r < R
    dm = d < D
    qm = rm[:, None] & dm[None, :]
    q = tl.load(q_ptr + b * stride_qb + (g * R + r)[:, None] * stride_qh + d[None, :], mask=qm, other=0.0)
    q = (q.to(C_DT).to(tl.float32) * scale).to(C_DT)
    kn = tl.load(kn_ptr + b * stride_knb + g * stride_kng + d, mask=dm, other=0.0).to(C_DT)
    vn = tl.load(vn_ptr + b * stride_vnb + g * stride_vng + d, mask=dm, other=0.0).to(C_DT)
    base = b * stride_cn + g * stride_cg
    tl.store(kc_ptr + base + pos * stride_cs + d, kn, mask=dm)
    tl.store(vc_ptr + base + pos * stride_cs + d, vn, mask=dm)
    # the new token's own key first: the running max starts finite, so padded rows never see exp(-inf - -inf)
    m_i = tl.sum(q.to(tl.float32) * kn.to(tl.float32)[None, :], axis=1)
    l_i = tl.full([R_PAD], 1.0, tl.float32)
    acc = tl.zeros([R_PAD, BLOCK_D], tl.float32) + vn.to(tl.float32)[None, :]
    lo = 0
    if HAS_PREFIX:  # a row sharing a prefix: its attention over it (fp32 output and lse), merged in first
        lo = tl.load(plen_ptr + b)
        has = rm & ((r * 0 + tl.load(at_ptr + b)) < n_table)  # [R_PAD]: the row has an entry
        p_lse = tl.load(plse_ptr + b * stride_lb + g * R + r, mask=has, other=float("-inf"))
        p_o = tl.load(po_ptr + b * stride_ob + (g * R + r)[:, None] * stride_oh + d[None, :],
                      mask=has[:, None] & dm[None, :], other=0.0)
        m_new = tl.maximum(m_i, p_lse)
        a1 = tl.exp(m_i - m_new)
        a2 = tl.exp(p_lse - m_new)
        l_i = a1 + a2
        acc = acc * a1[:, None] + p_o * a2[:, None]
        m_i = m_new
    m_i, l_i, acc = _attend_span(q, kc_ptr + base, vc_ptr + base, stride_cs, lo, pos, d, dm, m_i, l_i, acc,
                                 BLOCK_S, C_DT, PREC)
    out = acc / l_i[:, None]
    tl.store(o_ptr + b * stride_ob + (g * R + r)[:, None] * stride_oh + d[None, :], out.to(O_DT), mask=qm)


@triton.jit
def _prefix_attn_kernel(q_ptr, kp_ptr, vp_ptr, members_ptr, elen_ptr, o_ptr, lse_ptr, scale, B, D,
                        stride_qb, stride_qh, stride_pm, stride_pg, stride_ps, stride_ob, stride_oh, stride_lb,
                        E: tl.constexpr, R: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_S: tl.constexpr, C_DT: tl.constexpr, PREC: tl.constexpr):
    """Entry m's prefix for kv head g, read once for the R query heads of each of its (up to E) member rows."""
    m = tl.program_id(0)
    g = tl.program_id(1)
    n = tl.load(elen_ptr + m)
    i = tl.arange(0, ROWS)
    j = i // R
    r = i % R
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    b = tl.load(members_ptr + m * E + j, mask=i < E * R, other=B)
    rowm = (i < E * R) & (b < B)
    qm = rowm[:, None] & dm[None, :]
    q = tl.load(q_ptr + b[:, None] * stride_qb + (g * R + r)[:, None] * stride_qh + d[None, :], mask=qm, other=0.0)
    q = (q.to(C_DT).to(tl.float32) * scale).to(C_DT)
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    base = m * stride_pm + g * stride_pg
    m_i, l_i, acc = _attend_span(q, kp_ptr + base, vp_ptr + base, stride_ps, 0, n, d, dm, m_i, l_i, acc, BLOCK_S,
                                 C_DT, PREC)
    tl.store(o_ptr + b[:, None] * stride_ob + (g * R + r)[:, None] * stride_oh + d[None, :], acc / l_i[:, None],
             mask=qm)
    tl.store(lse_ptr + b * stride_lb + g * R + r, m_i + tl.log(l_i), mask=rowm)


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 caches: exact fp32 dots, not TF32


def _rows(x: torch.Tensor) -> torch.Tensor:
    """A [T, X] view with unit stride along X (a copy only if the last dim is strided)."""
    x = x.reshape(x.shape[0], -1)
    return x if x.stride(-1) == 1 else x.contiguous()


class TritonDecodeKernels(DecodeKernels):
    """One Triton kernel per fused op."""

    name = "triton"

    def rms_norm(self, x_TD: torch.Tensor, w_D: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None
                 ) -> torch.Tensor:
        return self._norm(x_TD, None, w_D, eps, out_dtype)[1]

    def add_rms_norm(self, h_TD: torch.Tensor, d_TD: torch.Tensor, w_D: torch.Tensor, eps: float,
                     out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self._norm(h_TD, d_TD, w_D, eps, out_dtype)

    def _norm(self, h_TD: torch.Tensor, d_TD: torch.Tensor | None, w_D: torch.Tensor, eps: float,
              out_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
        h = _rows(h_TD)
        T, D = h.shape
        h_dt = h.dtype if d_TD is None else torch.promote_types(h.dtype, d_TD.dtype)
        d = _rows(d_TD) if d_TD is not None else h
        h_out = torch.empty(T, D, dtype=h_dt, device=h.device) if d_TD is not None else h
        y = torch.empty(T, D, dtype=out_dtype or torch.promote_types(w_D.dtype, h_dt), device=h.device)
        if T:
            _add_rms_norm_kernel[(T,)](h, d, h_out, y, w_D, eps, D, h.stride(0), d.stride(0), h_out.stride(0),
                                       y.stride(0), HAS_ADD=d_TD is not None, H_DT=_tl(h_dt), Y_DT=_tl(y.dtype),
                                       BLOCK=triton.next_power_of_2(D))
        return h_out.view(h_TD.shape[:-1] + (D,)), y.view(h_TD.shape[:-1] + (D,))

    def qk_norm_rope(self, q_THD: torch.Tensor, k_TGD: torch.Tensor, qw_D: torch.Tensor | None,
                     kw_D: torch.Tensor | None, eps: float, cos_TD: torch.Tensor, sin_TD: torch.Tensor,
                     out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        T, H, D = q_THD.shape
        G = k_TGD.shape[1]
        if D % 2:
            return super().qk_norm_rope(q_THD, k_TGD, qw_D, kw_D, eps, cos_TD, sin_TD, out_dtype)
        q, k = _rows(q_THD), _rows(k_TGD)
        cos, sin = _rows(cos_TD), _rows(sin_TD)
        has_norm = qw_D is not None and kw_D is not None
        norm_dt = torch.promote_types(qw_D.dtype, q.dtype) if has_norm else q.dtype  # type: ignore[union-attr]
        rope_dt = torch.promote_types(norm_dt, cos.dtype)
        q_out = torch.empty(T, H, D, dtype=out_dtype, device=q.device)
        k_out = torch.empty(T, G, D, dtype=out_dtype, device=q.device)
        if T:
            w = qw_D if has_norm else q
            _qk_norm_rope_kernel[(T,)](
                q, k, q_out, k_out, w, kw_D if has_norm else w, cos, sin, eps, H, G, D, q.stride(0), k.stride(0),
                H * D, G * D, cos.stride(0), sin.stride(0), BLOCK_H=triton.next_power_of_2(H),
                BLOCK_G=triton.next_power_of_2(G), BLOCK_D=triton.next_power_of_2(D), HAS_NORM=has_norm,
                IN_DT=_tl(q.dtype), NORM_DT=_tl(norm_dt), ROPE_DT=_tl(rope_dt), OUT_DT=_tl(out_dtype))
        return q_out, k_out

    def silu_mul(self, a_TF: torch.Tensor, b_TF: torch.Tensor) -> torch.Tensor:
        a, b = _rows(a_TF), _rows(b_TF)
        T, F = a.shape
        out = torch.empty(T, F, dtype=torch.promote_types(a.dtype, b.dtype), device=a.device)
        block = min(1024, triton.next_power_of_2(F))
        if T:
            _silu_mul_kernel[(T, triton.cdiv(F, block))](a, b, out, F, a.stride(0), b.stride(0), out.stride(0),
                                                        A_DT=_tl(a.dtype), O_DT=_tl(out.dtype), BLOCK=block)
        return out.view(a_TF.shape)

    def attend_and_store(self, q_BHD: torch.Tensor, k_BGD: torch.Tensor, v_BGD: torch.Tensor,
                         k_NGSD: torch.Tensor, v_NGSD: torch.Tensor, pos_B: torch.Tensor, kv_len: int,
                         scale: float) -> torch.Tensor:
        if not (k_NGSD.is_contiguous() and v_NGSD.is_contiguous()):
            return super().attend_and_store(q_BHD, k_BGD, v_BGD, k_NGSD, v_NGSD, pos_B, kv_len, scale)
        q = q_BHD if q_BHD.stride(-1) == 1 else q_BHD.contiguous()
        return self._attend(q, k_BGD, v_BGD, k_NGSD, v_NGSD, pos_B, scale, None)

    def _attend(self, q: torch.Tensor, k_BGD: torch.Tensor, v_BGD: torch.Tensor, k_NGSD: torch.Tensor,
                v_NGSD: torch.Tensor, pos_B: torch.Tensor, scale: float, prefix: tuple | None) -> torch.Tensor:
        """The store + attention kernel; ``prefix``: (plen, at, table size, prefix output, prefix lse, lse row
        stride) of a cascade step, merged in before the row's own positions ``[plen, pos)``."""
        B, H, D = q.shape
        G = k_NGSD.shape[1]
        has_prefix = prefix is not None
        # unused pointer arguments of a step without a prefix: any tensor will do
        prefix_args = prefix if prefix is not None else (pos_B, pos_B, 0, q, q, 0)
        k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (k_BGD, v_BGD))
        R = H // G
        o = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
        c_dt = k_NGSD.dtype
        if B:
            _attend_store_kernel[(B, G)](
                q, k, v, k_NGSD, v_NGSD, pos_B, o, scale, D, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                v.stride(0), v.stride(1), k_NGSD.stride(0), k_NGSD.stride(1), k_NGSD.stride(2), o.stride(0),
                o.stride(1), *prefix_args, R=R, R_PAD=max(16, triton.next_power_of_2(R)),
                BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_S=64 if D <= 128 else 32, C_DT=_tl(c_dt),
                O_DT=_tl(o.dtype), PREC=_prec(c_dt), HAS_PREFIX=has_prefix, num_warps=4)
        return o

    def attend_cascade(self, q_BHD: torch.Tensor, k_BGD: torch.Tensor, v_BGD: torch.Tensor, k_NGSD: torch.Tensor,
                       v_NGSD: torch.Tensor, pos_B: torch.Tensor, kv_len: int, scale: float, store, layer: int,
                       shape) -> torch.Tensor:
        B, H, D = q_BHD.shape
        G = k_NGSD.shape[1]
        kp, vp = store.k[layer], store.v[layer]
        if not all(t.is_contiguous() for t in (k_NGSD, v_NGSD, kp, vp)):
            return super().attend_cascade(q_BHD, k_BGD, v_BGD, k_NGSD, v_NGSD, pos_B, kv_len, scale, store, layer,
                                          shape)
        q = q_BHD if q_BHD.stride(-1) == 1 else q_BHD.contiguous()
        R, M, E = H // G, shape.entries, shape.width
        o_pre = torch.empty(B, H, D, dtype=torch.float32, device=q.device)
        lse_pre = torch.empty(B, H, dtype=torch.float32, device=q.device)
        c_dt = kp.dtype
        _prefix_attn_kernel[(M, G)](
            q, kp, vp, store.members, store.entry_len, o_pre, lse_pre, scale, B, D, q.stride(0), q.stride(1),
            kp.stride(0), kp.stride(1), kp.stride(2), o_pre.stride(0), o_pre.stride(1), lse_pre.stride(0), E=E, R=R,
            ROWS=max(16, triton.next_power_of_2(E * R)), BLOCK_D=max(16, triton.next_power_of_2(D)),
            BLOCK_S=64 if D <= 128 else 32, C_DT=_tl(c_dt), PREC=_prec(c_dt), num_warps=4)
        return self._attend(q, k_BGD, v_BGD, k_NGSD, v_NGSD, pos_B, scale,
                            (store.plen, store.at, M * E, o_pre, lse_pre, lse_pre.stride(0)))
