"""Checks `archon export-hf` runs before it writes anything: the target is not a checkpoint, not the source
nor a folder holding it, and empty unless `--overwrite`; the `--model` config matches the checkpoint's shapes."""

from __future__ import annotations

import os
from pathlib import Path

from archon.errors import UserError

__all__ = ["check_export_target", "check_shapes_match"]


def _holds_checkpoint(d: Path) -> bool:
    return (d / "latest").is_file() or (d / ".metadata").is_file() or any(
        p.name.startswith("step-") and p.is_dir() for p in d.iterdir())


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_export_target(source: str, out: str, *, overwrite: bool, command: str = "export-hf") -> None:
    """Refuse an output directory whose replacement would destroy data the export did not create."""
    src, dst = Path(source).resolve(), Path(out).resolve()
    if _inside(src, dst):
        raise UserError(f"{command}: output {out!r} is the checkpoint {source!r} or a folder holding it; replacing "
                        "it would delete the checkpoint: pick a new output directory")
    if _inside(dst, src):
        raise UserError(f"{command}: output {out!r} lies inside the checkpoint {source!r}: pick a directory "
                        "outside it")
    if dst.exists() and not dst.is_dir():
        raise UserError(f"{command}: output {out!r} is a file, not a directory")
    if not dst.is_dir() or not any(dst.iterdir()):
        return
    if _holds_checkpoint(dst):
        raise UserError(f"{command}: output {out!r} holds a training checkpoint; Archon never replaces one "
                        "(even with --overwrite): pick a new output directory")
    if not overwrite:
        raise UserError(f"{command}: output {out!r} is not empty; pass --overwrite to replace its content or pick "
                        "a new directory")


def check_shapes_match(model_shapes: dict[str, tuple[int, ...]], saved: dict[str, tuple[int, ...]],
                       model_arg: str, step_dir: str) -> None:
    """Every tensor of the model built from `--model` exists in the checkpoint with the same shape."""
    missing = sorted(set(model_shapes) - set(saved))
    wrong = sorted(k for k in set(model_shapes) & set(saved) if tuple(model_shapes[k]) != tuple(saved[k]))
    extra = sorted(set(saved) - set(model_shapes))
    if not (missing or wrong or extra):
        return
    if wrong:
        k = wrong[0]
        what = f"{k} is {list(saved[k])} in the checkpoint but {list(model_shapes[k])} for --model"
    elif missing:
        what = f"{missing[0]} (and {len(missing) - 1} more) missing from the checkpoint"
    else:
        what = f"the checkpoint has {extra[0]} (and {len(extra) - 1} more) that --model lacks"
    raise UserError(f"export-hf: --model {model_arg!r} does not match checkpoint {os.fspath(step_dir)!r}: {what}; "
                    "pass the config of the model that was trained")
