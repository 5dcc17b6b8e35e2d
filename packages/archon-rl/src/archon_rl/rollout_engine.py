"""The rollout engine: continuous batching over a static slot KV cache, decode steps as CUDA graphs.

``RolloutEngine.generate(requests)`` runs every request to its end. A request takes a free slot (waiting
otherwise: never an out-of-memory error), is prefilled eagerly (requests with the same prompt prefill it once
and copy its KV to the others: the ``group_size`` samples of one GRPO prompt), then decodes one token per step
with all running rows. Every ``sync_every`` steps the host reads which rows finished, collects their tokens,
moves the last running rows into the freed slots (running rows stay a prefix, so a step never computes a
finished row beyond those few steps) and prefills waiting requests into the free slots.

A row's tokens are a function of (model, prompt, sampling, seed) only: per-row Gumbel noise from
`archon_rl.sampler`, attention masked to the row's own slot. On CPU in fp32 they do not depend on batch size,
bucket, slot or arrival order. On GPU in bf16 the matmul kernels chosen for different bucket sizes can round
differently, so a near-tie between two tokens may resolve differently in another batch.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch

from archon_rl.decode_compile import CompiledForward, compile_options
from archon_rl.decode_kernels import DecodeKernels
from archon_rl.decode_runner import DecodeRunner, EagerDecode, GraphDecode
from archon_rl.decode_state import DecodeState, StepFn
from archon_rl.kv_cache import DECODE_ATTENTION, CacheLayout, SlotKVCache, slot_count
from archon_rl.prefix_cache import CascadeShape, PrefixStore
from archon_rl.requests import GenRequest, GenResult
from archon_rl.row_sampling import gumbel_logits, sample_rows

__all__ = ["RolloutEngine", "batch_buckets"]

_CASCADE_WIDTH = 16  # rows per prefix entry; larger groups take several entries


def batch_buckets(num_slots: int) -> list[int]:
    """Row counts a decode step is captured for: 1, 2, 4, 8, then steps of 16 to 64, of 32 beyond."""
    sizes = {1, 2, 4, 8, *range(16, 65, 16), *range(96, num_slots + 32, 32), num_slots}
    return sorted(s for s in sizes if s <= num_slots)


class RolloutEngine:
    """A `GenerationBackend` on a model exposed as a `StepFn`.

    ``max_seq_len``: slot length (prompt + new tokens); None sizes it from the first call (rounded up to
    ``kv_block``) and re-allocates only between calls when a longer request comes. ``kv_cache_gb`` /
    ``kv_cache_fraction``: the cache budget (`slot_count`). ``cuda_graphs``: None = on for CUDA.
    ``compile_sampling``: fuse the sampling step with ``torch.compile`` (None = on for CUDA graphs).
    ``compile_decode``: compile the model part of each decode bucket with static shapes (`CompiledForward`;
    None = off: slower than the eager step in a graph on an H100), in ``compile_mode`` ("default" or "max-autotune-no-cudagraphs") by
    ``compile_backend`` ("inductor"; "aot_eager" traces the same graph without code generation, for tests).
    ``decode_attention``: "matmul" (`matmul_decode_attention`) or "sdpa".
    ``cascade``: rows sharing a prompt read its KV from one `PrefixStore` entry (cascade attention) instead of
    per-row copies; the store holds ``num_slots // 4`` entries of up to 16 rows (a fifth of the budget when the
    budget, not ``max_batch``, limits the slots).
    ``kernels``: the fused decode ops (`archon_rl.decode_kernels`) the cache's decode attention uses (K/V store
    and attention in one kernel); None = the ``decode_attention`` path. The step function may use the same
    object for its own fused ops (``archon.rl.decoder_step_fn``).
    ``context``: a context manager factory wrapping every model call (autocast, eval mode...).
    A ``step_fn.prepare()``, where the step function has one, runs at the start of every `generate` call.
    ``release_memory``: drop the cache, its state and the captured graphs at the end of every `generate` call
    (a trainer sharing the device gets the memory back; the next call allocates and captures again).
    """

    def __init__(self, step_fn: StepFn, layout: CacheLayout, *, device: torch.device | str = "cpu",
                 max_seq_len: int | None = None, kv_cache_gb: float | None = None, kv_cache_fraction: float = 0.9,
                 max_batch: int = 256, cuda_graphs: bool | None = None, compile_sampling: bool | None = None,
                 compile_decode: bool | None = None, compile_mode: str = "default", compile_backend: str = "inductor",
                 sync_every: int | None = None, prefill_tokens: int = 32768, share_prefixes: bool = True,
                 kv_block: int = 256, max_stop_tokens: int = 16, buckets: list[int] | None = None, seed: int = 0,
                 decode_attention: str = "matmul", cascade: bool = False, kernels: DecodeKernels | None = None,
                 release_memory: bool = False, context: Callable = nullcontext) -> None:
        self.device = torch.device(device)
        self.step_fn, self.layout = step_fn, layout
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs needs a CUDA device")
        self.compile_sampling = self.cuda_graphs if compile_sampling is None else compile_sampling
        # off unless asked: on one H100 (0.6B, batch 64) the compiled step captured in a graph ran at 5,339 tok/s,
        # the eager step captured in a graph at 8,674
        self.compile_decode = bool(compile_decode)
        compile_options(compile_mode)  # a bad mode is an error now, not at the first decode step
        self.compile_mode, self.compile_backend = compile_mode, compile_backend
        self.sync_every = sync_every or (8 if self.device.type == "cuda" else 1)
        for name, value in (("max_batch", max_batch), ("prefill_tokens", prefill_tokens), ("kv_block", kv_block),
                            ("sync_every", self.sync_every)):
            if value < 1:
                raise ValueError(f"rollout engine {name} must be >= 1, got {value}")
        self.max_seq_len, self.kv_cache_gb, self.kv_cache_fraction = max_seq_len, kv_cache_gb, kv_cache_fraction
        self.max_batch, self.prefill_tokens, self.share_prefixes = max_batch, prefill_tokens, share_prefixes
        self.kv_block, self.max_stop_tokens, self.fixed_buckets = kv_block, max_stop_tokens, buckets
        self.context = context
        if cascade and not share_prefixes:
            raise ValueError("rollout engine cascade needs share_prefixes")
        self.cascade = cascade
        if decode_attention not in DECODE_ATTENTION:
            raise ValueError(f"rollout engine decode_attention must be one of {sorted(DECODE_ATTENTION)}, "
                             f"got {decode_attention!r}")
        self.decode_attention = DECODE_ATTENTION[decode_attention]
        self.kernels = kernels
        self.release_memory = release_memory
        self.rng = torch.Generator().manual_seed(seed)
        self.cache: SlotKVCache | None = None
        self.last_slots = 0  # slots of the latest allocation (kept after `release`): rows beyond it wait
        self.state: DecodeState | None = None
        self.runner: DecodeRunner | None = None
        self.stats = dict(prefill_tokens=0, prompt_tokens=0, decode_steps=0, decode_row_steps=0, new_tokens=0,
                          cascade_rows=0, cascade_steps=0)

    # -- allocation ---------------------------------------------------------------------------------
    def _allocate(self, need_len: int) -> None:
        if self.cache is not None and need_len <= self.cache.slot_len:
            return
        if self.max_seq_len is not None:
            if need_len > self.max_seq_len:
                raise ValueError(f"a request needs {need_len} positions (prompt + max_new_tokens) but the rollout "
                                 f"engine's max_seq_len is {self.max_seq_len}; raise max_seq_len or shorten it")
            slot_len = self.max_seq_len
        else:
            slot_len = math.ceil(need_len / self.kv_block) * self.kv_block
        self.cache = self.state = self.runner = None  # free the old buffers before allocating new ones
        extra = self.max_batch // 4 + 1 if self.cascade else 0  # prefix-store entries, as many positions each
        n = slot_count(self.layout, slot_len, self.device, kv_cache_gb=self.kv_cache_gb,
                       kv_cache_fraction=self.kv_cache_fraction, max_slots=self.max_batch + extra)
        entries = 0
        if self.cascade:
            budget, n = n, min(self.max_batch, n)
            entries = min(max(1, n // 4), budget - n)
            if entries < 1 and budget >= 2:  # a budget-bound cache: a fifth of it goes to the store
                n = max(1, budget * 4 // 5)
                entries = max(1, min(n // 4, budget - n))
        self.cache = SlotKVCache(self.layout, n, slot_len, self.device, self.decode_attention, self.kernels)
        self.last_slots = n
        if entries > 0:  # (a budget of one sequence leaves cascade off)
            lay = self.layout
            self.cache.prefix = PrefixStore(lay.num_layers, entries, lay.num_kv_heads, slot_len, lay.head_dim,
                                            lay.dtype, n, _CASCADE_WIDTH, self.device)
        sampler = _CompiledSampler() if self.compile_sampling else sample_rows
        self.state = DecodeState(n, slot_len, self.max_stop_tokens, self.device, sampler)
        runner_cls = GraphDecode if self.cuda_graphs else EagerDecode
        # a partial, not a bound method: the runner must not keep the engine alive (its cache is most of the GPU)
        compiled = CompiledForward(self.compile_mode, self.compile_backend) if self.compile_decode else None
        self.runner = runner_cls(self.step_fn, self.cache, self.state, functools.partial(_no_grad, self.context),
                                 compiled)
        self.buckets = sorted(b for b in (self.fixed_buckets or batch_buckets(n)) if b <= n) or [n]
        if self.buckets[-1] < n:
            self.buckets.append(n)

    def _no_grad_context(self):
        return _no_grad(self.context)

    def reset_graphs(self) -> None:
        """Drop captured graphs (after replacing parameter tensors rather than copying into them)."""
        if self.runner is not None:
            self.runner.reset()

    @property
    def num_slots(self) -> int:
        return 0 if self.cache is None else self.cache.num_slots

    # -- generation ---------------------------------------------------------------------------------
    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        if not requests:
            return []
        for i, r in enumerate(requests):
            r.sampling.validate()
            if not r.input_ids:
                raise ValueError(f"request {i} has an empty prompt; every prompt needs at least one token")
            if len(r.sampling.stop_token_ids) > self.max_stop_tokens:
                raise ValueError(f"request {i} has {len(r.sampling.stop_token_ids)} stop tokens; the rollout "
                                 f"engine's max_stop_tokens is {self.max_stop_tokens}")
        self._allocate(max(len(r.input_ids) + r.sampling.max_new_tokens for r in requests))
        prepare = getattr(self.step_fn, "prepare", None)
        if prepare is not None:  # e.g. low-precision weight copies refreshed from the parameters
            with self._no_grad_context():
                prepare()
        seeds = [r.seed if r.seed is not None else int(torch.randint(-2**62, 2**62, (), generator=self.rng))
                 for r in requests]
        try:
            return _Run(self, requests, seeds).run()
        finally:
            if self.release_memory:
                self.release()

    def release(self) -> None:
        """Free the KV cache, the decode state and the captured graphs (the next call allocates them again)."""
        self.cache = self.state = self.runner = None


@contextmanager
def _no_grad(context: Callable) -> Iterator[None]:
    with torch.no_grad(), context():
        yield


class _CompiledSampler:
    """`sample_rows` with its Gumbel pass fused by ``torch.compile`` (eagerly the hash is a dozen full-vocab int64
    passes); falls back to eager for good, with a warning, if compilation fails."""

    def __init__(self) -> None:
        self.noisy = torch.compile(gumbel_logits, dynamic=True)

    def __call__(self, *args):
        try:
            return sample_rows(*args, noisy=self.noisy)
        except Exception as ex:  # noqa: BLE001 - any compiler failure: the eager function is exact
            if self.noisy is gumbel_logits:
                raise
            warnings.warn(f"rollout engine: compiling the sampling step failed ({ex!r:.200}); sampling eagerly",
                          stacklevel=2)
            self.noisy = gumbel_logits
            return sample_rows(*args)


class _Run:
    """One ``generate`` call's scheduling state (host side)."""

    def __init__(self, engine: RolloutEngine, requests: list[GenRequest], seeds: list[int]) -> None:
        self.e, self.requests, self.seeds = engine, requests, seeds
        assert engine.cache is not None and engine.state is not None, "allocate() runs before a call"
        self.cache: SlotKVCache = engine.cache
        self.state: DecodeState = engine.state
        self.waiting = deque(range(len(requests)))
        self.row_req: list[int] = []  # request index of each running row (row b = slot b)
        self.row_entry: list[int | None] = []  # each running row's prefix-store entry (cascade)
        self.entry_rows: dict[int, int] = {}  # running rows per entry
        self.cascade: CascadeShape | None = None
        self.tables_stale = False
        if self.cache.prefix is not None:  # entries left taken by an interrupted call
            self.cache.prefix.free = list(range(self.cache.prefix.entries))
        self.results: list[GenResult | None] = [None] * len(requests)

    def run(self) -> list[GenResult]:
        e = self.e
        while self.waiting or self.row_req:
            self._admit()
            if not self.row_req:
                continue
            n = len(self.row_req)
            plen = [len(self.requests[q].input_ids) for q in self.row_req]
            ngen, done = self._read_back(n)
            if done.any():
                self._finish(ngen, done)
                continue
            left = min(self.requests[q].sampling.max_new_tokens - g for q, g in zip(self.row_req, ngen.tolist()))
            k = max(1, min(e.sync_every, left))
            max_pos = max(p + g - 1 for p, g in zip(plen, ngen.tolist()))
            kv_len = min(self.cache.slot_len, math.ceil((max_pos + k) / e.kv_block) * e.kv_block)
            B = next(b for b in e.buckets if b >= n)
            truncate = any(self._truncates(q) for q in self.row_req)
            if self.tables_stale:
                assert self.cache.prefix is not None  # tables go stale only with a prefix store
                self.cascade = self.cache.prefix.set_rows(self.row_entry, e.kv_block)
                self.tables_stale = False
            assert e.runner is not None
            for _ in range(k):
                e.runner.run(B, kv_len, truncate, self.cascade)
            e.stats["decode_steps"] += k
            e.stats["decode_row_steps"] += k * B
            e.stats["cascade_steps"] += k if self.cascade is not None else 0
        return self.results  # type: ignore[return-value]

    def _truncates(self, q: int) -> bool:
        s = self.requests[q].sampling
        return s.temperature > 0 and (s.top_k > 0 or s.top_p < 1)

    def _read_back(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        both = torch.stack([self.state.ngen[:n], self.state.done[:n].long()]).cpu()
        return both[0], both[1].bool()

    # -- finishing --------------------------------------------------------------------------------------
    def _finish(self, ngen: torch.Tensor, done: torch.Tensor) -> None:
        rows = done.nonzero().flatten().tolist()
        width = int(ngen[rows].max())
        toks = self.state.out_tok[rows, :width].cpu().tolist()
        lps = self.state.out_lp[rows, :width].cpu().tolist()
        for row, t, lp in zip(rows, toks, lps):
            q = self.row_req[row]
            g = int(ngen[row])
            out, s = t[:g], self.requests[q].sampling
            stop = out[-1] if out and out[-1] in s.stop_token_ids else None
            self.results[q] = GenResult(output_ids=out, logprobs=lp[:g], finish_reason="stop" if stop is not None
                                        else "length", matched_stop=stop)
            self.e.stats["new_tokens"] += g
            m = self.row_entry[row]
            if m is not None:
                self.entry_rows[m] -= 1
                if self.entry_rows[m] == 0:
                    del self.entry_rows[m]
                    assert self.cache.prefix is not None  # rows hold entries only with a prefix store
                    self.cache.prefix.release(m)
        self._compact(set(rows), ngen)

    def _compact(self, finished: set[int], ngen: torch.Tensor) -> None:
        """Move the last running rows into the finished rows' slots so running rows stay a prefix."""
        n = len(self.row_req)
        keep = n - len(finished)
        holes = [r for r in sorted(finished) if r < keep]
        movers = [r for r in range(keep, n) if r not in finished]
        dev = self.e.device
        if movers:
            length = max(len(self.requests[self.row_req[r]].input_ids) + int(ngen[r]) for r in movers)
            src = torch.tensor(movers, device=dev)
            dst = torch.tensor(holes, device=dev)
            self.cache.copy_slots(src, dst, min(length, self.cache.slot_len))
            self.state.move_rows(src, dst)
            for s, d in zip(movers, holes):
                self.row_req[d] = self.row_req[s]
                self.row_entry[d] = self.row_entry[s]
        gone = [r for r in range(keep, n) if r in finished]
        if gone:
            self.state.free_rows(torch.tensor(gone, device=dev))
        del self.row_req[keep:]
        del self.row_entry[keep:]
        self.tables_stale = self.cache.prefix is not None

    # -- admission --------------------------------------------------------------------------------------
    def _admit(self) -> None:
        """Prefill waiting requests into free slots: when at least an eighth of the slots is free (fewer, larger
        prefills), or all remaining requests fit, or nothing runs."""
        free = self.e.num_slots - len(self.row_req)
        want = min(free, len(self.waiting))
        if want == 0 or (self.row_req and want < min(len(self.waiting), max(1, self.e.num_slots // 8))):
            return
        take = [self.waiting.popleft() for _ in range(want)]
        first = len(self.row_req)
        self.row_req.extend(take)
        self.row_entry.extend([None] * len(take))
        leader_of: dict[tuple[int, ...], int] = {}
        leaders: list[int] = []  # rows that prefill; the others copy their leader's KV
        for i, q in enumerate(take):
            key = tuple(self.requests[q].input_ids) if self.e.share_prefixes else (i,)
            if key not in leader_of:
                leader_of[key] = first + i
                leaders.append(first + i)
        self._set_row_params(first, take)
        self.e.stats["prompt_tokens"] += sum(len(self.requests[q].input_ids) for q in take)
        logits_of = self._prefill(leaders)
        leader_row = [leader_of[tuple(self.requests[q].input_ids) if self.e.share_prefixes else (i,)]
                      for i, q in enumerate(take)]
        followers = [(first + i, lr) for i, lr in enumerate(leader_row) if lr != first + i]
        if followers and self.cache.prefix is not None:
            followers = self._share_entries(leader_row, first)
        if followers:
            length = max(len(self.requests[self.row_req[r]].input_ids) for r, _ in followers)
            dev = self.e.device
            self.cache.copy_slots(torch.tensor([lr for _, lr in followers], device=dev),
                                  torch.tensor([r for r, _ in followers], device=dev), length)
        logits_BV = torch.cat([logits_of[lr] for lr in leader_row])
        with self.e._no_grad_context():
            self.state.record(first, first + len(take), logits_BV, any(self._truncates(q) for q in take))

    def _share_entries(self, leader_row: list[int], first: int) -> list[tuple[int, int]]:
        """Give each group (rows with the same leader) prefix-store entries of up to the table width; returns the
        (row, leader) pairs that found no entry and copy the leader's KV instead."""
        store, left = self.cache.prefix, []
        assert store is not None, "shared entries need a prefix store (cascade=True)"
        groups: dict[int, list[int]] = {}
        for i, lr in enumerate(leader_row):
            groups.setdefault(lr, []).append(first + i)
        for lr, rows in groups.items():
            if len(rows) < 2:
                continue
            plen = len(self.requests[self.row_req[lr]].input_ids)
            for c in range(0, len(rows), store.width_cap):
                chunk = rows[c:c + store.width_cap]
                m = store.take(plen) if len(chunk) > 1 else None
                if m is None:
                    left += [(r, lr) for r in chunk if r != lr]
                    continue
                store.fill(m, self.cache.k, self.cache.v, lr)
                self.entry_rows[m] = len(chunk)
                self.e.stats["cascade_rows"] += len(chunk)
                for r in chunk:
                    self.row_entry[r] = m
        self.tables_stale = True
        return left

    def _set_row_params(self, first: int, take: list[int]) -> None:
        st, n = self.state, len(take)
        sl = slice(first, first + n)
        reqs = [self.requests[q] for q in take]
        dev = self.e.device

        def put(buf: torch.Tensor, values: list, dtype: torch.dtype) -> None:
            buf[sl] = torch.tensor(values, dtype=dtype).to(dev, non_blocking=True)

        put(st.pos, [len(r.input_ids) for r in reqs], torch.long)
        put(st.ngen, [0] * n, torch.long)
        put(st.done, [False] * n, torch.bool)
        put(st.max_new, [r.sampling.max_new_tokens for r in reqs], torch.long)
        put(st.seed, [self.seeds[q] for q in take], torch.long)
        put(st.temperature, [r.sampling.temperature for r in reqs], torch.float32)
        put(st.top_k, [r.sampling.top_k for r in reqs], torch.long)
        put(st.top_p, [r.sampling.top_p for r in reqs], torch.float32)
        stops = [list(r.sampling.stop_token_ids) + [-1] * (st.stop.shape[1] - len(r.sampling.stop_token_ids))
                 for r in reqs]
        put(st.stop, stops, torch.long)

    def _prefill(self, leaders: list[int]) -> dict[int, torch.Tensor]:
        """Logits [1, V] at the last prompt token of each leader row, prefilled in blocks of at most
        ``prefill_tokens`` (padded) tokens."""
        out: dict[int, torch.Tensor] = {}
        rows = sorted(leaders, key=lambda r: -len(self.requests[self.row_req[r]].input_ids))
        i = 0
        while i < len(rows):
            P = len(self.requests[self.row_req[rows[i]]].input_ids)
            n = max(1, min(len(rows) - i, self.e.prefill_tokens // P))
            block = rows[i:i + n]
            i += n
            prompts = [self.requests[self.row_req[r]].input_ids for r in block]
            pad = self.requests[self.row_req[block[0]]].sampling.pad_token_id
            ids = torch.full((n, P), pad, dtype=torch.long)
            for j, p in enumerate(prompts):
                ids[j, :len(p)] = torch.as_tensor(p, dtype=torch.long)
            dev = self.e.device
            ids_T = ids.reshape(-1).to(dev)
            pos_T = torch.arange(P, device=dev).repeat(n)
            last_n = torch.tensor([j * P + len(p) - 1 for j, p in enumerate(prompts)], device=dev)
            hook = self.cache.prefill_hook(torch.tensor(block, device=dev), P)
            with self.e._no_grad_context():
                logits_nV = self.e.step_fn(ids_T, pos_T, hook, last_n)
            for j, r in enumerate(block):
                out[r] = logits_nV[j:j + 1]
            self.e.stats["prefill_tokens"] += sum(len(p) for p in prompts)
        return out
