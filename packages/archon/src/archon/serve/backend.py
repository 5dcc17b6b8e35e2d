"""The generation backend `archon serve` runs: `GenerationBackend` over archon_rl's KV-cache sampler.

Requests with equal sampling settings are generated together in one `archon_rl.generate` call. Every row samples
from its own seed (the request's ``sampling_seed``, else one drawn from the backend's generator), so a request
with a seed gets the same tokens whatever it is batched with. `make_backend` is the one place the server chooses
its engine; any object implementing `GenerationBackend` over the same model tensors can replace it (weight
updates copy into those tensors in place).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import astuple, replace

import torch
from archon_rl import GenerationBackend, GenRequest, GenResult, SamplingConfig, generate

from archon.rl.sampler import decoder_forward_fn

__all__ = ["BACKENDS", "RolloutBackend", "SamplerBackend", "make_backend"]


def _key(cfg: SamplingConfig) -> tuple:
    return tuple(tuple(v) if isinstance(v, list) else v for v in astuple(cfg))


class SamplerBackend:
    """`GenerationBackend` over `archon_rl.generate` with ``model`` (an archon Decoder with an LM head)."""

    def __init__(self, model, *, device: torch.device, seed: int = 0,
                 autocast: Callable[[], AbstractContextManager] | None = None) -> None:
        if getattr(model, "output", None) is None:
            raise ValueError("archon serve needs a model with an LM head")
        self.model = model.eval()
        self.device = device
        self.autocast = autocast or nullcontext
        self._seeds = torch.Generator().manual_seed(seed)
        self._forward = decoder_forward_fn(model)

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        results: list[GenResult | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(_key(r.sampling), []).append(i)
        for rows in groups.values():
            cfg = requests[rows[0]].sampling
            drawn = torch.randint(-(2**62), 2**62, (len(rows),), generator=self._seeds)
            seeds = torch.tensor([requests[i].seed if requests[i].seed is not None else int(drawn[j])
                                  for j, i in enumerate(rows)], dtype=torch.long)
            with torch.no_grad(), self.autocast():
                gen = generate(self._forward, [requests[i].input_ids for i in rows], cfg, device=self.device,
                               seeds=seeds)
            stops = set(cfg.stop_token_ids)
            for j, (ids, lps, stopped) in enumerate(zip(gen.responses(), gen.response_logprobs(),
                                                         gen.stopped_B.tolist())):
                i = rows[j]
                results[i] = GenResult(output_ids=ids, logprobs=lps, finish_reason="stop" if stopped else "length",
                                       matched_stop=ids[-1] if stopped and ids and ids[-1] in stops else None,
                                       prompt_tokens=len(requests[i].input_ids))
        return results  # type: ignore[return-value]


class RolloutBackend:
    """`GenerationBackend` over the rollout engine (`archon.rl.build_rollout_engine`: static KV cache, continuous
    batching, CUDA-graph decode) with ``model``'s own tensors. Requests without ``sampling_seed`` get one drawn
    from the backend's generator, as with `SamplerBackend`."""

    def __init__(self, model, *, device: torch.device, seed: int = 0,
                 autocast: Callable[[], AbstractContextManager] | None = None, **engine_options) -> None:
        from archon.rl.rollout import build_rollout_engine

        self.engine = build_rollout_engine(model, device=device, autocast=autocast, **engine_options)
        self._seeds = torch.Generator().manual_seed(seed)

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        drawn = torch.randint(-(2**62), 2**62, (len(requests),), generator=self._seeds).tolist()
        seeded = [r if r.seed is not None else replace(r, seed=int(s)) for r, s in zip(requests, drawn)]
        results = self.engine.generate(seeded)
        for req, res in zip(requests, results):
            res.prompt_tokens = len(req.input_ids)
        return results


BACKENDS = {"embedded": SamplerBackend, "rollout": RolloutBackend}
"""`archon serve --engine` -> backend class."""


def make_backend(model, *, device: torch.device, seed: int = 0, engine: str = "rollout",
                 **engine_options) -> GenerationBackend:
    """The backend `archon serve` generates with, over ``model``'s own tensors (``engine``: a key of BACKENDS;
    ``engine_options`` go to the rollout engine)."""
    if engine not in BACKENDS:
        raise ValueError(f"archon serve --engine {engine!r} is not one of {sorted(BACKENDS)}")
    if engine == "embedded" and engine_options:
        raise ValueError(f"archon serve: {sorted(engine_options)} only apply to --engine rollout")
    return BACKENDS[engine](model, device=device, seed=seed, **engine_options)
