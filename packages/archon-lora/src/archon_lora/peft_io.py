"""Read and write adapters in peft's on-disk format (``adapter_model.safetensors`` + ``adapter_config.json``).

Keys are ``base_model.model.<HF module path>.lora_A.weight`` / ``.lora_B.weight`` for linears and
``base_model.model.<HF param path>`` for ``modules_to_save``, exactly as peft writes them.
``to_hf_name`` / ``from_hf_name`` map *parameter* paths between native and HF names (the same mapping a
model's state-dict adapter implements), e.g. ``"layers.0.attn.wq.weight" <-> "model.layers.0.self_attn.q_proj.weight"``.

Expert LoRA (our format, not loadable by peft): for a 3-D expert weight with HF name ``P`` (whatever
``to_hf_name`` returns for the native ``<experts>.w1`` etc.) the file holds ``base_model.model.P.lora_A.weight``
[E, R, In] and ``base_model.model.P.lora_B.weight`` [E, O, R]; expert e's update is
``scaling * B[e] @ A[e]``. The config lists these ``P`` under ``"archon_expert_lora"``. peft 0.21 adapts
fused HF expert tensors through ``target_parameters`` with one A/B pair shaped [E*R, In] / [O, E*R] over
the *fused* gate_up weight, which cannot express separate gate/up pairs of rank R, hence our own layout.
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

from archon_lora.config import LoRAConfig
from archon_lora.experts import ExpertLoRA
from archon_lora.inject import SAVED_MODULE_ATTR, lora_modules
from archon_lora.layers import LoRALinear
from archon_lora.merge import clean_name, lora_state_dict

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
    hf_module = hf_param if isinstance(e.module, ExpertLoRA) else hf_param.removesuffix(".weight")
    return f"{_PREFIX}{hf_module}.lora_{e.kind}.weight"


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
    expert_params: list[str] = []
    for e in _entries(model):
        if e.kind != "save" and (e.module.r != config.r or abs(e.module.scaling - config.scaling) > 1e-12):
            raise ValueError(
                f"LoRA at {e.native_param!r} has r={e.module.r}, scaling={e.module.scaling:g} but the config "
                f"gives r={config.r}, scaling={config.scaling:g}; pass the LoRAConfig used for inject_lora"
            )
        hf_param = to_hf_name(e.native_param)
        tensors[_file_key(e, hf_param)] = native_sd[e.sd_key].contiguous()
        hf_module_leaf = hf_param.rpartition(".")[0].rpartition(".")[2]
        if e.kind == "save":
            saved.add(hf_module_leaf)
        elif isinstance(e.module, ExpertLoRA):
            if hf_param not in expert_params:
                expert_params.append(hf_param)
        else:
            targets.add(hf_module_leaf)
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    adapter_config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "target_modules": sorted(targets),
        "modules_to_save": sorted(saved) or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
    }
    if expert_params:
        adapter_config["archon_expert_lora"] = expert_params
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, ADAPTER_WEIGHTS), metadata={"format": "pt"})
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
    for key in ("use_dora", "lora_bias", "fan_in_fan_out"):
        if cfg.get(key):
            raise ValueError(f"{path}: {key}=true is not supported by archon-lora")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise ValueError(f"{path}: per-module {key} {cfg[key]} is not supported; use one r and alpha")
    return cfg


def read_peft_config(in_dir: str) -> LoRAConfig:
    """The ``LoRAConfig`` of a peft LoRA adapter directory (HF leaf names; pass ``name_aliases`` to inject).

    Expert LoRA entries (``archon_expert_lora``) are not turned into targets: add the experts module name.
    """
    cfg = _read_config(in_dir)
    targets = cfg.get("target_modules")
    if not isinstance(targets, list) or not targets:
        raise ValueError(
            f"{os.path.join(in_dir, ADAPTER_CONFIG)}: target_modules {targets!r} must be a non-empty list of "
            "module names (regex strings and 'all-linear' are not supported)"
        )
    return LoRAConfig(r=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), dropout=float(cfg.get("lora_dropout") or 0.0),
                      use_rslora=bool(cfg.get("use_rslora", False)), target_modules=list(targets),
                      modules_to_save=list(cfg.get("modules_to_save") or []))


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
    expert_params = set(cfg.get("archon_expert_lora") or [])
    index = {(e.native_param, e.kind): e for e in _entries(model)}

    plan: list[tuple[_Entry, torch.Tensor]] = []
    for file_key in sorted(file_sd):
        tensor = file_sd[file_key]
        if not file_key.startswith(_PREFIX):
            raise ValueError(f"unexpected key {file_key!r}: peft adapter keys start with {_PREFIX!r}")
        hf = file_key.removeprefix(_PREFIX)
        kind = "save"
        if hf.endswith((".lora_A.weight", ".lora_B.weight")):
            kind, hf_module = hf[-len("A.weight")], hf[: -len(".lora_A.weight")]
            hf = hf_module if hf_module in expert_params else hf_module + ".weight"
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
        if kind != "save" and e.module.r != r:
            raise ValueError(
                f"rank mismatch for {file_key!r}: adapter r={r} (tensor {tuple(tensor.shape)}) but the model's "
                f"LoRA at {native_param!r} has r={e.module.r}; inject with LoRAConfig(r={r})"
            )
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
        for module in lora_modules(model).values():
            module.set_scaling(alpha, use_rslora)
        for e, tensor in plan:
            _copy_into(e.module.get_parameter(e.attr), tensor)


def _copy_into(param: torch.Tensor, full: torch.Tensor) -> None:
    placements = getattr(param, "placements", None)
    if placements is None:
        param.copy_(full.to(param.dtype))
        return
    # Every rank holds the full tensor from the file: take the local shard without communication.
    shard = distribute_tensor(full.to(param.dtype), param.device_mesh, placements, src_data_rank=None)
    param.to_local().copy_(shard.to_local())
