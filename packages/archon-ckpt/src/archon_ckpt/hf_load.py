"""Load a Hugging Face safetensors checkpoint into a (possibly sharded) native module.

Contract: *validate everything, then copy*. Every native tensor's source keys are checked for
presence and shape (combined shapes are computed on the ``meta`` device, no data read) and, when
``strict``, every checkpoint tensor must be consumed. Only if all checks pass is any parameter
written, one tensor at a time, so a bad checkpoint never leaves the model half-loaded.

DTensor parameters (FSDP2 / TP) with plain ``Shard``/``Replicate`` placements and a single HF key
are filled by reading only this rank's box of the tensor from disk. Otherwise (a ``combine``,
strided shards) the *full* tensor is read on every rank and the local shard kept
(``distribute_tensor(..., src_data_rank=None)`` slices locally, no communication). Peak extra
memory is one full tensor. Meta-device parameters must be materialised first
(``module.to_empty(device=...)``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from archon_ckpt.safetensors_io import SafetensorsReader

__all__ = ["HFSource", "LoadReport", "load_into_module", "clean_fqn"]

Combine = Callable[[list[torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class HFSource:
    """Where one native tensor comes from: HF ``keys`` merged by ``combine``.

    ``combine`` receives the HF tensors in ``keys`` order and returns the native tensor; it
    must be a pure shape/layout op that also runs on ``meta`` tensors (``torch.cat``,
    ``torch.stack``, ``view``, ``transpose`` ...), because it is first run on meta tensors to
    validate the resulting shape. ``None`` means a single key used as is.
    Example (fused QKV): ``HFSource((q, k, v), lambda ts: torch.cat(ts, dim=0))``.
    """

    keys: tuple[str, ...]
    combine: Combine | None = None

    def __post_init__(self) -> None:
        if not self.keys:
            raise ValueError("HFSource needs at least one key")
        if self.combine is None and len(self.keys) != 1:
            raise ValueError(f"HFSource with several keys {self.keys} needs a combine function")


#: Maps a native state-dict name to its HF source; ``None`` = not stored in HF (left untouched).
NativeToHF = Callable[[str], "HFSource | str | Sequence[str] | None"]


@dataclass
class LoadReport:
    """What ``load_into_module`` did: native names loaded / skipped, HF keys left unused."""

    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)


_WRAPPER_PARTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def clean_fqn(name: str) -> str:
    """Drop wrapper segments added by torch.compile / activation checkpointing / FSDP1."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def _as_source(name: str, src: HFSource | str | Sequence[str]) -> HFSource:
    if isinstance(src, HFSource):
        return src
    if isinstance(src, str):
        return HFSource((src,))
    keys = tuple(src)
    if len(keys) != 1:
        raise TypeError(
            f"native_to_hf({name!r}) returned {len(keys)} keys without a combine function; "
            "return HFSource(keys, combine) instead"
        )
    return HFSource(keys)


def _expected_shape(src: HFSource, reader: SafetensorsReader) -> torch.Size:
    if src.combine is None:
        return reader.shape(src.keys[0])
    metas = [torch.empty(reader.shape(k), dtype=reader.dtype(k), device="meta") for k in src.keys]
    return src.combine(metas).shape


def _plan(
    module: nn.Module,
    reader: SafetensorsReader,
    native_to_hf: NativeToHF,
    strict: bool,
    ignore_unexpected: Sequence[str],
) -> tuple[list[tuple[str, torch.Tensor, HFSource]], LoadReport]:
    problems: list[str] = []
    plan: list[tuple[str, torch.Tensor, HFSource]] = []
    report = LoadReport()
    used: set[str] = set()
    for raw_name, tensor in module.state_dict(keep_vars=True).items():
        name = clean_fqn(raw_name)
        got = native_to_hf(name)
        if got is None:
            report.skipped.append(name)
            continue
        src = _as_source(name, got)
        used.update(src.keys)
        missing = [k for k in src.keys if k not in reader]
        if missing:
            problems.append(f"missing tensor(s) {missing} for {name!r} (not in {reader.path})")
            continue
        if tensor.device.type == "meta":
            problems.append(f"{name!r} is on the meta device; call module.to_empty(device=...) first")
            continue
        files = sorted({str(reader.file_of(k)) for k in src.keys})
        try:
            shape = _expected_shape(src, reader)
        except Exception as e:  # the user's combine failed on the checkpoint shapes
            problems.append(f"combine for {name!r} failed on {list(src.keys)} in {files}: {e}")
            continue
        if shape != tensor.shape:
            problems.append(
                f"shape mismatch for {name!r}: checkpoint {list(src.keys)} in {files} gives "
                f"{list(shape)}, model expects {list(tensor.shape)}"
            )
            continue
        plan.append((name, tensor, src))
    ignore = [re.compile(p) for p in ignore_unexpected]
    report.unused = [k for k in reader.keys() if k not in used and not any(p.search(k) for p in ignore)]
    if strict and report.unused:
        problems += [f"unexpected tensor {k!r} in {reader.file_of(k)}" for k in report.unused]
    if problems:
        shown = "\n  ".join(problems[:30])
        more = f"\n  ... and {len(problems) - 30} more" if len(problems) > 30 else ""
        raise ValueError(
            f"cannot load {reader.path} into {type(module).__name__}: {len(problems)} problem(s); "
            f"nothing was loaded:\n  {shown}{more}"
        )
    return plan, report


def _local_box(dst: DTensor) -> tuple[slice, ...] | None:
    """The block of the global tensor this rank holds, or None when it is not one plain box."""
    if dst.ndim == 0 or not all(type(p) in (Shard, Replicate) for p in dst.placements):
        return None
    try:
        # Private DTensor helper (the one DCP uses); any failure falls back to a full read.
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(dst.shape, dst.device_mesh, dst.placements)
    except Exception:
        return None
    if tuple(shape) != tuple(dst.to_local().shape):
        return None
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


@torch.no_grad()
def _load_one(dst: torch.Tensor, src: HFSource, reader: SafetensorsReader) -> None:
    if isinstance(dst, DTensor) and src.combine is None:
        if dst.device_mesh.get_coordinate() is None:
            return
        box = _local_box(dst)
        if box is not None:
            local = dst.to_local()
            if local.numel() > 0:
                local.copy_(reader.get_slice(src.keys[0], box))
            return
    parts = [reader.get(k) for k in src.keys]
    _copy_into(dst, parts[0] if src.combine is None else src.combine(parts))


@torch.no_grad()
def _copy_into(dst: torch.Tensor, full: torch.Tensor) -> None:
    if isinstance(dst, DTensor):
        mesh = dst.device_mesh
        if mesh.get_coordinate() is None:  # this rank holds no part of a sub-mesh tensor
            return
        full = full.to(device=mesh.device_type, dtype=dst.dtype)
        local = distribute_tensor(full, mesh, dst.placements, src_data_rank=None).to_local()
        dst.to_local().copy_(local)
    else:
        dst.copy_(full)


def load_into_module(
    module: nn.Module,
    reader: SafetensorsReader,
    *,
    native_to_hf: NativeToHF | None = None,
    strict: bool = True,
    ignore_unexpected: Sequence[str] = (),
) -> LoadReport:
    """Copy HF safetensors weights into ``module``'s parameters and persistent buffers in place.

    ``native_to_hf(name)`` is called for each name of ``module.state_dict()`` (wrapper segments
    such as ``_orig_mod.`` removed, see ``clean_fqn``) and returns the HF key (``str``), an
    ``HFSource(keys, combine)`` for merged tensors, or ``None`` for tensors that HF does not
    store (they are left as they are). Default: identity names.

    Validation happens before any copy and raises one ``ValueError`` listing every missing key,
    shape mismatch and (if ``strict``) every checkpoint tensor that no native tensor uses, except
    those matching a regex in ``ignore_unexpected``; each message names the key and its file.
    Tensors are then read one at a time (grouped by shard file) and cast to the parameter dtype.
    DTensor parameters receive only their local shard (read as a slice where possible); every
    rank must call this.
    """
    mapping: NativeToHF = native_to_hf if native_to_hf is not None else (lambda n: n)
    plan, report = _plan(module, reader, mapping, strict, ignore_unexpected)
    plan.sort(key=lambda item: (str(reader.file_of(item[2].keys[0])), item[0]))
    for name, tensor, src in plan:
        _load_one(tensor, src, reader)
        report.loaded.append(name)
    reader.close()
    return report
