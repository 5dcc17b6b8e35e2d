"""Context parallelism for packed batches: batch sharding, Ulysses and ring attention backends.

The model never knows about CP: it receives this rank's tokens (`shard_packed_batch`) and an
`AttentionBackend` (`get_cp_attention`) whose `meta` argument describes the WHOLE padded packed
batch (`PackedShard.meta`). Padding is one extra document at the end, masked out of the loss by
`PackedShard.valid_L`.

Layouts: "contiguous" (rank r holds tokens [r*L, (r+1)*L); Ulysses) and "load_balanced" (the padded
sequence is cut into 2*cp chunks and rank r holds chunks r and 2*cp-1-r, so causal work is even;
ring). Each CP backend names the layout it needs in `.layout`.

Legend: T packed tokens (whole padded batch), L this rank's tokens (T / cp), H query heads,
G key/value heads, D head dim, R ranks of the cp group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from archon_attn import AttentionBackend, AttnMeta, build_attn_meta, check_qkv
from archon_attn.blockwise import block_attention_backward, block_attention_forward, merge_partial_attention

__all__ = [
    "PackedShard",
    "RingAttention",
    "UlyssesAttention",
    "cp_token_index",
    "gather_sequence",
    "get_cp_attention",
    "shard_packed_batch",
    "ulysses_kv_repeat",
]

LAYOUTS = ("contiguous", "load_balanced")


# ----------------------------------------------------------------------------- batch sharding
def cp_token_index(num_tokens: int, cp_rank: int, cp_size: int, layout: str = "contiguous") -> torch.Tensor:
    """int64 [L]: indices into the padded packed sequence held by `cp_rank`."""
    if layout == "contiguous":
        L = num_tokens // cp_size
        return torch.arange(cp_rank * L, (cp_rank + 1) * L)
    if layout == "load_balanced":
        C = num_tokens // (2 * cp_size)
        far = 2 * cp_size - 1 - cp_rank
        return torch.cat([torch.arange(cp_rank * C, (cp_rank + 1) * C), torch.arange(far * C, (far + 1) * C)])
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


@dataclass(eq=False)
class PackedShard:
    """This rank's part of a packed batch, padded for CP."""

    tensors: tuple[torch.Tensor, ...]
    """The caller's tensors (token dim first), padded with zeros and sliced to this rank: [L, ...]."""
    meta: AttnMeta
    """The whole padded batch (padding = one extra document); pass it to the CP attention backend."""
    valid_L: torch.Tensor
    """bool [L]: False on padding tokens; multiply it into the loss mask."""
    positions_L: torch.Tensor
    """int64 [L]: position of each token inside its document (RoPE positions)."""
    index_L: torch.Tensor
    """int64 [L]: index of each local token in the padded packed sequence."""
    num_tokens: int
    """Tokens before padding."""
    cp_rank: int
    cp_size: int
    layout: str


def shard_packed_batch(cu_seqlens: torch.Tensor, *tensors: torch.Tensor, cp_rank: int, cp_size: int,
                       pad_multiple: int = 1, layout: str = "contiguous") -> PackedShard:
    """Pad a packed batch and take `cp_rank`'s tokens of `tensors` (tokens, labels, loss mask, ...).

    The padded length is a multiple of cp_size * pad_multiple (x2 for "load_balanced"), so each rank
    holds L tokens with L % pad_multiple == 0 (use pad_multiple = tp for sequence parallelism).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise ValueError(f"need 0 <= cp_rank < cp_size, got cp_rank={cp_rank}, cp_size={cp_size}")
    if pad_multiple < 1:
        raise ValueError(f"pad_multiple must be >= 1, got {pad_multiple}")
    T = int(cu_seqlens[-1])
    for i, x in enumerate(tensors):
        if x.shape[0] != T:
            raise ValueError(f"tensor {i} has {x.shape[0]} tokens on dim 0 but cu_seqlens[-1] = {T}")
    multiple = cp_size * pad_multiple * (2 if layout == "load_balanced" else 1)
    T_pad = max(multiple, -(-T // multiple) * multiple)
    cu_padded = cu_seqlens.to(torch.int32)
    if T_pad > T:
        cu_padded = torch.cat([cu_padded, cu_padded.new_tensor([T_pad])])
    meta = build_attn_meta(cu_padded)
    index_L = cp_token_index(T_pad, cp_rank, cp_size, layout).to(cu_padded.device)

    def take(x: torch.Tensor) -> torch.Tensor:
        if T_pad > T:
            x = torch.cat([x, x.new_zeros((T_pad - T, *x.shape[1:]))])
        return x[index_L.to(x.device)]

    return PackedShard(tensors=tuple(take(x) for x in tensors), meta=meta, valid_L=index_L < T,
                       positions_L=meta.positions()[index_L], index_L=index_L,
                       num_tokens=T, cp_rank=cp_rank, cp_size=cp_size, layout=layout)


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_L, shard: PackedShard, group):
        ctx.index_L = shard.index_L.to(x_L.device)
        parts = [torch.empty_like(x_L) for _ in range(shard.cp_size)]
        dist.all_gather(parts, x_L.contiguous(), group=group)
        index_T = torch.cat([cp_token_index(len(shard.index_L) * shard.cp_size, r, shard.cp_size, shard.layout)
                             for r in range(shard.cp_size)]).to(x_L.device)
        out = torch.empty((index_T.numel(), *x_L.shape[1:]), dtype=x_L.dtype, device=x_L.device)
        out[index_T] = torch.cat(parts)
        ctx.T_pad = index_T.numel()
        return out[: shard.num_tokens]

    @staticmethod
    def backward(ctx, grad_T):
        grad_pad = torch.cat([grad_T, grad_T.new_zeros((ctx.T_pad - grad_T.shape[0], *grad_T.shape[1:]))])
        return grad_pad[ctx.index_L], None, None


def gather_sequence(x_L: torch.Tensor, shard: PackedShard, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """All-gather a per-token tensor over the cp group and return [num_tokens, ...] in the original
    (unpadded) order. Backward returns this rank's slice of the gradient, i.e. the gathered tensor is
    treated as replicated: every rank must compute the same function of it."""
    return _GatherSequence.apply(x_L, shard, group)


# ----------------------------------------------------------------------------- Ulysses
def ulysses_kv_repeat(num_heads: int, num_kv_heads: int, cp_size: int) -> int:
    """How often each kv head is repeated so that the cp ranks can split kv heads; ValueError if cp
    does not divide the query heads.

    Rule: cp divides H. KV heads are repeated lcm(G, cp) / G times (1 when cp divides G); since G and
    cp both divide H, so does lcm(G, cp), and every rank gets whole kv heads for its H / cp query heads.
    """
    if num_heads % cp_size:
        valid = [cp for cp in range(1, num_heads + 1) if num_heads % cp == 0]
        raise ValueError(
            f"Ulysses context parallel size {cp_size} must divide the number of attention heads after TP "
            f"({num_heads}); pick cp in {valid}, or use cp_impl='ring' (not limited by heads)")
    return math.lcm(num_kv_heads, cp_size) // num_kv_heads


def _seq_to_heads(x_LHD: torch.Tensor, group) -> torch.Tensor:
    R = dist.get_world_size(group)
    L, H, D = x_LHD.shape
    send_RLhD = x_LHD.reshape(L, R, H // R, D).transpose(0, 1).contiguous()
    recv_RLhD = torch.empty_like(send_RLhD)
    dist.all_to_all_single(recv_RLhD, send_RLhD, group=group)
    return recv_RLhD.reshape(R * L, H // R, D)


def _heads_to_seq(x_ThD: torch.Tensor, group) -> torch.Tensor:
    R = dist.get_world_size(group)
    T, h, D = x_ThD.shape
    send_RLhD = x_ThD.reshape(R, T // R, h, D).contiguous()
    recv_RLhD = torch.empty_like(send_RLhD)
    dist.all_to_all_single(recv_RLhD, send_RLhD, group=group)
    return recv_RLhD.transpose(0, 1).reshape(T // R, R * h, D)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_LHD, group):
        ctx.group = group
        return _seq_to_heads(x_LHD, group)

    @staticmethod
    def backward(ctx, grad_ThD):
        return _heads_to_seq(grad_ThD, ctx.group), None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ThD, group):
        ctx.group = group
        return _heads_to_seq(x_ThD, group)

    @staticmethod
    def backward(ctx, grad_LHD):
        return _seq_to_heads(grad_LHD, ctx.group), None


class UlyssesAttention(AttentionBackend):
    """All-to-all sequence->heads, `inner` attention on the full sequence for H/cp heads, all-to-all back.

    Inputs hold this rank's contiguous slice ("contiguous" layout); `meta` is the whole padded batch,
    which is exactly what the inner backend sees after the all-to-all.
    """

    name = "ulysses"
    layout = "contiguous"

    def __init__(self, inner: AttentionBackend, cp_group: dist.ProcessGroup | None = None) -> None:
        self.inner, self.cp_group = inner, cp_group

    def __call__(self, q_LHD: torch.Tensor, k_LGD: torch.Tensor, v_LGD: torch.Tensor, meta: AttnMeta, *,
                 scale: float | None = None) -> torch.Tensor:
        check_qkv(q_LHD, k_LGD, v_LGD)
        R = dist.get_world_size(self.cp_group)
        _check_local_tokens(q_LHD.shape[0], R, meta)
        repeat = ulysses_kv_repeat(q_LHD.shape[1], k_LGD.shape[1], R)
        if repeat > 1:
            k_LGD, v_LGD = k_LGD.repeat_interleave(repeat, dim=1), v_LGD.repeat_interleave(repeat, dim=1)
        q_ThD, k_TgD, v_TgD = (_SeqToHeads.apply(x, self.cp_group) for x in (q_LHD, k_LGD, v_LGD))
        o_ThD = self.inner(q_ThD, k_TgD, v_TgD, meta, scale=scale)
        return _HeadsToSeq.apply(o_ThD, self.cp_group)


def _check_local_tokens(L: int, R: int, meta: AttnMeta) -> None:
    if L * R != meta.num_tokens:
        raise ValueError(f"local q has {L} tokens x cp {R} != {meta.num_tokens} tokens in meta; pass the "
                         f"PackedShard.meta of shard_packed_batch (the whole padded batch), not a local meta")


# ----------------------------------------------------------------------------- ring
def _ring_exchange(send: torch.Tensor, group) -> tuple[torch.Tensor, list]:
    """Start sending `send` to the next rank and receiving the previous rank's buffer (async)."""
    R, rank = dist.get_world_size(group), dist.get_rank(group)
    g = group if group is not None else dist.group.WORLD
    nxt, prv = dist.get_global_rank(g, (rank + 1) % R), dist.get_global_rank(g, (rank - 1) % R)
    recv = torch.empty_like(send)
    works = dist.batch_isend_irecv([dist.P2POp(dist.isend, send, nxt, group),
                                    dist.P2POp(dist.irecv, recv, prv, group)])
    return recv, works


def _wait(works: list) -> None:
    for w in works:
        w.wait()


class _RingAttentionFn(torch.autograd.Function):
    """Forward: K/V travel the ring; each step attends local queries to one rank's K/V and merges by lse.
    Backward: K/V travel again together with fp32 dK/dV accumulators, which end at their owner."""

    @staticmethod
    def forward(ctx, q_LHD, k_LGD, v_LGD, masks_RLL, nonempty, scale, group):
        R, rank = dist.get_world_size(group), dist.get_rank(group)
        L, H, D = q_LHD.shape
        o_LHD = q_LHD.new_zeros((L, H, D), dtype=torch.float32)
        lse_HL = q_LHD.new_full((H, L), float("-inf"), dtype=torch.float32)
        kv_2LGD = torch.stack([k_LGD, v_LGD])
        for step in range(R):
            src = (rank - step) % R
            if step < R - 1:
                next_kv, works = _ring_exchange(kv_2LGD, group)
            if nonempty[src]:
                part_o, part_lse = block_attention_forward(q_LHD, kv_2LGD[0], kv_2LGD[1], masks_RLL[src], scale)
                o_LHD, lse_HL = merge_partial_attention(o_LHD, lse_HL, part_o, part_lse)
            if step < R - 1:
                _wait(works)
                kv_2LGD = next_kv
        o_LHD = o_LHD.to(q_LHD.dtype)
        ctx.save_for_backward(q_LHD, k_LGD, v_LGD, o_LHD, lse_HL, masks_RLL)
        ctx.nonempty, ctx.scale, ctx.group = nonempty, scale, group
        return o_LHD

    @staticmethod
    def backward(ctx, do_LHD):
        q_LHD, k_LGD, v_LGD, o_LHD, lse_HL, masks_RLL = ctx.saved_tensors
        group = ctx.group
        R, rank = dist.get_world_size(group), dist.get_rank(group)
        delta_HL = (do_LHD.float() * o_LHD.float()).sum(-1).transpose(0, 1)
        dq_LHD = torch.zeros_like(q_LHD, dtype=torch.float32)
        kv_2LGD = torch.stack([k_LGD, v_LGD])
        dkv_2LGD = torch.zeros_like(kv_2LGD, dtype=torch.float32)
        for step in range(R):
            src = (rank - step) % R
            if step < R - 1:
                next_kv, kv_works = _ring_exchange(kv_2LGD, group)
            if ctx.nonempty[src]:
                dq, dk, dv = block_attention_backward(do_LHD, q_LHD, kv_2LGD[0], kv_2LGD[1], masks_RLL[src],
                                                      ctx.scale, lse_HL, delta_HL)
                dq_LHD += dq
                dkv_2LGD += torch.stack([dk, dv])
            if R > 1:  # the accumulator follows its K/V block; after R hops it is back with its owner
                dkv_2LGD, dkv_works = _ring_exchange(dkv_2LGD, group)
                _wait(dkv_works)
            if step < R - 1:
                _wait(kv_works)
                kv_2LGD = next_kv
        return (dq_LHD.to(q_LHD.dtype), dkv_2LGD[0].to(k_LGD.dtype), dkv_2LGD[1].to(v_LGD.dtype),
                None, None, None, None)


def _ring_masks(meta: AttnMeta, rank: int, R: int, device: torch.device) -> tuple[torch.Tensor, list[bool]]:
    """bool [R, L, L]: which of rank `src`'s keys each local query may see (same doc, not later)."""
    key = ("ring_masks", rank, R, device)
    if key not in meta.cache:
        T = meta.num_tokens
        doc_T = meta.doc_ids().to(device)
        idx_RL = torch.stack([cp_token_index(T, r, R, "load_balanced") for r in range(R)]).to(device)
        q_idx_L = idx_RL[rank]
        same_doc_RLL = doc_T[q_idx_L][None, :, None] == doc_T[idx_RL][:, None, :]
        masks_RLL = same_doc_RLL & (q_idx_L[None, :, None] >= idx_RL[:, None, :])
        meta.cache[key] = (masks_RLL, masks_RLL.flatten(1).any(1).tolist())
    return meta.cache[key]


class RingAttention(AttentionBackend):
    """Ring attention over the cp group with load-balanced causal chunks and packed documents.

    Inputs hold this rank's "load_balanced" tokens (chunks r and 2*cp-1-r of the padded sequence);
    `meta` is the whole padded batch. K/V blocks travel the ring by point-to-point send/recv while the
    local block is computed; partial results are merged with log-sum-exp (online softmax). Any cp size
    works, whatever the number of heads. Each block is computed with dense torch math under a
    document-causal mask built from doc ids (memory O(H * L^2) per step): correct on any device, not
    a fused kernel. Blocks that are fully masked are skipped.
    """

    name = "ring"
    layout = "load_balanced"

    def __init__(self, cp_group: dist.ProcessGroup | None = None) -> None:
        self.cp_group = cp_group

    def __call__(self, q_LHD: torch.Tensor, k_LGD: torch.Tensor, v_LGD: torch.Tensor, meta: AttnMeta, *,
                 scale: float | None = None) -> torch.Tensor:
        check_qkv(q_LHD, k_LGD, v_LGD)
        R, rank = dist.get_world_size(self.cp_group), dist.get_rank(self.cp_group)
        _check_local_tokens(q_LHD.shape[0], R, meta)
        if meta.num_tokens % (2 * R):
            raise ValueError(f"ring attention needs the padded length ({meta.num_tokens}) to be a multiple of "
                             f"2 * cp = {2 * R}; shard with shard_packed_batch(..., layout='load_balanced')")
        masks_RLL, nonempty = _ring_masks(meta, rank, R, q_LHD.device)
        scale = 1.0 / math.sqrt(q_LHD.shape[-1]) if scale is None else scale
        return _RingAttentionFn.apply(q_LHD, k_LGD, v_LGD, masks_RLL, nonempty, scale, self.cp_group)


CP_IMPLS = ("ulysses", "ring")


def get_cp_attention(cp_impl: str, inner: AttentionBackend, cp_group: dist.ProcessGroup | None = None
                     ) -> UlyssesAttention | RingAttention:
    """CP attention for config `cp_impl`: "ulysses" wraps `inner`; "ring" computes blocks itself (ignores
    `inner`). Shard the batch with `shard_packed_batch(..., layout=backend.layout)`."""
    if cp_impl == "ulysses":
        return UlyssesAttention(inner, cp_group)
    if cp_impl == "ring":
        return RingAttention(cp_group)
    raise ValueError(f"unknown cp_impl {cp_impl!r}; valid values: {list(CP_IMPLS)}")
