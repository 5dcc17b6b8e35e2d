"""Loading a checkpoint never runs code from it.

DCP stores its ``.metadata`` with plain ``pickle`` and every non-tensor value (optimizer hyper-parameters,
step counters, the RNG blobs) with ``torch.save``; its stock reader and planner unpickle both without limits,
so a hostile checkpoint could run code on load. Here:

- `SafeFileSystemReader` is DCP's public ``FileSystemReader`` with ``read_metadata`` replaced by a restricted
  unpickler that builds only the classes DCP metadata is made of (`METADATA_GLOBALS`);
- `safe_torch_load` is ``torch.load(weights_only=True)`` (tensors, containers, numbers, strings, bytes) plus
  the few numpy globals a numpy RNG state needs; `SafeBytesPlanner` routes DCP's non-tensor values through it.

A file that names anything else raises `UnsafeCheckpointError` and nothing is built from it.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

__all__ = ["METADATA_GLOBALS", "SafeBytesPlanner", "SafeFileSystemReader", "UnsafeCheckpointError",
           "safe_pickle_load", "safe_torch_load"]


class UnsafeCheckpointError(ValueError):
    """A checkpoint file asks to build an object outside the allowlist (it could run code)."""


_DCP_METADATA = "torch.distributed.checkpoint.metadata"

#: (module, name) pairs DCP metadata is built from, on torch 2.11 to 2.15.
METADATA_GLOBALS: frozenset[tuple[str, str]] = frozenset({
    (_DCP_METADATA, "Metadata"), (_DCP_METADATA, "TensorStorageMetadata"), (_DCP_METADATA, "BytesStorageMetadata"),
    (_DCP_METADATA, "ChunkStorageMetadata"), (_DCP_METADATA, "TensorProperties"), (_DCP_METADATA, "MetadataIndex"),
    (_DCP_METADATA, "StorageMeta"), (_DCP_METADATA, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"), ("pathlib", "Path"), ("collections", "OrderedDict"),
})


def _torch_value(module: str, name: str) -> Any:
    """`torch.float32`, `torch.strided`, `torch.contiguous_format`: values, never callables that act."""
    if module != "torch":
        return None
    value = getattr(torch, name, None)
    if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
        return value
    return None


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, origin: str) -> None:
        super().__init__(file)
        self.origin = origin

    def find_class(self, module: str, name: str) -> Any:
        value = _torch_value(module, name)
        if value is not None:
            return value
        if (module, name) in METADATA_GLOBALS:
            return super().find_class(module, name)
        raise UnsafeCheckpointError(f"{self.origin} asks to build {module}.{name}, which is not part of DCP "
                                    "checkpoint metadata; refusing to load it (it could run code)")


def safe_pickle_load(file: Any, origin: str = "checkpoint metadata") -> Any:
    """Unpickle DCP metadata from a binary file object, building only `METADATA_GLOBALS`."""
    return _MetadataUnpickler(file, origin).load()


class SafeFileSystemReader(FileSystemReader):
    """DCP's ``FileSystemReader`` whose ``read_metadata`` runs no code (restricted unpickler)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        name = ".metadata" if rank is None else f"__{rank}.metadata"
        path = os.path.join(os.fspath(self.path), name)
        with open(path, "rb") as f:
            metadata = safe_pickle_load(f, path)
        if not isinstance(metadata, Metadata):
            raise UnsafeCheckpointError(f"{path} holds a {type(metadata).__name__}, not DCP Metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _numpy_globals() -> list[Any]:
    """What a pickled numpy RNG state (a uint32 array) needs: the array reconstructor, ndarray, its dtype."""
    try:
        import numpy as np
    except ImportError:
        return []
    try:
        from numpy._core.multiarray import _reconstruct  # numpy 2
    except ImportError:  # numpy 1
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    found = [_reconstruct, np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        found.append(type(np.dtype(np.uint32)))
    return found


def safe_torch_load(data: bytes | io.BytesIO, origin: str = "checkpoint value") -> Any:
    """``torch.load(weights_only=True)`` with numpy arrays allowed; `UnsafeCheckpointError` for anything else."""
    buf = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(buf, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        found = re.search(r"WeightsUnpickler error: ([^\n]*)", str(e))
        why = found.group(1) if found else str(e).splitlines()[0]
        raise UnsafeCheckpointError(f"{origin}: refusing to load it, it names more than tensors and plain "
                                    f"values (it could run code): {why}") from None


class SafeBytesPlanner(DefaultLoadPlanner):
    """A ``DefaultLoadPlanner`` whose non-tensor values are read with `safe_torch_load`."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        # Check the bytes with the restricted loader first; only a stream that passed reaches DCP's own
        # (unrestricted) torch.load, which then builds nothing the allowlist did not.
        safe_torch_load(value, f"checkpoint value {read_item.dest_index.fqn!r}")
        value.seek(0)
        super().load_bytes(read_item, value)
