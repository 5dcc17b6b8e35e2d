"""Token-choice top-k router: softmax/sigmoid scores, aux loss, aux-loss-free bias.

T: tokens, D: model dim, E: experts, K: top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .args import MoEArgs

__all__ = ["TopKRouter", "RouterOutput", "load_balancing_loss", "count_tokens_per_expert"]


@dataclass
class RouterOutput:
    weights_TK: torch.Tensor
    """Routing weights of the selected experts, in the input dtype."""
    experts_TK: torch.Tensor
    """Selected expert ids (int64)."""
    tokens_per_expert_E: torch.Tensor
    """Token-assignments per expert (int64, detached)."""
    aux_loss: torch.Tensor
    """Load-balancing loss, already multiplied by its coefficient (0 when the coefficient is 0)."""


def count_tokens_per_expert(experts_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Histogram of expert ids, int64 [E]; scatter_add keeps it on device (bincount syncs on CUDA)."""
    flat = experts_TK.reshape(-1)
    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    return counts_E.scatter_add_(0, flat, torch.ones_like(flat))


def load_balancing_loss(probs_TE: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """Switch/Qwen load-balancing loss ``E * sum_e (count_e / T) * mean_t p_te`` (K at perfect balance).

    Same definition as HF transformers' ``load_balancing_loss_func`` for one layer; computed on the
    tokens this rank sees (per micro-batch), like HF.
    """
    num_tokens, num_experts = probs_TE.shape
    if num_tokens == 0:  # an empty micro-batch (possible under EP) must not turn the loss into NaN
        return probs_TE.sum() * 0.0
    frac_E = tokens_per_expert_E.to(probs_TE.dtype) / num_tokens
    return num_experts * (frac_E * probs_TE.mean(dim=0)).sum()


class TopKRouter(nn.Module):
    """Gate GEMM + top-k selection. Parameter ``gate.weight`` [E, D]; buffer ``expert_bias`` [E] when
    ``aux_free_bias`` (persistent, so it is saved in checkpoints)."""

    def __init__(self, args: MoEArgs) -> None:
        super().__init__()
        self.num_experts = args.num_experts
        self.top_k = args.top_k
        self.score_func = args.score_func
        self.norm_topk_prob = args.norm_topk_prob
        self.route_scale = args.route_scale
        self.gate_fp32 = args.gate_fp32
        self.aux_loss_coef = args.aux_loss_coef
        self.aux_free_update_rate = args.aux_free_update_rate
        self.gate = nn.Linear(args.dim, args.num_experts, bias=False)
        self.expert_bias: torch.Tensor | None
        if args.aux_free_bias:
            self.register_buffer("expert_bias", torch.zeros(args.num_experts, dtype=torch.float32))
            # Load accumulated over the forwards since the last bias update (micro-batches, layers' calls).
            self.register_buffer(
                "load_since_update", torch.zeros(args.num_experts, dtype=torch.float32), persistent=False
            )
        else:
            self.expert_bias = None

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.trunc_normal_(self.gate.weight, std=std)
        if self.expert_bias is not None:
            self.expert_bias.zero_()
            self.load_since_update.zero_()

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        if self.gate_fp32:
            logits_TE = F.linear(x_TD.float(), self.gate.weight.float())
        else:
            logits_TE = self.gate(x_TD).float()
        if self.score_func == "softmax":
            scores_TE = logits_TE.softmax(dim=-1)
        else:
            scores_TE = logits_TE.sigmoid()

        if self.expert_bias is None:
            weights_TK, experts_TK = scores_TE.topk(self.top_k, dim=-1)
        else:
            # The bias steers the selection only; the weights come from the unbiased scores.
            _, experts_TK = (scores_TE + self.expert_bias).topk(self.top_k, dim=-1)
            weights_TK = scores_TE.gather(1, experts_TK)
        if self.norm_topk_prob:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        if self.route_scale != 1.0:
            weights_TK = weights_TK * self.route_scale

        tokens_per_expert_E = count_tokens_per_expert(experts_TK, self.num_experts)
        if self.expert_bias is not None and self.training:
            self.load_since_update += tokens_per_expert_E.float()
        if self.aux_loss_coef > 0 and self.training:
            probs_TE = (
                scores_TE if self.score_func == "softmax" else scores_TE / scores_TE.sum(-1, keepdim=True)
            )
            aux_loss = self.aux_loss_coef * load_balancing_loss(probs_TE, tokens_per_expert_E)
        else:
            aux_loss = logits_TE.new_zeros(())
        return RouterOutput(weights_TK.to(x_TD.dtype), experts_TK, tokens_per_expert_E, aux_loss)

    @torch.no_grad()
    def update_aux_free_bias(self, group: dist.ProcessGroup | None = None) -> None:
        """DeepSeek-V3 update ``bias += u * sign(mean_load - load)`` from the load since the last call.

        Call after each optimizer step. Pass the data-parallel group (the group over which routers see
        different tokens) so that every rank applies the same update from the global load.
        """
        if self.expert_bias is None:
            raise ValueError("update_aux_free_bias needs MoEArgs(aux_free_bias=True)")
        load_E = self.load_since_update
        if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(load_E, group=group)
        self.expert_bias += self.aux_free_update_rate * torch.sign(load_E.mean() - load_E)
        load_E.zero_()
