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
from typing import Protocol, cast

import torch
import torch.nn.functional as F
from archon_rl import (
    CacheLayout,
    DecodeKernels,
    Generation,
    GenRequest,
    RolloutEngine,
    SamplingConfig,
    select_decode_kernels,
    sequence_seeds,
)

from archon.models.common.rope import rope_cos_sin

__all__ = ["decoder_step_fn", "decoder_cache_layout", "build_rollout_engine", "fused_step_supported",
           "RolloutSampler"]


class DecoderStepFn(Protocol):
    """What `decoder_step_fn` returns: an ``archon_rl.StepFn`` with the attributes the rollout engine reads."""

    traceable: Callable  # the forward a compiled decode step traces (compiled blocks inlined)
    fused: bool  # the fused kernels drive the blocks
    prepare: Callable[[], None] | None  # called at the start of each generate (refreshes `weights`)
    weights: LowPrecisionWeights | None

    def __call__(self, ids_T: torch.Tensor, pos_T: torch.Tensor, kv_hook, rows_N: torch.Tensor | None
                 ) -> torch.Tensor: ...


def decoder_step_fn(model, kernels: DecodeKernels | None = None, compute_dtype: torch.dtype | None = None
                    ) -> DecoderStepFn:
    """``archon_rl.StepFn`` for an archon Decoder with an LM head: logits only at the wanted tokens.

    With ``kernels`` (and a model `fused_step_supported` accepts) the step drives the same modules block by block
    with the fused ops: a residual add and the next norm in one kernel, q/k norm and RoPE in one, SwiGLU's gate
    in one; projections, MoE layers and the LM head are the modules' own calls. This is the math of
    `TransformerBlock.forward`, reordered so that each norm follows the add that feeds it. With a
    ``compute_dtype`` (the autocast dtype) below the parameters' dtype, the fused step reads `LowPrecisionWeights`
    instead of letting autocast cast every weight in every step; ``step.prepare()`` (the engine calls it at the
    start of each generate) refreshes them from the parameters."""
    fused = kernels is not None and fused_step_supported(model)
    weights = LowPrecisionWeights(model, compute_dtype) if fused and compute_dtype is not None else None

    def forward(ids_T: torch.Tensor, pos_T: torch.Tensor, kv_hook, rows_N: torch.Tensor | None) -> torch.Tensor:
        if fused:
            return _fused_forward(model, kernels, weights, ids_T, pos_T, kv_hook, rows_N)  # type: ignore[arg-type]
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

    fn = cast(DecoderStepFn, step)
    fn.traceable = forward  # what the engine's compiled decode step traces (it inlines compiled blocks)
    fn.fused = fused
    fn.prepare = weights.refresh if weights is not None else None
    fn.weights = weights
    return fn


class LowPrecisionWeights:
    """Copies in ``dtype`` of the plain ``nn.Linear`` weights (and biases) of the blocks and of the LM head, for a
    decode step under autocast: autocast would cast every fp32 weight again in every step (reading 4 and writing
    2 bytes per parameter per token); these are cast once per generate call by `refresh`. The values equal
    autocast's casts, so the logits are the same bits. Modules with hooks or of other types (LoRA) are called as
    they are."""

    def __init__(self, model, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.copies: dict[int, tuple[torch.nn.Module, torch.Tensor, torch.Tensor | None]] = {}
        for block in model.layers.values():
            for m in block.modules():
                if (type(m) is torch.nn.Linear and m.weight.dtype != dtype and m.weight.is_floating_point()
                        and not (m._forward_hooks or m._forward_pre_hooks)):
                    bias = None if m.bias is None else torch.empty_like(m.bias, dtype=dtype)
                    self.copies[id(m)] = (m, torch.empty_like(m.weight, dtype=dtype), bias)
        head = model.output
        self.head = None
        if head.weight.dtype != dtype and not (head._forward_hooks or head._forward_pre_hooks):
            self.head = torch.empty_like(head.weight, dtype=dtype)
        self.model = model

    def nbytes(self) -> int:
        ts = [t for _, w, b in self.copies.values() for t in (w, b)] + [self.head]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    @torch.no_grad()
    def refresh(self) -> None:
        for m, w, b in self.copies.values():
            w.copy_(m.weight)
            if b is not None:
                b.copy_(m.bias)
        if self.head is not None:
            self.head.copy_(self.model.output.weight)

    def linear(self, m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        c = self.copies.get(id(m))
        if c is None:
            return m(x)
        return F.linear(x.to(self.dtype), c[1], c[2])

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            return self.model.output(x)
        return F.linear(x.to(self.dtype), self.head)


def fused_step_supported(model) -> bool:
    """Whether the fused step can drive ``model``: plain (not DTensor) parameters, since calling a block's
    submodules directly would bypass FSDP's per-block gathers, and the Qwen-family block layout."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        return False
    if model.tok_embeddings is None or model.norm is None or model.output is None:
        return False
    for block in model.layers.values():
        a = getattr(block, "attention", None)
        if a is None or not all(hasattr(a, n) for n in ("wq", "wk", "wv", "wo", "q_norm", "k_norm", "head_dim")):
            return False
        if not (hasattr(block, "attention_norm") and hasattr(block, "ffn_norm")):
            return False
        ff = None if getattr(block, "moe_enabled", False) else getattr(block, "feed_forward", None)
        if ff is not None and not all(hasattr(ff, n) for n in ("w1", "w2", "w3")):
            return False
    return True


def _fused_forward(model, kernels: DecodeKernels, weights: LowPrecisionWeights | None, ids_T: torch.Tensor,
                   pos_T: torch.Tensor, kv_hook, rows_N: torch.Tensor | None) -> torch.Tensor:
    lin = weights.linear if weights is not None else (lambda m, x: m(x))
    cdt = weights.dtype if weights is not None else None  # norms write the matmul input dtype directly
    blocks = list(model.layers.values())
    h_TD = model.tok_embeddings(ids_T)
    T = h_TD.shape[0]
    cos_TD, sin_TD = rope_cos_sin(model.rope_inv_freq, pos_T, model.rope_attn_factor, h_TD.dtype)
    norm = blocks[0].attention_norm
    x_TD = kernels.rms_norm(h_TD, norm.weight, norm.eps, cdt)
    for i, block in enumerate(blocks):
        a = block.attention
        q_THD = lin(a.wq, x_TD).view(T, -1, a.head_dim)
        k_TGD = lin(a.wk, x_TD).view(T, -1, a.head_dim)
        v_TGD = lin(a.wv, x_TD).view(T, -1, a.head_dim)
        qn, kn = a.q_norm, a.k_norm
        q_THD, k_TGD = kernels.qk_norm_rope(q_THD, k_TGD, qn.weight if qn is not None else None,
                                            kn.weight if kn is not None else None, qn.eps if qn is not None else 0.0,
                                            cos_TD, sin_TD, v_TGD.dtype)
        o_THD = kv_hook(a, q_THD, k_TGD, v_TGD)
        moe = getattr(block, "moe_enabled", False)  # an MoE layer gets its input as the eager forward does
        h_TD, x_TD = kernels.add_rms_norm(h_TD, lin(a.wo, o_THD.reshape(T, -1)), block.ffn_norm.weight,
                                          block.ffn_norm.eps, None if moe else cdt)
        if moe:
            m_TD = block.moe(x_TD)
        else:
            ff = block.feed_forward
            m_TD = lin(ff.w2, kernels.silu_mul(lin(ff.w1, x_TD), lin(ff.w3, x_TD)))
        norm = blocks[i + 1].attention_norm if i + 1 < len(blocks) else model.norm
        h_TD, x_TD = kernels.add_rms_norm(h_TD, m_TD, norm.weight, norm.eps, cdt)
    if rows_N is not None:
        x_TD = x_TD[rows_N]
    return (weights.logits(x_TD) if weights is not None else model.output(x_TD)).float()


def decoder_cache_layout(model, dtype: torch.dtype | None = None) -> CacheLayout:
    """KV cache shape of ``model``; ``dtype`` is the attention dtype (the autocast dtype under autocast)."""
    args = model.args
    dtype = dtype or next(model.parameters()).dtype
    return CacheLayout(num_layers=len(model.layers), num_kv_heads=args.n_kv_heads, head_dim=args.head_dim,
                       dtype=dtype)


def build_rollout_engine(model, *, device: torch.device | str | None = None,
                         autocast: Callable[[], AbstractContextManager] | None = None,
                         dtype: torch.dtype | None = None, kernels: str = "auto", **engine_options) -> RolloutEngine:
    """A `RolloutEngine` on ``model`` (an archon Decoder with an LM head). Each call runs in eval mode, eagerly
    (compiled training blocks are bypassed) under ``autocast``; the model's mode is restored afterwards.
    ``kernels``: the fused decode ops, `archon_rl.DECODE_KERNELS` ("auto": Triton on CUDA, none on CPU or with
    ``compile_decode``, where inductor fuses the step instead).
    ``engine_options`` go to `RolloutEngine` (kv_cache_gb, max_seq_len, cuda_graphs, ...)."""
    if getattr(model, "output", None) is None:
        raise ValueError("the rollout engine needs a model with an LM head (head='lm')")
    device = torch.device(device if device is not None else next(model.parameters()).device)
    assert isinstance(device, torch.device)
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

    if engine_options.get("decode_attention", "matmul") != "matmul":  # an unfused attention was asked for
        if kernels not in ("auto", "none"):
            raise ValueError(f"rollout engine: kernels={kernels!r} fuse decode attention; decode_attention="
                             f"{engine_options['decode_attention']!r} needs kernels='none'")
        kernels = "none"
    if engine_options.get("compile_decode"):
        if kernels not in ("auto", "none"):
            raise ValueError(f"rollout engine: kernels={kernels!r} and compile_decode are alternatives (inductor "
                             "fuses the compiled step itself); use one")
        kernels = "none"
    ops = select_decode_kernels(kernels, device)
    return RolloutEngine(decoder_step_fn(model, ops, dtype), decoder_cache_layout(model, dtype), device=device,
                         context=context, kernels=ops, **engine_options)


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
