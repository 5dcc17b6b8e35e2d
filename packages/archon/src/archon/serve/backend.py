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
from dataclasses import astuple

import torch
from archon_rl import GenerationBackend, GenRequest, GenResult, SamplingConfig, generate

from archon.rl.sampler import decoder_forward_fn

__all__ = ["SamplerBackend", "make_backend"]


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


def make_backend(model, *, device: torch.device, seed: int = 0) -> GenerationBackend:
    """The backend `archon serve` generates with, over ``model``'s own tensors."""
    return SamplerBackend(model, device=device, seed=seed)
