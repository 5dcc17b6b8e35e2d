"""Batched autoregressive generation with a KV cache, for embedded rollouts.

The sampler is model-agnostic: it drives a ``forward_fn`` that runs the policy on a [B, S] block of
tokens and calls a ``kv_hook(attn_module, q_THD, k_TGD, v_TGD) -> o_THD`` in every attention layer
after RoPE (the archon Decoder's hook). The hook stores K/V in a per-layer cache and computes the
attention itself, so the model never sees the cache:

- prefill: the prompts, right-padded to [B, P]; causal SDPA per row (a right-padded real query never
  sees padding under the causal mask), K/V written to cache positions [0, P);
- decode: one token per row at its own position ``pos_B`` (prompt length + step); K/V written at
  ``pos_B`` and the query attends to cache positions ``<= pos_B``. One forward per step for the whole
  batch; finished rows keep running (their outputs are masked), so there is no loop over sequences.

Behaviour logprobs are those of the model's own distribution (``log_softmax`` of the raw logits, no
temperature or truncation), i.e. what the trainer's ``forward_batch`` computes for the same tokens.

B: batch, P: longest prompt, S: cache length (P + max new tokens), L: new tokens, V: vocab,
T: tokens of one forward (B * P or B), H: query heads, G: kv heads, D: head dim.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = ["SamplingConfig", "KVCache", "Generation", "ForwardFn", "sample_tokens", "generate", "sequence_seeds"]

ForwardFn = Callable[[torch.Tensor, torch.Tensor, Callable, torch.Tensor], torch.Tensor]
"""``(input_ids [B, S], position_ids [B, S], kv_hook, last_B [B]) -> logits [B, V]`` at column ``last_B[b]``."""


@dataclass
class SamplingConfig:
    """How to pick the next token."""

    max_new_tokens: int = 16
    """Generation stops after this many tokens (stop token included)."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1 = off)."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = off)."""
    stop_token_ids: list[int] = field(default_factory=list)
    """A sequence ends after emitting one of these (the stop token is part of the response)."""
    pad_token_id: int = 0
    """Filler for prompts and finished rows; never part of a response."""

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"sampling temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"sampling top_k must be >= 0 (0 = off), got {self.top_k}")


@dataclass
class Generation:
    """Responses of one ``generate`` call (rows in prompt order)."""

    tokens_BL: torch.Tensor
    """[B, L] int64 response tokens, ``pad_token_id`` after each row's end."""
    logprobs_BL: torch.Tensor
    """[B, L] fp32 behaviour logprobs of the response tokens, 0 after each row's end."""
    lengths_B: torch.Tensor
    """[B] int64 response lengths."""
    stopped_B: torch.Tensor
    """[B] bool: the row ended on a stop token (False: cut at max_new_tokens)."""

    def responses(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens_BL.cpu(), self.lengths_B.tolist())]

    def response_logprobs(self) -> list[list[float]]:
        return [row[:n].tolist() for row, n in zip(self.logprobs_BL.cpu(), self.lengths_B.tolist())]


def prefill_attention(attn, q_THD: torch.Tensor, k_TGD: torch.Tensor, v_TGD: torch.Tensor,
                      batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal attention over a right-padded [B, P] prompt block (a real query never sees the padding after it):
    the output [T, H, D] and the block's K / V as [B, G, P, D], for the caller to store in its cache."""
    T, H, D = q_THD.shape
    P = T // batch
    k_BGPD = k_TGD.view(batch, P, -1, D).transpose(1, 2)
    v_BGPD = v_TGD.view(batch, P, -1, D).transpose(1, 2)
    q_BHPD = q_THD.view(batch, P, H, D).transpose(1, 2)
    o_BHPD = F.scaled_dot_product_attention(q_BHPD, k_BGPD, v_BGPD, is_causal=True,
                                            scale=getattr(attn, "scale", None), enable_gqa=H != k_BGPD.shape[1])
    return o_BHPD.transpose(1, 2).reshape(T, H, D), k_BGPD, v_BGPD


class KVCache:
    """Per-layer K/V buffers [B, G, S, D] (keyed by the attention module) and the ``kv_hook``."""

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def _buffers(self, attn: object, like_BGD: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = id(attn)
        if key not in self.k:
            shape = (batch, like_BGD.shape[-2], self.max_len, like_BGD.shape[-1])
            self.k[key] = like_BGD.new_zeros(shape)
            self.v[key] = like_BGD.new_zeros(shape)
        return self.k[key], self.v[key]

    def prefill_hook(self, batch: int) -> Callable:
        """Hook for a right-padded [B, P] prompt block at positions 0..P-1."""

        def hook(attn, q_THD: torch.Tensor, k_TGD: torch.Tensor, v_TGD: torch.Tensor) -> torch.Tensor:
            o_THD, k_BGPD, v_BGPD = prefill_attention(attn, q_THD, k_TGD, v_TGD, batch)
            P = k_BGPD.shape[2]
            cache_k, cache_v = self._buffers(attn, k_TGD[0], batch)
            cache_k[:, :, :P] = k_BGPD
            cache_v[:, :, :P] = v_BGPD
            return o_THD

        return hook

    def decode_hook(self, pos_B: torch.Tensor) -> Callable:
        """Hook for one new token per row at position ``pos_B`` [B]."""
        batch = pos_B.numel()
        rows_B = torch.arange(batch, device=pos_B.device)
        mask_B11S = (torch.arange(self.max_len, device=pos_B.device)[None, :] <= pos_B[:, None])[:, None, None, :]

        def hook(attn, q_THD: torch.Tensor, k_TGD: torch.Tensor, v_TGD: torch.Tensor) -> torch.Tensor:
            cache_k, cache_v = self._buffers(attn, k_TGD[0], batch)
            cache_k[rows_B, :, pos_B] = k_TGD
            cache_v[rows_B, :, pos_B] = v_TGD
            H = q_THD.shape[1]
            o_BH1D = F.scaled_dot_product_attention(q_THD[:, :, None, :], cache_k, cache_v, attn_mask=mask_B11S,
                                                    scale=getattr(attn, "scale", None),
                                                    enable_gqa=H != cache_k.shape[1])
            return o_BH1D.squeeze(2)

        return hook


_MASK64 = (1 << 64) - 1


def _i64(x: int) -> int:
    """A 64-bit constant as a signed int64 value (torch integer ops wrap around modulo 2**64)."""
    x &= _MASK64
    return x - (1 << 64) if x >> 63 else x


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser, elementwise on int64: a counter-based hash (a keyed stream per element)."""
    x = x + _i64(0x9E3779B97F4A7C15)
    x = (x ^ _shr(x, 30)) * _i64(0xBF58476D1CE4E5B9)
    x = (x ^ _shr(x, 27)) * _i64(0x94D049BB133111EB)
    return x ^ _shr(x, 31)


def sequence_seeds(seed: int, step: int, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """int64 [B] per-sequence sampling seeds, a function of (seed, step, sequence index) only: a sequence samples
    the same tokens whatever batch, rank or data-parallel layout it is generated in."""
    idx = torch.as_tensor(indices, dtype=torch.long)
    base = _mix64(torch.tensor([seed * 1_000_003 + step], dtype=torch.long))
    return _mix64(base ^ _mix64(idx))


def _gumbel(seeds_B: torch.Tensor, i: int, V: int) -> torch.Tensor:
    """Standard Gumbel noise [B, V] for decode step ``i``, from each row's seed (no RNG state)."""
    v_V = torch.arange(V, device=seeds_B.device, dtype=torch.long)
    z = _mix64(_mix64(seeds_B + i)[:, None] ^ v_V[None])
    u = (_shr(z, 11).double() + 0.5) * 2.0**-53  # in (0, 1)
    return -torch.log(-torch.log(u)).float()


def sample_tokens(logits_BV: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None = None, *,
                  seeds_B: torch.Tensor | None = None, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens [B] and their logprobs [B] under the model's (untempered, untruncated) distribution.

    With ``seeds_B`` (per-sequence seeds, `sequence_seeds`) a row samples by Gumbel-max with noise hashed from
    (its seed, ``step``, token id): exact categorical sampling of the tempered, truncated distribution that
    does not depend on the other rows. Otherwise ``torch.multinomial`` draws from ``generator``."""
    logits_BV = logits_BV.float()
    logp_BV = logits_BV.log_softmax(-1)
    if config.temperature == 0:
        tok_B = logits_BV.argmax(-1)
    else:
        scaled_BV = logits_BV / config.temperature
        V = scaled_BV.shape[-1]
        if 0 < config.top_k < V:
            kth_B1 = scaled_BV.topk(config.top_k, dim=-1).values[:, -1:]
            scaled_BV = scaled_BV.masked_fill(scaled_BV < kth_B1, float("-inf"))
        if config.top_p < 1:
            sorted_BV, order_BV = scaled_BV.sort(dim=-1, descending=True)
            probs_BV = sorted_BV.softmax(-1)
            # Drop a token when the tokens before it already reach top_p (the first always stays).
            drop_BV = probs_BV.cumsum(-1) - probs_BV >= config.top_p
            sorted_BV = sorted_BV.masked_fill(drop_BV, float("-inf"))
            scaled_BV = torch.empty_like(scaled_BV).scatter_(-1, order_BV, sorted_BV)
        if seeds_B is not None:
            tok_B = (scaled_BV + _gumbel(seeds_B, step, V)).argmax(-1)
        else:
            tok_B = torch.multinomial(scaled_BV.softmax(-1), 1, generator=generator).squeeze(-1)
    return tok_B, logp_BV.gather(-1, tok_B[:, None]).squeeze(-1)


@torch.no_grad()
def generate(forward_fn: ForwardFn, prompts: Sequence[Sequence[int]], config: SamplingConfig, *,
             device: torch.device | str = "cpu", generator: torch.Generator | None = None,
             seeds: torch.Tensor | None = None) -> Generation:
    """Generate up to ``config.max_new_tokens`` tokens for every prompt with one forward per step.

    ``generator`` (on ``device``) makes sampling reproducible without touching the global RNG. ``seeds``
    (int64 [B], `sequence_seeds`) instead makes each row's tokens a function of its own seed, independent of
    the batch it is in.
    """
    config.validate()
    if len(prompts) == 0:
        raise ValueError("generate needs at least one prompt")
    lens = [len(p) for p in prompts]
    if min(lens) == 0:
        raise ValueError("every prompt needs at least one token")
    B, P, L = len(prompts), max(lens), config.max_new_tokens
    pad = config.pad_token_id
    ids_BP = torch.full((B, P), pad, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids_BP[b, : len(p)] = torch.as_tensor(p, dtype=torch.long)
    ids_BP = ids_BP.to(device)
    prompt_len_B = torch.tensor(lens, dtype=torch.long, device=device)
    stop_ids = torch.tensor(list(config.stop_token_ids), dtype=torch.long, device=device)

    cache = KVCache(P + L)
    pos_BP = torch.arange(P, device=device).expand(B, P)
    logits_BV = forward_fn(ids_BP, pos_BP, cache.prefill_hook(B), prompt_len_B - 1)
    tokens_BL = torch.full((B, L), pad, dtype=torch.long, device=device)
    logprobs_BL = torch.zeros(B, L, dtype=torch.float32, device=device)
    lengths_B = torch.zeros(B, dtype=torch.long, device=device)
    done_B = torch.zeros(B, dtype=torch.bool, device=device)
    pos_B = prompt_len_B.clone()
    zeros_B = torch.zeros(B, dtype=torch.long, device=device)
    seeds_B = None if seeds is None else torch.as_tensor(seeds, dtype=torch.long).to(device)
    if seeds_B is not None and seeds_B.shape != (B,):
        raise ValueError(f"seeds must have one entry per prompt ({B}), got shape {tuple(seeds_B.shape)}")
    for i in range(L):
        tok_B, lp_B = sample_tokens(logits_BV, config, generator, seeds_B=seeds_B, step=i)
        tokens_BL[:, i] = tok_B.masked_fill(done_B, pad)
        logprobs_BL[:, i] = lp_B.masked_fill(done_B, 0.0)
        lengths_B += (~done_B).long()
        done_B = done_B | torch.isin(tok_B, stop_ids)
        if i == L - 1 or bool(done_B.all()):
            break
        logits_BV = forward_fn(tok_B[:, None], pos_B[:, None], cache.decode_hook(pos_B), zeros_B)
        pos_B = pos_B + 1
    return Generation(tokens_BL, logprobs_BL, lengths_B, done_B)
