"""Generation requests and results: the one interface between rollout callers and generation engines.

`archon serve` turns SGLang-protocol `/generate` calls into `GenRequest`s and hands them to a
`GenerationBackend`; the RL loop does the same in-process. Every engine (the simple KV-cache `generate`
loop, the static-cache / CUDA-graph rollout engine) implements `GenerationBackend`, so callers never ask
which engine they hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from archon_rl.sampler import SamplingConfig

__all__ = ["GenRequest", "GenResult", "GenerationBackend"]


@dataclass
class GenRequest:
    """One prompt to complete."""

    input_ids: list[int]
    """Prompt token ids (at least one)."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """max_new_tokens, temperature (0 = greedy), top_p, top_k, stop_token_ids."""
    seed: int | None = None
    """Per-request sampling seed (SGLang's ``sampling_seed``; RL passes `sequence_seeds(seed, step, index)`):
    the sampled tokens are a function of (model, prompt, sampling, seed) only, whatever batch the request is
    in. None: the engine draws from its own generator (not reproducible across batchings)."""


@dataclass
class GenResult:
    """The completion of one `GenRequest`."""

    output_ids: list[int]
    """New tokens (a stop token that ended the sequence included)."""
    logprobs: list[float]
    """Per-token logprobs of ``output_ids`` under the model's untempered, untruncated distribution."""
    finish_reason: Literal["stop", "length", "abort"]
    """``stop``: ended on a stop token; ``length``: hit max_new_tokens; ``abort``: cut by the caller."""
    matched_stop: int | None = None
    """The stop token id when ``finish_reason == "stop"``."""
    weight_version: str | None = None
    """The weight version the engine held while producing this result (set by servers; None in-process)."""
    prompt_tokens: int | None = None
    """Length of the prompt, as the server counted it (None in-process)."""


@runtime_checkable
class GenerationBackend(Protocol):
    """Completes a list of requests; results come back in request order."""

    def generate(self, requests: list[GenRequest]) -> list[GenResult]: ...
