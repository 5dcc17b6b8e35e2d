"""Spawn N CPU gloo ranks with a timeout, for tests and small tools.

`run_ranks(fn, world_size, *args)` runs ``fn(rank, world_size, *args)`` in ``world_size`` fresh
processes that share a gloo process group, and returns the per-rank return values. A hang fails
with TimeoutError instead of stalling the test run; an exception in any rank is re-raised in the
parent with that rank's traceback.

The worker function is located by source file and qualified name rather than pickled by module
name, so functions defined in test files collected by pytest's ``importlib`` mode work.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import socket
import sys
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_ranks", "free_port"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load_fn(path: str, qualname: str) -> Callable[..., Any]:
    name = f"_archon_rank_mod_{abs(hash(path))}"
    if name in sys.modules:
        mod = sys.modules[name]
    else:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    obj: Any = mod
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _worker(rank: int, world_size: int, port: int, path: str, qualname: str, args: tuple, out_dir: str,
            threads: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    result_path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        fn = _load_fn(path, qualname)
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, result_path)
    except BaseException:  # noqa: BLE001 - reported to the parent
        torch.save({"ok": False, "error": traceback.format_exc()}, result_path)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 300.0,
              threads: int = 1) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return each rank's result."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    path = inspect.getsourcefile(fn)
    if path is None:
        raise TypeError(f"cannot locate the source file of {fn!r}; define it at module level")
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="archon_ranks_") as out_dir:
        procs = [
            ctx.Process(target=_worker,
                        args=(r, world_size, port, os.path.abspath(path), fn.__qualname__, args, out_dir,
                              threads), daemon=False)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        import time

        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results: list = []
        errors: list = []
        for r in range(world_size):
            f = os.path.join(out_dir, f"rank{r}.pt")
            if not os.path.exists(f):
                errors.append(f"rank {r}: no result (exit code {procs[r].exitcode})")
                results.append(None)
                continue
            payload = torch.load(f, weights_only=False)
            if payload["ok"]:
                results.append(payload["result"])
            else:
                errors.append(f"rank {r} raised:\n{payload['error']}")
                results.append(None)
        if hung:
            raise TimeoutError(f"ranks {hung} still running after {timeout:.0f}s (hang?)\n" + "\n".join(errors))
        if errors:
            raise RuntimeError("\n".join(errors))
        return results
