"""Per-slot decode state on the device, and the decode step that advances it.

The step reads and writes only these fixed buffers (and the KV cache), so a CUDA graph captured for rows
``[0, B)`` replays it with no host work. Row b uses slot b; the scheduler keeps running rows in a prefix.

State of a running row: ``tok`` is its last sampled token (not yet fed to the model), at position ``pos``;
``ngen`` tokens are generated, stored in ``out_tok[b, :ngen]`` / ``out_lp[b, :ngen]``. A ``done`` row is
masked: it stays in a padded bucket until the scheduler reads it back, writing to the trash column.

N: slots, B: rows of one step, L: output columns (slot length + 1 trash column), K: stop tokens per row.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from archon_rl.kv_cache import SlotKVCache
from archon_rl.prefix_cache import CascadeShape
from archon_rl.row_sampling import sample_rows

__all__ = ["DecodeState", "StepFn"]

StepFn = Callable[[torch.Tensor, torch.Tensor, Callable, "torch.Tensor | None"], torch.Tensor]
"""``(ids_T, pos_T, kv_hook, rows_N | None) -> logits [N, V]``: the model on flat tokens at positions ``pos_T``,
calling ``kv_hook`` in every attention layer; logits at tokens ``rows_N`` (all tokens when None)."""


class DecodeState:
    """Device buffers of N slots and the step functions over them."""

    def __init__(self, num_slots: int, out_len: int, max_stop: int, device: torch.device,
                 sampler: Callable = sample_rows) -> None:
        N, dev = num_slots, device
        self.tok = torch.zeros(N, dtype=torch.long, device=dev)
        self.pos = torch.zeros(N, dtype=torch.long, device=dev)
        self.ngen = torch.zeros(N, dtype=torch.long, device=dev)
        self.done = torch.ones(N, dtype=torch.bool, device=dev)
        self.max_new = torch.ones(N, dtype=torch.long, device=dev)
        self.seed = torch.zeros(N, dtype=torch.long, device=dev)
        self.temperature = torch.ones(N, dtype=torch.float32, device=dev)
        self.top_k = torch.zeros(N, dtype=torch.long, device=dev)
        self.top_p = torch.ones(N, dtype=torch.float32, device=dev)
        self.stop = torch.full((N, max_stop), -1, dtype=torch.long, device=dev)
        self.out_tok = torch.zeros(N, out_len + 1, dtype=torch.long, device=dev)
        self.out_lp = torch.zeros(N, out_len + 1, dtype=torch.float32, device=dev)
        self.trash_col = out_len
        self.sampler = sampler

    def row_buffers(self) -> list[torch.Tensor]:
        return [self.tok, self.pos, self.ngen, self.done, self.max_new, self.seed, self.temperature, self.top_k,
                self.top_p, self.stop, self.out_tok, self.out_lp]

    def snapshot(self, B: int) -> list[torch.Tensor]:
        return [t[:B].clone() for t in self.row_buffers()]

    def restore(self, B: int, saved: list[torch.Tensor]) -> None:
        for t, s in zip(self.row_buffers(), saved):
            t[:B].copy_(s)

    def move_rows(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy the state of rows ``src`` into rows ``dst`` and free ``src``."""
        for t in self.row_buffers():
            t[dst] = t[src]
        self.free_rows(src)

    def free_rows(self, rows: torch.Tensor) -> None:
        self.done[rows] = True
        self.pos[rows] = 0
        self.max_new[rows] = 1

    def record(self, lo: int, hi: int, logits_BV: torch.Tensor, truncate: bool) -> None:
        """Sample the next token of rows ``[lo, hi)`` from ``logits_BV`` and advance their state."""
        sl = slice(lo, hi)
        done_B = self.done[sl]
        ngen_B = self.ngen[sl]
        new_B, lp_B = self.sampler(logits_BV, self.temperature[sl], self.top_k[sl], self.top_p[sl], self.seed[sl],
                                   ngen_B, truncate)
        active_B = ~done_B
        col_B1 = torch.where(active_B, ngen_B, self.trash_col)[:, None]
        self.out_tok[sl].scatter_(1, col_B1, new_B[:, None])
        self.out_lp[sl].scatter_(1, col_B1, lp_B[:, None])
        ngen_B.add_(active_B.long())
        stopped_B = (new_B[:, None] == self.stop[sl]).any(-1)
        done_B.logical_or_(active_B & (stopped_B | (ngen_B >= self.max_new[sl])))
        self.tok[sl].copy_(torch.where(active_B, new_B, self.tok[sl]))

    def forward(self, step_fn: StepFn, cache: SlotKVCache, B: int, kv_len: int,
                compiled: Callable | None = None, cascade: CascadeShape | None = None) -> torch.Tensor:
        """Logits [B, V] after feeding rows ``[0, B)``'s ``tok`` at ``pos`` (their K/V stored in the cache):
        the model part of a step, eager or through ``compiled`` (a `CompiledForward`)."""
        if compiled is not None:
            return compiled(step_fn, cache, self.tok[:B], self.pos[:B], kv_len, cascade)
        pos_B = self.pos[:B]
        return step_fn(self.tok[:B], pos_B, cache.decode_hook(pos_B, kv_len, cascade), None)

    def decode_step(self, step_fn: StepFn, cache: SlotKVCache, B: int, kv_len: int, truncate: bool,
                    compiled: Callable | None = None, cascade: CascadeShape | None = None) -> None:
        """One token for rows ``[0, B)``: feed ``tok`` at ``pos``, sample, advance (running rows only)."""
        active_B = ~self.done[:B]
        logits_BV = self.forward(step_fn, cache, B, kv_len, compiled, cascade)
        self.record(0, B, logits_BV, truncate)
        self.pos[:B].add_(active_B.long())
