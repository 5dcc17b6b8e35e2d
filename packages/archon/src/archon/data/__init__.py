"""Training data: built-in synthetic digit tasks, pre-tokenized JSONL, and text datasets (JSONL / Parquet /
`datasets` directories, reasoning-gym) tokenized with a chat template."""

from archon.data.synthetic import (
    BOS,
    DIGIT0,
    EOS,
    PAD,
    SEP,
    TASKS,
    digits_to_tokens,
    jsonl_batches,
    solve,
    synthetic_batches,
    synthetic_example,
)

__all__ = ["BOS", "DIGIT0", "EOS", "PAD", "SEP", "TASKS", "digits_to_tokens", "jsonl_batches", "solve",
           "synthetic_batches", "synthetic_example"]
