"""The asynchronous rollout loop: a thread that keeps the rollout servers busy while the trainer trains.

Batch ``s`` (the prompts of step ``s``, each response with seed `sequence_seeds(seed, s, index)`) is sent
once the servers hold weight version ``>= s - max_staleness``; the servers tag every answer with the
version they generated it with. Versions only grow, so every sample of batch ``s`` is at most
``max_staleness`` versions older than the policy that trains on it at step ``s``; with
``max_staleness = 0`` a batch waits for the previous step's weights (the synchronous loop). At most
``max_staleness + 1`` batches are ahead of the servers' version, so samples are never thrown away.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from archon_rl import GenRequest, SamplingConfig, sequence_seeds

__all__ = ["RolloutProducer", "ReadyBatch"]


@dataclass
class ReadyBatch:
    """The finished generation of one step: global samples in index order, and its timing."""

    step: int
    samples: list[dict[str, Any]]
    submit_version: int
    gen_time: float
    num_tokens: int
    stopped: int
    finished_at: float = field(default_factory=time.perf_counter)


class RolloutProducer:
    """See the module docstring. ``client`` is an `archon_rl.client.RolloutClient` (``generate_async``);
    ``score(prompts, results, step) -> samples`` turns one batch's results into sample dicts."""

    def __init__(self, client_fn: Callable[[], Any], prompts: Iterator[list[tuple[list[int], dict]]],
                 score: Callable[[list[tuple[list[int], dict]], list, int], list[dict]], *,
                 sampling: SamplingConfig, seed: int, group_size: int, max_staleness: int, start_step: int,
                 total_steps: int) -> None:
        self.client_fn = client_fn
        self.prompts = prompts
        self.score = score
        self.sampling = sampling
        self.seed = seed
        self.group_size = group_size
        self.max_staleness = max_staleness
        self.total_steps = total_steps
        self.server_version = start_step
        self._next = start_step
        self._cond = threading.Condition()
        self._ready: dict[int, ReadyBatch] = {}
        self._inflight: list[tuple[int, Any, float, list, int]] = []
        self._error: BaseException | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="archon-rollouts", daemon=True)

    # -- trainer side ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def set_server_version(self, version: int) -> None:
        """The servers now hold ``version``: batches up to ``version + max_staleness`` may be sent."""
        with self._cond:
            self.server_version = version
            self._cond.notify_all()

    def get(self, step: int, *, poll_s: float = 0.5, check: Callable[[], None] | None = None) -> ReadyBatch:
        """Block until batch ``step`` is ready; ``check()`` runs every ``poll_s`` (it raises to abort, e.g. when a
        server died). A failure of the loop is raised here."""
        while True:
            with self._cond:
                if step in self._ready:
                    return self._ready.pop(step)
                if self._error is not None:
                    raise self._error
                self._cond.wait(poll_s)
                if step in self._ready:
                    return self._ready.pop(step)
            if check is not None:
                check()

    @property
    def outstanding_batches(self) -> int:
        with self._cond:
            return len(self._inflight)

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    # -- the loop ----------------------------------------------------------------------------------
    def _submit(self, step: int) -> None:
        prompts = next(self.prompts)
        g = self.group_size
        ids = [p for p, _ in prompts for _ in range(g)]
        seeds = sequence_seeds(self.seed, step, range(len(ids)))
        requests = [GenRequest(list(p), self.sampling, int(s)) for p, s in zip(ids, seeds)]
        fut = self.client_fn().generate_async(requests)
        fut.add_done_callback(lambda _f: self._notify())
        self._inflight.append((step, fut, time.perf_counter(), prompts, self.server_version))

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _finish(self, step: int, fut, t0: float, prompts: list, version: int) -> None:
        results = fut.result()
        gen_time = time.perf_counter() - t0
        samples = self.score(prompts, results, step)
        batch = ReadyBatch(step, samples, version, gen_time, sum(len(r.output_ids) for r in results),
                           sum(r.finish_reason == "stop" for r in results))
        with self._cond:
            self._ready[step] = batch
            self._cond.notify_all()

    def _run(self) -> None:
        try:
            while True:
                done = None
                with self._cond:
                    if self._stop:
                        return
                    if self._next < self.total_steps and self.server_version >= self._next - self.max_staleness:
                        self._submit(self._next)
                        self._next += 1
                        continue
                    for item in self._inflight:
                        if item[1].done():
                            done = item
                            self._inflight.remove(item)
                            break
                    if done is None:
                        if self._next >= self.total_steps and not self._inflight:
                            return
                        self._cond.wait(1.0)
                        continue
                self._finish(*done)  # rewards are computed outside the lock
        except BaseException as e:  # noqa: BLE001 - handed to the trainer, which raises it
            with self._cond:
                self._error = e
                self._cond.notify_all()
