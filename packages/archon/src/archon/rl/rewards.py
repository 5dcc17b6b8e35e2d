"""Reward functions named by an import path, and the prompt streams the trainer samples from."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from archon.errors import parse_json_line
from archon.reward_pool import load_reward_fn

__all__ = ["load_reward_fn", "prompt_stream"]


def prompt_stream(task: str, num_prompts: int, *, num_digits: int = 4, seed: int = 0, path: str = "",
                  start_step: int = 0) -> Iterator[list[tuple[list[int], dict[str, Any]]]]:
    """Per step, ``num_prompts`` (prompt_ids, fields for the reward fn); step s depends only on (seed, s)."""
    from archon.data import BOS, SEP, TASKS, digits_to_tokens

    rows: list[tuple[list[int], dict[str, Any]]] = []
    if task == "jsonl":
        with open(path) as f:
            for i, line in enumerate(f):
                if line.strip():
                    row = parse_json_line(path, i + 1, line)
                    if not isinstance(row, dict) or "prompt_ids" not in row:
                        raise ValueError(f"{path}:{i + 1}: missing 'prompt_ids'")
                    rows.append((list(row.pop("prompt_ids")), row))
        if not rows:
            raise ValueError(f"{path} has no prompts")
    elif task not in TASKS:
        raise ValueError(f"data.task {task!r} is not one of {TASKS + ('jsonl',)}")
    step = start_step
    while True:
        rng = random.Random(seed * 1_000_003 + step)
        if rows:
            yield [rows[rng.randrange(len(rows))] for _ in range(num_prompts)]
        else:
            yield [([BOS, *digits_to_tokens([rng.randrange(10) for _ in range(num_digits)]), SEP], {"task": task})
                   for _ in range(num_prompts)]
        step += 1
