"""Split a RolloutBatch into micro-batches under a token budget.

- default: first-fit-decreasing bin packing (longest sample first, into the first micro-batch with room);
- ``keep_order=True``: consecutive samples, a new micro-batch whenever the next sample does not fit;
- ``num_micro_batches``: at least that many micro-batches (FSDP needs every DP rank to run the same
  number; agree on it with ``sync_num_micro_batches``). Extra micro-batches come from splitting the
  heaviest one; when there are fewer samples than micro-batches, the rest are empty;
- ``pad_to_maximum=True``: each micro-batch is padded to exactly ``max_tokens`` tokens with a
  trailing padding segment, so compiled kernels see one shape.

Shapes: T: packed tokens of one micro-batch, P: T plus padding, N: sequences.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from archon_rl.batch import RolloutBatch

__all__ = ["MicroBatch", "plan_micro_batches", "split_micro_batches", "sync_num_micro_batches"]


@dataclass
class MicroBatch:
    """One micro-batch: the real samples, where they came from, and the padding to add."""

    batch: RolloutBatch
    sample_indices: list[int]
    """Indices of these samples in the batch that was split."""
    num_pad_tokens: int = 0
    """Padding appended after the real tokens (``pad_to_maximum``)."""

    @property
    def padded_len(self) -> int:
        return self.batch.num_tokens + self.num_pad_tokens

    def padded_input_ids(self, pad_id: int = 0) -> torch.Tensor:
        """[P] token ids with ``num_pad_tokens`` copies of ``pad_id`` appended."""
        return self.pad(self.batch.input_ids, pad_id)

    def padded_cu_seqlens(self) -> torch.Tensor:
        """[N+2] (or [N+1] without padding): the padding is its own segment so it attends to nothing real."""
        cu = self.batch.cu_seqlens
        if self.num_pad_tokens == 0:
            return cu
        return torch.cat([cu, cu.new_tensor([self.padded_len])])

    def pad(self, x_T: torch.Tensor, fill: float | int = 0) -> torch.Tensor:
        """Append ``num_pad_tokens`` entries of ``fill`` along dim 0."""
        if self.num_pad_tokens == 0:
            return x_T
        return torch.cat([x_T, x_T.new_full((self.num_pad_tokens, *x_T.shape[1:]), fill)])

    def unpad(self, x_P: torch.Tensor) -> torch.Tensor:
        """Drop the padding from a model output [P, ...] (e.g. logprobs) before calling a loss."""
        return x_P[: self.batch.num_tokens]


def _split_heaviest(bins: list[list[int]], lengths: Sequence[int]) -> bool:
    loads = [(sum(lengths[i] for i in b), -j) for j, b in enumerate(bins) if len(b) > 1]
    if not loads:
        return False
    _, neg_j = max(loads)  # heaviest; ties go to the first
    j = -neg_j
    b = bins[j]
    half, run, cut = sum(lengths[i] for i in b) / 2, 0, 1
    for pos, i in enumerate(b[:-1]):
        run += lengths[i]
        cut = pos + 1
        if run >= half:
            break
    bins[j: j + 1] = [b[:cut], b[cut:]]
    return True


def plan_micro_batches(lengths: Sequence[int], max_tokens: int, keep_order: bool = False,
                       num_micro_batches: int | None = None) -> list[list[int]]:
    """Sample indices of each micro-batch; every micro-batch holds at most ``max_tokens`` tokens."""
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be > 0, got {max_tokens}")
    if num_micro_batches is not None and num_micro_batches < 1:
        raise ValueError(f"num_micro_batches must be >= 1 or None, got {num_micro_batches}")
    too_long = [i for i, n in enumerate(lengths) if n > max_tokens]
    if too_long:
        raise ValueError(f"samples {too_long[:8]} have more than max_tokens={max_tokens} tokens "
                         f"(longest {max(lengths)}); raise max_tokens or truncate the rollouts")
    bins: list[list[int]] = []
    if keep_order:
        load = 0
        for i, n in enumerate(lengths):
            if not bins or load + n > max_tokens:
                bins.append([])
                load = 0
            bins[-1].append(i)
            load += n
    else:
        loads: list[int] = []
        for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
            j = next((j for j, ld in enumerate(loads) if ld + lengths[i] <= max_tokens), len(loads))
            if j == len(loads):
                bins.append([])
                loads.append(0)
            bins[j].append(i)
            loads[j] += lengths[i]
        bins = sorted((sorted(b) for b in bins), key=lambda b: b[0])
    target = num_micro_batches or 1
    while len(bins) < target and _split_heaviest(bins, lengths):
        pass
    bins.extend([] for _ in range(target - len(bins)))
    return bins


def split_micro_batches(batch: RolloutBatch, max_tokens: int, keep_order: bool = False,
                        pad_to_maximum: bool = False, num_micro_batches: int | None = None) -> list[MicroBatch]:
    """Split ``batch`` into micro-batches of at most ``max_tokens`` tokens (see module docstring)."""
    plan = plan_micro_batches(batch.seq_lens.tolist(), max_tokens, keep_order, num_micro_batches)
    out = []
    for idx in plan:
        mb = batch.select(idx)
        out.append(MicroBatch(mb, list(idx), max_tokens - mb.num_tokens if pad_to_maximum else 0))
    return out


def sync_num_micro_batches(num_micro_batches: int, group: dist.ProcessGroup | None = None,
                           device: torch.device | str = "cpu") -> int:
    """Max of ``num_micro_batches`` over ``group`` (a CUDA ``device`` for NCCL groups)."""
    t = torch.tensor([num_micro_batches], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())
