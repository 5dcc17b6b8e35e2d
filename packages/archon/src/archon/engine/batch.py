"""The packed batch the engine trains on: flat tokens + document boundaries, no padding.

Every per-token tensor is *token-aligned*: entry t belongs to token t. `loss_mask[t] = 1` means token t is
a target (its log-probability given tokens < t is trained); the first token of every sequence is never
a target. Outputs of `forward_batch` follow the same alignment (logprobs[t] = log p(token t | < t), 0 at
sequence starts). T: packed tokens, N: sequences.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # long [T]
    cu_seqlens: torch.Tensor  # int32 [N+1]
    loss_mask: torch.Tensor  # float [T], token-aligned
    token_extras: dict[str, torch.Tensor] = field(default_factory=dict)  # [T] each, e.g. old logprobs
    seq_extras: dict[str, torch.Tensor] = field(default_factory=dict)  # [N] each, e.g. rewards

    def __post_init__(self) -> None:
        self.validate()

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return int(self.cu_seqlens.shape[0]) - 1

    @property
    def lengths(self) -> torch.Tensor:
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()

    def validate(self) -> None:
        T = self.input_ids.shape[0]
        if self.input_ids.dim() != 1:
            raise ValueError(f"input_ids must be flat [T], got shape {tuple(self.input_ids.shape)}")
        if T == 0:
            raise ValueError("empty batch: input_ids has no tokens")
        cu = self.cu_seqlens.detach().cpu()
        if cu.dim() != 1 or cu.numel() < 2 or cu[0] != 0 or cu[-1] != T or bool((cu[1:] <= cu[:-1]).any()):
            raise ValueError(f"cu_seqlens must rise strictly from 0 to the {T} tokens, got {cu.tolist()[:8]}...")
        if self.loss_mask.shape != (T,):
            raise ValueError(f"loss_mask has shape {tuple(self.loss_mask.shape)}, expected [{T}]")
        for k, v in self.token_extras.items():
            if v.shape[0] != T:
                raise ValueError(f"token_extras[{k!r}] has {v.shape[0]} entries for {T} tokens")
        for k, v in self.seq_extras.items():
            if v.shape[0] != self.num_seqs:
                raise ValueError(f"seq_extras[{k!r}] has {v.shape[0]} entries for {self.num_seqs} sequences")

    @classmethod
    def from_sequences(cls, seqs: Sequence[Sequence[int]], loss_masks: Sequence[Sequence[float]] | None = None,
                       **seq_extras: torch.Tensor) -> PackedBatch:
        if not seqs:
            raise ValueError("empty batch: no sequences")
        lengths = torch.tensor([len(s) for s in seqs])
        if (lengths == 0).any():
            raise ValueError("every sequence needs at least one token")
        ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
        if loss_masks is None:
            mask = torch.ones(len(ids))
        else:
            mask = torch.tensor([float(m) for ms in loss_masks for m in ms])
        cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
        cu[1:] = lengths.cumsum(0)
        mask[cu[:-1].long()] = 0.0  # the first token has no prediction
        return cls(ids, cu, mask, seq_extras=dict(seq_extras))

    def sequences(self) -> list[torch.Tensor]:
        """Each sequence's token ids, on the host (views of one copy)."""
        return list(torch.split(self.input_ids.cpu(), self.lengths.tolist()))

    def select(self, seq_idx: Sequence[int] | torch.Tensor) -> PackedBatch:
        """The sub-batch of sequences `seq_idx`, in that order."""
        idx = torch.as_tensor(seq_idx, dtype=torch.long)
        lengths = self.lengths[idx]
        tok = self.token_index(idx)
        cu = torch.zeros(len(idx) + 1, dtype=torch.int32)
        cu[1:] = lengths.cumsum(0)
        return PackedBatch(self.input_ids[tok], cu, self.loss_mask[tok],
                           {k: v[tok] for k, v in self.token_extras.items()},
                           {k: v[idx] for k, v in self.seq_extras.items()})

    def token_index(self, seq_idx: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Indices into the flat token dim of the tokens of sequences `seq_idx`, in that order."""
        idx = torch.as_tensor(seq_idx, dtype=torch.long)
        starts, lengths = self.cu_seqlens[:-1].long()[idx], self.lengths[idx]
        base = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)[:-1]])
        return torch.arange(int(lengths.sum())) + torch.repeat_interleave(starts - base, lengths)

    def to(self, device: torch.device | str) -> PackedBatch:
        """The batch on `device`. Host -> accelerator copies go through pinned memory without blocking, and the
        already validated contents are not validated again (that reads `cu_seqlens` on the host, which for a
        device copy would wait for the GPU to drain its queue)."""
        from archon_attn import to_device

        device = torch.device(device)
        moved = copy.copy(self)  # no __post_init__
        moved.input_ids, moved.cu_seqlens, moved.loss_mask = (
            to_device(t, device) for t in (self.input_ids, self.cu_seqlens, self.loss_mask))
        moved.token_extras = {k: to_device(v, device) for k, v in self.token_extras.items()}
        moved.seq_extras = {k: to_device(v, device) for k, v in self.seq_extras.items()}
        return moved

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in ("input_ids", "cu_seqlens", "loss_mask"):
            return getattr(self, key)
        if key in self.token_extras:
            return self.token_extras[key]
        return self.seq_extras[key]
