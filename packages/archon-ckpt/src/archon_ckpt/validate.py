"""Checks that run before a DCP load touches any tensor: files, keys, global shapes.

They run inside DCP's planning step, so DCP gathers a failure on any rank and raises it on all
ranks (no rank is left waiting in a collective).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan

from archon_ckpt.errors import CheckpointError
from archon_ckpt.safe_load import SafeBytesPlanner

__all__ = ["ValidatingLoadPlanner", "check_files", "collect_failure"]

_MAX_SHOWN = 20


def _error(msg: str) -> Exception:
    return CheckpointError(msg)  # one exception type for all load errors


def check_files(path: Path, metadata: Metadata) -> None:
    """Every data file named by the metadata exists and is long enough (catches truncation)."""
    storage = metadata.storage_data
    if not isinstance(storage, dict):
        return
    needed: dict[str, int] = {}
    for info in storage.values():
        rel = getattr(info, "relative_path", None)
        if rel is None:
            continue
        needed[rel] = max(needed.get(rel, 0), int(info.offset) + int(info.length))
    for rel, need in sorted(needed.items()):
        f = path / rel
        if not f.is_file():
            raise _error(f"checkpoint data file {f} is missing")
        size = f.stat().st_size
        if size < need:
            raise _error(f"checkpoint data file {f} is truncated: {size} bytes, metadata needs {need}")


class ValidatingLoadPlanner(SafeBytesPlanner):
    """DefaultLoadPlanner that first reports *all* missing / unexpected keys and shape mismatches.

    ``strict_prefixes``: checkpoint keys under these prefixes must all be requested by the state
    being loaded (unexpected keys are errors).
    """

    def __init__(self, path: Path, strict_prefixes: list[str]) -> None:
        super().__init__(flatten_state_dict=True, flatten_sharded_tensors=True, allow_partial_load=False)
        self.path = path
        self.strict_prefixes = tuple(strict_prefixes)

    def create_local_plan(self) -> LoadPlan:
        assert self.metadata is not None
        check_files(self.path, self.metadata)
        saved = self.metadata.state_dict_metadata
        problems = []
        for fqn, obj in self.state_dict.items():
            md = saved.get(fqn)
            if md is None:
                problems.append(f"missing key {fqn!r}")
            elif isinstance(obj, torch.Tensor):
                if not isinstance(md, TensorStorageMetadata):
                    problems.append(f"key {fqn!r} is a tensor in the state but not in the checkpoint")
                elif md.size != obj.shape:  # DTensor.shape is the global shape
                    problems.append(
                        f"shape mismatch for {fqn!r}: checkpoint {list(md.size)}, state {list(obj.shape)}"
                    )
        if self.strict_prefixes:
            problems += [
                f"unexpected key {k!r} (in the checkpoint, not in the state; load with strict=False "
                f"to ignore)"
                for k in sorted(saved)
                if k.startswith(self.strict_prefixes) and k not in self.state_dict
            ]
        if problems:
            shown = "\n  ".join(problems[:_MAX_SHOWN])
            more = f"\n  ... and {len(problems) - _MAX_SHOWN} more" if len(problems) > _MAX_SHOWN else ""
            raise _error(f"checkpoint {self.path} does not match the state ({len(problems)} problem(s)); "
                         f"nothing was loaded:\n  {shown}{more}")
        return super().create_local_plan()


def collect_failure(exc: CheckpointException, path: Path) -> str:
    """One readable message from DCP's per-rank failures (deduplicated across ranks)."""
    msgs: list[str] = []
    for _rank, wrapped in sorted(exc.failures.items()):
        err = wrapped[0] if isinstance(wrapped, tuple) else getattr(wrapped, "exception", wrapped)
        text = str(err) if isinstance(err, CheckpointError) else f"{type(err).__name__}: {err}"
        if text not in msgs:
            msgs.append(text)
    if len(msgs) == 1 and msgs[0].startswith(("checkpoint", "missing", "corrupt")):
        return msgs[0]
    return f"failed to load checkpoint {path}: " + "\n".join(msgs)
