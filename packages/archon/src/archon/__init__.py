"""Archon: a PyTorch-native engine for RL post-training of LLMs."""

from archon.hf import build_model, from_pretrained, load_hf_weights, save_pretrained
from archon.models.common.args import ModelArgs
from archon.models.common.decoder import Decoder
from archon.spec import ModelSpec, get_model_spec, register_model, registered_models

__all__ = [
    "Decoder", "ModelArgs", "ModelSpec", "build_model", "from_pretrained", "get_model_spec",
    "load_hf_weights", "register_model", "registered_models", "save_pretrained",
]
