"""Synthetic RL-shaped batches for tests and benchmarks (seeded, tiny vocabularies so prefixes collide)."""

from __future__ import annotations

import torch

__all__ = ["grpo_batch", "multiturn_batch", "mixed_batch"]


def _rand(g: torch.Generator, n: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=g)


def grpo_batch(
    g: torch.Generator, num_groups: int, group_size: int, prompt_len: int, max_resp: int, vocab: int = 50
) -> list[torch.Tensor]:
    """GRPO groups: one prompt per group followed by different responses."""
    out = []
    for _ in range(num_groups):
        prompt = _rand(g, prompt_len, vocab)
        for _ in range(group_size):
            n = int(torch.randint(1, max_resp + 1, (1,), generator=g))
            out.append(torch.cat([prompt, _rand(g, n, vocab)]))
    return out


def multiturn_batch(
    g: torch.Generator, num_chains: int, num_turns: int, turn_len: int, vocab: int = 50
) -> list[torch.Tensor]:
    """Multi-turn trajectories: every turn's sequence extends the previous turn's full history."""
    out = []
    for _ in range(num_chains):
        hist = _rand(g, turn_len, vocab)
        for _ in range(num_turns):
            hist = torch.cat([hist, _rand(g, int(torch.randint(1, turn_len + 1, (1,), generator=g)), vocab)])
            out.append(hist.clone())
    return out


def mixed_batch(g: torch.Generator) -> list[torch.Tensor]:
    """GRPO groups, multi-turn chains, a prefix of another sequence, duplicates and a lone sequence,
    shuffled."""
    seqs = grpo_batch(g, 2, 3, 5, 4) + multiturn_batch(g, 2, 3, 3)
    seqs.append(seqs[0][:3].clone())  # strict prefix of another sequence
    seqs.append(seqs[1].clone())  # duplicate
    seqs.append(seqs[1].clone())
    seqs.append(_rand(g, 6, 50) + 1000)  # shares nothing
    perm = torch.randperm(len(seqs), generator=g).tolist()
    return [seqs[i] for i in perm]
