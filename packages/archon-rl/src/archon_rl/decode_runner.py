"""How a decode step runs: eagerly (CPU, or CUDA without graphs) or as CUDA graphs captured per bucket.

Both runners expose ``run(B, kv_len, truncate)``; the scheduler never asks which one it holds. A graph is
captured lazily the first time a bucket (rows B, attended positions kv_len, top-k/top-p on or off) is needed,
into one memory pool shared by all graphs (they never run concurrently and every result lands in the fixed
`DecodeState` buffers). With ``compiled`` (a `CompiledForward`) the model part of each step is inductor's
fused kernels, compiled for the bucket before its capture. The graphs read the model's parameters in place:
weights updated with ``param.copy_`` are seen by the next replay; replacing a parameter tensor needs `reset()`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from archon_rl.decode_state import DecodeState, StepFn
from archon_rl.kv_cache import SlotKVCache
from archon_rl.prefix_cache import CascadeShape

__all__ = ["DecodeRunner", "EagerDecode", "GraphDecode"]


class DecodeRunner:
    def __init__(self, step_fn: StepFn, cache: SlotKVCache, state: DecodeState,
                 context: Callable = torch.no_grad, compiled: Callable | None = None) -> None:
        self.step_fn, self.cache, self.state, self.context = step_fn, cache, state, context
        self.compiled = compiled  # a `CompiledForward`, or None for the eager forward

    def run(self, B: int, kv_len: int, truncate: bool, cascade: CascadeShape | None = None) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget anything derived from the parameters' addresses."""

    def _eager(self, B: int, kv_len: int, truncate: bool, cascade: CascadeShape | None = None) -> None:
        with self.context():
            self.state.decode_step(self.step_fn, self.cache, B, kv_len, truncate, self.compiled, cascade)


class EagerDecode(DecodeRunner):
    """One eager forward per step."""

    def run(self, B: int, kv_len: int, truncate: bool, cascade: CascadeShape | None = None) -> None:
        self._eager(B, kv_len, truncate, cascade)


class GraphDecode(DecodeRunner):
    """Each bucket's step captured once as a CUDA graph and replayed."""

    def __init__(self, step_fn: StepFn, cache: SlotKVCache, state: DecodeState,
                 context: Callable = torch.no_grad, compiled: Callable | None = None) -> None:
        super().__init__(step_fn, cache, state, context, compiled)
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.pool = None
        self.uncapturable = False

    def reset(self) -> None:
        self.graphs.clear()
        self.pool = None
        self.uncapturable = False

    def run(self, B: int, kv_len: int, truncate: bool, cascade: CascadeShape | None = None) -> None:
        if self.uncapturable:
            return self._eager(B, kv_len, truncate, cascade)
        key = (B, kv_len, truncate, cascade)
        graph = self.graphs.get(key)
        if graph is None:
            try:
                graph = self.graphs[key] = self._capture(B, kv_len, truncate, cascade)
            except RuntimeError as ex:  # a model step that syncs with the host (e.g. fp32 MoE's per-expert loop)
                warnings.warn(f"rollout engine: the decode step cannot be captured as a CUDA graph ({ex!s:.160}); "
                              "decoding eagerly", stacklevel=2)
                self.uncapturable = True
                torch.cuda.synchronize()
                return self._eager(B, kv_len, truncate, cascade)
        graph.replay()

    def _capture(self, B: int, kv_len: int, truncate: bool, cascade: CascadeShape | None) -> torch.cuda.CUDAGraph:
        # A warm-up step on a side stream initialises libraries (cuBLAS workspaces) and compiles the bucket's
        # step (`CompiledForward`) outside the capture; it writes the same K/V the real step will, and the row state is restored after it.
        saved = self.state.snapshot(B)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._eager(B, kv_len, truncate, cascade)
        torch.cuda.current_stream().wait_stream(side)
        self.state.restore(B, saved)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool), self.context():
            self.state.decode_step(self.step_fn, self.cache, B, kv_len, truncate, self.compiled, cascade)
        return graph
