"""Per-block ``torch.compile``: each decoder block is compiled on its own (fullgraph, static shapes).

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
    dynamic: bool = False
    """Static shapes; pad micro-batches to fixed token budgets to avoid recompiles."""


def apply_compile(model: nn.Module, plan: ParallelPlan, config: CompileConfig | bool | None = None) -> None:
    """Compile every block of ``model`` in place (``nn.Module.compile`` keeps parameter names)."""
    if isinstance(config, bool):
        config = CompileConfig(enabled=config)
    if config is None or not config.enabled:
        return
    for _, block in plan.block_list(model):
        block.compile(backend=config.backend, fullgraph=config.fullgraph, dynamic=config.dynamic)
