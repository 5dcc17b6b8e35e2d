"""``torch.compile`` of the decoder blocks, at one of two scopes.

- ``block`` (per block, fullgraph): FSDP2's per-block hooks stay outside the graphs, and one compiled graph
  serves every identical block. Each call pays dynamo's guards and the AOT wrapper, about a millisecond of
  host time per block, which a small micro-batch on a fast GPU does not hide.
- ``stack``: the model's layer-stack method (``ParallelPlan.layer_stack``) is compiled as one graph of every
  block, so that host cost is paid once per forward and once per backward, and inductor fuses across block
  boundaries. Needs a model that no FSDP2 unit splits (``parallelize`` checks), such as one GPU or full
  data-parallel replicas.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .plan import ParallelPlan

__all__ = ["COMPILE_SCOPES", "CompileConfig", "apply_compile", "compile_kwargs"]

COMPILE_SCOPES = ("block", "stack")


@dataclass
class CompileConfig:
    """torch.compile settings for the per-block compile."""

    enabled: bool = False
    """Compile each block."""
    backend: str = "inductor"
    """torch.compile backend ('inductor'; 'aot_eager' for debugging / CPU tests)."""
    fullgraph: bool = True
    """Fail on graph breaks instead of silently splitting the block."""
    mode: str | None = None
    """torch.compile's ``mode`` (None = default; "reduce-overhead" replays CUDA graphs, "max-autotune-no-cudagraphs"
    autotunes kernels)."""
    scope: str = "block"
    """What one graph covers: ``block`` (each decoder block) or ``stack`` (all blocks; see the module doc)."""
    cpp_wrapper: bool = False
    """Inductor's C++ wrapper: the code that launches a graph's kernels is compiled C++ instead of Python, which
    cuts the host cost of every compiled call (a small model whose GPU waits for launches gains most). Longer
    first compile; inductor only."""
    dynamic: bool | None = None
    """torch.compile's ``dynamic``. None (automatic dynamic): the first shape compiles static, a dim that
    later changes is made dynamic (one recompile, not one per shape). False: static shapes, right only when
    every micro-batch is padded to the same token count (otherwise each new shape recompiles until dynamo's
    recompile limit)."""


def compile_kwargs(config: CompileConfig) -> dict:
    """``torch.compile`` keyword arguments for ``config``. torch.compile takes a mode or an options dict, not
    both: with ``cpp_wrapper`` the mode's own options (``torch._inductor.list_mode_options``) are merged in."""
    kw = dict(backend=config.backend, fullgraph=config.fullgraph, dynamic=config.dynamic)
    if not config.cpp_wrapper:
        return {**kw, "mode": config.mode}
    if config.backend != "inductor":
        raise ValueError(f"compile cpp_wrapper is an inductor option; the backend is {config.backend!r}")
    from torch._inductor import list_mode_options

    return {**kw, "options": {**list_mode_options(config.mode or "default"), "cpp_wrapper": True}}


def apply_compile(model: nn.Module, plan: ParallelPlan, config: CompileConfig | bool | None = None) -> None:
    """Compile every block of ``model`` in place (``nn.Module.compile`` keeps parameter names)."""
    if isinstance(config, bool):
        config = CompileConfig(enabled=config)
    if config is None or not config.enabled:
        return
    if config.scope not in COMPILE_SCOPES:
        raise ValueError(f"compile scope must be one of {COMPILE_SCOPES}, got {config.scope!r}")
    if config.scope == "stack":
        if plan.layer_stack is None or not callable(getattr(model, plan.layer_stack, None)):
            raise ValueError(f"compile scope 'stack' needs the model's layer-stack method (ParallelPlan.layer_stack "
                             f"= {plan.layer_stack!r} is not a method of {type(model).__name__}); use scope 'block'")
        run = getattr(model, plan.layer_stack)
        # An instance attribute shadows the method: parameters keep their names, the class method stays eager.
        setattr(model, plan.layer_stack, torch.compile(run, **compile_kwargs(config)))
        return
    for _, block in plan.block_list(model):
        block.compile(**compile_kwargs(config))
