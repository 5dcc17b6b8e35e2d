"""The rollout engine (`archon_rl.RolloutEngine`) driving an archon Decoder in place.

`decoder_step_fn` runs the model's own modules (embedding, blocks, norm, LM head) on flat tokens with a
``kv_hook``, so the engine shares the trainer's parameters: no weight copy, and weights updated in place
(``param.copy_``) are used by the next call, captured CUDA graphs included. `RolloutSampler` is the
`EmbeddedSampler` interface (prompts, step, indices -> `Generation`) on top of the engine.

T: tokens of one forward, N: rows whose logits are wanted, D: model dim, V: vocab, B: batch, L: new tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from archon_rl import CacheLayout, Generation, GenRequest, RolloutEngine, SamplingConfig, sequence_seeds

from archon.models.common.rope import rope_cos_sin

__all__ = ["decoder_step_fn", "decoder_cache_layout", "build_rollout_engine", "RolloutSampler"]


def decoder_step_fn(model) -> Callable:
    """``archon_rl.StepFn`` for an archon Decoder with an LM head: logits only at the wanted tokens."""

    def forward(ids_T: torch.Tensor, pos_T: torch.Tensor, kv_hook, rows_N: torch.Tensor | None) -> torch.Tensor:
        h_TD = model.tok_embeddings(ids_T)
        rope = rope_cos_sin(model.rope_inv_freq, pos_T, model.rope_attn_factor, h_TD.dtype)
        for block in model.layers.values():
            h_TD = block(h_TD, rope, None, kv_hook)
        if rows_N is not None:
            h_TD = h_TD[rows_N]
        return model.output(model.norm(h_TD)).float()

    def step(ids_T: torch.Tensor, pos_T: torch.Tensor, kv_hook, rows_N: torch.Tensor | None) -> torch.Tensor:
        with torch.compiler.set_stance("force_eager"):  # compiled training blocks: decode shapes vary
            return forward(ids_T, pos_T, kv_hook, rows_N)

    step.traceable = forward  # what the engine's compiled decode step traces (it inlines compiled blocks)
    return step


def decoder_cache_layout(model, dtype: torch.dtype | None = None) -> CacheLayout:
    """KV cache shape of ``model``; ``dtype`` is the attention dtype (the autocast dtype under autocast)."""
    args = model.args
    dtype = dtype or next(model.parameters()).dtype
    return CacheLayout(num_layers=len(model.layers), num_kv_heads=args.n_kv_heads, head_dim=args.head_dim,
                       dtype=dtype)


def build_rollout_engine(model, *, device: torch.device | str | None = None,
                         autocast: Callable[[], AbstractContextManager] | None = None,
                         dtype: torch.dtype | None = None, **engine_options) -> RolloutEngine:
    """A `RolloutEngine` on ``model`` (an archon Decoder with an LM head). Each call runs in eval mode, eagerly
    (compiled training blocks are bypassed) under ``autocast``; the model's mode is restored afterwards.
    ``engine_options`` go to `RolloutEngine` (kv_cache_gb, max_seq_len, cuda_graphs, ...)."""
    if getattr(model, "output", None) is None:
        raise ValueError("the rollout engine needs a model with an LM head (head='lm')")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    autocast = autocast or nullcontext
    if dtype is None:
        with autocast():
            dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None

    @contextmanager
    def context() -> Iterator[None]:
        was_training = model.training
        model.eval()
        try:
            with autocast():
                yield
        finally:
            model.train(was_training)

    return RolloutEngine(decoder_step_fn(model), decoder_cache_layout(model, dtype), device=device,
                         context=context, **engine_options)


class RolloutSampler:
    """Drop-in for `EmbeddedSampler` backed by the rollout engine: ``generate(prompts, step, indices)``.

    Every row samples from its own seed, `archon_rl.sequence_seeds(seed, step, index)` (index: the prompt's
    position in the step's global batch, or in ``prompts`` without ``indices``)."""

    def __init__(self, model, config: SamplingConfig, *, seed: int = 0, device: torch.device | str | None = None,
                 autocast: Callable[[], AbstractContextManager] | None = None, **engine_options) -> None:
        config.validate()
        self.config, self.seed = config, seed
        self.engine = build_rollout_engine(model, device=device, autocast=autocast, **engine_options)
        self.device = self.engine.device

    def generate(self, prompts: Sequence[Sequence[int]], step: int = 0,
                 indices: Sequence[int] | None = None) -> Generation:
        if indices is not None and len(indices) != len(prompts):
            raise ValueError(f"indices has {len(indices)} entries for {len(prompts)} prompts")
        if len(prompts) == 0:
            raise ValueError("generate needs at least one prompt")
        seeds = sequence_seeds(self.seed, step, indices if indices is not None else range(len(prompts))).tolist()
        results = self.engine.generate([GenRequest(list(p), self.config, seed=s) for p, s in zip(prompts, seeds)])
        B, L, pad = len(prompts), self.config.max_new_tokens, self.config.pad_token_id
        tokens_BL = torch.full((B, L), pad, dtype=torch.long)
        logprobs_BL = torch.zeros(B, L, dtype=torch.float32)
        for b, r in enumerate(results):
            tokens_BL[b, :len(r.output_ids)] = torch.tensor(r.output_ids, dtype=torch.long)
            logprobs_BL[b, :len(r.logprobs)] = torch.tensor(r.logprobs, dtype=torch.float32)
        lengths_B = torch.tensor([len(r.output_ids) for r in results], dtype=torch.long)
        stopped_B = torch.tensor([r.finish_reason == "stop" for r in results])
        dev = self.device
        return Generation(tokens_BL.to(dev), logprobs_BL.to(dev), lengths_B.to(dev), stopped_B.to(dev))
