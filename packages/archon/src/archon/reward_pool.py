"""Reward calls in worker processes with a per-call timeout, and the error policy for bad rewards.

``RewardPool(spec, num_workers=N, timeout_s=T)`` starts N worker processes that each import the reward
function named by ``spec`` once. Every call gets its own deadline from the moment a worker takes it; a
worker past its deadline is killed and replaced, so a hanging reward costs T seconds, not the run. With
``num_workers=0`` calls run in this process (no timeout can be enforced there). Workers fork from a
forkserver that has imported this module, so starting or replacing one is fast.

A call that raises, hangs, returns a non-number (or NaN / inf), or kills its worker is a reward error,
reported with the function's name and the sample; ``on_error='raise'`` stops the run with that message,
``'zero'`` scores it 0.0 and counts it (``reward/errors`` in the step metrics).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any

from archon.errors import RunError

log = logging.getLogger("archon")

__all__ = ["RewardCall", "RewardError", "RewardPool", "load_reward_fn"]

RewardFn = Callable[..., float]

RewardCall = tuple[tuple[Any, ...], dict[str, Any]]
"""(positional args, keyword fields) of one reward call: (prompt, response), fields."""

ON_ERROR = ("raise", "zero")


def load_reward_fn(spec: str) -> RewardFn:
    """``'package.module:function'`` (importable, or a module file under the working directory such as
    ``examples.rewards``) or ``'path/to/file.py:function'``."""
    if ":" not in spec:
        raise ValueError(f"reward.fn {spec!r} must look like 'module:function' or 'path/file.py:function'")
    mod_name, fn_name = spec.rsplit(":", 1)
    path = mod_name if mod_name.endswith(".py") else mod_name.replace(".", os.sep) + ".py"
    if os.path.isfile(path):
        name = "archon_reward_" + os.path.splitext(os.path.basename(path))[0]
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise ValueError(f"reward.fn {spec!r}: {path} cannot be loaded as a Python module")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise ValueError(f"reward.fn {spec!r}: cannot import {mod_name!r} ({e}) and no file {path!r}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"reward.fn {spec!r}: {mod_name!r} has no function {fn_name!r}")
    return fn


def _call(fn, args, kwargs) -> tuple[str, Any]:
    try:
        return "ok", fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - any failure of user code is reported, not fatal to the worker
        return "error", f"raised {type(e).__name__}: {e}"


def _worker_main(spec: str, conn: Connection) -> None:
    try:
        fn = load_reward_fn(spec)
    except Exception as e:  # noqa: BLE001
        conn.send(("load_error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        idx, args, kwargs = msg
        status, value = _call(fn, args, kwargs)
        if status == "ok" and not isinstance(value, int | float):
            status, value = "error", f"returned {type(value).__name__} {value!r:.80}, not a number"
        conn.send((idx, status, value))


class _Worker:
    def __init__(self, ctx, spec: str) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(spec, child), daemon=True)
        self.proc.start()
        child.close()
        status, info = self.conn.recv()
        if status != "ready":
            self.stop()
            raise ValueError(f"reward.fn {spec!r} cannot be loaded in a reward worker: {info}")
        self.task: tuple[int, float] | None = None  # (call index, deadline)

    def stop(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


class RewardError(RunError, ValueError):
    """A reward call failed under reward.on_error=raise: a run-time stop (exit 1) naming reward.fn and the sample."""


class RewardPool:
    """Scores batches of reward calls; see the module docstring for workers, timeouts and errors."""

    def __init__(self, spec: str, *, num_workers: int = 0, timeout_s: float = 0.0, on_error: str = "raise") -> None:
        if on_error not in ON_ERROR:
            raise ValueError(f"reward.on_error must be one of {ON_ERROR}, got {on_error!r}")
        if num_workers < 0 or timeout_s < 0:
            raise ValueError("reward.num_workers and reward.timeout_s must be >= 0")
        self.spec, self.num_workers, self.timeout_s, self.on_error = spec, num_workers, timeout_s, on_error
        self.fn = load_reward_fn(spec)  # the name in messages, and a load error here rather than in a worker
        self.name = getattr(self.fn, "__qualname__", spec)
        # forkserver: one clean server process imports this module once; each worker (and each replacement of a
        # killed one) forks from it in milliseconds, never from the trainer with its threads and CUDA state
        self._ctx = mp.get_context("forkserver")
        self._ctx.set_forkserver_preload([__name__])
        self._workers: list[_Worker] = []

    def _error(self, what: str, call: RewardCall) -> str:
        args, _ = call
        sample = ", ".join(f"{a!r:.200}" for a in args)
        return f"reward.fn {self.spec!r} {what} on sample ({sample})"

    def __call__(self, calls: list[RewardCall]) -> tuple[list[float], int]:
        """Scores for ``calls`` in order, and the number of calls that failed (scored 0.0 under 'zero')."""
        results: list[tuple[str, Any]] = (self._inline(calls) if self.num_workers == 0 else self._pooled(calls))
        scores, errors = [], []
        for call, (status, value) in zip(calls, results):
            if status == "ok" and not (isinstance(value, int | float) and math.isfinite(value)):
                status, value = "error", f"returned {value!r:.80}, not a finite number"
            if status == "ok":
                scores.append(float(value))
                continue
            msg = self._error(value, call)
            if self.on_error == "raise":
                raise RewardError(msg + "; fix the function or set reward.on_error=zero to score such samples 0")
            errors.append(msg)
            scores.append(0.0)
        if errors:
            log.warning("%d of %d reward calls failed (scored 0); first: %s", len(errors), len(calls), errors[0])
        return scores, len(errors)

    def _inline(self, calls: list[RewardCall]) -> list[tuple[str, Any]]:
        return [_call(self.fn, args, kwargs) for args, kwargs in calls]

    def _pooled(self, calls: list[RewardCall]) -> list[tuple[str, Any]]:
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self._ctx, self.spec))
        results: list[tuple[str, Any] | None] = [None] * len(calls)
        todo = deque(range(len(calls)))
        while todo or any(w.task for w in self._workers):
            for w in self._workers:
                if w.task is None and todo:
                    i = todo.popleft()
                    w.conn.send((i, *calls[i]))
                    w.task = (i, time.monotonic() + self.timeout_s if self.timeout_s else math.inf)
            busy = [w for w in self._workers if w.task]
            deadline = min(w.task[1] for w in busy if w.task is not None)
            ready = wait([w.conn for w in busy], timeout=None if deadline == math.inf
                         else max(0.0, deadline - time.monotonic()))
            now = time.monotonic()
            for k, w in enumerate(list(self._workers)):
                if w.task is None:
                    continue
                i, due = w.task
                if w.conn in ready:
                    try:
                        _, status, value = w.conn.recv()
                        results[i], w.task = (status, value), None
                        continue
                    except (EOFError, OSError):
                        results[i] = ("error", f"killed its worker process (exit code {w.proc.exitcode})")
                elif now >= due:
                    results[i] = ("error", f"did not return within reward.timeout_s={self.timeout_s:g} s")
                else:
                    continue
                w.stop()
                self._workers[k] = _Worker(self._ctx, self.spec)
        return results  # type: ignore[return-value]

    def close(self) -> None:
        for w in self._workers:
            try:
                w.conn.send(None)
            except OSError:
                pass
            w.stop()
        self._workers = []

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
