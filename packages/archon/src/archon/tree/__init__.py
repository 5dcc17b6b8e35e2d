"""Tree training in the engine: runners for `tree_training_mode: sparse | dta` and tree-aware DP balance."""

from __future__ import annotations

from archon.engine.setup import EngineSetup
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


def make_tree_runner(setup: EngineSetup, model, **kw) -> TreeRunner:
    """The runner of `setup`'s tree training mode ("sparse" or "dta"); `kw` as for every `Runner`."""
    a = setup.cfg.archon
    if a.tree_training_mode == "sparse":
        return SparseTreeRunner(model, **kw)
    if a.tree_training_mode == "dta":
        return DtaTreeRunner(model, block_size=a.tree_dta_block_size, cache_dtype=setup.dtype, **kw)
    raise ValueError(f"tree_training_mode {a.tree_training_mode!r} is not one of ('disabled', 'sparse', 'dta')")
