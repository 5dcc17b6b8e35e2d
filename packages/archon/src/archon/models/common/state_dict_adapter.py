"""Native <-> Hugging Face parameter names for the Qwen family, both directions.

A native parameter maps to one or more HF tensors (MoE experts: one stacked [E, ...] native tensor is
E per-expert HF tensors). `hf_sources` tells a loader which HF keys build one native tensor and how;
`to_hf` splits a native tensor into HF tensors for export.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import torch

from archon.models.common.args import ModelArgs

_LAYER_RULES = [  # (native suffix, HF suffix) inside layer i
    ("attention.wq.{p}", "self_attn.q_proj.{p}"),
    ("attention.wk.{p}", "self_attn.k_proj.{p}"),
    ("attention.wv.{p}", "self_attn.v_proj.{p}"),
    ("attention.wo.{p}", "self_attn.o_proj.{p}"),
    ("attention.q_norm.weight", "self_attn.q_norm.weight"),
    ("attention.k_norm.weight", "self_attn.k_norm.weight"),
    ("attention_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("feed_forward.w1.weight", "mlp.gate_proj.weight"),
    ("feed_forward.w2.weight", "mlp.down_proj.weight"),
    ("feed_forward.w3.weight", "mlp.up_proj.weight"),
    ("moe.router.gate.weight", "mlp.gate.weight"),
]
_EXPERT_RULES = {"moe.experts.w1": "gate_proj", "moe.experts.w2": "down_proj", "moe.experts.w3": "up_proj"}
_TOP_RULES = [
    ("tok_embeddings.weight", "model.embed_tokens.weight"),
    ("norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("score.weight", "score.weight"),
    ("score.bias", "score.bias"),
]
# Native-only buffers/params that have no HF counterpart (kept at their initial value on HF import).
_NATIVE_ONLY = re.compile(r"^layers\.\d+\.moe\.(router\.expert_bias|expert_bias|tokens_per_expert).*$")


def _expand(rules: list[tuple[str, str]]) -> list[tuple[str, str]]:
    out = []
    for n, h in rules:
        for p in ("weight", "bias") if "{p}" in n else ("",):
            out.append((n.format(p=p), h.format(p=p)))
    return out


class QwenStateDictAdapter:
    """HF <-> native names for qwen2 / qwen3 / qwen3_moe (and their value-head variants)."""

    def __init__(self, args: ModelArgs) -> None:
        self.args = args
        self._n2h = dict(_expand(_LAYER_RULES))
        self._h2n = {h: n for n, h in self._n2h.items()}

    def is_native_only(self, native: str) -> bool:
        return bool(_NATIVE_ONLY.match(native))

    def hf_sources(self, native: str) -> tuple[list[str], Callable[[list[torch.Tensor]], torch.Tensor]]:
        """HF keys that build native tensor `native`, and the function that combines them."""
        for n, h in _TOP_RULES:
            if native == n:
                return [h], _single
        m = re.match(r"^layers\.(\d+)\.(.+)$", native)
        if m is None:
            raise KeyError(f"no HF name for native parameter {native!r}")
        i, rest = m.group(1), m.group(2)
        if rest in _EXPERT_RULES:
            proj = _EXPERT_RULES[rest]
            keys = [f"model.layers.{i}.mlp.experts.{j}.{proj}.weight" for j in range(self.args.num_experts)]
            return keys, _stack
        if rest not in self._n2h:
            raise KeyError(f"no HF name for native parameter {native!r}")
        return [f"model.layers.{i}.{self._n2h[rest]}"], _single

    def to_hf(self, native: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        keys, combine = self.hf_sources(native)
        if combine is _stack:
            yield from zip(keys, tensor.unbind(0))
        else:
            yield keys[0], tensor

    def to_hf_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, t in state_dict.items():
            if self.is_native_only(name):
                continue
            out.update(self.to_hf(name, t))
        return out

    def from_hf_state_dict(self, hf: dict[str, torch.Tensor], native_names: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        for name in native_names:
            keys, combine = self.hf_sources(name)
            out[name] = combine([hf[k] for k in keys])
        return out


def _single(ts: list[torch.Tensor]) -> torch.Tensor:
    return ts[0]


def _stack(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(ts, dim=0)
