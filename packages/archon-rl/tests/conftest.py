"""Shared random packed-batch factory for archon-rl tests."""

import pytest
import torch
from archon_rl import RolloutBatch


def _make(seed: int = 0, lens: list[int] | None = None, dtype: torch.dtype = torch.float64,
          group_size: int = 1, empty_mask_seq: int | None = 1) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    lens = lens or [5, 1, 7, 2, 9, 4]
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    t = int(cu[-1])
    mask = torch.rand(t, generator=g) < 0.75
    mask[cu[:-1].long()] = False  # first token of each sequence has no logprob
    lens_t = torch.tensor(lens)
    # one length-1 sequence with mask True to exercise that edge case too
    if 1 in lens:
        mask[int(cu[lens.index(1)])] = True
    if empty_mask_seq is not None:
        mask[int(cu[empty_mask_seq]): int(cu[empty_mask_seq + 1])] = False
    n = len(lens)
    logp = -torch.rand(t, generator=g, dtype=dtype) * 3
    return RolloutBatch(
        input_ids=torch.randint(0, 100, (t,), generator=g),
        cu_seqlens=cu,
        loss_mask=mask,
        logprobs=logp + 0.3 * torch.randn(t, generator=g, dtype=dtype),
        rewards=torch.randn(n, generator=g, dtype=dtype),
        group_ids=torch.arange(n) // group_size,
        versions=torch.zeros(n, dtype=torch.long),
        prompt_lens=torch.ones(n, dtype=torch.long).clamp(max=lens_t),
        ref_logprobs=logp + 0.3 * torch.randn(t, generator=g, dtype=dtype),
        prox_logprobs=logp + 0.2 * torch.randn(t, generator=g, dtype=dtype),
        values=torch.randn(t, generator=g, dtype=dtype),
        advantages=torch.randn(t, generator=g, dtype=dtype),
        returns=torch.randn(t, generator=g, dtype=dtype),
        token_rewards=0.1 * torch.randn(t, generator=g, dtype=dtype),
    )


@pytest.fixture
def make_batch():
    return _make
