"""Description of a packed batch of documents, shared by every attention layer of one micro-batch.

Legend: T packed tokens, N documents, S longest document.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["AttnMeta", "build_attn_meta", "doc_ids_from_cu_seqlens", "positions_from_cu_seqlens", "to_device"]


@dataclass(eq=False)
class AttnMeta:
    """Packed-batch description: documents are contiguous spans of the token dim.

    Build it once per micro-batch with `build_attn_meta` and pass the same object to every layer:
    backends cache their masks on it (`cache`), so the cache lives exactly as long as the batch.
    """

    cu_seqlens: torch.Tensor
    """int32 [N+1], document boundaries in the packed token dim; T = cu_seqlens[-1]."""
    max_seqlen: int
    """Length of the longest document."""
    seqlen_bound: int | None = None
    """A static upper bound on every document's length, set for micro-batches padded to a fixed token count
    (`actor.archon.pad_to_maximum`). Kernels that need only a bound (FlashAttention varlen sizes its launch
    grid with it) use it instead of `max_seqlen`, so a compiled graph does not specialize on each micro-batch's
    longest document."""
    cache: dict[Any, Any] = field(default_factory=dict, repr=False)
    """Per-batch cache of derived masks / indices, keyed by backend; never part of the contract."""

    @property
    def num_tokens(self) -> int:
        if "num_tokens" not in self.cache:
            self.cache["num_tokens"] = int(self.cu_seqlens[-1])
        return self.cache["num_tokens"]

    @property
    def num_docs(self) -> int:
        return self.cu_seqlens.numel() - 1

    def doc_ids(self) -> torch.Tensor:
        """int64 [T]: document index of every token (cached)."""
        key = ("doc_ids", self.cu_seqlens.device)
        if key not in self.cache:
            self.cache[key] = doc_ids_from_cu_seqlens(self.cu_seqlens, self.cache.get("num_tokens"))
        return self.cache[key]

    def to(self, device: torch.device | str) -> AttnMeta:
        """This meta with `cu_seqlens` (and the cached doc ids / positions) on `device`. Host tensors are copied
        through pinned memory without blocking, so building the meta on the host and moving it costs no device
        sync (a pageable host-to-device copy waits for the stream to drain)."""
        device = torch.device(device)
        if self.cu_seqlens.device == device:
            return self
        moved = AttnMeta(to_device(self.cu_seqlens, device), self.max_seqlen, self.seqlen_bound)
        for key, value in self.cache.items():
            if isinstance(key, tuple) and len(key) == 2 and isinstance(value, torch.Tensor):
                moved.cache[(key[0], device)] = to_device(value, device)
            elif key == "num_tokens":
                moved.cache[key] = value
        return moved

    def positions(self) -> torch.Tensor:
        """int64 [T]: position of every token inside its document (cached)."""
        key = ("positions", self.cu_seqlens.device)
        if key not in self.cache:
            self.cache[key] = positions_from_cu_seqlens(self.cu_seqlens, self.doc_ids())
        return self.cache[key]


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`; a host tensor bound for an accelerator goes through pinned memory, non-blocking."""
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type != "cpu" and torch.cuda.is_available():
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def doc_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, num_tokens: int | None = None) -> torch.Tensor:
    """int64 [T] document index per token, vectorised (empty documents are allowed). Pass `num_tokens`
    (cu_seqlens[-1]) when known to save a device->host read."""
    lengths_N = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    docs_N = torch.arange(lengths_N.numel(), device=cu_seqlens.device)
    T = int(cu_seqlens[-1]) if num_tokens is None else num_tokens
    return torch.repeat_interleave(docs_N, lengths_N, output_size=T)


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, doc_ids_T: torch.Tensor | None = None) -> torch.Tensor:
    """int64 [T] position of each token inside its document (the RoPE position of a packed batch)."""
    if doc_ids_T is None:
        doc_ids_T = doc_ids_from_cu_seqlens(cu_seqlens)
    arange_T = torch.arange(doc_ids_T.numel(), device=cu_seqlens.device)
    return arange_T - cu_seqlens.long()[doc_ids_T]


def build_attn_meta(cu_seqlens: torch.Tensor) -> AttnMeta:
    """Validate `cu_seqlens` (int [N+1], starts at 0, non-decreasing) and build an `AttnMeta`.

    Costs one device->host sync (for `max_seqlen`) when `cu_seqlens` is on a device; build it from the host
    copy and move it with `AttnMeta.to` to avoid that. Call it once per micro-batch.
    """
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with N+1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 (or int64), got {cu_seqlens.dtype}")
    lengths_N = cu_seqlens[1:] - cu_seqlens[:-1]
    stats = torch.stack([cu_seqlens[0].long(), lengths_N.min().long(), lengths_N.max().long(),
                         cu_seqlens[-1].long()]).tolist()
    if stats[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {stats[0]}")
    if stats[1] < 0:
        raise ValueError("cu_seqlens must be non-decreasing (document lengths >= 0)")
    meta = AttnMeta(cu_seqlens=cu_seqlens.to(torch.int32), max_seqlen=int(stats[2]))
    meta.cache["num_tokens"] = int(stats[3])  # read here, in the one sync, not per layer
    return meta
