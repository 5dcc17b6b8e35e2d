"""Qwen3-MoE: Qwen3 attention; sparse MoE FFN every `decoder_sparse_step` layers except `mlp_only_layers`."""

from typing import Any

from archon.models.common.args import ModelArgs


def qwen3_moe_args(cfg: Any) -> ModelArgs:
    bias = bool(getattr(cfg, "attention_bias", False))
    return ModelArgs.common_from_hf(
        cfg, qkv_bias=bias, o_bias=bias, qk_norm=True,
        num_experts=cfg.num_experts, top_k=cfg.num_experts_per_tok, moe_inter_dim=cfg.moe_intermediate_size,
        norm_topk_prob=bool(cfg.norm_topk_prob), decoder_sparse_step=cfg.decoder_sparse_step,
        mlp_only_layers=tuple(getattr(cfg, "mlp_only_layers", None) or ()),
        router_aux_loss_coef=float(getattr(cfg, "router_aux_loss_coef", 0.0)),
    )
