"""`tree_training_mode: dta`: depth-first tree training with prefix-KV reuse; exact gradients, memory
bounded by one root-to-leaf path instead of the batch.

The trie's blocks (`archon_attn.tree.dta.dta_schedule`) are grouped into *units* of at most ``block_size``
tokens, each one forward: a chain of blocks where each is the only child of the one before (a multi-turn
history whose every turn ends a sequence) is one causal run; sibling chains that end at leaves (a GRPO
group's responses) are packed side by side, each attending to the shared cached path and causally to
itself only. A unit whose last block has children is a single chain; its K/V become the path cache.

How one micro-batch trains (the loss is any function of the token-aligned outputs):

1. Outputs pass: walk the units depth first without grad; each attends to its ancestors' cached K/V.
   This gives every output row (a unique next-token pair, or a tree token for a value head).
2. Upstream gradients: lay the rows out flat as leaf tensors, run `loss_fn` on them and back-propagate
   to get d loss / d row, for every row at once, without touching the model.
3. Gradient walk: depth first again. An internal unit is forwarded with grad and its graph is kept (while
   the path's kept graphs hold at most ``block_size`` tokens; deeper units are forwarded without grad now
   and again with grad when their subtree is done); its K/V per layer are detached into leaf tensors that
   require grad (the path's KV cache). Its children attend to them, so their backward accumulates
   d loss / d (K, V) of this unit into the leaves' `.grad`. When the subtree is done, one
   `torch.autograd.backward([rows, K, V per layer], [d rows, d K, d V])` through the unit's graph pushes
   its share into the parameters and into its ancestors' leaves. Leaf units are forwarded with grad and
   back-propagated at once.

Every parameter thus receives exactly the gradient of training each sequence on its own. Memory: the
K/V (+ grads) of one root-to-leaf path, kept graphs of at most ``block_size`` tokens and one unit's
activations; nothing grows with the batch. A token-separable loss skips pass 1 (see
``_forward_backward_separable``); then every token is forwarded once and back-propagated once, plus one
no-grad forward for internal units beyond the keep budget.

Legend: N: tree tokens, B: blocks, U: units, R: output rows, T: flat tokens, Q: a unit's tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from archon_attn.tree import PackedTree
from archon_attn.tree.dta import DtaSchedule, dta_schedule, prefix_attention

from archon.engine.batch import PackedBatch
from archon.models.common.head import LogprobRequest
from archon.tree.common import TreeRows, TreeRunner, tree_rows
from archon.tree.fsdp_hold import hold_unsharded


@dataclass
class _CacheEntry:
    """An internal unit on the current root-to-leaf path: its post-RoPE K/V per attention module (leaves
    that collect the children's gradients) and, in the gradient walk, its kept graph."""

    unit: int
    kv: dict[Any, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    kept: tuple[list[torch.Tensor], list[torch.Tensor], dict[Any, tuple[torch.Tensor, torch.Tensor]]] | None = None
    """(outputs, their upstream grads, K/V per attention module with grad history) for the deferred backward."""


class _PrefixKVHook:
    """`kv_hook` for one unit forward: attend to the path's cached K/V, record this unit's K/V.

    Recording stops after the forward, so an activation-checkpoint recompute in backward (which calls
    the hook again) reads the same cache and leaves the recorded K/V alone. Not traceable: a compiled block
    breaks its graph around the call (the path and segments change every unit).
    """

    traceable = False

    def __init__(self, path: tuple[_CacheEntry, ...], seg_lens: list[int]) -> None:
        self.path = path
        self.seg_lens = seg_lens
        self.new_kv: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}
        self.recording = True

    def __call__(self, attn, q_QHD: torch.Tensor, k_QGD: torch.Tensor, v_QGD: torch.Tensor) -> torch.Tensor:
        k_cache = v_cache = None
        if self.path:
            ks, vs = zip(*(e.kv[attn] for e in self.path))
            k_cache, v_cache = (ks[0], vs[0]) if len(ks) == 1 else (torch.cat(ks), torch.cat(vs))
        if self.recording:
            self.new_kv[attn] = (k_QGD, v_QGD)
        return prefix_attention(q_QHD, k_QGD, v_QGD, k_cache, v_cache, scale=attn.scale, seg_lens=self.seg_lens)


@dataclass(frozen=True)
class _Unit:
    """Blocks forwarded together: one chain of blocks (each the only child of the one before) that ends at a
    block with children, or a run of sibling chains that each end at a leaf."""

    start: int
    """First tree token (a unit's blocks are one contiguous run of tree tokens)."""
    seg_lens: list[int]
    """Tokens of each chain (causal inside, chains never see each other)."""
    parent: int
    """Parent unit, -1 for roots."""
    internal: bool
    rows: torch.Tensor
    """Output rows produced by the unit's tokens (may be empty)."""

    @property
    def length(self) -> int:
        return sum(self.seg_lens)


def _units(sched: DtaSchedule, rows_B: list[torch.Tensor], budget: int) -> list[_Unit]:
    """Group blocks into units in DFS order under ``budget`` tokens per unit (0: no cap).

    A block joins the chain of the block before it when it is that block's only child (multi-turn histories,
    a long node cut into blocks); chains that end at a leaf and share a parent are packed side by side (a GRPO
    group's responses). A unit that ends at a block with children is a single chain (its K/V become the cache).
    """
    start_B, length_B, parent_B = sched.start_B.tolist(), sched.length_B.tolist(), sched.parent_B.tolist()
    nchild_B = torch.bincount(sched.parent_B[sched.parent_B >= 0], minlength=sched.num_blocks).tolist()

    def fits(n: int, extra: int) -> bool:
        return budget <= 0 or n + extra <= budget

    chains: list[list[int]] = []  # DFS order; a chain's blocks are consecutive blocks
    chain_len: list[int] = []  # running token counts: linear in the number of blocks
    for b in range(len(start_B)):
        prev = chains[-1] if chains else None
        if (prev is not None and parent_B[b] == prev[-1] and nchild_B[prev[-1]] == 1
                and fits(chain_len[-1], length_B[b])):
            prev.append(b)
            chain_len[-1] += length_B[b]
        else:
            chains.append([b])
            chain_len.append(length_B[b])
    groups: list[list[list[int]]] = []
    group_len: list[int] = []
    for c, n in zip(chains, chain_len):
        last = groups[-1] if groups else None
        if (last is not None and nchild_B[c[-1]] == 0 and nchild_B[last[-1][-1]] == 0
                and parent_B[last[-1][0]] == parent_B[c[0]] and fits(group_len[-1], n)):
            last.append(c)
            group_len[-1] += n
        else:
            groups.append([c])
            group_len.append(n)
    unit_of_B = [0] * len(start_B)
    for u, g in enumerate(groups):
        for ch in g:
            for b in ch:
                unit_of_B[b] = u
    units = []
    for g in groups:
        first, blocks = g[0][0], [b for ch in g for b in ch]
        assert all(start_B[x] + length_B[x] == start_B[y] for x, y in zip(blocks, blocks[1:])), "contiguous unit"
        units.append(_Unit(start_B[first], [sum(length_B[b] for b in ch) for ch in g],
                           unit_of_B[parent_B[first]] if parent_B[first] >= 0 else -1, nchild_B[g[-1][-1]] > 0,
                           torch.cat([rows_B[b] for b in blocks])))
    return units


_RowGrads = Callable[[int, dict[str, torch.Tensor]], dict[str, "torch.Tensor | None"]]
"""(unit, its outputs) -> d loss / d output per output name (None: no gradient, skip it)."""


@dataclass(frozen=True)
class _Plan:
    tree: PackedTree
    rows: TreeRows
    units: list[_Unit]


class DtaTreeRunner(TreeRunner):
    """Depth-first tree training (see the module docstring); works under FSDP2 and activation checkpointing."""

    def __init__(self, model: torch.nn.Module, *, block_size: int = 8192, cache_dtype: torch.dtype = torch.bfloat16,
                 **kw) -> None:
        super().__init__(model, **kw)
        self.cache_dtype = cache_dtype
        if block_size < 0:
            raise ValueError(f"tree_dta_block_size must be >= 0 (0 = do not split trie nodes), got {block_size}")
        self.block_size = block_size

    # -- planning ---------------------------------------------------------------------------------
    def _plan(self, mb: PackedBatch) -> _Plan:
        tree = self.build_tree(mb)
        self._check_cache_fits(tree)
        rows = tree_rows(tree, self.head)
        sched = dta_schedule(tree, self.block_size)
        order_R = torch.argsort(rows.tree_index_R, stable=True)
        sorted_R = rows.tree_index_R[order_R]
        lo = torch.searchsorted(sorted_R, sched.start_B).tolist()
        hi = torch.searchsorted(sorted_R, sched.start_B + sched.length_B).tolist()
        rows_B = [order_R[a:b] for a, b in zip(lo, hi)]
        return _Plan(tree, rows, _units(sched, rows_B, self.block_size))

    def _check_cache_fits(self, tree: PackedTree) -> None:
        """Fail with a clear message before walking when one path's K/V cache cannot fit on the GPU."""
        if self.device.type != "cuda":
            return
        args = self.model.args
        path = int(tree.depth_N.max()) + 1
        elem = torch.finfo(self.cache_dtype).bits // 8
        need = path * args.n_layers * 2 * args.n_kv_heads * args.head_dim * elem * 2  # K, V and their grads
        free, _ = torch.cuda.mem_get_info(self.device)
        if need > free:
            raise ValueError(f"dta: the longest root-to-leaf path has {path} tokens; its K/V cache needs "
                             f"{need / 2**30:.1f} GiB but {free / 2**30:.1f} GiB is free; shorten the "
                             "sequences or use tree_training_mode=sparse with a smaller mb_max_tokens")

    # -- one unit ---------------------------------------------------------------------------------
    def _forward(self, plan: _Plan, u: int, path: list[_CacheEntry], want_entropy: bool, keep_last: bool = False
                 ) -> tuple[dict[str, torch.Tensor], _PrefixKVHook]:
        """One unit's outputs, attending to the cached path. `keep_last`: its backward follows directly, so the
        LM head keeps its last chunk's logits instead of recomputing them."""
        unit = plan.units[u]
        s, n = unit.start, unit.length
        tok_Q, pos_Q = plan.tree.tokens_N[s:s + n], plan.tree.depth_N[s:s + n]
        hook = _PrefixKVHook(tuple(path), unit.seg_lens)
        cu = torch.tensor([0, n], dtype=torch.int32)  # on the host: the meta is built there, copied non-blocking
        rows_u = unit.rows
        with self.autocast():
            if self.head == "value":
                v_Q = self.model(tok_Q, position_ids=pos_Q, cu_seqlens=cu, kv_hook=hook).float().reshape(-1)
                outs = {"values": v_Q[plan.rows.tree_index_R[rows_u] - s]}
            else:
                if rows_u.numel() == 0:  # the head still runs (one dummy row) so every FSDP unit takes part
                    idx = lab = torch.zeros(1, dtype=torch.int64, device=self.device)
                else:
                    labels = plan.rows.label_R
                    assert labels is not None  # an LM head's rows carry their labels
                    idx, lab = plan.rows.tree_index_R[rows_u] - s, labels[rows_u]
                lp, ent = self.model(tok_Q, position_ids=pos_Q, cu_seqlens=cu, kv_hook=hook, logprobs=LogprobRequest(
                    lab, rows=idx, want_entropy=want_entropy, chunk_size=self.chunk, keep_last_logits=keep_last))
                outs = {"logprobs": lp, "entropy": ent} if want_entropy else {"logprobs": lp}
        hook.recording = False
        return outs, hook

    # -- walks ------------------------------------------------------------------------------------
    def _record_rows(self, out_R: dict[str, torch.Tensor], plan: _Plan, rows: torch.Tensor,
                     outs: dict[str, torch.Tensor]) -> None:
        """Write a unit's outputs (detached, fp32) into the per-row results, creating them on first use."""
        for k, v in outs.items():
            if k not in out_R:
                out_R[k] = torch.zeros(plan.rows.num_rows, dtype=torch.float32, device=self.device)
            if rows.numel():
                out_R[k][rows] = v.detach().float()

    @torch.no_grad()
    def _walk_outputs(self, plan: _Plan, want_entropy: bool) -> dict[str, torch.Tensor]:
        """Pass 1: every output row, depth first with the path's K/V cached (no grad)."""
        out_R: dict[str, torch.Tensor] = {}
        path: list[_CacheEntry] = []
        for u, unit in enumerate(plan.units):
            while path and path[-1].unit != unit.parent:
                path.pop()
            outs, hook = self._forward(plan, u, path, want_entropy)
            self._record_rows(out_R, plan, unit.rows, outs)
            if unit.internal:
                path.append(_CacheEntry(u, hook.new_kv))
        return out_R

    def _walk_grads(self, plan: _Plan, row_grads: _RowGrads, want_entropy: bool, aux_scale: float,
                    before_last_backward: Callable[[], None]) -> None:
        """Pass 3: accumulate parameter gradients, injecting d rows (from ``row_grads``, given the unit's
        outputs) and the children's d (K, V)."""
        num_units, done = len(plan.units), 0

        def forward(u: int, path: list[_CacheEntry], keep_last: bool
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor], _PrefixKVHook]:
            outs, hook = self._forward(plan, u, path, want_entropy, keep_last)
            tensors, grads = [], []
            for k, g in row_grads(u, outs).items():
                if g is not None:
                    tensors.append(outs[k])
                    grads.append(g.to(outs[k].dtype))
            aux = self.model.moe_aux_loss() if hasattr(self.model, "moe_aux_loss") else None
            if aux is not None and aux.requires_grad:  # routed tokens of this unit, as a share of the tree's
                tensors.append(aux)
                grads.append(torch.full_like(aux, aux_scale * plan.units[u].length / plan.tree.num_tree_tokens))
            return tensors, grads, hook

        def backward(tensors: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
            nonlocal done
            done += 1
            if done == num_units:
                before_last_backward()
            torch.autograd.backward(tensors, grads)

        kept_tokens = 0  # tokens of the kept graphs on the path

        def finish(entry: _CacheEntry, ancestors: list[_CacheEntry]) -> None:
            nonlocal kept_tokens
            if entry.kept is None:  # over the keep budget: forward again with grad, attending to the ancestors
                tensors, grads, hook = forward(entry.unit, ancestors, keep_last=True)
                kv = hook.new_kv
            else:
                tensors, grads, kv = entry.kept
                entry.kept = None
                kept_tokens -= plan.units[entry.unit].length
            for attn, (k_QGD, v_QGD) in kv.items():
                for x, leaf in zip((k_QGD, v_QGD), entry.kv[attn]):
                    if leaf.grad is not None:
                        tensors.append(x)
                        grads.append(leaf.grad.to(x.dtype))
            backward(tensors, grads)

        path: list[_CacheEntry] = []
        for u, unit in enumerate(plan.units):
            while path and path[-1].unit != unit.parent:
                finish(path.pop(), path)
            if not unit.internal:
                backward(*forward(u, path, keep_last=True)[:2])
                continue
            # Keep the graph while the path's kept graphs stay within the block budget (activations of at most
            # about two budgets: the kept path and the current unit); deeper, recompute it when the subtree is done.
            keep = self.block_size <= 0 or kept_tokens + unit.length <= self.block_size
            if keep:
                tensors, grads, hook = forward(u, path, keep_last=False)  # backward after the subtree
                kept_tokens += unit.length
            else:
                with torch.no_grad():
                    _, hook = self._forward(plan, u, path, want_entropy=False)
            leaves = {a: (k.detach().requires_grad_(), v.detach().requires_grad_()) for a, (k, v) in hook.new_kv.items()}
            path.append(_CacheEntry(u, leaves, (tensors, grads, hook.new_kv) if keep else None))
        while path:
            finish(path.pop(), path)

    # -- Runner interface -------------------------------------------------------------------------
    def forward(self, mb: PackedBatch, want_entropy: bool) -> dict[str, torch.Tensor]:
        plan = self._plan(mb)
        with hold_unsharded(self.model):
            out_R = self._walk_outputs(plan, want_entropy)
        return {k: plan.rows.to_flat(v) for k, v in out_R.items()}

    def forward_backward(self, mb: PackedBatch, loss_fn, scale: float, aux_scale: float, want_entropy: bool = True
                         ) -> tuple[torch.Tensor, dict[str, Any]]:
        plan = self._plan(mb)
        self.count(plan.tree, scale)
        mb = mb.to(self.device)  # one non-blocking copy: the loss's .to(device) calls are no-ops
        if getattr(loss_fn, "token_separable", False):
            return self._forward_backward_separable(plan, mb, loss_fn, scale, aux_scale, want_entropy)
        with hold_unsharded(self.model) as fsdp:
            out_R = self._walk_outputs(plan, want_entropy)
            leaf_R = {k: v.detach().requires_grad_() for k, v in out_R.items()}
            res = loss_fn({k: plan.rows.to_flat(v) for k, v in leaf_R.items()}, mb)
            loss, stats = res if isinstance(res, tuple) else (res, {})
            if loss.requires_grad:
                (loss * scale).backward()
            grad_R = {k: v.grad if v.grad is not None else torch.zeros_like(v) for k, v in leaf_R.items()
                      if k != "entropy" or (v.grad is not None and bool(v.grad.any()))}

            def row_grads(u: int, outs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
                rows_u = plan.units[u].rows
                return {k: grad_R[k][rows_u] if rows_u.numel() else torch.zeros_like(outs[k]) for k in grad_R}

            self._walk_grads(plan, row_grads, "entropy" in grad_R, aux_scale, fsdp.before_last_backward)
        return loss.detach(), stats

    def _forward_backward_separable(self, plan: _Plan, mb: PackedBatch, loss_fn, scale: float, aux_scale: float,
                                    want_entropy: bool) -> tuple[torch.Tensor, dict[str, Any]]:
        """One walk, no outputs pass: ``loss_fn.token_separable`` promises that d loss / d output of a token
        depends on that token's output only, so each unit's row gradients come from ``loss_fn`` evaluated with
        the unit's rows live (the other rows are held at 0 and get no gradient). The loss value and stats come
        from one last ``loss_fn`` call on all rows."""
        out_R: dict[str, torch.Tensor] = {}

        def row_grads(u: int, outs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
            rows_u = plan.units[u].rows
            self._record_rows(out_R, plan, rows_u, outs)

            def zeros() -> dict[str, torch.Tensor]:
                return {k: torch.zeros_like(out) for k, out in outs.items() if k != "entropy"}

            if rows_u.numel() == 0:  # the dummy row of a unit without outputs: back-propagate zeros
                return zeros()
            live = {}
            for k in outs:
                x = torch.zeros_like(out_R[k])
                x[rows_u] = out_R[k][rows_u]
                live[k] = x.requires_grad_()
            with torch.enable_grad():
                res = loss_fn({k: plan.rows.to_flat(x) for k, x in live.items()}, mb)
                loss = res[0] if isinstance(res, tuple) else res
                if not loss.requires_grad:
                    return zeros()
                g = torch.autograd.grad(loss * scale, list(live.values()), allow_unused=True)
            return {k: None if gk is None else gk[rows_u] for k, gk in zip(live, g)}

        with hold_unsharded(self.model) as fsdp:
            self._walk_grads(plan, row_grads, want_entropy, aux_scale, fsdp.before_last_backward)
        with torch.no_grad():
            res = loss_fn({k: plan.rows.to_flat(v) for k, v in out_R.items()}, mb)
        loss, stats = res if isinstance(res, tuple) else (res, {})
        return loss.detach(), stats
