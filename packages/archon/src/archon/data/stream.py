"""A resumable, per-epoch shuffled stream of record indices: the data position a checkpoint restores."""

from __future__ import annotations

import random
from typing import Any

from torch.distributed.checkpoint.stateful import Stateful

__all__ = ["EpochStream"]


class EpochStream(Stateful):
    """Yields batches of indices into ``num_records`` items. Each epoch is a permutation seeded by
    (seed, epoch), so the stream is deterministic; ``state_dict`` is the position (epoch, offset), so a resumed
    run continues with the batch an uninterrupted one would have drawn. A batch may span two epochs."""

    def __init__(self, num_records: int, batch_size: int, *, seed: int = 0, shuffle: bool = True) -> None:
        if num_records < 1:
            raise ValueError("the data stream has no records")
        self.n, self.batch_size, self.seed, self.shuffle = num_records, batch_size, seed, shuffle
        self.epoch, self.offset = 0, 0
        self._perm: list[int] | None = None

    def _order(self) -> list[int]:
        if self._perm is None:
            self._perm = list(range(self.n))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + self.epoch).shuffle(self._perm)
        return self._perm

    def next_indices(self) -> list[int]:
        out: list[int] = []
        while len(out) < self.batch_size:
            take = min(self.batch_size - len(out), self.n - self.offset)
            out += self._order()[self.offset:self.offset + take]
            self.offset += take
            if self.offset == self.n:
                self.epoch, self.offset, self._perm = self.epoch + 1, 0, None
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "offset": self.offset, "num_records": self.n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["num_records"]) != self.n:
            raise ValueError(f"the checkpoint's data stream had {int(state['num_records'])} records, this run's has "
                             f"{self.n}: resume with the same data.path, filters and tokenizer")
        self.epoch, self.offset, self._perm = int(state["epoch"]), int(state["offset"]), None
