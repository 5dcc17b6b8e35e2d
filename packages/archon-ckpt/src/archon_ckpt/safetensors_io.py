"""Hugging Face safetensors: lazy sharded reader and streaming sharded writer.

Layout (what ``transformers`` reads and writes): either one ``model.safetensors``, or shards
``model-00001-of-00003.safetensors`` ... plus ``model.safetensors.index.json`` =
``{"metadata": {"total_size": <bytes>}, "weight_map": {tensor_name: shard_file}}``.

The reader parses only the JSON headers up front (keys, shapes, dtypes, and a size check that
catches truncated files) and reads tensor data one tensor at a time through ``safe_open``
(memory-mapped), so host memory stays around one tensor, not one model.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from archon_ckpt.atomic import atomic_directory, user_file_mode

__all__ = [
    "SafetensorsReader",
    "save_safetensors_sharded",
    "parse_size",
    "SAFE_WEIGHTS_NAME",
    "SAFE_WEIGHTS_INDEX_NAME",
]

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

_DTYPES: dict[str, torch.dtype] = {
    name: dt
    for name, attr in [
        ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"),
        ("I64", "int64"), ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"),
        ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("BOOL", "bool"),
        ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
    ]
    if (dt := getattr(torch, attr, None)) is not None
}

# An absurd header length means this is not a safetensors file (or it is corrupt).
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: str
    shape: tuple[int, ...]


def _read_header(path: Path) -> tuple[dict[str, Any], dict[str, str] | None]:
    """Parse the JSON header of one safetensors file and check the file is long enough."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise ValueError("file shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > min(_MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"header length {header_len} exceeds the file size {size}")
            header = json.loads(f.read(header_len))
    except FileNotFoundError:
        raise
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise ValueError(f"corrupt safetensors file {path}: {e}") from e
    if not isinstance(header, dict):
        raise ValueError(f"corrupt safetensors file {path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    data_end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if 8 + header_len + data_end > size:
        raise ValueError(
            f"truncated safetensors file {path}: header needs {8 + header_len + data_end} bytes, "
            f"file has {size}; re-download or re-export it"
        )
    return header, metadata


class SafetensorsReader:
    """Lazy reader over a single safetensors file or a sharded HF checkpoint directory.

    ``path`` may be a ``.safetensors`` file, a directory holding ``model.safetensors.index.json``
    (sharded), or a directory holding ``model.safetensors``. All headers are validated at
    construction: a missing index or shard raises ``FileNotFoundError``; a corrupt or truncated
    file, or an index naming a tensor its shard lacks, raises ``ValueError``. Each error names
    the file.

    Tensor data is read on demand, one tensor at a time (``get``) or one slice of a tensor
    (``get_slice``). Use as a context manager or call ``close()`` to release the open mmap.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        self.path = path
        self._entries: dict[str, _Entry] = {}
        self.metadata: dict[str, str] = {}
        self.index: dict[str, Any] | None = None
        if path.is_dir():
            index_file = path / SAFE_WEIGHTS_INDEX_NAME
            single = path / SAFE_WEIGHTS_NAME
            if index_file.is_file():
                self._load_index(index_file)
            elif single.is_file():
                self._add_file(single)
            else:
                raise FileNotFoundError(
                    f"{path} has neither {SAFE_WEIGHTS_INDEX_NAME} nor {SAFE_WEIGHTS_NAME}; "
                    "pass a Hugging Face model directory or a .safetensors file"
                )
        elif path.is_file():
            self._add_file(path)
        else:
            raise FileNotFoundError(f"no such safetensors file or directory: {path}")
        self._open_file: Path | None = None
        self._handle: Any = None

    def _load_index(self, index_file: Path) -> None:
        try:
            index = json.loads(index_file.read_text(encoding="utf-8"))
            weight_map: dict[str, str] = index["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"corrupt index file {index_file}: {e!r}") from e
        self.index = index
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            shard_path = index_file.parent / shard
            if not shard_path.is_file():
                raise FileNotFoundError(f"index {index_file} points at missing shard file {shard_path}")
        for shard in shards:
            self._add_file(index_file.parent / shard, expected=[k for k, v in weight_map.items() if v == shard])

    def _add_file(self, file: Path, expected: list[str] | None = None) -> None:
        header, metadata = _read_header(file)
        if metadata and not self.metadata:
            self.metadata = dict(metadata)
        if expected is not None:
            lacking = [k for k in expected if k not in header]
            if lacking:
                raise ValueError(
                    f"index maps {len(lacking)} tensor(s) to {file} which does not contain them, "
                    f"e.g. {lacking[:3]}"
                )
            header = {k: header[k] for k in expected}
        for key, info in header.items():
            if key in self._entries:
                raise ValueError(f"tensor {key!r} appears in both {self._entries[key].file} and {file}")
            self._entries[key] = _Entry(file, info["dtype"], tuple(int(s) for s in info["shape"]))

    # -- metadata -------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """All tensor names, sorted."""
        return sorted(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def _entry(self, key: str) -> _Entry:
        try:
            return self._entries[key]
        except KeyError:
            raise KeyError(f"tensor {key!r} not found in {self.path}") from None

    def file_of(self, key: str) -> Path:
        """The shard file that stores ``key``."""
        return self._entry(key).file

    def shape(self, key: str) -> torch.Size:
        return torch.Size(self._entry(key).shape)

    def dtype(self, key: str) -> torch.dtype:
        code = self._entry(key).dtype
        if code not in _DTYPES:
            raise TypeError(f"tensor {key!r} in {self.file_of(key)} has unsupported dtype {code}")
        return _DTYPES[code]

    def files(self) -> list[Path]:
        """Shard files in name order."""
        return sorted({e.file for e in self._entries.values()})

    # -- data -----------------------------------------------------------------------------------
    def _handle_for(self, file: Path) -> Any:
        if self._open_file != file:
            self.close()
            try:
                self._handle = safe_open(str(file), framework="pt", device="cpu")
            except Exception as e:  # SafetensorError is not importable by a stable name
                raise ValueError(f"cannot open safetensors file {file}: {e}") from e
            self._open_file = file
        return self._handle

    def get(self, key: str) -> torch.Tensor:
        """Read one full tensor (CPU, its stored dtype)."""
        entry = self._entry(key)
        return self._handle_for(entry.file).get_tensor(key)

    def get_slice(self, key: str, index: tuple[slice, ...]) -> torch.Tensor:
        """Read only ``tensor[index]`` (basic slices per leading dim), e.g. one rank's shard."""
        entry = self._entry(key)
        return self._handle_for(entry.file).get_slice(key)[index]

    def close(self) -> None:
        """Release the open file handle (reopened on the next read)."""
        self._handle = None
        self._open_file = None

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsReader({str(self.path)!r}, {len(self)} tensors, {len(self.files())} files)"


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)


def parse_size(size: int | str) -> int:
    """``"5GB"`` -> 5_000_000_000, ``"2GiB"`` -> 2 * 2**30, ``123`` -> 123 (bytes)."""
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        return size
    m = _SIZE_RE.match(size)
    if not m:
        raise ValueError(f"cannot parse size {size!r}; use an int of bytes or e.g. '500MB', '5GB', '2GiB'")
    num, unit = float(m.group(1)), m.group(2).upper()
    prefix = unit.rstrip("B").rstrip("I")
    base = 1024 if "I" in unit else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[prefix]
    value = int(num * base**power)
    if value <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return value


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _to_host(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.full_tensor()  # collective: every rank must reach this for the same tensor
    t = t.detach()
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    # A private contiguous copy: safetensors refuses views or tensors sharing storage (tied weights).
    return t.to("cpu", copy=True).contiguous()


def save_safetensors_sharded(
    named_tensors: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike,
    *,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
) -> list[Path]:
    """Write tensors as a Hugging Face safetensors checkpoint into ``out_dir``, atomically.

    Streams: tensors are consumed in order and a shard is written as soon as the next tensor
    would exceed ``max_shard_size`` (a tensor larger than the limit gets a shard of its own), so
    host memory holds at most one shard. Output is one ``model.safetensors`` when everything
    fits, otherwise ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``.
    Everything is written into a temporary sibling directory, fsynced, then renamed to
    ``out_dir`` (an existing ``out_dir`` is replaced). Other files the caller wants in the same
    directory (config.json, tokenizer) should be written into it afterwards, or use
    ``atomic_directory`` yourself and call this on a subdirectory.

    ``dtype`` casts floating-point tensors (e.g. ``torch.bfloat16``). ``metadata`` defaults to
    ``{"format": "pt"}``, which ``transformers`` requires.

    Distributed: DTensor inputs are gathered with ``full_tensor()`` one tensor at a time, so every
    rank must call this with the same tensor sequence. Only rank 0 writes; all ranks return after
    the directory is published (barrier). Returns the written files (on rank 0; [] elsewhere).
    """
    limit = parse_size(max_shard_size)
    meta = dict(metadata) if metadata is not None else {"format": "pt"}
    items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
    rank = _rank()
    written: list[Path] = []
    if rank == 0:
        with atomic_directory(out_dir) as tmp:
            written = _write_shards(items, tmp, limit, dtype, meta)
        written = [Path(out_dir) / p.name for p in written]
    else:
        for _name, t in items:
            if _is_dtensor(t):
                t.full_tensor()  # take part in the gather; rank 0 keeps the result
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return written


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _write_shards(
    items: Iterable[tuple[str, torch.Tensor]],
    tmp: Path,
    limit: int,
    dtype: torch.dtype | None,
    meta: dict[str, str],
) -> list[Path]:
    return name_shards(tmp, write_parts(items, tmp, limit, dtype, meta))


def write_parts(
    items: Iterable[tuple[str, torch.Tensor]],
    tmp: Path,
    limit: int,
    dtype: torch.dtype | None,
    meta: dict[str, str],
    prefix: str = "part",
) -> list[tuple[Path, list[str], int]]:
    """Stream ``items`` into ``tmp/<prefix>-0000i.safetensors`` files of at most ``limit`` bytes (a larger
    tensor gets its own); returns (file, tensor names, bytes) per file, for `name_shards`."""
    seen: set[str] = set()
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0
    parts: list[tuple[Path, list[str], int]] = []

    def flush() -> None:
        nonlocal shard, shard_bytes
        if not shard:
            return
        part = tmp / f"{prefix}-{len(parts) + 1:05d}.safetensors"
        save_file(shard, str(part), metadata=meta)
        user_file_mode(part)
        parts.append((part, list(shard), shard_bytes))
        shard, shard_bytes = {}, 0

    for name, t in items:
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {type(name).__name__}")
        if name in seen:
            raise ValueError(f"duplicate tensor name {name!r}; each name may be saved once")
        seen.add(name)
        host = _to_host(t, dtype)
        nbytes = host.numel() * host.element_size()
        if shard and shard_bytes + nbytes > limit:
            flush()
        shard[name] = host
        shard_bytes += nbytes
    flush()
    return parts


def name_shards(tmp: Path, parts: list[tuple[Path, list[str], int]]) -> list[Path]:
    """Rename `write_parts` files (of one or several writers, all under ``tmp``) to HF's names: one
    ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``."""
    if not parts:
        raise ValueError("no tensors given; refusing to write an empty checkpoint")
    if len(parts) == 1:
        final = tmp / SAFE_WEIGHTS_NAME
        os.rename(parts[0][0], final)
        return [final]
    n = len(parts)
    weight_map: dict[str, str] = {}
    files = []
    for i, (part, names, _) in enumerate(parts, start=1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        os.rename(part, tmp / fname)
        files.append(tmp / fname)
        for k in names:
            if k in weight_map:
                raise ValueError(f"duplicate tensor name {k!r} in {weight_map[k]} and {fname}")
            weight_map[k] = fname
    total = sum(nbytes for _, _, nbytes in parts)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return files
