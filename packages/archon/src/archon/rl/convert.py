"""RolloutBatch (archon_rl) <-> PackedBatch (engine): the optional fields travel as token / sequence extras.

T: packed tokens, N: sequences.
"""

from __future__ import annotations

import torch
from archon_rl import SAMPLE_FIELDS, TOKEN_FIELDS, RolloutBatch

from archon.engine.batch import PackedBatch

__all__ = ["to_packed", "from_packed", "minibatches"]


def to_packed(batch: RolloutBatch) -> PackedBatch:
    """The engine's view of a rollout batch (loss_mask as float, every set field as an extra)."""
    tok = {n: getattr(batch, n) for n in TOKEN_FIELDS if getattr(batch, n) is not None}
    seq = {n: getattr(batch, n) for n in SAMPLE_FIELDS if getattr(batch, n) is not None}
    return PackedBatch(batch.input_ids, batch.cu_seqlens, batch.loss_mask.float(), tok, seq)


def from_packed(batch: PackedBatch, device: torch.device | str | None = None, *, trusted: bool = False
                ) -> RolloutBatch:
    """The rollout view of an engine (micro-)batch, optionally moved to ``device``. ``trusted``: the batch is a
    view of a validated RolloutBatch (`to_packed`, then the engine's micro-batching), so the value checks,
    which read device tensors on the host inside the training step, are skipped."""
    kw = {n: v for n, v in batch.token_extras.items() if n in TOKEN_FIELDS}
    kw.update({n: v for n, v in batch.seq_extras.items() if n in SAMPLE_FIELDS})
    make = RolloutBatch.trusted if trusted else RolloutBatch
    rb = make(input_ids=batch.input_ids, cu_seqlens=batch.cu_seqlens, loss_mask=batch.loss_mask != 0, **kw)
    return rb.to(device) if device is not None else rb


def minibatches(batch: RolloutBatch, n_minibatches: int, seed: int) -> list[RolloutBatch]:
    """Shuffle samples with a generator seeded by ``seed`` and split into ``n_minibatches`` near-equal parts."""
    n = batch.num_seqs
    if not 1 <= n_minibatches <= n:
        raise ValueError(f"n_minibatches must be in [1, {n}] (the number of rollouts), got {n_minibatches}")
    if n_minibatches == 1:
        return [batch]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    sizes = [n // n_minibatches + (i < n % n_minibatches) for i in range(n_minibatches)]
    return batch.select(perm).split_by_samples(sizes)
