"""Calling the user's reward function: an exception or a non-finite or non-numeric reward ends the run with an
error naming `reward.fn` and the sample, never a skipped step."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from archon.errors import RunError

__all__ = ["score"]


def score(fn: Callable[..., Any], spec: str, prompt_ids: Sequence[list[int]], responses: Sequence[list[int]],
          fields: Sequence[dict[str, Any]]) -> list[float]:
    """``fn(prompt, response, **fields)`` for every sample, checked: each reward is a finite number."""
    rewards = []
    for i, (p, r, f) in enumerate(zip(prompt_ids, responses, fields)):
        try:
            value = fn(p, r, **f)
        except Exception as e:  # noqa: BLE001 - any failure of user code ends the run with its name
            raise RunError(f"reward.fn {spec!r} raised {type(e).__name__}: {e} (sample {i}, prompt {p[:8]}..., "
                           f"response {r[:8]}...)") from e
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise RunError(f"reward.fn {spec!r} returned {value!r} for sample {i}; it must return a number") from None
        if not math.isfinite(value):
            raise RunError(f"reward.fn {spec!r} returned {value} for sample {i} (prompt {p[:8]}...): rewards must be "
                           "finite; a NaN reward would make every advantage NaN and skip every step")
        rewards.append(value)
    return rewards
