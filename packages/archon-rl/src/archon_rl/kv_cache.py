"""A slot-based KV cache allocated once from a memory budget, and the attention hooks that use it.

Every layer owns two buffers ``[N, G, S, D]`` (N slots of S positions each); a sequence lives in one slot
from prefill to its end. The buffers are allocated once (from ``kv_cache_gb`` or a fraction of the free
device memory) and never grow during generation, so their addresses stay fixed and a decode step captured
as a CUDA graph stays valid. The hooks speak the decoder's ``kv_hook(attn, q_THD, k_TGD, v_TGD) -> o_THD``
protocol: the model computes projections and RoPE, the hook stores K/V and runs attention.

Decode attention runs over the first ``kv_len`` positions of each row's slot with a length mask; the ``H / G``
query heads of one KV head are laid out as the query length, so no KV head is ever repeated. By default it is
two batched matmuls (`matmul_decode_attention`: each reads K or V once, as a decode step must); SDPA with the
mask (cuDNN's kernel on an H100) measured the same end-to-end speed at 256-768 positions.

N: slots, B: rows of one decode step (rows ``0..B-1`` use slots ``0..B-1``), G: kv heads, D: head dim,
S: slot length, P: longest prompt of a prefill block, H: query heads, R = H / G, T: tokens of one forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from archon_rl.decode_kernels import DecodeKernels, TorchDecodeKernels
from archon_rl.prefix_cache import CascadeShape, PrefixStore
from archon_rl.sampler import prefill_attention

__all__ = ["CacheLayout", "DECODE_ATTENTION", "DecodeAttention", "SlotKVCache", "matmul_decode_attention",
           "sdpa_decode_attention", "slot_count"]

DecodeAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
"""``(q [B, G, R, D], k [B, G, S, D], v [B, G, S, D], valid [B, 1, S], scale) -> o [B, G, R, D]``."""


def matmul_decode_attention(q_BGRD: torch.Tensor, k_BGSD: torch.Tensor, v_BGSD: torch.Tensor,
                            valid_B1S: torch.Tensor, scale: float) -> torch.Tensor:
    """Two batched matmuls over the cache (each reads K or V once: a decode step is bandwidth-bound) and an
    fp32 softmax over the small [B, G, R, S] scores."""
    scores_BGRS = torch.matmul(q_BGRD * scale, k_BGSD.transpose(-1, -2)).float()
    scores_BGRS = scores_BGRS.masked_fill(~valid_B1S[:, None], float("-inf"))
    return torch.matmul(scores_BGRS.softmax(-1).to(v_BGSD.dtype), v_BGSD)


def sdpa_decode_attention(q_BGRD: torch.Tensor, k_BGSD: torch.Tensor, v_BGSD: torch.Tensor,
                          valid_B1S: torch.Tensor, scale: float) -> torch.Tensor:
    """``scaled_dot_product_attention`` with a length mask (PyTorch picks the kernel)."""
    return F.scaled_dot_product_attention(q_BGRD, k_BGSD, v_BGSD, attn_mask=valid_B1S[:, None], scale=scale)


DECODE_ATTENTION: dict[str, DecodeAttention] = {"matmul": matmul_decode_attention, "sdpa": sdpa_decode_attention}


_REFERENCE = TorchDecodeKernels()  # cascade attention without fused kernels


@dataclass(frozen=True)
class CacheLayout:
    """What the cache needs to know about the model."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def bytes_per_token(self) -> int:
        """K and V of one position in every layer."""
        elt = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elt


def slot_count(layout: CacheLayout, slot_len: int, device: torch.device, *, kv_cache_gb: float | None,
               kv_cache_fraction: float, max_slots: int) -> int:
    """Slots of ``slot_len`` positions that fit the budget: ``kv_cache_gb`` GiB, or else ``kv_cache_fraction`` of
    the device's free memory, counting what this process's allocator reserved but does not use (CUDA only; on
    CPU ``kv_cache_gb`` defaults to 1 GiB). At most ``max_slots``."""
    if kv_cache_gb is not None:
        if kv_cache_gb <= 0:
            raise ValueError(f"kv_cache_gb must be > 0, got {kv_cache_gb}")
        budget = kv_cache_gb * 2**30
    elif device.type == "cuda":
        if not 0 < kv_cache_fraction <= 1:
            raise ValueError(f"kv_cache_fraction must be in (0, 1], got {kv_cache_fraction}")
        free, _ = torch.cuda.mem_get_info(device)
        # memory this process's caching allocator holds but does not use (a trainer's freed activations) is free
        # for the cache too: the driver's count alone would shrink the cache after every training step
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        budget = free * kv_cache_fraction
    else:
        budget = 2**30
    per_slot = layout.bytes_per_token() * slot_len
    n = min(max_slots, int(budget // per_slot))
    if n < 1:
        raise ValueError(f"the KV cache budget ({budget / 2**30:.3f} GiB) holds no sequence of {slot_len} tokens "
                         f"({per_slot / 2**30:.3f} GiB each); raise kv_cache_gb / kv_cache_fraction or lower "
                         "max_seq_len")
    return n


class SlotKVCache:
    """Per-layer K/V buffers ``[N, G, S, D]``; layers are numbered in the order the hooks first see them."""

    def __init__(self, layout: CacheLayout, num_slots: int, slot_len: int, device: torch.device,
                 decode_attention: DecodeAttention | None = None, kernels: DecodeKernels | None = None) -> None:
        self.layout, self.num_slots, self.slot_len = layout, num_slots, slot_len
        self.decode_attention = decode_attention or matmul_decode_attention
        self.kernels = kernels  # fused K/V store + attention for decode steps without cascade (DecodeKernels)
        shape = (num_slots, layout.num_kv_heads, slot_len, layout.head_dim)
        # zeros, not empty: rows of a padded decode bucket read slots nothing has written yet
        self.k = [torch.zeros(shape, dtype=layout.dtype, device=device) for _ in range(layout.num_layers)]
        self.v = [torch.zeros(shape, dtype=layout.dtype, device=device) for _ in range(layout.num_layers)]
        self._layer_of: dict[int, int] = {}
        self.prefix: PrefixStore | None = None  # shared prompt prefixes (cascade attention), when enabled

    def nbytes(self) -> int:
        own = sum(t.numel() * t.element_size() for t in self.k + self.v)
        return own + (self.prefix.nbytes() if self.prefix is not None else 0)

    def _layer(self, attn: object) -> int:
        key = id(attn)
        if key not in self._layer_of:
            if len(self._layer_of) == self.layout.num_layers:
                raise RuntimeError(f"the model has more attention layers than the cache's {self.layout.num_layers}")
            self._layer_of[key] = len(self._layer_of)
        return self._layer_of[key]

    def prefill_hook(self, slots_n: torch.Tensor, P: int) -> Callable:
        """Hook for a right-padded ``[n, P]`` prompt block at positions ``0..P-1``, row i stored in slot
        ``slots_n[i]``. A right-padded real query never sees padding under the causal mask."""
        n = slots_n.numel()

        def hook(attn, q_THD: torch.Tensor, k_TGD: torch.Tensor, v_TGD: torch.Tensor) -> torch.Tensor:
            layer = self._layer(attn)
            o_THD, k_nGPD, v_nGPD = prefill_attention(attn, q_THD, k_TGD, v_TGD, n)
            self.k[layer][slots_n, :, :P] = k_nGPD.to(self.layout.dtype)
            self.v[layer][slots_n, :, :P] = v_nGPD.to(self.layout.dtype)
            return o_THD

        return hook

    def decode_hook(self, pos_B: torch.Tensor, kv_len: int, cascade: CascadeShape | None = None) -> Callable:
        """Hook for one new token per row: row b (slot b) stores K/V at ``pos_B[b]`` and attends to its slot's
        positions ``<= pos_B[b]`` among the first ``kv_len``. With ``cascade`` (the `PrefixStore` tables set for
        this step) a row with a shared prefix attends to it in the store and to its own positions ``[plen, pos]``
        from ``cascade.own_lo`` on. Only device ops: safe to capture in a CUDA graph."""
        B = pos_B.numel()
        G, S = self.layout.num_kv_heads, self.slot_len
        if cascade is not None:
            prefix = self.prefix
            assert prefix is not None, "cascade tables without a prefix store"
            cascade_ops = self.kernels or _REFERENCE

            def cascaded(attn, q_THD: torch.Tensor, k_TGD: torch.Tensor, v_TGD: torch.Tensor) -> torch.Tensor:
                layer = self._layer(attn)
                scale = getattr(attn, "scale", None) or q_THD.shape[-1] ** -0.5
                return cascade_ops.attend_cascade(q_THD, k_TGD, v_TGD, self.k[layer], self.v[layer], pos_B, kv_len,
                                                  scale, prefix, layer, cascade)

            return cascaded
        kernels = self.kernels
        if kernels is not None:
            def fused(attn, q_THD: torch.Tensor, k_TGD: torch.Tensor, v_TGD: torch.Tensor) -> torch.Tensor:
                layer = self._layer(attn)
                scale = getattr(attn, "scale", None) or q_THD.shape[-1] ** -0.5
                return kernels.attend_and_store(q_THD, k_TGD, v_TGD, self.k[layer], self.v[layer], pos_B, kv_len,
                                                scale)

            return fused
        # flat row of (slot b, head g, position pos_b) in a [N * G * S, D] view: one index_copy_ per layer
        heads_G = torch.arange(G, device=pos_B.device)
        rows_BG = ((torch.arange(B, device=pos_B.device)[:, None] * G + heads_G[None, :]) * S
                   + pos_B[:, None]).reshape(-1)
        valid_B1S = (torch.arange(kv_len, device=pos_B.device)[None, :] <= pos_B[:, None])[:, None, :]

        def hook(attn, q_THD: torch.Tensor, k_TGD: torch.Tensor, v_TGD: torch.Tensor) -> torch.Tensor:
            layer = self._layer(attn)
            k_all, v_all = self.k[layer], self.v[layer]
            D = k_all.shape[-1]
            k_all.view(-1, D).index_copy_(0, rows_BG, k_TGD.reshape(-1, D).to(k_all.dtype))
            v_all.view(-1, D).index_copy_(0, rows_BG, v_TGD.reshape(-1, D).to(v_all.dtype))
            H = q_THD.shape[1]
            q_BGRD = q_THD.to(k_all.dtype).view(B, G, H // G, D)
            scale = getattr(attn, "scale", None) or D**-0.5
            o_BGRD = self.decode_attention(q_BGRD, k_all[:B, :, :kv_len], v_all[:B, :, :kv_len], valid_B1S, scale)
            return o_BGRD.reshape(B, H, D).to(q_THD.dtype)

        return hook

    def copy_slots(self, src_n: torch.Tensor, dst_n: torch.Tensor, length: int) -> None:
        """Copy positions ``[0, length)`` of slots ``src_n`` into slots ``dst_n`` (shared prompt prefixes,
        compaction after rows finish)."""
        for k, v in zip(self.k, self.v):
            k[dst_n, :, :length] = k[src_n, :, :length]
            v[dst_n, :, :length] = v[src_n, :, :length]
