"""Reward functions for the synthetic digit tasks of archon.data (prompt = bos d1..dn sep).

The reward is the fraction of answer positions that are right, in [0, 1]; a response longer than
the answer is divided by its own length, so babbling is not free. The trailing eos is not scored.
Use as `reward.fn: examples/rewards.py:digit_reward` (or `examples.rewards:digit_reward`).
"""

from archon.data import DIGIT0, EOS, solve


def digit_reward(prompt_ids: list[int], response_ids: list[int], task: str = "reverse", **_) -> float:
    digits = [t - DIGIT0 for t in prompt_ids[1:-1]]
    want = [DIGIT0 + d for d in solve(task, digits)]
    got = response_ids[:-1] if response_ids and response_ids[-1] == EOS else response_ids
    right = sum(a == b for a, b in zip(got, want))
    return right / max(len(want), len(got))


def reverse_reward(prompt_ids: list[int], response_ids: list[int], **_) -> float:
    return digit_reward(prompt_ids, response_ids, "reverse")
