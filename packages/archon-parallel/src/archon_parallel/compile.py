"""Per-block ``torch.compile``: each decoder block is compiled on its own (fullgraph).

Compiling blocks rather than the whole model keeps FSDP2's per-block hooks outside the graphs and
reuses one compiled graph for all identical blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .plan import ParallelPlan

__all__ = ["CompileConfig", "apply_compile"]


@dataclass
class CompileConfig:
    """torch.compile settings for the per-block compile."""

    enabled: bool = False
    """Compile each block."""
    backend: str = "inductor"
    """torch.compile backend ('inductor'; 'aot_eager' for debugging / CPU tests)."""
    fullgraph: bool = True
    """Fail on graph breaks instead of silently splitting the block."""
    dynamic: bool | None = None
    """torch.compile's ``dynamic``. None (automatic dynamic): the first shape compiles static, a dim that
    later changes is made dynamic (one recompile, not one per shape). False: static shapes, right only when
    every micro-batch is padded to the same token count (otherwise each new shape recompiles until dynamo's
    recompile limit)."""


def apply_compile(model: nn.Module, plan: ParallelPlan, config: CompileConfig | bool | None = None) -> None:
    """Compile every block of ``model`` in place (``nn.Module.compile`` keeps parameter names)."""
    if isinstance(config, bool):
        config = CompileConfig(enabled=config)
    if config is None or not config.enabled:
        return
    for _, block in plan.block_list(model):
        block.compile(backend=config.backend, fullgraph=config.fullgraph, dynamic=config.dynamic)
