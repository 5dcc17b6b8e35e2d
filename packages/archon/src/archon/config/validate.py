"""Reject incompatible feature combinations up front, each with the rule named."""

from __future__ import annotations

from typing import Any

import torch

AC_MODES = ("none", "full", "selective", "memory_budget")
PP_SCHEDULES = ("1F1B", "Interleaved1F1B", "InterleavedZeroBubble", "ZBVZeroBubble", "GPipe")
ATTN_IMPLS = ("auto", "sdpa", "varlen", "flex")
CP_IMPLS = ("ulysses", "ring")
TREE_MODES = ("disabled", "sparse", "dta")
DP_LAYOUTS = ("fsdp", "zero1")
COMPILE_SCOPES = ("block", "stack")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")


def validate_engine(cfg, dims, device: torch.device, *, hf_config: Any = None) -> None:
    """Check an ActorConfig against the parallel dims and device; raise ValueError naming the rule.
    `hf_config`: the model's HF config when the caller has read it (`archon.engine.setup`); otherwise it is read
    from `cfg.path` once, and only when a rule needs it."""
    a = cfg.archon
    hf = _HFConfig(cfg.path, hf_config)
    if a.ac_mode not in AC_MODES:
        raise ValueError(f"actor.archon.ac_mode {a.ac_mode!r} is not one of {AC_MODES}")
    compile_on = compile_enabled(cfg, device)
    if a.ac_mode == "memory_budget":
        if not compile_on:
            raise ValueError("rule ac-memory-budget-needs-compile: actor.archon.ac_mode=memory_budget works through "
                             "torch.compile's min-cut partitioner; set actor.archon.enable_compile=true or use "
                             "ac_mode=selective/full")
        if not 0.0 < a.ac_memory_budget <= 1.0:
            raise ValueError(f"actor.archon.ac_memory_budget must be in (0, 1], got {a.ac_memory_budget}")
    if a.ac_selective_every < 1:
        raise ValueError(f"actor.archon.ac_selective_every must be >= 1, got {a.ac_selective_every}")
    if a.pp_schedule not in PP_SCHEDULES:
        raise ValueError(f"actor.archon.pp_schedule {a.pp_schedule!r} is not one of {PP_SCHEDULES}")
    if dims.pp > 1:
        validate_pipeline(cfg, dims, hf_config=hf)
    if a.attn_impl not in ATTN_IMPLS:
        raise ValueError(f"actor.archon.attn_impl {a.attn_impl!r} is not one of {ATTN_IMPLS}")
    if a.cp_impl not in CP_IMPLS:
        raise ValueError(f"actor.archon.cp_impl {a.cp_impl!r} is not one of {CP_IMPLS}")
    if a.attn_impl == "varlen" and device.type != "cuda":
        pass  # the varlen backend has a CPU reference path
    validate_dp_layout(cfg, dims)
    validate_pad_to_maximum(cfg, dims, hf_config=hf)
    compile_scope(cfg, dims, device)  # raises for an explicit scope that cannot apply
    validate_compile_mode(cfg, dims, device)
    if a.offload_params and dims.pp > 1:
        raise ValueError("rule offload-with-pp: actor.archon.offload_params cannot be combined with pipeline "
                         "parallelism (p>1 in allocation_mode); drop one of them")
    if a.offload_params and not dims.fsdp_enabled:
        raise ValueError("rule offload-needs-fsdp: actor.archon.offload_params uses FSDP2's CPUOffloadPolicy; "
                         "it needs data-parallel sharding (d>1 in allocation_mode)")
    if dims.pp > 1 and cfg.path:
        if getattr(hf.get(), "tie_word_embeddings", False):
            raise ValueError("rule pp-tied-embeddings: pipeline parallelism (p>1) cannot split a model whose "
                             "embedding and LM head are tied (tie_word_embeddings=true); use p1 or an untied model")
    if a.tree_training_mode not in TREE_MODES:
        raise ValueError(f"actor.archon.tree_training_mode {a.tree_training_mode!r} is not one of {TREE_MODES}")
    if a.tree_training_mode != "disabled":
        if dims.pp > 1:
            raise ValueError(f"rule tree-with-pp: tree_training_mode={a.tree_training_mode} runs whole trees through "
                             "the model and cannot be split into pipeline stages; use p1 or tree_training_mode=disabled")
        if dims.cp > 1:
            raise ValueError(f"rule tree-with-cp: tree_training_mode={a.tree_training_mode} needs every tree token's "
                             "ancestors on the same rank; use c1 or tree_training_mode=disabled")
        if dims.tp > 1:
            raise ValueError(f"rule tree-with-tp: tree_training_mode={a.tree_training_mode} does not pad trees for "
                             "sequence-parallel shards yet; use t1 (scale with d) or tree_training_mode=disabled")
    if a.tree_dta_block_size < 0:
        raise ValueError(f"actor.archon.tree_dta_block_size must be >= 0 (0 = no split), got {a.tree_dta_block_size}")
    if cfg.mb_max_tokens <= 0:
        raise ValueError(f"actor.mb_max_tokens must be positive, got {cfg.mb_max_tokens}")
    if cfg.optimizer.gradient_clipping < 0:
        raise ValueError(f"actor.optimizer.gradient_clipping must be >= 0, got {cfg.optimizer.gradient_clipping}")
    if dims.tp > 1 and cfg.path:
        from archon_parallel.tensor_parallel import validate_tp

        c = hf.get()
        validate_tp(c.num_attention_heads, getattr(c, "num_key_value_heads", None) or c.num_attention_heads, dims.tp)
    if dims.cp > 1:
        if dims.pp > 1:
            raise ValueError("rule cp-with-pp: context parallelism (c>1) is not wired into pipeline stages; use p1 "
                             "with c>1, or c1 with p>1")
        if cfg.path:
            c = hf.get()
            validate_cp(a.cp_impl, c.num_attention_heads,
                        getattr(c, "num_key_value_heads", None) or c.num_attention_heads, dims.cp, dims.tp)


class _HFConfig:
    """The HF config of `path`, read at most once (or the one given)."""

    def __init__(self, path: str, config: Any = None) -> None:
        self.path, self.config = path, config

    def get(self) -> Any:
        if isinstance(self.config, _HFConfig):
            return self.config.get()
        if self.config is None:
            from archon.hf import load_hf_config

            self.config = load_hf_config(self.path)
        return self.config


def compile_enabled(cfg, device: torch.device) -> bool:
    """`actor.archon.enable_compile` resolved: None = on for CUDA, off elsewhere."""
    a = cfg.archon
    return a.enable_compile if a.enable_compile is not None else device.type == "cuda"


def fsdp_sharded(cfg, dims) -> bool:
    """Whether FSDP2 shards the model: data sharding under dp_layout=fsdp, or experts sharded over edp."""
    return (dims.fsdp_enabled and cfg.archon.dp_layout == "fsdp") or (dims.ep_enabled and dims.edp > 1)


def compile_scope(cfg, dims, device: torch.device) -> str:
    """`actor.archon.compile_scope`, checked (rules compile-stack-*). `stack` compiles all blocks as one graph
    (one dynamo/AOT host overhead per pass instead of one per block); it cannot hold FSDP2's per-block hooks,
    nor DTA's per-layer KV callbacks. `block` is the default: on one H200 (Qwen3-0.6B / 1.7B shapes, seq 4096)
    the stack graph measured 4 to 8% slower than per-block graphs."""
    a = cfg.archon
    if a.compile_scope not in COMPILE_SCOPES:
        raise ValueError(f"actor.archon.compile_scope {a.compile_scope!r} is not one of {COMPILE_SCOPES}")
    if a.compile_scope == "stack":
        if fsdp_sharded(cfg, dims):
            raise ValueError("rule compile-stack-with-fsdp: compile_scope=stack would put FSDP2's per-block "
                             "all-gathers inside one graph; with data sharding (d>1 with dp_layout=fsdp, or experts "
                             "sharded over data-parallel ranks) use compile_scope=block")
        if a.tree_training_mode == "dta":
            raise ValueError("rule compile-stack-with-dta: tree_training_mode=dta calls back into Python at every "
                             "layer (prefix KV reuse); use compile_scope=block")
    return a.compile_scope


def validate_compile_mode(cfg, dims, device: torch.device) -> None:
    """Rules compile-mode-*: CUDA graphs (reduce-overhead) need CUDA, and replay fixed addresses that FSDP2's
    per-step all-gathered parameters do not have. Rule compile-cpp-wrapper-needs-compile: the C++ wrapper is a
    compile option, an error when nothing compiles; rule compile-cpp-wrapper-cuda: refused on CUDA, where inductor
    cannot run it for Archon's batches."""
    a = cfg.archon
    if a.compile_mode not in COMPILE_MODES:
        raise ValueError(f"actor.archon.compile_mode {a.compile_mode!r} is not one of {COMPILE_MODES}")
    if a.compile_cpp_wrapper and not compile_enabled(cfg, device):
        raise ValueError("rule compile-cpp-wrapper-needs-compile: compile_cpp_wrapper configures torch.compile, which "
                         "is off (enable_compile); set enable_compile: true or drop compile_cpp_wrapper")
    if a.compile_cpp_wrapper and device.type == "cuda":
        # Measured on one H100 (torch 2.11, benchmarks/train_throughput.py --modes cpp-wrapper): inductor fails on
        # packed batches ("arg type List[int] is not yet supported") and at seq 4096 ("CudaKernelParamCache not
        # populated"); the CPU C++ wrapper runs (tests/test_compile_scope.py).
        raise ValueError("rule compile-cpp-wrapper-cuda: inductor's C++ wrapper fails on CUDA for the batches Archon "
                         "runs (packed batches: 'arg type List[int] is not yet supported'; one 4096-token sequence "
                         "on an H100: 'CudaKernelParamCache not populated'); set compile_cpp_wrapper: false on CUDA "
                         "(compile_mode=reduce-overhead also cuts host time per call)")
    if a.compile_mode != "reduce-overhead":
        return
    if device.type != "cuda":
        raise ValueError("rule compile-mode-cuda-graphs-needs-cuda: compile_mode=reduce-overhead records CUDA graphs; "
                         "use compile_mode=default on this device")
    if fsdp_sharded(cfg, dims) or dims.ep_enabled or dims.tp > 1 or dims.cp > 1 or dims.pp > 1:
        raise ValueError("rule compile-mode-cuda-graphs-layout: compile_mode=reduce-overhead is supported on one GPU "
                         "or zero1 replicas (archon:dN with dp_layout=zero1); use compile_mode=default here")
    if a.tree_training_mode != "disabled":
        raise ValueError("rule compile-mode-cuda-graphs-tree: tree modes run many differently shaped forwards per "
                         "step (and dta calls back into Python per layer); use compile_mode=default")


def validate_pad_to_maximum(cfg, dims, *, hf_config: Any = None) -> None:
    """Rules pad-to-maximum-*: only the flat runner pads a micro-batch to the token budget, and only a dense
    model leaves the padding out of every real result; an explicit `pad_to_maximum: true` elsewhere is
    rejected rather than ignored. Off by default: padding to the budget costs its compute on every short
    micro-batch (4x on a 4K sequence under a 16K budget), while automatic dynamic shapes cost one recompile."""
    a = cfg.archon
    if not a.pad_to_maximum:
        return
    fix = "set actor.archon.pad_to_maximum=false (the default)"
    if dims.cp > 1:
        raise ValueError("rule pad-to-maximum-with-cp: context parallelism (c>1) pads each micro-batch only to a "
                         f"multiple of cp x tp before sharding it, not to the token budget; {fix}")
    if dims.pp > 1:
        raise ValueError("rule pad-to-maximum-with-pp: the pipeline runner pads stage inputs to its own 64-token "
                         f"bucket and runs the blocks on each micro-batch's own tokens; {fix}")
    if a.tree_training_mode != "disabled":
        raise ValueError(f"rule pad-to-maximum-with-tree: tree_training_mode={a.tree_training_mode} runs each "
                         f"micro-batch as a trie with its own attention mask and does not pad it; {fix}")
    if cfg.path:
        if getattr(_HFConfig(cfg.path, hf_config).get(), "num_experts", 0):
            raise ValueError("rule pad-to-maximum-moe: padding tokens would be routed to experts and counted in "
                             f"the load-balancing loss and expert-load statistics, changing the loss; {fix}")


def validate_dp_layout(cfg, dims) -> None:
    """Rule zero1-pure-dp: dp_layout=zero1 keeps a full replica per rank, so every other parallel degree
    (which would shard the model) is 1, and FSDP-only knobs are rejected rather than ignored."""
    a = cfg.archon
    if a.dp_layout not in DP_LAYOUTS:
        raise ValueError(f"actor.archon.dp_layout {a.dp_layout!r} is not one of {DP_LAYOUTS}")
    if a.dp_layout != "zero1":
        return
    others = {"t (tensor)": dims.tp, "c (context)": dims.cp, "p (pipeline)": dims.pp, "e (expert)": dims.ep,
              "etp (expert tensor)": dims.etp, "r (FSDP replicate)": dims.dp_replicate}
    bad = [f"{name}={size}" for name, size in others.items() if size > 1]
    if bad or dims.hybrid:
        what = ", ".join(bad) if bad else "a hybrid attn/ffn allocation"
        raise ValueError(f"rule zero1-pure-dp: actor.archon.dp_layout=zero1 keeps a full model replica on every "
                         f"rank and needs pure data parallelism (allocation_mode archon:dN), but the allocation "
                         f"has {what}; use archon:d{dims.world_size} or dp_layout=fsdp")
    if a.offload_params:
        raise ValueError("rule offload-needs-fsdp: actor.archon.offload_params uses FSDP2's CPUOffloadPolicy; "
                         "dp_layout=zero1 has no FSDP, so set offload_params=false or dp_layout=fsdp")
    if a.reshard_after_forward != "default":
        raise ValueError(f"rule zero1-no-reshard: actor.archon.reshard_after_forward={a.reshard_after_forward} "
                         "is an FSDP2 knob; dp_layout=zero1 never shards parameters, so leave it at 'default' "
                         "or use dp_layout=fsdp")


def validate_cp(cp_impl: str, num_heads: int, num_kv_heads: int, cp: int, tp: int = 1) -> None:
    """Rule ulysses-cp-divides-heads: Ulysses splits each tp rank's query heads over the cp ranks, so cp must
    divide num_heads / tp; kv heads (num_kv_heads / tp) are repeated when cp does not divide them. Ring has
    no head rule."""
    if cp_impl not in CP_IMPLS:
        raise ValueError(f"actor.archon.cp_impl {cp_impl!r} is not one of {CP_IMPLS}")
    if cp_impl != "ulysses" or cp == 1:
        return
    local = num_heads // tp
    if num_heads % tp or local % cp:
        valid = [d for d in range(1, local + 1) if local % d == 0]
        raise ValueError(
            f"rule ulysses-cp-divides-heads: context parallel size {cp} must divide the number of attention heads "
            f"after TP ({num_heads} heads / tp {tp} = {local}) for cp_impl=ulysses; pick cp in {valid}, or set "
            f"actor.archon.cp_impl=ring (any cp; pads to a multiple of 2 x cp x tp tokens)")


def validate_pipeline(cfg, dims, *, hf_config: Any = None) -> None:
    """Pipeline rules: schedule available in this torch, stage count fills the layers, micro-batch count."""
    from archon_parallel.pipeline import available_schedules, stage_layout, validate_microbatches

    a = cfg.archon
    if a.pp_schedule not in available_schedules():
        raise ValueError(f"rule pp-schedule-available: actor.archon.pp_schedule={a.pp_schedule} is not in this "
                         f"torch's torch.distributed.pipelining; available: {available_schedules()}")
    if a.pp_stages_per_rank < 1:
        raise ValueError(f"actor.archon.pp_stages_per_rank must be >= 1, got {a.pp_stages_per_rank}")
    if a.pp_microbatches is not None:
        validate_microbatches(a.pp_schedule, a.pp_microbatches, dims.pp, a.pp_stages_per_rank)
    if cfg.path:
        stage_layout(a.pp_schedule, _HFConfig(cfg.path, hf_config).get().num_hidden_layers, 0, dims.pp, a.pp_stages_per_rank,
                     first_less=a.pp_first_stage_less_layers, last_less=a.pp_last_stage_less_layers)


def validate_no_inference(allocation_mode: str, command: str = "archon train") -> None:
    """Rule inference-part-needs-rl: only `archon rl` has rollouts, so an inference part elsewhere is an error."""
    from archon_parallel.allocation import parse_allocation

    infer = parse_allocation(allocation_mode).inference
    if infer is not None:
        part = f"{infer.backend}:" + "".join(f"{k}{v}" for k, v in infer.dims.items())
        raise ValueError(f"rule inference-part-needs-rl: allocation_mode {allocation_mode!r} has an inference part "
                         f"({part}) but {command} has no rollouts; drop '{part}+' (rollout servers are an "
                         "`archon rl` feature)")


def validate_rl_layout(cfg, world_size: int) -> None:
    """`validate_rl_replicas` with the layout parsed from ``cfg.allocation_mode`` (`cfg`: an RLConfig)."""
    from archon_parallel.dims import ParallelDims

    validate_rl_replicas(cfg, ParallelDims.from_allocation(cfg.allocation_mode, world_size), world_size)


def validate_rl_replicas(cfg, dims, world_size: int) -> None:
    """Rule zero1-pure-dp for the colocated sampler: without rollout servers every rank samples from its own full
    model replica, so the trainer must be `archon:dN` with dp_layout=zero1 for every engine (actor, critic for
    GAE); FSDP2, TP, CP, EP or PP would shard the weights the sampler needs. With rollout servers (an inference
    part in allocation_mode) any training layout works. `cfg`: an RLConfig."""
    from archon_parallel.allocation import parse_allocation

    if parse_allocation(cfg.allocation_mode).inference is not None or world_size <= 1:
        return
    servers = f"sglang:d1+{cfg.allocation_mode}"
    if dims.dp_shard * dims.dp_replicate != world_size:
        raise ValueError(f"rule zero1-pure-dp: archon rl with the embedded sampler on {world_size} ranks is data "
                         f"parallel only: use allocation_mode=archon:d{world_size} with actor.archon.dp_layout=zero1, "
                         f"or rollout servers for any layout (allocation_mode={servers})")
    engines = [("actor", cfg.actor)] + ([("critic", cfg.critic)] if cfg.rl.estimator == "gae" else [])
    for name, c in engines:
        if c.archon.dp_layout != "zero1":
            raise ValueError(f"rule zero1-pure-dp: archon rl with the embedded sampler on {world_size} ranks samples "
                             f"on every rank from a full model replica: set {name}.archon.dp_layout=zero1 (FSDP2 "
                             f"shards the weights the sampler needs), or use rollout servers "
                             f"(allocation_mode={servers})")
