"""Tree training in the engine: runners for `tree_training_mode: sparse | dta` and tree-aware DP balance."""

from __future__ import annotations

from archon.tree.balance import balance_for_tree, tree_balance, tree_cost_model
from archon.tree.common import TreeRows, TreeRunner, tree_rows
from archon.tree.dta_runner import DtaTreeRunner
from archon.tree.fsdp_hold import hold_unsharded
from archon.tree.sparse_runner import SparseTreeRunner

__all__ = [
    "DtaTreeRunner",
    "SparseTreeRunner",
    "TreeRows",
    "TreeRunner",
    "balance_for_tree",
    "hold_unsharded",
    "make_tree_runner",
    "tree_balance",
    "tree_cost_model",
    "tree_rows",
]


def make_tree_runner(mode: str, cfg, model, **kw) -> TreeRunner:
    """The runner of a tree training mode ("sparse" or "dta") for an engine config."""
    chunk = cfg.archon.logprob_chunk_size
    if mode == "sparse":
        return SparseTreeRunner(model, logprob_chunk_size=chunk, **kw)
    if mode == "dta":
        import torch

        dtype = torch.float32 if cfg.dtype in ("float32", "fp32") else torch.bfloat16
        return DtaTreeRunner(model, block_size=cfg.archon.tree_dta_block_size, cache_dtype=dtype,
                             logprob_chunk_size=chunk, **kw)
    raise ValueError(f"tree_training_mode {mode!r} is not one of ('disabled', 'sparse', 'dta')")
