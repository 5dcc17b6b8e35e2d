"""Value checks on a loaded `archon train` / `archon rl` config that need no model, process group or device
memory: they run before any work starts and name the key, the value and what to type instead.

`check_config` looks only at the sections a config has, so every command's config gets the checks of the
sections it shares (actor, checkpoint, data, distributed, top-level step counts).
"""

from __future__ import annotations

import glob
import math
import os
from typing import Any

from archon.errors import UserError, warn

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("bfloat16", "bf16", "float32", "fp32")
SCHEDULES = ("constant", "linear", "cosine")


def check_config(cfg: Any) -> Any:
    """Raise `UserError` naming the first bad key; return `cfg` unchanged."""
    if hasattr(cfg, "total_train_steps") and cfg.total_train_steps < 1:
        raise UserError(f"total_train_steps must be >= 1, got {cfg.total_train_steps}")
    if hasattr(cfg, "max_skipped_steps") and cfg.max_skipped_steps < 1:
        raise UserError(f"max_skipped_steps must be >= 1 (non-finite steps in a row before the run stops), got "
                        f"{cfg.max_skipped_steps}")
    if hasattr(cfg, "device"):
        check_device(cfg.device)
    if hasattr(cfg, "distributed"):
        t = cfg.distributed.timeout_s
        if not (math.isfinite(t) and t > 0):
            raise UserError(f"distributed.timeout_s must be a positive number of seconds, got {t}")
    for section in ("actor", "critic"):
        if hasattr(cfg, section):
            check_actor(getattr(cfg, section), section, required=section == "actor")
    if hasattr(cfg, "checkpoint"):
        check_checkpoint(cfg.checkpoint)
    data = getattr(cfg, "data", None)
    if data is not None and hasattr(data, "batch_size"):  # `archon train` data
        if data.batch_size < 1:
            raise UserError(f"data.batch_size must be >= 1, got {data.batch_size}")
        if data.task != "jsonl" and data.num_digits < 1:
            raise UserError(f"data.num_digits must be >= 1, got {data.num_digits}")
    if data is not None and getattr(data, "task", "") == "jsonl":
        if not data.path:
            raise UserError("data.task=jsonl needs data.path (a JSONL file)")
        if not os.path.isfile(data.path):
            raise UserError(f"data.path {data.path!r} is not a file")
    return cfg


def check_device(device: str) -> None:
    if device not in DEVICES:
        raise UserError(f"device {device!r} is not one of {DEVICES}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("device=cuda but no CUDA GPU is visible to torch; use --device=cpu (or auto)")


def check_actor(a: Any, section: str, *, required: bool) -> None:
    """Model path, dtype, token budget and optimizer numbers of one trained model."""
    if a.dtype not in DTYPES:
        raise UserError(f"{section}.dtype {a.dtype!r} is not one of {DTYPES}")
    if a.mb_max_tokens < 1:
        raise UserError(f"{section}.mb_max_tokens must be >= 1, got {a.mb_max_tokens}")
    check_model_path(a.path, f"{section}.path", init_from_scratch=a.init_from_scratch, required=required)
    o = a.optimizer
    key = f"{section}.optimizer"
    if not (math.isfinite(o.lr) and o.lr >= 0):
        raise UserError(f"{key}.lr must be a finite number >= 0, got {o.lr}")
    for name in ("beta1", "beta2"):
        v = getattr(o, name)
        if not 0.0 <= v < 1.0:
            raise UserError(f"{key}.{name} must be in [0, 1), got {v}")
    if not o.eps > 0:
        raise UserError(f"{key}.eps must be > 0, got {o.eps}")
    if o.weight_decay < 0:
        raise UserError(f"{key}.weight_decay must be >= 0, got {o.weight_decay}")
    if o.lr_scheduler_type not in SCHEDULES:
        raise UserError(f"{key}.lr_scheduler_type {o.lr_scheduler_type!r} is not one of {SCHEDULES}")
    for name in ("warmup_steps_proportion", "min_lr_ratio"):
        v = getattr(o, name)
        if not 0.0 <= v <= 1.0:
            raise UserError(f"{key}.{name} must be in [0, 1], got {v}")
    if a.lora.enabled and a.lora.r < 1:
        raise UserError(f"{section}.lora.r must be >= 1, got {a.lora.r}")
    if a.lora.adapter_path and not os.path.isdir(a.lora.adapter_path):
        raise UserError(f"{section}.lora.adapter_path {a.lora.adapter_path!r} is not a directory")


def check_model_path(path: str, key: str, *, init_from_scratch: bool = False, required: bool = True) -> None:
    """A model directory with config.json (+ safetensors), or a config.json: weights in another format are an
    error (they would be ignored and the model trained from random init)."""
    if not path:
        if required:
            raise UserError(f"{key} is empty: set it to an HF model directory or a config.json")
        return
    if not os.path.exists(path):
        raise UserError(f"{key} {path!r} does not exist")
    d = path if os.path.isdir(path) else os.path.dirname(path) or "."
    if not os.path.isfile(os.path.join(d, "config.json")):
        raise UserError(f"{key} {path!r} has no config.json; pass an HF model directory or its config.json")
    if not os.path.isdir(path) or init_from_scratch:
        return  # a config.json: random init by request
    if glob.glob(os.path.join(d, "*.safetensors")):
        return
    other = sorted(os.path.basename(p) for pat in ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf")
                   for p in glob.glob(os.path.join(d, pat)))
    if other:
        raise UserError(f"{key} {path!r} holds {other[0]} but no *.safetensors: Archon reads safetensors only (a "
                        "pickled file could run code); convert it (transformers: save_pretrained(..., "
                        "safe_serialization=True)) or set init_from_scratch: true to train from random init")
    warn(f"{key} {path!r} has a config.json but no weights: the model starts from random init "
         "(point at a config.json, or set init_from_scratch: true, to say so)")


def check_checkpoint(c: Any) -> None:
    resume = c.resume
    if isinstance(resume, str) and resume.isdigit():
        resume = int(resume)
    if isinstance(resume, str) and resume not in ("none", "auto"):
        raise UserError(f"checkpoint.resume must be none, auto or a step number, got {resume!r}")
    if isinstance(resume, int) and resume < 0:
        raise UserError(f"checkpoint.resume step must be >= 0, got {resume}")
    if resume != "none" and not c.dir:
        raise UserError(f"checkpoint.resume={resume} needs checkpoint.dir (where the checkpoints are)")
    if c.every_n_steps < 0:
        raise UserError(f"checkpoint.every_n_steps must be >= 0 (0 = only at the end), got {c.every_n_steps}")
    if c.keep_last_n < 0:
        raise UserError(f"checkpoint.keep_last_n must be >= 0 (0 = keep all), got {c.keep_last_n}")
    if c.dir and os.path.isfile(c.dir):
        raise UserError(f"checkpoint.dir {c.dir!r} is a file, not a directory")
    if c.every_n_steps and not c.dir:
        raise UserError("checkpoint.every_n_steps needs checkpoint.dir")
