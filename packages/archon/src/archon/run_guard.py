"""What a training loop checks around its steps: the lineage rule at the start, non-finite steps in a row,
token ids out of the vocabulary, and collectives that time out because a rank stalled or died.

`init_process_group` gives every process group (the default one and every group created after it, e.g. the
DeviceMesh sub-groups) the timeout `distributed.timeout_s`. A `Heartbeat` thread on each rank bumps a counter in
the process group's store; when a collective fails, `RunGuard.step` reads the counters twice and names the ranks
whose counter did not move (stopped or dead), so every surviving rank exits with that message.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from archon.errors import RunError, UserError

log = logging.getLogger("archon")

__all__ = ["Heartbeat", "RunGuard", "check_token_ids", "init_process_group"]

HEARTBEAT_S = 1.0


def _set_new_group_timeout(timeout: timedelta) -> None:
    """Default timeout of process groups created later without one (DeviceMesh sub-groups, `new_group`).

    torch reads it from module globals of `distributed_c10d` (private; torch 2.11 to 2.15). Fallback when they
    move: sub-groups keep torch's default (30 minutes) and only the default group has `timeout`."""
    try:
        from torch.distributed import distributed_c10d as c10d
    except ImportError:  # pragma: no cover
        return
    if hasattr(c10d, "default_pg_timeout"):
        c10d.default_pg_timeout = timeout
    if getattr(c10d, "default_pg_nccl_timeout", None) is not None:
        c10d.default_pg_nccl_timeout = timeout


def init_process_group(device: torch.device, timeout_s: float) -> None:
    """Under torchrun (WORLD_SIZE > 1): the default process group with `timeout_s` for every collective."""
    timeout = timedelta(seconds=timeout_s)
    _set_new_group_timeout(timeout)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # gloo next to NCCL: host-side collectives (metadata, objects) work too
    dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo", timeout=timeout)


def _default_store():
    """The default process group's key-value store (private accessor; None if it moved or there is no group)."""
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except (ImportError, RuntimeError, ValueError):
        return None


class Heartbeat:
    """A daemon thread that bumps ``archon/heartbeat/<rank>`` in the default store every `interval` seconds."""

    def __init__(self, interval: float = HEARTBEAT_S) -> None:
        self.interval = interval
        self.store = _default_store() if dist.is_initialized() else None
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Heartbeat:
        if self.store is not None and self.world > 1:
            self._thread = threading.Thread(target=self._beat, name="archon-heartbeat", daemon=True)
            self._thread.start()
        return self

    def _beat(self) -> None:
        key = f"archon/heartbeat/{self.rank}"
        store = self.store
        assert store is not None  # start() runs the thread only with a store
        while not self._stop.is_set():
            try:
                store.add(key, 1)
            except Exception:  # noqa: BLE001 - the store's host is gone; the failing collective reports it
                return
            self._stop.wait(self.interval)

    def counts(self) -> list[int]:
        store = self.store
        if store is None:
            raise RuntimeError("no key-value store: there is no default process group")
        return [int(store.add(f"archon/heartbeat/{r}", 0)) for r in range(self.world)]

    def silent_ranks(self) -> list[int] | None:
        """Ranks whose heartbeat does not move over three intervals; None when the store cannot be read."""
        if self.store is None:
            return None
        try:
            before = self.counts()
            time.sleep(3 * self.interval)
            after = self.counts()
        except Exception:  # noqa: BLE001
            return None
        return [r for r, (b, a) in enumerate(zip(before, after)) if a == b and r != self.rank]

    def stop(self) -> None:
        self._stop.set()


def _is_collective_failure(exc: BaseException) -> bool:
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("timed out", "timeout", "connection reset", "connection closed", "gloo", "nccl"))


class RunGuard:
    """Per-run checks around a training loop's steps (see the module doc)."""

    def __init__(self, *, max_skipped_steps: int, timeout_s: float) -> None:
        self.max_skipped_steps = max_skipped_steps
        self.timeout_s = timeout_s
        self.skipped_in_a_row = 0
        self.heartbeat = Heartbeat().start()

    @staticmethod
    def check_start(start: int, total_steps: int, where: str) -> None:
        """The lineage rule: a run never continues from a checkpoint past its last step (its next save
        would carry a smaller step and move `latest` back)."""
        if start > total_steps:
            raise UserError(f"the checkpoint in {where} is at step {start}, past total_train_steps={total_steps}: "
                            f"raise total_train_steps above {start}, or use a new checkpoint.dir")

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        """Turn a collective that failed (timeout, peer gone) into a `RunError` naming the silent ranks."""
        try:
            yield
        except Exception as e:
            if not (dist.is_initialized() and _is_collective_failure(e)):
                raise
            silent = self.heartbeat.silent_ranks()
            who = (f"rank {', '.join(map(str, silent))} stopped responding (stalled or dead)" if silent else
                   "a collective failed (a rank stalled, died or lost its connection)")
            raise RunError(f"step {step}: {who}; waited distributed.timeout_s={self.timeout_s:g}s, every rank "
                           f"stops ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e

    def after_step(self, step: int, stats: dict[str, Any]) -> None:
        """Count updates skipped for a non-finite loss or gradient; `max_skipped_steps` in a row is an error."""
        loss = stats.get("loss")
        bad = bool(stats.get("update_skipped")) or (isinstance(loss, float) and not math.isfinite(loss))
        if not bad:
            self.skipped_in_a_row = 0
            return
        self.skipped_in_a_row += 1
        log.warning("step %d skipped: non-finite loss or gradient (loss %s, grad_norm %s); %d in a row", step, loss,
                    stats.get("grad_norm"), self.skipped_in_a_row)
        if self.skipped_in_a_row >= self.max_skipped_steps:
            raise RunError(f"{self.skipped_in_a_row} steps in a row (up to step {step}) had a non-finite loss or "
                           f"gradient and were skipped (max_skipped_steps={self.max_skipped_steps}); lower "
                           "actor.optimizer.lr, check the data and rewards, or resume from an earlier checkpoint")

    def close(self) -> None:
        self.heartbeat.stop()


def check_token_ids(ids: torch.Tensor, vocab_size: int, source: str) -> None:
    """Token ids must index the embedding: an out-of-range id is a data error, not an IndexError later."""
    if ids.numel() == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise UserError(f"{source}: token id {bad} is outside the model's vocabulary [0, {vocab_size}); check the "
                        "tokenizer matches actor.path")


def check_prompt_lengths(prompt_ids: list[list[int]], max_new_tokens: int, context: int, source: str) -> None:
    """A prompt plus its response must fit the model's context (`max_position_embeddings`)."""
    longest = max((len(p) for p in prompt_ids), default=0)
    if longest + max_new_tokens > context:
        raise UserError(f"{source}: a prompt of {longest} tokens plus sampling.max_new_tokens={max_new_tokens} "
                        f"exceeds the model's context of {context} tokens (max_position_embeddings); shorten the "
                        "prompts or lower sampling.max_new_tokens")
