"""`tree_training_mode: dta`: depth-first tree training with prefix-KV reuse; exact gradients, memory
bounded by one root-to-leaf path instead of the batch.

How one micro-batch trains (the loss is any function of the token-aligned outputs):

1. Outputs pass: walk the trie's blocks (`archon_attn.tree.dta.dta_schedule`) depth first without grad;
   each block attends to its ancestors' cached K/V. This gives every output row (a unique next-token
   pair, or a tree token for a value head).
2. Upstream gradients: lay the rows out flat as leaf tensors, run `loss_fn` on them and back-propagate
   to get d loss / d row, for every row at once, without touching the model.
3. Gradient walk: depth first again. A block with children is forwarded without grad and its K/V per
   layer become leaf tensors that require grad (the path's KV cache). Its children attend to them, so
   their backward accumulates d loss / d (K, V) of this block into the leaves' `.grad`. When the subtree
   is done, the block is forwarded again with grad (attending to its ancestors' leaves) and one
   `torch.autograd.backward([rows, K, V per layer], [d rows, d K, d V])` pushes its share into the
   parameters and into its ancestors' leaves. Leaf blocks are forwarded with grad once.

Every parameter thus receives exactly the gradient of training each sequence on its own. Memory: the
K/V (+ grads) of one root-to-leaf path plus the activations of one block (`tree_dta_block_size`
tokens); nothing grows with the batch. Internal blocks are forwarded one extra time (recompute).

Legend: N: tree tokens, B: blocks, R: output rows, T: flat tokens, Q: a block's tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from archon_attn.tree import PackedTree
from archon_attn.tree.dta import DtaSchedule, dta_schedule, prefix_attention

from archon.engine.batch import PackedBatch
from archon.tree.common import TreeRows, TreeRunner, tree_rows
from archon.tree.fsdp_hold import hold_unsharded


@dataclass
class _CacheEntry:
    """A block on the current root-to-leaf path: its post-RoPE K/V per attention module."""

    block: int
    kv: dict[Any, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class _PrefixKVHook:
    """`kv_hook` for one block forward: attend to the path's cached K/V, record this block's K/V.

    Recording stops after the forward, so an activation-checkpoint recompute in backward (which calls
    the hook again) reads the same cache and leaves the recorded K/V alone.
    """

    def __init__(self, path: tuple[_CacheEntry, ...]) -> None:
        self.path = path
        self.new_kv: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}
        self.recording = True

    def __call__(self, attn, q_QHD: torch.Tensor, k_QGD: torch.Tensor, v_QGD: torch.Tensor) -> torch.Tensor:
        k_cache = v_cache = None
        if self.path:
            ks, vs = zip(*(e.kv[attn] for e in self.path))
            k_cache, v_cache = (ks[0], vs[0]) if len(ks) == 1 else (torch.cat(ks), torch.cat(vs))
        if self.recording:
            self.new_kv[attn] = (k_QGD, v_QGD)
        return prefix_attention(q_QHD, k_QGD, v_QGD, k_cache, v_cache, scale=attn.scale)


@dataclass(frozen=True)
class _Plan:
    tree: PackedTree
    rows: TreeRows
    sched: DtaSchedule
    start_B: list[int]
    length_B: list[int]
    parent_B: list[int]
    has_children_B: list[bool]
    rows_B: list[torch.Tensor]
    """Output rows produced by each block's tokens (may be empty)."""


class DtaTreeRunner(TreeRunner):
    """Depth-first tree training (see the module docstring); works under FSDP2 and activation checkpointing."""

    def __init__(self, model: torch.nn.Module, *, block_size: int = 2048, cache_dtype: torch.dtype = torch.bfloat16,
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
        return _Plan(tree, rows, sched, sched.start_B.tolist(), sched.length_B.tolist(), sched.parent_B.tolist(),
                     sched.has_children_B.tolist(), [order_R[a:b] for a, b in zip(lo, hi)])

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

    # -- one block --------------------------------------------------------------------------------
    def _block(self, plan: _Plan, b: int, path: list[_CacheEntry], want_entropy: bool
               ) -> tuple[dict[str, torch.Tensor], _PrefixKVHook]:
        s, n = plan.start_B[b], plan.length_B[b]
        tok_Q, pos_Q = plan.tree.tokens_N[s:s + n], plan.tree.depth_N[s:s + n]
        hook = _PrefixKVHook(tuple(path))
        cu = torch.tensor([0, n], dtype=torch.int32)  # on the host: the meta is built there, copied non-blocking
        rows_b = plan.rows_B[b]
        with self.autocast():
            if self.head == "value":
                v_Q = self.model(tok_Q, position_ids=pos_Q, cu_seqlens=cu, kv_hook=hook).float().reshape(-1)
                outs = {"values": v_Q[plan.rows.tree_index_R[rows_b] - s]}
            else:
                if rows_b.numel() == 0:  # the head still runs (one dummy row) so every FSDP unit takes part
                    idx = lab = torch.zeros(1, dtype=torch.int64, device=self.device)
                else:
                    idx, lab = plan.rows.tree_index_R[rows_b] - s, plan.rows.label_R[rows_b]
                lp, ent = self.model(tok_Q, position_ids=pos_Q, cu_seqlens=cu, kv_hook=hook, labels=lab,
                                     label_rows=idx, want_entropy=want_entropy, logprob_chunk_size=self.chunk)
                outs = {"logprobs": lp, "entropy": ent} if want_entropy else {"logprobs": lp}
        hook.recording = False
        return outs, hook

    # -- walks ------------------------------------------------------------------------------------
    @torch.no_grad()
    def _walk_outputs(self, plan: _Plan, want_entropy: bool) -> dict[str, torch.Tensor]:
        """Pass 1: every output row, depth first with the path's K/V cached (no grad)."""
        out_R: dict[str, torch.Tensor] = {}
        path: list[_CacheEntry] = []
        for b in range(plan.sched.num_blocks):
            while path and path[-1].block != plan.parent_B[b]:
                path.pop()
            outs, hook = self._block(plan, b, path, want_entropy)
            rows_b = plan.rows_B[b]
            for k, v in outs.items():
                if k not in out_R:
                    out_R[k] = torch.zeros(plan.rows.num_rows, dtype=torch.float32, device=self.device)
                if rows_b.numel():
                    out_R[k][rows_b] = v.float()
            if plan.has_children_B[b]:
                path.append(_CacheEntry(b, hook.new_kv))
        return out_R

    def _walk_grads(self, plan: _Plan, grad_R: dict[str, torch.Tensor], aux_scale: float,
                    before_last_backward: Callable[[], None]) -> None:
        """Pass 3: accumulate parameter gradients, injecting d rows and the children's d (K, V)."""
        want_entropy = "entropy" in grad_R
        num_blocks, done = plan.sched.num_blocks, 0

        def train_block(b: int, path: list[_CacheEntry], own: _CacheEntry | None) -> None:
            nonlocal done
            outs, hook = self._block(plan, b, path, want_entropy)
            rows_b = plan.rows_B[b]
            tensors, grads = [], []
            for k, out in outs.items():
                g = grad_R[k][rows_b] if rows_b.numel() else torch.zeros_like(out)
                tensors.append(out)
                grads.append(g.to(out.dtype))
            if own is not None:
                for attn, (k_QGD, v_QGD) in hook.new_kv.items():
                    for x, leaf in zip((k_QGD, v_QGD), own.kv[attn]):
                        if leaf.grad is not None:
                            tensors.append(x)
                            grads.append(leaf.grad.to(x.dtype))
            aux = self.model.moe_aux_loss() if hasattr(self.model, "moe_aux_loss") else None
            if aux is not None:  # routed tokens of this block, as a share of the tree's
                tensors.append(aux)
                grads.append(torch.full_like(aux, aux_scale * plan.length_B[b] / plan.tree.num_tree_tokens))
            done += 1
            if done == num_blocks:
                before_last_backward()
            torch.autograd.backward(tensors, grads)

        path: list[_CacheEntry] = []
        for b in range(num_blocks):
            while path and path[-1].block != plan.parent_B[b]:
                own = path.pop()
                train_block(own.block, path, own)
            if plan.has_children_B[b]:
                with torch.no_grad():
                    _, hook = self._block(plan, b, path, want_entropy=False)
                leaves = {a: (k.detach().requires_grad_(), v.detach().requires_grad_())
                          for a, (k, v) in hook.new_kv.items()}
                path.append(_CacheEntry(b, leaves))
            else:
                train_block(b, path, None)
        while path:
            own = path.pop()
            train_block(own.block, path, own)

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
        with hold_unsharded(self.model) as fsdp:
            out_R = self._walk_outputs(plan, want_entropy)
            leaf_R = {k: v.detach().requires_grad_() for k, v in out_R.items()}
            res = loss_fn({k: plan.rows.to_flat(v) for k, v in leaf_R.items()}, mb)
            loss, stats = res if isinstance(res, tuple) else (res, {})
            if loss.requires_grad:
                (loss * scale).backward()
            grad_R = {k: v.grad if v.grad is not None else torch.zeros_like(v) for k, v in leaf_R.items()
                      if k != "entropy" or (v.grad is not None and bool(v.grad.any()))}
            self._walk_grads(plan, grad_R, aux_scale, fsdp.before_last_backward)
        return loss.detach(), stats
