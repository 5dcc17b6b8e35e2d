"""Read and write adapters in peft's on-disk format (``adapter_model.safetensors`` + ``adapter_config.json``).

Keys are ``base_model.model.<HF module path>.lora_A.weight`` / ``.lora_B.weight`` for linears and
``base_model.model.<HF param path>`` for ``modules_to_save``, exactly as peft writes them.
``to_hf_name`` / ``from_hf_name`` map *parameter* paths between native and HF names (the same mapping a
model's state-dict adapter implements), e.g. ``"layers.0.attn.wq.weight" <-> "model.layers.0.self_attn.q_proj.weight"``.

Expert LoRA is written and read in peft's ``target_parameters`` form over the fused HF expert parameters
(``gate_up_proj`` / ``down_proj``), see ``archon_lora.peft_experts``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.tensor import distribute_tensor

from archon_lora.config import LoRAConfig, lora_scaling
from archon_lora.experts import ExpertLoRA
from archon_lora.inject import SAVED_MODULE_ATTR, lora_modules
from archon_lora.layers import LoRALinear
from archon_lora.merge import clean_name, lora_state_dict
from archon_lora.peft_experts import (
    FUSED_EXPERT_PARAMS,
    expert_file_rank,
    expert_peft_plan,
    expert_peft_tensors,
    hf_experts_module,
    pad_rank,
    peft_rank_alpha,
)

__all__ = ["save_peft_adapter", "load_peft_adapter", "read_peft_config", "ADAPTER_WEIGHTS", "ADAPTER_CONFIG"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."


class _Entry(NamedTuple):
    native_param: str  # native path of the base parameter the tensor belongs to (or of the saved param)
    kind: str  # "A", "B" or "save"
    module: nn.Module
    attr: str  # parameter name on ``module``
    sd_key: str  # key in ``lora_state_dict``


def _entries(model: nn.Module) -> list[_Entry]:
    out: list[_Entry] = []
    for path, module in model.named_modules():
        path = clean_name(path)
        if isinstance(module, LoRALinear):
            out += [_Entry(f"{path}.weight", k, module, f"lora_{k}", f"{path}.lora_{k}") for k in "AB"]
        elif isinstance(module, ExpertLoRA):
            out += [_Entry(f"{path}.{w}", k, module, f"lora_{k}_{w}", f"{path}.lora_{k}_{w}")
                    for w in module.lora_targets for k in "AB"]
        elif getattr(module, SAVED_MODULE_ATTR, False):
            out += [_Entry(f"{path}.{n}", "save", module, n, f"{path}.{n}") for n, _ in module.named_parameters()]
    return out


def _file_key(e: _Entry, hf_param: str) -> str:
    if e.kind == "save":
        return _PREFIX + hf_param
    return f"{_PREFIX}{hf_param.removesuffix('.weight')}.lora_{e.kind}.weight"


def save_peft_adapter(model: nn.Module, out_dir: str, config: LoRAConfig, to_hf_name: Callable[[str], str],
                      base_model_name_or_path: str | None = None) -> None:
    """Write the adapter of ``model`` in peft's format to ``out_dir``.

    Collective under FSDP2/TP (DTensors are gathered); only global rank 0 writes. ``config`` supplies
    r / alpha / rsLoRA / dropout; every LoRA module's own r and scaling must agree with it.
    """
    native_sd = lora_state_dict(model)
    tensors: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    saved: set[str] = set()
    target_parameters: list[str] = []
    entries = _entries(model)
    # peft's fused gate_up_proj pair needs rank 2r to hold separate gate and up pairs; every pair of the file is
    # then zero-padded to that rank (an exact update), so one r / lora_alpha serves all and no pattern is needed
    file_r = max([expert_file_rank(e.module) for e in entries if isinstance(e.module, ExpertLoRA)] + [config.r])
    for e in entries:
        if e.kind != "save" and (e.module.r != config.r or abs(e.module.scaling - config.scaling) > 1e-12):
            raise ValueError(
                f"LoRA at {e.native_param!r} has r={e.module.r}, scaling={e.module.scaling:g} but the config "
                f"gives r={config.r}, scaling={config.scaling:g}; pass the LoRAConfig used for inject_lora"
            )
        if isinstance(e.module, ExpertLoRA):
            path = e.native_param.rpartition(".")[0]
            if e.kind == "A" and e.native_param.endswith(e.module.lora_targets[0]):  # once per module
                t, params = expert_peft_tensors(e.module, hf_experts_module(to_hf_name, path), native_sd, path,
                                                config.dropout, file_r)
                tensors.update(t)
                target_parameters += [p for p in params if p not in target_parameters]
            continue
        hf_param = to_hf_name(e.native_param)
        t = native_sd[e.sd_key]
        if e.kind != "save":
            t = pad_rank(t, file_r, dim=0 if e.kind == "A" else 1)
        tensors[_file_key(e, hf_param)] = t.contiguous()
        hf_module_leaf = hf_param.rpartition(".")[0].rpartition(".")[2]
        if e.kind == "save":
            saved.add(hf_module_leaf)
        else:
            targets.add(hf_module_leaf)
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    adapter_config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": file_r,
        "lora_alpha": config.scaling * (file_r ** 0.5 if config.use_rslora else file_r),  # the same scaling
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "target_modules": sorted(targets) or None,
        "modules_to_save": sorted(saved) or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
    }
    if target_parameters:
        adapter_config["target_parameters"] = target_parameters
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(os.path.join(out_dir, ADAPTER_WEIGHTS), 0o666 & ~umask)  # safetensors creates files 0600
    with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as f:
        json.dump(adapter_config, f, indent=2, sort_keys=True)


def _read_config(in_dir: str) -> dict:
    path = os.path.join(in_dir, ADAPTER_CONFIG)
    if not os.path.exists(path):
        raise ValueError(f"no {ADAPTER_CONFIG} in {in_dir!r}; is this a peft adapter directory?")
    with open(path) as f:
        cfg = json.load(f)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {cfg.get('peft_type')!r} is not supported, only LORA")
    if cfg.get("archon_expert_lora"):
        raise ValueError(f"{path}: expert LoRA in archon's former own layout (archon_expert_lora), which peft loads "
                         "without applying it; re-export the checkpoint with `archon export-adapter` (peft's "
                         "target_parameters form)")
    for key in ("use_dora", "lora_bias", "fan_in_fan_out"):
        if cfg.get(key):
            raise ValueError(f"{path}: {key}=true is not supported by archon-lora")
    return cfg


def read_peft_config(in_dir: str) -> LoRAConfig:
    """The ``LoRAConfig`` of a peft LoRA adapter directory (HF leaf names; pass ``name_aliases`` to inject).

    ``target_parameters`` on fused experts (``...experts.gate_up_proj`` / ``.down_proj``) become the experts
    module's leaf name in ``target_modules`` and ``expert_params`` (gate_up_proj -> w1, w3; down_proj -> w2).
    """
    cfg = _read_config(in_dir)
    targets = cfg.get("target_modules") or []
    expert_modules: list[str] = []
    expert_params: list[str] = []
    for name in cfg.get("target_parameters") or []:
        module, _, param = name.rpartition(".")
        if param not in FUSED_EXPERT_PARAMS or not module:
            raise ValueError(f"{os.path.join(in_dir, ADAPTER_CONFIG)}: target parameter {name!r} is not a fused "
                             f"expert parameter ({sorted(FUSED_EXPERT_PARAMS)}); archon-lora cannot load it")
        expert_modules.append(module.rpartition(".")[2])
        expert_params += FUSED_EXPERT_PARAMS[param]
    if not isinstance(targets, list) or not (targets or expert_modules):
        raise ValueError(
            f"{os.path.join(in_dir, ADAPTER_CONFIG)}: target_modules {targets!r} must be a non-empty list of "
            "module names (regex strings and 'all-linear' are not supported)"
        )
    targets = list(targets) + [m for m in dict.fromkeys(expert_modules) if m not in targets]
    return LoRAConfig(r=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), dropout=float(cfg.get("lora_dropout") or 0.0),
                      use_rslora=bool(cfg.get("use_rslora", False)), target_modules=targets,
                      modules_to_save=list(cfg.get("modules_to_save") or []),
                      expert_params=sorted(set(expert_params)) or ["w1", "w2", "w3"])


def load_peft_adapter(model: nn.Module, in_dir: str, from_hf_name: Callable[[str], str]) -> None:
    """Load a peft LoRA adapter into ``model`` (LoRA already injected on the same targets).

    ``from_hf_name`` maps an HF parameter path to the native one. Everything is validated before any
    tensor is copied, and errors name the offending key. The LoRA modules' alpha / rsLoRA scaling are set
    from the adapter config. DTensor parameters receive their own shard.
    """
    cfg = _read_config(in_dir)
    weights_path = os.path.join(in_dir, ADAPTER_WEIGHTS)
    if not os.path.exists(weights_path):
        raise ValueError(f"no {ADAPTER_WEIGHTS} in {in_dir!r}")
    file_sd = load_file(weights_path)
    r, alpha, use_rslora = int(cfg["r"]), float(cfg["lora_alpha"]), bool(cfg.get("use_rslora", False))
    entries = _entries(model)
    index = {(e.native_param, e.kind): e for e in entries if not isinstance(e.module, ExpertLoRA)}
    experts = {clean_name(n): m for n, m in model.named_modules() if isinstance(m, ExpertLoRA)}
    # Every module takes the adapter's scaling, whatever its own rank (a zero-padded file has a larger r);
    # a module whose rank_pattern / alpha_pattern scaling differs gets the ratio folded into B.
    scaling = lora_scaling(r, alpha, use_rslora)
    expert_plan: list[tuple[nn.Module, str, torch.Tensor]] = []
    expert_done: set[tuple[str, str]] = set()
    expert_keys: set[str] = set()
    for hf_module, params in _targeted_experts(file_sd, cfg.get("target_parameters") or []).items():
        native = from_hf_name(f"{hf_module}.{params[0]}").rpartition(".")[0]
        module = experts.get(native)
        if module is None:
            raise ValueError(f"adapter targets expert parameters {params} of {hf_module!r} but the model has no expert "
                             f"LoRA at {native!r}; inject LoRA on the experts first")
        pairs, used = expert_peft_plan(module, native, hf_module, file_sd, cfg, params, scaling)
        for attr, tensor in pairs:
            if tuple(tensor.shape) != tuple(module.get_parameter(attr).shape):
                raise ValueError(f"shape mismatch for expert LoRA {native}.{attr}: adapter {tuple(tensor.shape)}, "
                                 f"model {tuple(module.get_parameter(attr).shape)}")
            expert_plan.append((module, attr, tensor))
            expert_done.add((native, attr.rpartition("_")[2]))
        expert_keys |= used
    for native, module in experts.items():
        lacking = [w for w in module.lora_targets if (native, w) not in expert_done]
        if lacking:
            raise ValueError(f"adapter in {in_dir!r} is missing expert LoRA for {native} {lacking} (its "
                             f"target_parameters are {cfg.get('target_parameters')}); the adapter must cover every "
                             "injected module")

    plan: list[tuple[_Entry, torch.Tensor]] = []
    for file_key in sorted(set(file_sd) - expert_keys):
        tensor = file_sd[file_key]
        if not file_key.startswith(_PREFIX):
            raise ValueError(f"unexpected key {file_key!r}: peft adapter keys start with {_PREFIX!r}")
        hf = file_key.removeprefix(_PREFIX)
        kind = "save"
        if hf.endswith((".lora_A.weight", ".lora_B.weight")):
            kind, hf_module = hf[-len("A.weight")], hf[: -len(".lora_A.weight")]
            hf = hf_module + ".weight"
        native_param = from_hf_name(hf)
        e = index.get((native_param, kind))
        if e is None:
            what = "a module in modules_to_save" if kind == "save" else "a LoRA target module"
            raise ValueError(
                f"unexpected key {file_key!r}: its native name {native_param!r} is not {what} of the model "
                f"(unknown target module?); inject LoRA on the adapter's target_modules "
                f"{cfg.get('target_modules')} / modules_to_save {cfg.get('modules_to_save')} first"
            )
        param = e.module.get_parameter(e.attr)
        if kind != "save":
            tensor = _fit_linear(file_sd, file_key, kind, e.module, cfg, hf_module, scaling)
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(
                f"shape mismatch for {file_key!r}: adapter {tuple(tensor.shape)}, model {tuple(param.shape)} "
                f"at {native_param!r}"
            )
        plan.append((e, tensor))
    loaded = {(e.native_param, e.kind) for e, _ in plan}
    missing = [e for key, e in index.items() if key not in loaded]
    if missing:
        e = missing[0]
        what = f"{e.native_param} ({'saved module' if e.kind == 'save' else 'lora_' + e.kind})"
        raise ValueError(
            f"adapter in {in_dir!r} is missing {len(missing)} tensor(s) the model expects, first: missing key "
            f"for {what}; the adapter must cover every injected module"
        )
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.set_scaling(scaling * (m.r ** 0.5 if use_rslora else m.r), use_rslora)
        for e, tensor in plan:
            _copy_into(e.module.get_parameter(e.attr), tensor)
        for module, attr, tensor in expert_plan:
            _copy_into(module.get_parameter(attr), tensor)


def _fit_linear(file_sd: dict[str, torch.Tensor], file_key: str, kind: str, module: nn.Module, cfg: dict,
                hf_module: str, scaling: float) -> torch.Tensor:
    """The file's A or B for a linear LoRA of rank ``module.r`` that will scale by ``scaling``: a zero-padded
    larger rank is cut back (exact), a pattern's different scaling is folded into B."""
    own = file_sd[file_key]
    a = file_sd.get(file_key.replace(".lora_B.weight", ".lora_A.weight"), own if kind == "A" else None)
    b = file_sd.get(file_key.replace(".lora_A.weight", ".lora_B.weight"), own if kind == "B" else None)
    rf, alpha_f = peft_rank_alpha(cfg, hf_module)
    r = module.r
    rank = own.shape[0] if kind == "A" else own.shape[-1]
    if a is None or b is None:  # the partner's absence is reported as a missing key
        a, b = (own, None) if kind == "A" else (None, own)
        if rank == r:
            return own if kind == "A" else own * (lora_scaling(rf, alpha_f, bool(cfg.get("use_rslora"))) / scaling)
    if rank != r:
        if a is None or b is None or not (a.shape[0] > r and (not a[r:].any() or not b[:, r:].any())):
            raise ValueError(
                f"rank mismatch for {file_key!r}: adapter r={rank} (tensor {tuple(own.shape)}) "
                f"but the model's LoRA at {hf_module!r} has r={r}; inject with LoRAConfig(r={rank})")
        a, b = a[:r], b[:, :r]
    if kind == "A":
        return a
    assert b is not None
    return b * (lora_scaling(rf, alpha_f, bool(cfg.get("use_rslora"))) / scaling)


def _targeted_experts(file_sd: dict[str, torch.Tensor], target_parameters: list[str]) -> dict[str, list[str]]:
    """HF experts module -> its fused parameters matched by ``target_parameters`` (peft's suffix matching),
    for every module the file holds LoRA tensors of."""
    out: dict[str, list[str]] = {}
    for key in file_sd:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix(_PREFIX).removesuffix(".lora_A.weight")
        while module.endswith(".base_layer"):
            module = module.removesuffix(".base_layer")
        params = [p for p in FUSED_EXPERT_PARAMS if any(
            f"{module}.{p}" == t or f"{module}.{p}".endswith("." + t) for t in target_parameters)]
        if params:
            out[module] = params
    return out


def _copy_into(param: torch.Tensor, full: torch.Tensor) -> None:
    placements = getattr(param, "placements", None)
    if placements is None:
        param.copy_(full.to(param.dtype))
        return
    # Every rank holds the full tensor from the file: take the local shard without communication.
    shard = distribute_tensor(full.to(param.dtype), param.device_mesh, placements, src_data_rank=None)
    param.to_local().copy_(shard.to_local())
