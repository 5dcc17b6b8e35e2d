"""Shared prompt prefixes stored once, and cascade attention over them (opt-in: ``RolloutEngine(cascade=True)``).

The samples of one GRPO prompt share its KV: an entry of the prefix store holds the prompt's K/V once and each
row keeps only its own tokens (positions ``>= plen``) in its slot. Decode attention is two attentions merged
by their log-sum-exp: over the shared prefix, with the queries of a group's rows batched against the one K/V
of their entry (``[entries, rows per entry]``: the prefix is read once per group, not once per row), and over
the row's own positions ``[plen, pos]``. The host rebuilds the small index tables (which rows use which entry)
whenever rows join, finish or move, into fixed buffers a captured graph reads.

M: entries, E: rows per entry (table width), Q: prefix positions attended, G: kv heads, R = H / G, D: head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["CascadeShape", "PrefixStore", "merge_attention"]


@dataclass(frozen=True)
class CascadeShape:
    """The static sizes of one captured cascade step: ``entries`` x ``width`` query table, ``prefix_len``
    prefix positions, own-slot positions from ``own_lo`` on."""

    entries: int
    width: int
    prefix_len: int
    own_lo: int


def merge_attention(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor) -> torch.Tensor:
    """Attention over the union of two key sets from each one's output and log-sum-exp (``lse2`` finite)."""
    m = torch.maximum(lse1, lse2)
    m = torch.where(torch.isfinite(m), m, 0.0)  # a padding row with no key at all: output 0, not NaN
    w1, w2 = torch.exp(lse1 - m), torch.exp(lse2 - m)
    den = (w1 + w2)[..., None]
    return torch.where(den > 0, (o1 * w1[..., None] + o2 * w2[..., None]) / den.clamp_min(1e-30), 0.0)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [..., R, D]`` over ``k, v [..., S, D]`` where ``valid [..., 1 or R, S]``: fp32 output and lse."""
    scores = torch.matmul(q * scale, k.transpose(-1, -2)).float().masked_fill(~valid, float("-inf"))
    lse = scores.logsumexp(-1)
    probs = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    return torch.matmul(probs.to(v.dtype), v).float(), lse


class PrefixStore:
    """``entries`` prefixes of up to ``prefix_cap`` positions per layer, and the row tables of the running rows."""

    def __init__(self, num_layers: int, entries: int, num_kv_heads: int, prefix_cap: int, head_dim: int,
                 dtype: torch.dtype, num_slots: int, width_cap: int, device: torch.device) -> None:
        shape = (entries, num_kv_heads, prefix_cap, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.entries, self.prefix_cap, self.width_cap = entries, prefix_cap, width_cap
        # members[m, j]: the row of entry m's j-th user (num_slots = a padding row); at[b]: row b's flat
        # position m * width + j in the table (entries * width_cap: no entry); plen[b]: row b's prefix length
        self.members = torch.full((entries * width_cap,), num_slots, dtype=torch.long, device=device)
        self.at = torch.full((num_slots,), entries * width_cap, dtype=torch.long, device=device)
        self.plen = torch.zeros(num_slots, dtype=torch.long, device=device)
        self.entry_len = torch.zeros(entries, dtype=torch.long, device=device)
        self.free = list(range(entries))
        self.length = [0] * entries

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def take(self, length: int) -> int | None:
        """A free entry for a prefix of ``length`` positions, or None."""
        if not self.free or length > self.prefix_cap:
            return None
        m = self.free.pop(0)
        self.length[m] = length
        return m

    def release(self, m: int) -> None:
        self.free.append(m)
        self.free.sort()

    def fill(self, m: int, slot_k: list[torch.Tensor], slot_v: list[torch.Tensor], slot: int) -> None:
        """Copy the first ``length`` positions of ``slot`` (a freshly prefilled row) into entry ``m``."""
        n = self.length[m]
        for pk, pv, sk, sv in zip(self.k, self.v, slot_k, slot_v):
            pk[m, :, :n] = sk[slot, :, :n]
            pv[m, :, :n] = sv[slot, :, :n]

    def set_rows(self, row_entry: list[int | None], kv_block: int) -> CascadeShape | None:
        """Upload the tables for running rows ``0..n-1`` (``row_entry[b]``: row b's entry or None) and return the
        step's static shape (None: no running row uses an entry)."""
        users: dict[int, list[int]] = {}
        for b, m in enumerate(row_entry):
            if m is not None:
                users.setdefault(m, []).append(b)
        if not users:
            return None
        entries = min(self.entries, 1 << max(users).bit_length())  # buckets: powers of two
        most = max(len(r) for r in users.values())
        if most > self.width_cap:
            raise RuntimeError(f"an entry has {most} rows; the table holds {self.width_cap}")
        width = min(self.width_cap, 1 << (most - 1).bit_length())
        members = [len(self.at)] * (entries * width)
        at = [entries * width] * len(self.at)
        plen = [0] * len(self.at)
        for m, rows in users.items():
            for j, b in enumerate(rows):
                members[m * width + j] = b
                at[b] = m * width + j
                plen[b] = self.length[m]
        dev = self.members.device
        self.members[:len(members)].copy_(torch.tensor(members).to(dev))
        self.at.copy_(torch.tensor(at).to(dev))
        self.plen.copy_(torch.tensor(plen).to(dev))
        self.entry_len.copy_(torch.tensor(self.length).to(dev))
        prefix_len = min(self.prefix_cap, -(-max(self.length[m] for m in users) // kv_block) * kv_block)
        own_lo = 0 if any(m is None for m in row_entry) else min(self.length[m] for m in users) // kv_block * kv_block
        return CascadeShape(entries, width, prefix_len, own_lo)

    def attention(self, layer: int, q_BGRD: torch.Tensor, shape: CascadeShape, scale: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix attention of rows ``0..B-1``: output ``[B, G, R, D]`` (fp32) and lse ``[B, G, R]`` (-inf for
        rows without a prefix)."""
        B, G, R, D = q_BGRD.shape
        M, E, Q = shape.entries, shape.width, shape.prefix_len
        q_pad = torch.cat([q_BGRD, q_BGRD.new_zeros(1, G, R, D)])  # row B: the padding member
        members = self.members[:M * E].clamp(max=B)
        q_MGED = q_pad[members].view(M, E, G, R, D).permute(0, 2, 1, 3, 4).reshape(M, G, E * R, D)
        valid = (torch.arange(Q, device=q_BGRD.device)[None, :] < self.entry_len[:M, None])[:, None, None, :]
        o, lse = masked_attention(q_MGED, self.k[layer][:M, :, :Q], self.v[layer][:M, :, :Q], valid, scale)
        o = o.view(M, G, E, R, D).permute(0, 2, 1, 3, 4).reshape(M * E, G, R, D)
        lse = lse.view(M, G, E, R).permute(0, 2, 1, 3).reshape(M * E, G, R)
        # rows without an entry point one past the table: a row of -inf lse
        o = torch.cat([o, o.new_zeros(1, G, R, D)])
        lse = torch.cat([lse, lse.new_full((1, G, R), float("-inf"))])
        at = self.at[:B].clamp(max=M * E)
        return o[at], lse[at]
