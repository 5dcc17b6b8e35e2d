"""The embedded sampler: archon_rl's KV-cache generation driven by the engine's own Decoder.

It shares the trainer's parameters (no weight copy on one device), so weights are always the latest
version. Sampling runs under ``no_grad``, in eval mode, eagerly (compiled blocks are bypassed: decode
shapes change every step), with its own seeded ``torch.Generator``; the model's train/eval mode is
restored afterwards and the global RNG is never touched, so training stays reproducible.

B: batch, S: tokens per row of one forward, D: model dim, V: vocab.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
from archon_rl import Generation, SamplingConfig, generate, sequence_seeds

__all__ = ["decoder_forward_fn", "EmbeddedSampler"]


def decoder_forward_fn(model) -> Callable:
    """``archon_rl.ForwardFn`` for an archon Decoder: the LM head runs only on the gathered positions."""

    def forward(ids_BS: torch.Tensor, pos_BS: torch.Tensor, kv_hook, last_B: torch.Tensor) -> torch.Tensor:
        h_BSD = model(ids_BS, position_ids=pos_BS, kv_hook=kv_hook, return_hidden=True)
        h_BD = h_BSD[torch.arange(h_BSD.shape[0], device=h_BSD.device), last_B]
        return model.output(h_BD).float()

    return forward


class EmbeddedSampler:
    """Generate rollouts with ``model`` (an archon Decoder with an LM head) in place."""

    def __init__(self, model, config: SamplingConfig, *, seed: int = 0, device: torch.device | str | None = None,
                 autocast: Callable[[], AbstractContextManager] | None = None) -> None:
        config.validate()
        if getattr(model, "output", None) is None:
            raise ValueError("the embedded sampler needs a model with an LM head (head='lm')")
        self.model = model
        self.config = config
        self.seed = seed
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.autocast = autocast or nullcontext

    def generator(self, step: int) -> torch.Generator:
        """The sampling RNG of ``step``: a pure function of (seed, step)."""
        return torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + step)

    def generate(self, prompts: Sequence[Sequence[int]], step: int = 0,
                 indices: Sequence[int] | None = None) -> Generation:
        """Responses for ``prompts``. With ``indices`` (each prompt's index in the step's global batch) every
        row samples from its own seed, `archon_rl.sequence_seeds(seed, step, index)`: the same tokens however
        the batch is split over data-parallel ranks. Without, one generator of (seed, step) drives the batch."""
        if indices is not None and len(indices) != len(prompts):
            raise ValueError(f"indices has {len(indices)} entries for {len(prompts)} prompts")
        seeds = sequence_seeds(self.seed, step, indices) if indices is not None else None
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), torch.compiler.set_stance("force_eager"), self.autocast():
                return generate(decoder_forward_fn(self.model), prompts, self.config, device=self.device,
                                generator=None if seeds is not None else self.generator(step), seeds=seeds)
        finally:
            self.model.train(was_training)
