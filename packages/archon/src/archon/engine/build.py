"""Build the model an engine trains: meta build -> parallelize -> materialise -> load or init weights."""

from __future__ import annotations

import glob
import os
from collections.abc import Callable
from typing import Any

import torch
from archon.engine.dp_layout import DataParallelLayout
from archon.engine.pipeline_runner import build_pipeline_model
from archon.engine.setup import EngineSetup
from archon.hf import build_model, load_hf_weights
from archon.models.common.head import LMHead
from archon_ckpt import clean_fqn
from torch import nn


def _has_weights(path: str) -> bool:
    d = path if os.path.isdir(path) else os.path.dirname(path)
    return bool(glob.glob(os.path.join(d, "*.safetensors")))


def block_compile_config(cfg, dims, device: torch.device):
    """torch.compile settings: scope from `archon.config.validate.compile_scope`. With pad_to_maximum every
    micro-batch has the same token count, so the graphs compile once with static shapes (dynamic=False);
    without it dynamic=None (automatic dynamic): the first shape compiles static and the first change marks
    the changed dims dynamic (one recompile, not one per micro-batch shape until dynamo's recompile limit)."""
    from archon.config.validate import compile_enabled, compile_scope
    from archon_parallel.compile import CompileConfig

    mode = None if cfg.archon.compile_mode == "default" else cfg.archon.compile_mode
    dta = cfg.archon.tree_training_mode == "dta"
    # dta: every unit has its own token count, so its graphs start dynamic (no static first compile), and its KV
    # hook runs eagerly between two graphs per block (no fullgraph).
    dynamic = False if cfg.archon.pad_to_maximum else (True if dta else None)
    return CompileConfig(enabled=compile_enabled(cfg, device), scope=compile_scope(cfg, dims, device), mode=mode,
                         dynamic=dynamic, fullgraph=not dta, cpp_wrapper=cfg.archon.compile_cpp_wrapper)


def build_parallel_model(setup: EngineSetup, meshes, layout: DataParallelLayout, *,
                         stage_prune: Callable[[nn.Module, Any], None] | None = None) -> nn.Module:
    """The model of `setup` on this rank, wrapped by `layout` (the engine's data-parallel layout) over `meshes`.
    `stage_prune(model, plan)` (pipeline parallel) cuts the meta model down to one stage first."""
    from archon.spec import get_model_spec
    from archon_parallel.fsdp import FSDPConfig

    cfg, dims, device, head = setup.cfg, setup.dims, setup.device, setup.head
    if not cfg.path:
        raise ValueError("actor.path is empty: set it to an HF model directory or a config.json")
    hf_cfg = setup.hf_config
    if dims.pp > 1 and stage_prune is None:
        return build_pipeline_model(setup, meshes, lambda prune: (
            build_parallel_model(setup, meshes, layout, stage_prune=prune)))
    model = build_model(hf_cfg, head=head, device="meta", dtype=torch.float32)
    if stage_prune is not None:
        stage_prune(model, get_model_spec(hf_cfg.model_type).parallel_plan(model.args))
    model.set_attention_backend(setup.attn_impl)
    lora = cfg.lora.enabled
    if lora:
        from archon import lora_integration as li

        li.inject_engine_lora(model, cfg.lora, stage=stage_prune is not None)
    spec = get_model_spec(hf_cfg.model_type)
    plan = spec.parallel_plan(model.args)
    compile_cfg = block_compile_config(cfg, dims, device)
    param_dtype = "bfloat16" if setup.dtype == torch.bfloat16 else "float32"
    fsdp = FSDPConfig(param_dtype=param_dtype, reduce_dtype="float32",
                      reshard_after_forward=cfg.archon.reshard_after_forward, cpu_offload=cfg.archon.offload_params)
    if dims.tp_enabled:
        from archon.parallel_head import apply_head_norm_tp

        apply_head_norm_tp(model, meshes["tp"])
    if isinstance(model.output, LMHead) and (dims.tp_enabled or compile_cfg.enabled):
        # the LM head built whole: a vocab shard under TP, its softmax kernels compiled with the blocks
        model.output = LMHead.like(model.output, tp_mesh=meshes["tp"] if dims.tp_enabled else None,
                                   compile_backend=compile_cfg.backend if compile_cfg.enabled else None)
    if lora:
        li.restore_trainable(model)  # the head / q-k-norm TP above re-created parameters as trainable
    hooks = li.lora_parallel_hooks() if lora else {}
    layout.wrap(model, dims, plan, device_type=device.type, ac=setup.ac_mode, compile=compile_cfg, fsdp=fsdp, **hooks)
    model.to_empty(device="cpu" if cfg.archon.offload_params else device)
    model.init_buffers()
    if _has_weights(cfg.path) and not cfg.init_from_scratch:
        if lora:
            li.load_base_weights(model, cfg.path, strict=stage_prune is None)
        else:  # a pipeline stage holds only its own layers
            load_hf_weights(model, cfg.path, strict=stage_prune is None)
    else:
        init_like_single_process(model, hf_cfg, head, cfg.seed)
    if lora:
        li.init_lora_like_single_process(model, cfg.seed)
        if cfg.lora.adapter_path:
            li.load_adapter(model, cfg.lora.adapter_path)
        li.check_same_trainable_per_stage(model, dims, meshes)
    return model


@torch.no_grad()
def init_like_single_process(model: nn.Module, hf_cfg, head: str, seed: int) -> None:
    """Random init that gives the same weights on every layout: init a full CPU copy, then keep each shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = build_model(hf_cfg, head=head, device="meta", dtype=torch.float32)
    full.to_empty(device="cpu")
    full.init_weights(seed=seed)
    src = full.state_dict()
    for name, t in model.state_dict(keep_vars=True).items():
        key = clean_fqn(name)
        if key not in src and ".lora_" in key:
            continue  # LoRA factors: archon.lora_integration.init_lora_like_single_process
        value = src[key]
        if isinstance(t, DTensor):
            local = distribute_tensor(value.to(t.device_mesh.device_type, t.dtype), t.device_mesh, t.placements,
                                      src_data_rank=None).to_local()
            t.to_local().copy_(local)
        else:
            t.copy_(value.to(t.device, t.dtype))
