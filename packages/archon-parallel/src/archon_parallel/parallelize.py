"""One ``parallelize`` for every model: TP -> EP -> CP -> AC -> compile -> FSDP, driven by a ParallelPlan.

Expert and context parallel live in sibling modules and are looked up lazily:

- EP (``dims.ep > 1``): ``archon_parallel.expert_parallel.apply_expert_parallel(moe, ep_mesh, etp_mesh)``
  on the parent of ``plan.experts`` in every block that has one (etp_mesh only when ``dims.etp > 1``);
  expert weights are then FSDP-sharded over ``edp``. The router gate and shared experts stay dense
  (replicated over ep and tp, FSDP over the dense mesh).
- Hybrid attn/ffn form (MoE parallel folding, ``archon:(attn:d2t2|ffn:e4)``): the same, on the expert
  mesh ``(edp, ep, etp)`` that re-splits a stage's ranks, so ep groups may take tp (and cp) ranks. The
  MoE keeps the plan's tp layout (tokens replicated over tp inside it); when ep folds onto tp ranks
  (``etp < tp``) ``expert_folding.fold_expert_runner`` makes each of the ``tp / etp`` ranks that share
  tokens dispatch a distinct slice of the rows and all-gather the outputs, so each row is computed
  once. ``etp`` must divide ``tp`` (``expert_folding.validate_folding``, checked before any mesh).
- CP (``dims.cp > 1``): attention picks its CP backend at runtime (``context_parallel.get_cp_attention``
  with ``meshes.group("cp")``): nothing is applied to the model here. FSDP shards over dp_shard x cp.

Extension points (for layers archon_parallel does not know, e.g. LoRA): ``style_factory`` replaces
``tensor_parallel.make_style`` when TP builds a style from its plan name, and ``after_expert_parallel(moe,
ep_mesh, etp_mesh)`` runs on each MoE right after expert parallel (before folding and FSDP). Both are
plain arguments, so nothing is patched and concurrent calls do not interfere.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from .checkpointing import ACConfig, apply_ac
from .compile import CompileConfig, apply_compile
from .dims import ParallelDims, ParallelMeshes
from .expert_folding import fold_expert_runner, fold_mesh, validate_folding
from .expert_parallel import apply_expert_parallel
from .fsdp import FSDPConfig, apply_fsdp, mixed_precision_policy
from .plan import ParallelPlan
from .tensor_parallel import StyleFactory, apply_tp, validate_tp

__all__ = ["AfterExpertParallel", "parallelize"]

# Called as `after_expert_parallel(moe, ep_mesh, etp_mesh)` once per MoE module after its experts are sharded.
AfterExpertParallel = Callable[[nn.Module, DeviceMesh, DeviceMesh | None], None]


def _apply_ep(model: nn.Module, dims: ParallelDims, meshes: ParallelMeshes, plan: ParallelPlan,
              device_type: str, after_expert_parallel: AfterExpertParallel | None = None) -> None:
    if plan.experts is None:
        raise ValueError("expert parallelism (ep > 1) needs ParallelPlan.experts, the experts module name")
    parent, _, _ = plan.experts.rpartition(".")
    etp_mesh = meshes["etp"] if dims.etp > 1 else None
    fold = fold_mesh(dims, meshes, device_type)  # None unless hybrid ep folds onto tp ranks
    for _, block in plan.block_list(model):
        if plan.optional_module(block, plan.experts) is not None:
            moe = block.get_submodule(parent) if parent else block
            apply_expert_parallel(moe, meshes["ep"], etp_mesh)
            if after_expert_parallel is not None:
                after_expert_parallel(moe, meshes["ep"], etp_mesh)
            if fold is not None:
                fold_expert_runner(moe, fold.get_group())


def _tied_to(model: nn.Module, module: nn.Module) -> list[nn.Module]:
    """Modules outside ``module`` that hold one of its parameters (a tied LM head holds the embedding's)."""
    own = {id(p) for p in module.parameters()}
    inside = {id(m) for m in module.modules()}
    return [m for m in model.modules() if id(m) not in inside
            and any(id(p) in own for p in m.parameters(recurse=False))]


def _fsdp_groups(model: nn.Module, plan: ParallelPlan) -> list[nn.Module | list[nn.Module]]:
    """``[embedding, *blocks, [norm, head]]``. A tied embedding joins the last unit with the module that shares
    its weight (FSDP2 needs one unit per parameter); that unit stays unsharded from the embedding lookup to
    the head, one all-gather per step instead of two."""
    groups: list[nn.Module | list[nn.Module]] = []
    tail = [m for m in (plan.optional_module(model, plan.norm), plan.optional_module(model, plan.head)) if m is not None]
    if (embedding := plan.optional_module(model, plan.embedding)) is not None:
        if tied := _tied_to(model, embedding):
            tail = [embedding, *tail, *(m for m in tied if all(m is not t for t in tail))]
        else:
            groups.append(embedding)
    groups.extend(block for _, block in plan.block_list(model))
    if tail:
        groups.append(tail)
    return groups


def _expert_modules(model: nn.Module, plan: ParallelPlan) -> list[nn.Module]:
    if plan.experts is None:
        return []
    found = (plan.optional_module(block, plan.experts) for _, block in plan.block_list(model))
    return [m for m in found if m is not None]


def parallelize(
    model: nn.Module,
    dims: ParallelDims,
    plan: ParallelPlan,
    *,
    device_type: str = "cpu",
    ac: ACConfig | str | None = None,
    compile: CompileConfig | bool | None = None,
    fsdp: FSDPConfig | None = None,
    sequence_parallel: bool = True,
    loss_parallel: bool = True,
    style_factory: StyleFactory | None = None,
    after_expert_parallel: AfterExpertParallel | None = None,
) -> nn.Module:
    """Apply every parallelism ``dims`` asks for to ``model`` in place and return it.

    Call on a model built on the ``meta`` device (then ``to_empty`` + load weights), or on a
    materialised model whose parameters are identical on every rank. ``fsdp=None`` means plain fp32
    FSDP with default resharding. World size 1 applies only AC and compile. ``style_factory`` and
    ``after_expert_parallel`` are the extension points described in the module docstring; None keeps
    the built-in behaviour.
    """
    if dims.tp_enabled and plan.num_heads is not None:
        validate_tp(plan.num_heads, plan.num_kv_heads or plan.num_heads, dims.tp)
    validate_folding(dims)
    compile_cfg = CompileConfig(enabled=compile) if isinstance(compile, bool) else (compile or CompileConfig())
    sharded = dims.fsdp_enabled or (dims.ep_enabled and dims.edp > 1)
    if compile_cfg.enabled and compile_cfg.scope == "stack" and sharded:
        raise ValueError("compile scope 'stack' would put FSDP2's per-block all-gathers inside one graph; with data "
                         "sharding (d>1, or experts sharded over edp) use compile scope 'block'")
    meshes: ParallelMeshes = dims.build_meshes(device_type)
    ac_cfg = ACConfig.parse(ac)
    if ac_cfg.mode == "memory_budget" and not compile_cfg.enabled:
        raise ValueError("activation checkpointing mode 'memory_budget' needs compile; enable compile or "
                         "choose 'full' / 'selective'")
    if dims.tp_enabled:
        apply_tp(model, meshes["tp"], plan, sequence_parallel=sequence_parallel, loss_parallel=loss_parallel,
                 style_factory=style_factory)
    if dims.ep_enabled:
        _apply_ep(model, dims, meshes, plan, device_type, after_expert_parallel)
    apply_ac(model, plan, ac_cfg, compiled=compile_cfg.enabled)
    apply_compile(model, plan, compile_cfg)
    if sharded:
        cfg = fsdp or FSDPConfig(param_dtype="float32", reduce_dtype="float32")
        expert_groups = _expert_modules(model, plan) if dims.ep_enabled else []
        apply_fsdp(
            model, meshes["fsdp"],
            groups=_fsdp_groups(model, plan),
            mp_policy=mixed_precision_policy(cfg.param_dtype, cfg.reduce_dtype),
            reshard_after_forward=cfg.reshard_after_forward,
            cpu_offload=cfg.cpu_offload,
            pp_enabled=dims.pp_enabled,
            expert_groups=expert_groups,
            expert_mesh=meshes["edp"],
        )
    return model
