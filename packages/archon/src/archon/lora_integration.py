"""LoRA in the engine: config -> archon_lora, injection on the meta model, TP placements, init that equals one
process, base-weight loading, PEFT adapter save/load with HF names, and merged / adapter-only export.

Order inside `build_parallel_model` (per pipeline stage when p>1): inject (meta) -> parallelize with
`lora_parallel_hooks()` (LoRA-aware TP styles, expert LoRA placed after EP; TP -> EP -> AC -> compile -> FSDP2)
-> to_empty -> base weights -> `init_lora_like_single_process` -> optional `actor.lora.adapter_path` ->
trainable-set check across ranks.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import zlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.tensor.parallel import ParallelStyle

# HF leaf names of the Qwen family -> native leaf names (targets may use either).
QWEN_ALIASES = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo", "gate_proj": "w1",
                "up_proj": "w3", "down_proj": "w2", "lm_head": "output", "embed_tokens": "tok_embeddings"}
_EXPERT_HF = {"w1": "gate_up_proj", "w2": "down_proj", "w3": "gate_up_proj"}  # fused HF experts (transformers >= 5)
_LORA_PARAM = re.compile(r"\.lora_[AB](_w[123])?$")


def is_lora_param(native_name: str) -> bool:
    """True for a LoRA factor's native name (`...wq.lora_A`, `...experts.lora_B_w1`)."""
    return bool(_LORA_PARAM.search(native_name))


def to_lora_config(cfg):
    """archon_lora.LoRAConfig from the `actor.lora` section (expert LoRA adds the `experts` target)."""
    from archon_lora import LoRAConfig

    targets = list(cfg.target_modules)
    if cfg.expert_lora and "experts" not in targets:
        targets.append("experts")
    return LoRAConfig(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, use_rslora=cfg.use_rslora,
                      target_modules=targets, modules_to_save=list(cfg.modules_to_save))


def validate_lora(cfg, dims) -> None:
    """Reject LoRA settings the parallel layout cannot run, with the rule named."""
    if cfg.dropout > 0 and dims.tp > 1:
        raise ValueError("rule lora-dropout-with-tp: actor.lora.dropout > 0 under tensor parallel would draw the "
                         "dropout mask from DTensor's RNG (untested); set actor.lora.dropout=0 or use t1")


def _matches_any(model: nn.Module, target: str) -> bool:
    head, _, leaf = target.rpartition(".")
    native = f"{head}.{QWEN_ALIASES.get(leaf, leaf)}" if head else QWEN_ALIASES.get(leaf, leaf)
    return any(p == native or p.endswith("." + native) for p, _ in model.named_modules() if p)


def inject_engine_lora(model: nn.Module, cfg, *, stage: bool = False) -> None:
    """Inject LoRA into a (meta) model per `actor.lora` and store the LoRAConfig as `model.lora_config`.

    `experts` on a dense model is dropped when it came from `expert_lora`. On a pipeline stage (`stage`), names
    are checked against the whole model (a typo still raises) and each stage keeps the targets it holds; a
    stage with none is rejected (its optimizer would be empty).
    """
    from archon_lora import inject_lora, is_grouped_experts

    lcfg = to_lora_config(cfg)
    if "experts" in lcfg.target_modules and not any(is_grouped_experts(m) for m in model.modules()):
        if not cfg.expert_lora:
            raise ValueError("actor.lora.target_modules names 'experts' but the model has no MoE experts; remove it")
        lcfg.target_modules.remove("experts")
    local = lcfg
    if stage:
        from archon.hf import build_model, load_hf_config

        inject_lora(build_model(load_hf_config(model.hf_config), device="meta"), lcfg, name_aliases=QWEN_ALIASES)
        local = copy.copy(lcfg)
        local.target_modules = [t for t in lcfg.target_modules if _matches_any(model, t)]
        local.modules_to_save = [t for t in lcfg.modules_to_save if _matches_any(model, t)]
    if not local.target_modules:
        layers = sorted(model.layers.keys(), key=int) if getattr(model, "layers", None) is not None else []
        raise ValueError(f"rule lora-stage-without-adapter: the pipeline stage with layers {layers} holds none of "
                         f"actor.lora.target_modules {lcfg.target_modules}; every stage needs a LoRA target "
                         "(use leaf names such as q_proj) or use p1")
    inject_lora(model, local, name_aliases=QWEN_ALIASES)
    model.lora_config = lcfg
    if head_untied(model):  # the trainable lm_head copy must survive Decoder.to_empty's re-tying
        model.tie_weights = lambda: None
    model.lora_trainable = {n for n, p in model.named_parameters() if p.requires_grad}


def restore_trainable(model: nn.Module) -> None:
    """Re-freeze the base after a TP step that re-created parameters (torch's styles make them trainable)."""
    from archon_lora.merge import clean_name

    keep = model.lora_trainable
    for n, p in model.named_parameters():
        p.requires_grad_(clean_name(n) in keep)


class _KeepRequiresGrad(ParallelStyle):
    """Run a TP style and give every parameter it re-creates back its `requires_grad` (frozen base stays frozen)."""

    def __init__(self, style: ParallelStyle) -> None:
        super().__init__()
        self.style = style

    def _apply(self, module: nn.Module, device_mesh):
        before = {n: p.requires_grad for n, p in module.named_parameters()}
        out = self.style._apply(module, device_mesh)
        for n, p in out.named_parameters():
            if n in before:
                p.requires_grad_(before[n])
        return out


def lora_config_of(model: nn.Module):
    """The LoRAConfig a model was injected with, or None."""
    return getattr(model, "lora_config", None)


def lora_style_factory(name: str, **kw) -> ParallelStyle | None:
    """`parallelize(style_factory=...)` for a LoRA model: colwise/rowwise TP styles also place LoRA A/B like
    their base (`LoRATensorParallel` behaves exactly like the wrapped style on plain linears), and every TP
    style keeps the frozen base frozen."""
    from archon_lora import LoRATensorParallel
    from archon_parallel.tensor_parallel import make_style
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    style = make_style(name, **kw)
    if name in ("colwise", "rowwise", "rowwise_seq") and isinstance(style, (ColwiseParallel, RowwiseParallel)):
        style = LoRATensorParallel(style)
    return None if style is None else _KeepRequiresGrad(style)


def lora_after_expert_parallel(moe: nn.Module, ep_mesh, etp_mesh=None) -> None:
    """`parallelize(after_expert_parallel=...)` for a LoRA model: shard expert LoRA pairs on experts like
    w1/w2/w3, before FSDP."""
    from archon_lora import ExpertLoRA, place_lora_like_base

    if isinstance(moe.experts, ExpertLoRA):
        place_lora_like_base(moe.experts)


def lora_parallel_hooks() -> dict:
    """The keyword arguments that make `archon_parallel.parallelize` LoRA-aware (TP styles and EP placement)."""
    return {"style_factory": lora_style_factory, "after_expert_parallel": lora_after_expert_parallel}


def _hf_name_fn(model: nn.Module):
    from archon.spec import get_model_spec

    adapter = get_model_spec(model.args.model_type).state_dict_adapter(model.args)

    def to_hf_name(native: str) -> str:
        m = re.match(r"^layers\.(\d+)\.moe\.experts\.(w[123])$", native)
        if m:  # archon's own expert-LoRA layout (see docs/archon-lora.md)
            return f"model.layers.{m.group(1)}.mlp.experts.{_EXPERT_HF[m.group(2)]}"
        return adapter.hf_sources(native)[0][0]

    return adapter, to_hf_name


def to_hf_name_fn(model: nn.Module):
    """native parameter path -> HF path (`layers.0.attention.wq.weight` -> `model.layers.0.self_attn.q_proj.weight`)."""
    return _hf_name_fn(model)[1]


def from_hf_name_fn(model: nn.Module):
    """Inverse of `to_hf_name_fn` over the model's own base parameters (and expert weights)."""
    from archon_lora.merge import clean_name

    to_hf = to_hf_name_fn(model)
    table: dict[str, str] = {}
    for name, _ in model.named_parameters():
        name = clean_name(name)
        if is_lora_param(name):
            continue
        try:
            table[to_hf(name)] = name
        except KeyError:
            continue

    def from_hf_name(hf: str) -> str:
        if hf not in table:
            raise KeyError(f"no native parameter for HF name {hf!r}")
        return table[hf]

    return from_hf_name


def head_untied(model: nn.Module) -> bool:
    """True when `modules_to_save` turned a tied LM head into its own trainable copy."""
    from archon_lora.inject import SAVED_MODULE_ATTR

    return bool(model.args.tie_embeddings and getattr(model.output, SAVED_MODULE_ATTR, False))


def load_base_weights(model: nn.Module, path: str, *, strict: bool = True) -> None:
    """`archon.hf.load_hf_weights` for a model with LoRA injected: LoRA factors are not in the base checkpoint."""
    from archon_ckpt import HFSource

    from archon.hf import load_hf_weights

    tied_head = model.args.tie_embeddings and model.output is not None

    def source_for(name: str):
        if tied_head and name == "output.weight":  # a modules_to_save copy of a tied head starts from the embedding
            return HFSource(("model.embed_tokens.weight",), None) if head_untied(model) else None
        return None if is_lora_param(name) else NotImplemented

    load_hf_weights(model, path, strict=strict, source_for=source_for)


@torch.no_grad()
def init_lora_like_single_process(model: nn.Module, seed: int) -> None:
    """A kaiming-uniform(a=sqrt(5)) (per expert for expert LoRA) and B zero, drawn on full CPU tensors from a
    generator seeded by (seed, module path), so every layout starts from the same adapter as one process."""
    from archon_lora import ExpertLoRA, LoRALinear, lora_modules
    from archon_lora.merge import clean_name
    from torch.distributed.tensor import DTensor, distribute_tensor

    for path, module in lora_modules(model).items():
        # one generator per module, seeded by its path: a pipeline stage draws what one process draws
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(clean_name(path).encode()))
        if isinstance(module, LoRALinear):
            pairs = [(module.lora_A, module.lora_B)]
        else:
            assert isinstance(module, ExpertLoRA)
            pairs = [module.lora_pair(w) for w in module.lora_targets]
        for a, b in pairs:
            bound = 1.0 / (a.shape[-1] ** 0.5)  # kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in))
            full_a = torch.empty(a.shape, dtype=torch.float32).uniform_(-bound, bound, generator=gen)
            for param, full in ((a, full_a), (b, torch.zeros(b.shape))):
                if isinstance(param, DTensor):
                    local = distribute_tensor(full.to(param.device_mesh.device_type, param.dtype), param.device_mesh,
                                              param.placements, src_data_rank=None).to_local()
                    param.to_local().copy_(local)
                else:
                    param.copy_(full.to(param.device, param.dtype))


def check_same_trainable_per_stage(model: nn.Module, dims, meshes) -> None:
    """Every rank that runs collectives with this one (same pipeline stage) has the same trainable set."""
    from archon_lora import check_same_trainable

    if meshes is None:
        return
    if dims.pp <= 1:
        check_same_trainable(model)
        return
    for name, size in (("dp_cp", dims.dp_cp), ("tp", dims.tp)):  # pipeline stages differ by design
        if size > 1:
            check_same_trainable(model, meshes.group(name))


def load_adapter(model: nn.Module, adapter_dir: str) -> None:
    """Load a PEFT adapter (peft's or ours) into the injected model; alpha / rsLoRA come from the adapter."""
    from archon_lora import load_peft_adapter, lora_modules

    if not os.path.isdir(adapter_dir):
        raise ValueError(f"actor.lora.adapter_path {adapter_dir!r} is not a directory")
    load_peft_adapter(model, adapter_dir, from_hf_name=from_hf_name_fn(model))
    modules = list(lora_modules(model).values())
    if lora_config_of(model) is not None and modules:  # the adapter's scaling now applies to every module
        model.lora_config = dataclasses.replace(model.lora_config, alpha=modules[0].alpha,
                                                use_rslora=modules[0].use_rslora)


def _reject_pipeline(model: nn.Module, what: str) -> None:
    if getattr(model, "pipeline", None) is not None:  # each rank holds one stage: rank 0 alone would write a part
        raise ValueError(f"{what} under pipeline parallelism (p>1) is not supported yet; export the merged weights "
                         "with engine.export_weights(dir, merged=True) (complete under p>1), or save a checkpoint "
                         "and reload it with p1 (archon:d1 or d/t layouts) to write the PEFT adapter")


def save_adapter(model: nn.Module, out_dir: str, base_path: str | None = None) -> None:
    """PEFT-format adapter with HF names (collective under FSDP2/TP; rank 0 writes)."""
    from archon_lora import save_peft_adapter

    _reject_pipeline(model, "saving the adapter")
    lcfg = lora_config_of(model)
    if lcfg is None:
        raise ValueError("the engine has no LoRA adapter; set actor.lora.enabled=true")
    save_peft_adapter(model, out_dir, lcfg, to_hf_name_fn(model), base_model_name_or_path=base_path)


def iter_merged_hf_tensors(model: nn.Module, dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    """HF (name, tensor) of the base weights with every LoRA update folded in (collective: all ranks); a pipeline
    stage yields its own layers (see `archon.engine.export.write_hf_dir`)."""
    from archon_lora import merged_state_dict

    adapter, _ = _hf_name_fn(model)
    tied = model.args.tie_embeddings and not head_untied(model)
    for name, t in merged_state_dict(model).items():
        if adapter.is_native_only(name) or (tied and name == "output.weight"):
            continue
        t = t.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        yield from adapter.to_hf(name, t)
