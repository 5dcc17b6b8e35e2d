"""archon-lora: LoRA layers that compose with FSDP2/TP, injection by module name, PEFT-format adapter I/O."""

from archon_lora.config import LoRAConfig, lora_scaling
from archon_lora.experts import ExpertLoRA, add_expert_lora, is_grouped_experts
from archon_lora.inject import init_lora_weights, inject_lora, lora_modules
from archon_lora.layers import LoRALinear
from archon_lora.merge import (
    lora_disabled,
    lora_state_dict,
    merge_lora,
    merged_state_dict,
    trainable_parameters,
    unmerge_lora,
)
from archon_lora.parallel import (
    LoRATensorParallel,
    check_same_trainable,
    distribute_lora,
    lora_tp_plan,
    place_lora_like_base,
)
from archon_lora.peft_io import load_peft_adapter, read_peft_config, save_peft_adapter

__all__ = [
    "LoRAConfig",
    "lora_scaling",
    "LoRALinear",
    "ExpertLoRA",
    "add_expert_lora",
    "is_grouped_experts",
    "inject_lora",
    "init_lora_weights",
    "lora_modules",
    "merge_lora",
    "unmerge_lora",
    "merged_state_dict",
    "lora_state_dict",
    "trainable_parameters",
    "lora_disabled",
    "lora_tp_plan",
    "distribute_lora",
    "LoRATensorParallel",
    "place_lora_like_base",
    "check_same_trainable",
    "save_peft_adapter",
    "load_peft_adapter",
    "read_peft_config",
]
