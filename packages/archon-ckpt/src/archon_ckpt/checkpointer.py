"""Crash-safe, reshardable training checkpoints on torch.distributed.checkpoint (DCP).

On-disk layout under ``root``::

    step-00000100/        one DCP checkpoint (.metadata + __<rank>_<n>.distcp), complete or absent
    step-00000200/
    latest                text file "step-00000200", replaced atomically, updated last

Save: every rank writes with DCP into ``.step-XXXXXXXX.tmp-save``; after DCP's final collective
rank 0 fsyncs, renames it to ``step-XXXXXXXX``, then rewrites ``latest``, then prunes. A crash at
any point leaves ``latest`` on the previous complete checkpoint. Load: everything is validated
(files present and long enough, keys, shapes) and read into freshly allocated tensors; only on
success are the model/optimizer/RNG states updated, so a failed load changes nothing.
Assumes ``root`` is on a filesystem shared by all ranks (as DCP does).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.stateful import Stateful

from archon_ckpt.atomic import TMP_MARKER, atomic_write_text, publish_directory
from archon_ckpt.errors import CheckpointError
from archon_ckpt.safe_load import SafeBytesPlanner, SafeFileSystemReader, UnsafeCheckpointError
from archon_ckpt.state import RNGState
from archon_ckpt.validate import ValidatingLoadPlanner, check_files, collect_failure
from archon_ckpt.writer_lock import WriterLock, WriterLockError

__all__ = ["Checkpointer", "CheckpointError", "iter_dcp_tensors", "read_metadata", "step_dir_name"]

log = logging.getLogger(__name__)

LATEST_FILE = "latest"
_STEP_RE = re.compile(r"^step-(\d{8,})$")


def step_dir_name(step: int) -> str:
    """``step-00000042`` for step 42."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step-{step:08d}"


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist_on() else 0


def _barrier() -> None:
    if _dist_on():
        dist.barrier()


def _alloc_like(obj: Any) -> Any:
    """Same structure with new, uninitialised tensors (DTensors keep mesh and placements)."""
    if isinstance(obj, torch.Tensor):
        return torch.empty_like(obj.detach())
    if isinstance(obj, Mapping):
        return {k: _alloc_like(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_alloc_like(v) for v in obj]
    return obj


@torch.no_grad()
def _assign_into(dst: dict, src: dict) -> None:
    """Write loaded values of a plain-dict state back into the caller's dict, in place."""
    for k, v in src.items():
        cur = dst.get(k)
        if isinstance(cur, torch.Tensor) and isinstance(v, torch.Tensor) and cur.shape == v.shape:
            cur.copy_(v)
        elif isinstance(cur, dict) and isinstance(v, Mapping):
            _assign_into(cur, dict(v))
        else:
            dst[k] = v


def _reraise_root_cause(exc: BaseException) -> None:
    """Raise the first rank's underlying error of a DCP ``CheckpointException`` (e.g. ``OSError(ENOSPC)``),
    so the caller sees what went wrong; any other exception as it is."""
    if isinstance(exc, CheckpointException):
        for _, wrapped in sorted(exc.failures.items()):
            err = wrapped[0] if isinstance(wrapped, tuple) else getattr(wrapped, "exception", wrapped)
            if isinstance(err, BaseException):
                raise err from exc
    raise exc


def read_metadata(path: str | os.PathLike) -> Metadata:
    """DCP metadata of a checkpoint directory; ``CheckpointError`` naming the file if unreadable."""
    path = Path(path)
    meta_file = path / ".metadata"
    if not meta_file.is_file():
        raise CheckpointError(f"{path} is not a complete DCP checkpoint: {meta_file} is missing")
    try:
        return SafeFileSystemReader(str(path)).read_metadata()
    except UnsafeCheckpointError as e:
        raise CheckpointError(str(e)) from None
    except Exception as e:
        raise CheckpointError(f"corrupt checkpoint metadata {meta_file}: {e!r}") from e


class Checkpointer:
    """Save / load / prune step checkpoints under ``root_dir`` (see module docstring).

    ``state`` is a dict of top-level names to ``Stateful`` objects (``ModelState``,
    ``OptimizerState``, ``SchedulerState``, ``RNGState``) or plain dicts of tensors / python
    values (step, data-loader position). All ranks call ``save``/``load`` with the same keys.
    Works without an initialised process group (single process).

    ``keep_last_n``: keep only the newest n step directories (None keeps all).
    ``async_save``: stage to CPU and write in a background thread (``dcp.async_save``); the step
    is published (renamed, ``latest`` updated) when the write finishes. The next ``save``,
    ``load``, ``wait`` and ``close`` wait for the pending write and raise its error, if any.
    Async save needs a CPU-capable process group (gloo, or ``"cpu:gloo,cuda:nccl"``).
    """

    def __init__(self, root_dir: str | os.PathLike, *, keep_last_n: int | None = None,
                 async_save: bool = False, writer: bool = False) -> None:
        if keep_last_n is not None and keep_last_n < 1:
            raise ValueError(f"keep_last_n must be >= 1 or None, got {keep_last_n}")
        self.root = Path(root_dir)
        self.keep_last_n = keep_last_n
        self.async_save = async_save
        self._pending: tuple[Future, int, Path, Path] | None = None
        self._lock = WriterLock(self.root)
        self._locked = False  # the same on every rank (rank 0 holds the file lock)
        if writer:  # fail now, before any training, when another run writes here
            self.lock()

    def lock(self) -> None:
        """Become the only writer of ``root`` (rank 0 holds ``root/.lock``); `WriterLockError` if taken."""
        error = None
        if _rank() == 0:
            try:
                self._lock.acquire()
                self._remove_stale_temps()  # left by a killed writer; no other writer can be running now
            except WriterLockError as e:
                error = e
        if _dist_on():  # every rank learns the outcome, so none waits in a later collective
            failed = torch.tensor([int(error is not None)])
            dist.all_reduce(failed, op=dist.ReduceOp.MAX)
            if failed.item() and error is None:
                error = WriterLockError(f"{self.root} is being written by another run (rank 0 holds no lock)")
        if error is not None:
            raise error
        self._locked = True

    # -- paths ----------------------------------------------------------------------------------
    def step_path(self, step: int) -> Path:
        return self.root / step_dir_name(step)

    def steps(self) -> list[int]:
        """Steps with a published (complete) checkpoint directory, ascending."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _STEP_RE.match(p.name)
            if m and p.is_dir():
                found.append(int(m.group(1)))
        return sorted(found)

    def latest_step(self) -> int | None:
        """Step named by the ``latest`` pointer; if there is no pointer, the newest step dir;
        ``None`` when there is no checkpoint at all (start fresh)."""
        pointer = self.root / LATEST_FILE
        if pointer.is_file():
            name = pointer.read_text(encoding="utf-8").strip()
            m = _STEP_RE.match(name)
            if not m:
                raise CheckpointError(f"{pointer} holds {name!r}, expected e.g. 'step-00000100'")
            if not (self.root / name).is_dir():
                raise CheckpointError(f"{pointer} points at {self.root / name}, which does not exist")
            return int(m.group(1))
        steps = self.steps()
        return steps[-1] if steps else None

    # -- save -----------------------------------------------------------------------------------
    def save(self, step: int, state: dict[str, Any]) -> None:
        """Save ``state`` as step ``step`` (collective: every rank calls it)."""
        self.wait()
        final = self.step_path(step)
        tmp = self.root / f".{final.name}{TMP_MARKER}save"
        if not self._locked:
            self.lock()
        latest = self.latest_step()  # every rank reads it (shared filesystem): all raise together
        if latest is not None and step < latest:  # the lineage rule: `latest` never moves back
            raise CheckpointError(f"refusing to save step {step} into {self.root}: its latest checkpoint is "
                                  f"step {latest} and steps never go backwards; use a new checkpoint dir")
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left by a crashed save of the same step
                shutil.rmtree(tmp)
            tmp.mkdir()
        _barrier()
        no_dist = not _dist_on()
        if self.async_save:
            resp = dcp.async_save(state, checkpoint_id=str(tmp), no_dist=no_dist)
            fut: Future = getattr(resp, "upload_completion", resp)
            self._pending = (fut, step, tmp, final)
        else:
            try:
                dcp.save(state, checkpoint_id=str(tmp), no_dist=no_dist)
                # dcp.save returns on every rank only after rank 0 wrote .metadata (its last collective)
                self._publish(step, tmp, final)
            except BaseException as e:  # a full disk, a bad value: keep `latest` and remove the partial step
                self._discard(tmp)
                _reraise_root_cause(e)
            _barrier()

    def _discard(self, tmp: Path) -> None:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)

    def _publish(self, step: int, tmp: Path, final: Path) -> None:
        if _rank() != 0:
            return
        publish_directory(tmp, final)
        atomic_write_text(self.root / LATEST_FILE, final.name + "\n")
        self._prune()

    def _remove_stale_temps(self) -> None:
        if not self.root.is_dir():
            return
        for p in self.root.iterdir():
            if p.name.startswith(".step-") and TMP_MARKER in p.name and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)

    def _prune(self) -> None:
        self._remove_stale_temps()
        if self.keep_last_n is None:
            return
        latest = self.latest_step()
        for s in self.steps()[: -self.keep_last_n]:
            if s != latest:
                shutil.rmtree(self.step_path(s), ignore_errors=True)

    def wait(self) -> None:
        """Block until a pending async save is written and published; re-raise its error."""
        if self._pending is None:
            return
        fut, step, tmp, final = self._pending
        self._pending = None
        try:
            fut.result()
            self._publish(step, tmp, final)
        except BaseException as e:
            self._discard(tmp)
            _reraise_root_cause(e)

    def close(self) -> None:
        """Finish any pending async save; drop the writer lock."""
        try:
            self.wait()
        finally:
            self._lock.release()
            self._locked = False

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- load -----------------------------------------------------------------------------------
    def load(self, state: dict[str, Any], step: int | Literal["latest"] | None = None, *,
             strict: bool = True, copy_on_success: bool = True) -> int:
        """Load step ``step`` (default: latest) into ``state`` in place; return the step.

        DCP reshards: the checkpoint may come from any world size / FSDP / TP layout. Before any
        state is touched, the files (present, not truncated), keys (missing always an error,
        unexpected ones an error when ``strict``) and global shapes are checked, and data is read
        into fresh tensors. ``CheckpointError`` names the offending file or key. An ``RNGState``
        entry is skipped when the world size changed (its per-rank streams cannot map). A Stateful
        whose ``rank_subset`` attribute is true (e.g. a ZeRO-1 optimizer: each rank asks only for the
        parameters it owns) is exempt from the unexpected-key check; its missing keys are still errors.

        ``copy_on_success=False`` reads straight into the live tensors instead (no extra memory);
        all the checks above still run before any read, so only an I/O error in the middle of
        reading (e.g. a bit-flipped but full-length file) could then leave a partial load.
        """
        self.wait()
        if step is None or step == "latest":
            found = self.latest_step()
            if found is None:
                raise CheckpointError(f"no checkpoint under {self.root}")
            step = found
        path = self.step_path(int(step))
        if not path.is_dir():
            raise CheckpointError(f"checkpoint {path} does not exist (steps: {self.steps()})")
        metadata = read_metadata(path)
        saved = set(metadata.state_dict_metadata)
        to_load: dict[str, Any] = {}
        per_rank: list[str] = []
        for name in sorted(state):
            obj = state[name]
            if isinstance(obj, RNGState):
                per_rank.append(name)
                if not RNGState.loadable_from(saved, f"{name}."):
                    log.warning("RNG state in %s was saved on another world size; not restored", path)
                    continue
            if not isinstance(obj, (Stateful, dict)):
                raise TypeError(f"state[{name!r}] must be Stateful or a dict, got {type(obj).__name__}")
            to_load[name] = obj.state_dict() if isinstance(obj, Stateful) else obj
        shadow = _alloc_like(to_load) if copy_on_success else dict(to_load)
        strict_prefixes = [f"{n}." for n in to_load if n not in per_rank
                           and not getattr(state[n], "rank_subset", False)] if strict else []
        planner = ValidatingLoadPlanner(path, strict_prefixes)
        try:
            dcp.load(shadow, storage_reader=SafeFileSystemReader(str(path)), planner=planner,
                     no_dist=not _dist_on())
        except CheckpointException as e:
            raise CheckpointError(collect_failure(e, path)) from None
        for name, loaded in shadow.items():
            obj = state[name]
            if isinstance(obj, Stateful):
                obj.load_state_dict(loaded)
            else:
                _assign_into(obj, loaded)
        return int(step)


def iter_dcp_tensors(path: str | os.PathLike, prefix: str = "model.", *,
                     max_batch_bytes: int = 1 << 30) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream full tensors under ``prefix`` out of a DCP checkpoint, in one process.

    Yields ``(name_without_prefix, tensor)`` in name order, reading at most ``max_batch_bytes``
    at a time, so it can feed ``save_safetensors_sharded`` for an HF export without building the
    model: ``save_safetensors_sharded(((adapter(n), t) for n, t in iter_dcp_tensors(step_dir)), out)``.
    """
    path = Path(path)
    metadata = read_metadata(path)
    check_files(path, metadata)
    items = sorted(
        (k, md) for k, md in metadata.state_dict_metadata.items()
        if k.startswith(prefix) and isinstance(md, TensorStorageMetadata)
    )
    batch: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> Iterator[tuple[str, torch.Tensor]]:
        try:
            dcp.load(batch, storage_reader=SafeFileSystemReader(str(path)), planner=SafeBytesPlanner(), no_dist=True)
        except CheckpointException as e:
            raise CheckpointError(collect_failure(e, path)) from None
        for k in sorted(batch):
            yield k[len(prefix):], batch[k]

    for key, md in items:
        t = torch.empty(md.size, dtype=md.properties.dtype)
        nbytes = t.numel() * t.element_size()
        if batch and size + nbytes > max_batch_bytes:
            yield from flush()
            batch, size = {}, 0
        batch[key] = t
        size += nbytes
    if batch:
        yield from flush()
