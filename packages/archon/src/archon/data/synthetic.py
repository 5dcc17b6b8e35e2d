"""Training data: built-in synthetic digit tasks (no download) and JSONL token files.

Synthetic vocabulary: 0 pad, 1 bos, 2 sep, 3 eos, 4..13 the digits 0..9. An example is
`bos d1..dn sep answer eos`; only the answer and eos are targets.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from archon.engine.batch import PackedBatch
from archon.errors import parse_json_line

PAD, BOS, SEP, EOS, DIGIT0 = 0, 1, 2, 3, 4
TASKS = ("copy", "reverse", "sort")


def digits_to_tokens(digits: list[int]) -> list[int]:
    return [DIGIT0 + d for d in digits]


def solve(task: str, digits: list[int]) -> list[int]:
    if task == "copy":
        return list(digits)
    if task == "reverse":
        return digits[::-1]
    if task == "sort":
        return sorted(digits)
    raise ValueError(f"unknown synthetic task {task!r}; choose one of {TASKS}")


def synthetic_example(task: str, rng: random.Random, num_digits: int) -> tuple[list[int], list[int]]:
    digits = [rng.randrange(10) for _ in range(num_digits)]
    prompt = [BOS, *digits_to_tokens(digits), SEP]
    answer = [*digits_to_tokens(solve(task, digits)), EOS]
    return prompt + answer, [0] * len(prompt) + [1] * len(answer)


def synthetic_batches(task: str, batch_size: int, num_digits: int, seed: int, *, rank: int = 0,
                      world: int = 1, start_step: int = 0) -> Iterator[PackedBatch]:
    """An endless stream of batches; each rank gets its own slice of the global batch (deterministic)."""
    if task not in TASKS:
        raise ValueError(f"data.task {task!r} is not one of {TASKS + ('jsonl',)}")
    if batch_size % world:
        raise ValueError(f"data.batch_size {batch_size} must be divisible by the {world} data-parallel ranks")
    step = start_step
    while True:
        rng = random.Random(seed * 1_000_003 + step)
        examples = [synthetic_example(task, rng, num_digits) for _ in range(batch_size)]
        mine = examples[rank::world]
        yield PackedBatch.from_sequences([e[0] for e in mine], [e[1] for e in mine])
        step += 1


def jsonl_batches(path: str, batch_size: int, *, rank: int = 0, world: int = 1, start_step: int = 0
                  ) -> Iterator[PackedBatch]:
    """Cycle over a JSONL file of {"input_ids": [...], "loss_mask": [...]} lines."""
    rows = []
    with open(path) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            row = parse_json_line(path, i + 1, line)
            if not isinstance(row, dict) or "input_ids" not in row:
                raise ValueError(f"{path}:{i + 1}: missing 'input_ids'")
            ids = row["input_ids"]
            mask = row.get("loss_mask", [1] * len(ids))
            if len(mask) != len(ids):
                raise ValueError(f"{path}:{i + 1}: loss_mask has {len(mask)} entries for {len(ids)} tokens")
            rows.append((ids, mask))
    if len(rows) < batch_size:
        raise ValueError(f"{path} has {len(rows)} examples, fewer than data.batch_size={batch_size}")
    step = start_step
    while True:
        base = (step * batch_size) % len(rows)
        chunk = [rows[(base + j) % len(rows)] for j in range(batch_size)][rank::world]
        yield PackedBatch.from_sequences([c[0] for c in chunk], [c[1] for c in chunk])
        step += 1
