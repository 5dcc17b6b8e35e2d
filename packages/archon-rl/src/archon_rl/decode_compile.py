"""The model part of a decode step compiled by ``torch.compile`` with static shapes, one graph per bucket.

Captured as a CUDA graph, an eager decode step still launches every RMSNorm, RoPE, cast and residual add as
its own small kernel; inductor fuses them (and the K/V write, mask and softmax around the attention matmuls)
into a few kernels per layer. The engine captures the compiled step in its own CUDA graph, so the compile mode
must not use CUDA graphs itself ("default" or "max-autotune-no-cudagraphs"; "reduce-overhead" is refused).

The parameters stay graph inputs: inductor's ``freezing`` (which would fold them into constants) is forced
off, so weights updated in place (``param.copy_``) are read by the next replay. Compilation failure is not
fatal: the step falls back to the eager forward for good, with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch

__all__ = ["COMPILE_MODES", "CompiledForward", "compile_options"]

COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
# every (rows, kv_len, top-k/top-p) bucket is one static-shape graph of the same code object
_MAX_BUCKET_GRAPHS = 512


def compile_options(mode: str) -> dict:
    """Inductor options of ``mode`` with freezing and inductor's own CUDA graphs off."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"rollout engine compile_mode must be one of {COMPILE_MODES}, got {mode!r} (the engine "
                         "captures CUDA graphs itself)")
    try:
        from torch._inductor import list_mode_options

        base = dict(list_mode_options(mode))
    except (ImportError, AttributeError):  # private helper; the named options below are what matters
        base = {"max_autotune": True} if mode == "max-autotune-no-cudagraphs" else {}
    return {**base, "freezing": False, "triton.cudagraphs": False}


def _recompile_limit(n: int) -> AbstractContextManager:
    """Allow ``n`` graphs per code object (dynamo's default 8 would send later buckets back to eager)."""
    try:
        import torch._dynamo.config as dynamo_config

        name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
        return dynamo_config.patch(**{name: max(n, getattr(dynamo_config, name))})
    except (ImportError, AttributeError):
        return nullcontext()


def _decode_forward(step_fn: Callable, cache, tok_B: torch.Tensor, pos_B: torch.Tensor, kv_len: int,
                    cascade=None) -> torch.Tensor:
    return step_fn(tok_B, pos_B, cache.decode_hook(pos_B, kv_len, cascade), None)


class CompiledForward:
    """``(step_fn, cache, tok_B, pos_B, kv_len) -> logits``: the decode forward compiled with ``fullgraph=True,
    dynamic=False``. A step function may offer ``step_fn.traceable``, the same forward without anything dynamo
    cannot trace (``set_stance`` guards against compiled training blocks)."""

    def __init__(self, mode: str = "default", backend: str = "inductor") -> None:
        kw = dict(options=compile_options(mode)) if backend == "inductor" else {}
        self.compiled = torch.compile(_decode_forward, fullgraph=True, dynamic=False, backend=backend, **kw)
        self.failed = False

    def __call__(self, step_fn: Callable, cache, tok_B: torch.Tensor, pos_B: torch.Tensor, kv_len: int,
                 cascade=None) -> torch.Tensor:
        fn = getattr(step_fn, "traceable", step_fn)
        if not self.failed:
            try:
                with _recompile_limit(_MAX_BUCKET_GRAPHS):
                    return self.compiled(fn, cache, tok_B, pos_B, kv_len, cascade)
            except Exception as ex:  # noqa: BLE001 - any compiler failure: the eager forward is exact
                if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                    raise
                warnings.warn(f"rollout engine: compiling the decode step failed ({ex!r:.300}); decoding with the "
                              "eager forward", stacklevel=2)
                self.failed = True
        return _decode_forward(step_fn, cache, tok_B, pos_B, kv_len, cascade)
