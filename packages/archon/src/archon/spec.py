"""ModelSpec registry keyed by the HF `model_type`.

A spec says how to read a model's arguments from an HF config, which module class to build, how its
parameter names map to HF's, and its parallel plan (filled by `archon_parallel`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from archon.models.common.args import ModelArgs
from archon.models.common.decoder import Decoder
from archon.models.common.state_dict_adapter import QwenStateDictAdapter
from archon.models.qwen2 import qwen2_args
from archon.models.qwen3 import qwen3_args
from archon.models.qwen3_moe import qwen3_moe_args


@dataclass(frozen=True)
class ModelSpec:
    name: str
    args_from_hf: Callable[[Any], ModelArgs]
    parallel_plan: Callable[[ModelArgs], Any]  # TP/SP/EP/CP sharding of the model's modules (every layout uses it)
    model_cls: type = Decoder
    state_dict_adapter: type = QwenStateDictAdapter
    hf_causal_lm: str = ""  # transformers class name, for docs and export checks
    hf_value_model: str = ""


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> None:
    _REGISTRY[spec.name] = spec


def get_model_spec(model_type: str) -> ModelSpec:
    if model_type not in _REGISTRY:
        raise ValueError(
            f"unsupported model_type {model_type!r}; registered model types: {sorted(_REGISTRY)}. "
            "Register a ModelSpec with archon.spec.register_model to add one."
        )
    return _REGISTRY[model_type]


def registered_models() -> list[str]:
    return sorted(_REGISTRY)


def _qwen_plan(args: ModelArgs) -> Any:
    from archon.parallel_plan import qwen_parallel_plan

    return qwen_parallel_plan(args)


register_model(ModelSpec("qwen2", qwen2_args, parallel_plan=_qwen_plan, hf_causal_lm="Qwen2ForCausalLM",
                         hf_value_model="Qwen2ForTokenClassification"))
register_model(ModelSpec("qwen3", qwen3_args, parallel_plan=_qwen_plan, hf_causal_lm="Qwen3ForCausalLM",
                         hf_value_model="Qwen3ForTokenClassification"))
register_model(ModelSpec("qwen3_moe", qwen3_moe_args, parallel_plan=_qwen_plan,
                         hf_causal_lm="Qwen3MoeForCausalLM", hf_value_model="Qwen3MoeForTokenClassification"))
