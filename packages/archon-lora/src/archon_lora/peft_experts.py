"""Expert LoRA in peft's ``target_parameters`` form (peft >= 0.17 ``ParamWrapper`` on fused HF experts).

HF transformers >= 5 stores a MoE layer's experts as one module with fused 3-D parameters
``gate_up_proj`` [E, 2I, D] (gate rows first, then up rows) and ``down_proj`` [E, D, I]. peft adapts each
targeted parameter with one pair ``lora_A.weight`` [E*R, In] / ``lora_B.weight`` [O, E*R]; expert e's
update is ``scaling * B_e @ A_e`` with ``A_e = A[e*R:(e+1)*R]`` and ``B_e[:, k] = B[:, k*E + e]``
(peft interleaves the experts in B). Several parameters of one module nest their wrappers in the module's
parameter order, so with both targeted the file keys are ``<experts>.base_layer.lora_*`` (gate_up_proj)
and ``<experts>.lora_*`` (down_proj).

Archon's ``ExpertLoRA`` has separate rank-R pairs on ``w1`` (gate) and ``w3`` (up). Both together are a
rank-2R update of the fused ``gate_up_proj`` with block-diagonal B; the file then has ``r = 2R`` and every
other pair is zero-padded to rank 2R (exact; the scaling is kept through ``lora_alpha``). peft 0.21 applies
``rank_pattern`` to target parameters but warns that such keys "were ignored", hence one rank for all. peft's own rank-R ``gate_up_proj`` pair loads
as ``w1``/``w3`` pairs sharing A. Whatever does not fit (dropout on experts, a coupled rank-2R pair into
rank-R pairs) is refused with a message, never written or read approximately.

Legend: E: experts, R: LoRA rank, I: expert hidden dim, D: model dim.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from archon_lora.config import lora_scaling
from archon_lora.experts import ExpertLoRA

__all__ = ["FUSED_EXPERT_PARAMS", "expert_peft_tensors", "expert_peft_plan", "peft_rank_alpha"]

# HF fused parameter -> the native weights it holds, in HF registration order (peft nests wrappers by it)
FUSED_EXPERT_PARAMS: dict[str, tuple[str, ...]] = {"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)}
_PREFIX = "base_model.model."


def _hf_params(targets: tuple[str, ...]) -> list[str]:
    return [p for p, ws in FUSED_EXPERT_PARAMS.items() if set(ws) & set(targets)]


def _key(hf_module: str, params: list[str], param: str, kind: str) -> str:
    depth = len(params) - 1 - params.index(param)  # the first parameter is wrapped innermost
    return f"{_PREFIX}{hf_module}{'.base_layer' * depth}.lora_{kind}.weight"


def _to_peft_B(b_EOR: torch.Tensor) -> torch.Tensor:
    return b_EOR.permute(1, 2, 0).reshape(b_EOR.shape[1], -1)


def _from_peft(a: torch.Tensor, b: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's [E*R, In] / [O, E*R] -> [E, R, In] / [E, O, R]."""
    E = num_experts
    return a.reshape(E, -1, a.shape[-1]), b.reshape(b.shape[0], -1, E).permute(2, 0, 1)


def hf_experts_module(to_hf_name: Callable[[str], str], native_path: str) -> str:
    """The HF experts module path of the ExpertLoRA at ``native_path`` (``to_hf_name`` of its weights' parent)."""
    hf = {to_hf_name(f"{native_path}.{w}").rpartition(".")[0] for w in ("w1", "w2", "w3")}
    if len(hf) != 1:
        raise ValueError(f"expert weights of {native_path!r} map to different HF modules {sorted(hf)}; peft's "
                         "target_parameters form needs one fused experts module")
    return hf.pop()


def expert_file_rank(module: ExpertLoRA) -> int:
    """The rank peft needs for this module's pairs: 2r when gate and up both carry LoRA (one fused pair)."""
    return 2 * module.r if {"w1", "w3"} <= set(module.lora_targets) else module.r


def pad_rank(t: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    """Zero-pad the rank dimension ``dim`` of a LoRA factor to ``rank`` (B @ A is unchanged)."""
    if t.shape[dim] == rank:
        return t
    pad = list(t.shape)
    pad[dim] = rank - t.shape[dim]
    return torch.cat([t, t.new_zeros(pad)], dim=dim)


def expert_peft_tensors(module: ExpertLoRA, hf_module: str, sd: dict[str, torch.Tensor], native_path: str,
                        dropout: float, file_r: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """File tensors (every pair zero-padded to rank ``file_r``) and target parameter names of one ExpertLoRA
    (full tensors ``sd``)."""
    if dropout:
        raise ValueError(f"expert LoRA at {native_path!r} with lora dropout {dropout}: peft's target_parameters "
                         "LoRA has no dropout and refuses such an adapter; train with actor.lora.dropout=0")
    tensors: dict[str, torch.Tensor] = {}
    params = _hf_params(module.lora_targets)
    pairs = {w: (sd[f"{native_path}.lora_A_{w}"], sd[f"{native_path}.lora_B_{w}"]) for w in module.lora_targets}
    for param in params:
        ws = [w for w in FUSED_EXPERT_PARAMS[param] if w in pairs]
        if param == "gate_up_proj":
            (a1, b1), (a3, b3) = pairs.get("w1", (None, None)), pairs.get("w3", (None, None))
            if len(ws) == 2:  # rank 2R, block-diagonal B: [B1 0; 0 B3] @ [A1; A3]
                a = torch.cat([a1, a3], dim=1)
                b = torch.cat([torch.cat([b1, torch.zeros_like(b3)], dim=2),
                               torch.cat([torch.zeros_like(b1), b3], dim=2)], dim=1)
            else:  # one of gate / up: the other half of B is zero
                a, b_half = (a1, b1) if ws == ["w1"] else (a3, b3)
                halves = [b_half, torch.zeros_like(b_half)]
                b = torch.cat(halves if ws == ["w1"] else halves[::-1], dim=1)
        else:
            a, b = pairs["w2"]
        a, b = pad_rank(a, file_r, dim=1), pad_rank(b, file_r, dim=2)
        tensors[_key(hf_module, params, param, "A")] = a.reshape(-1, a.shape[-1]).contiguous()
        tensors[_key(hf_module, params, param, "B")] = _to_peft_B(b).contiguous()
    return tensors, [f"{hf_module}.{p}" for p in params]


def _nonzero_rank(a_ERIn: torch.Tensor, b_EOR: torch.Tensor) -> int:
    """1 + the last rank index whose A row or B column is non-zero in some expert (trailing zero ranks cut)."""
    used = a_ERIn.abs().sum(dim=(0, 2)).ne(0) & b_EOR.abs().sum(dim=(0, 1)).ne(0)
    idx = used.nonzero()
    return int(idx[-1]) + 1 if len(idx) else 0


def peft_rank_alpha(cfg: dict, hf_param: str) -> tuple[int, float]:
    """r and lora_alpha peft uses for ``hf_param`` (its ``rank_pattern`` / ``alpha_pattern`` matching)."""
    def pick(patterns: dict | None, default):
        for key, value in (patterns or {}).items():
            if re.match(rf"(.*\.)?({key})$", hf_param):
                return value
        return default

    return int(pick(cfg.get("rank_pattern"), cfg["r"])), float(pick(cfg.get("alpha_pattern"), cfg["lora_alpha"]))


def expert_peft_plan(module: ExpertLoRA, native_path: str, hf_module: str, file_sd: dict[str, torch.Tensor],
                     cfg: dict, targeted: list[str], scaling: float) -> tuple[list[tuple[str, torch.Tensor]], set[str]]:
    """(parameter name on ``module``, tensor) pairs loading peft's ``targeted`` fused parameters of one experts
    module, and the file keys used; ``module`` will scale by ``scaling`` (a parameter whose rank / alpha
    pattern gives another scaling has the ratio folded into B)."""
    E = module.w1.shape[0]
    plan: list[tuple[str, torch.Tensor]] = []
    used: set[str] = set()
    for param in targeted:
        ka, kb = _key(hf_module, targeted, param, "A"), _key(hf_module, targeted, param, "B")
        if ka not in file_sd or kb not in file_sd:
            raise ValueError(f"adapter lists target parameter {hf_module}.{param} but has no {ka!r} / {kb!r}")
        used |= {ka, kb}
        a, b = _from_peft(file_sd[ka], file_sd[kb], E)
        rf, alpha_f = peft_rank_alpha(cfg, f"{hf_module}.{param}")
        if a.shape[1] != rf:
            raise ValueError(f"{ka!r} has rank {a.shape[1]} per expert but the adapter config gives r={rf}")
        b = b * (lora_scaling(rf, alpha_f, bool(cfg.get("use_rslora"))) / scaling)
        ws = [w for w in FUSED_EXPERT_PARAMS[param] if w in module.lora_targets]
        if rf > module.r and len(ws) == 1 and _nonzero_rank(a, b) <= module.r:
            a, b, rf = a[:, :module.r], b[:, :, :module.r], module.r  # zero-padded (see save): exact cut
        missing = [w for w in FUSED_EXPERT_PARAMS[param] if w not in module.lora_targets]
        r = module.r
        if param == "down_proj":
            pieces = {"w2": (a, b)}
        else:
            inter = b.shape[1] // 2
            b_gate, b_up = b[:, :inter], b[:, inter:]
            if rf == r:  # peft's own form (or one of gate/up): the two halves share A
                pieces = {"w1": (a, b_gate), "w3": (a, b_up)}
            elif rf == 2 * r and not b_gate[:, :, r:].any() and not b_up[:, :, :r].any():
                pieces = {"w1": (a[:, :r], b_gate[:, :, :r]), "w3": (a[:, r:], b_up[:, :, r:])}
            else:
                raise ValueError(
                    f"{ka!r}: a rank-{rf} pair over the fused gate_up_proj cannot be loaded into expert LoRA of "
                    f"rank {r} (gate and up pairs of rank {r} hold rank {r} shared-A or rank {2 * r} block-diagonal "
                    f"updates); inject the experts with r={rf}")
            for w in missing:
                if pieces[w][1].any():
                    raise ValueError(f"{ka!r} updates the {'gate' if w == 'w1' else 'up'} half of gate_up_proj but "
                                     f"the expert LoRA at {native_path!r} has no {w} pair; add {w} to expert_params")
        for w in ws:
            a_w, b_w = pieces[w]
            if a_w.shape[1] != r:
                raise ValueError(f"rank mismatch for {ka!r}: adapter rank {a_w.shape[1]} per expert but the model's "
                                 f"expert LoRA at {native_path!r} has r={r}; inject with LoRAConfig(r={a_w.shape[1]})")
            plan += [(f"lora_A_{w}", a_w), (f"lora_B_{w}", b_w)]
    return plan, used
