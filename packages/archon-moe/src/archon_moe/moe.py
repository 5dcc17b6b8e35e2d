"""The MoE layer: router -> permute -> experts (local or expert-parallel) -> combine (+ shared experts).

T: tokens, D: model dim, E: experts, K: top-k, N = T * K.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .args import MoEArgs
from .dispatch import ExpertRunner, LocalExpertRunner, permute_by_expert, unpermute_and_combine
from .experts import GroupedExperts, SharedExperts
from .router import TopKRouter

__all__ = ["MoE", "update_aux_free_biases", "moe_load_metrics"]


class MoE(nn.Module):
    """Token-choice top-k MoE on packed tokens ``[T, D]`` with no capacity drop.

    Parameters: ``router.gate.weight`` [E, D], ``experts.w1``/``experts.w3`` [E, I, D] (gate/up),
    ``experts.w2`` [E, D, I] (down), ``shared_experts.w{1,2,3}.weight`` when shared experts are on.
    After each forward: ``aux_loss`` (scalar with grad, times its coefficient; add it to the loss) and
    ``tokens_per_expert`` (int64 [E], detached, this rank's tokens).
    """

    def __init__(self, args: MoEArgs) -> None:
        super().__init__()
        self.args = args
        self.router = TopKRouter(args)
        self.experts = GroupedExperts(args.num_experts, args.dim, args.moe_inter_dim)
        self.shared_experts: SharedExperts | None = None
        if args.num_shared_experts > 0:
            inter = args.num_shared_experts * (args.shared_inter_dim or args.moe_inter_dim)
            self.shared_experts = SharedExperts(args.dim, inter)
        self.expert_runner: ExpertRunner = LocalExpertRunner()
        self.aux_loss = torch.zeros(())
        self.tokens_per_expert = torch.zeros(args.num_experts, dtype=torch.int64)

    def reset_parameters(self, std: float = 0.02) -> None:
        """Initialise every parameter and zero the aux-free bias (call after ``to_empty``)."""
        self.router.reset_parameters(std)
        self.experts.reset_parameters(std)
        if self.shared_experts is not None:
            self.shared_experts.reset_parameters(std)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        if x_TD.dim() != 2:
            raise ValueError(
                f"MoE expects packed tokens [T, D], got shape {tuple(x_TD.shape)}; flatten batch dims"
            )
        route = self.router(x_TD)
        self.aux_loss = route.aux_loss
        self.tokens_per_expert = route.tokens_per_expert_E
        x_ND, order_N, inverse_N = permute_by_expert(x_TD, route.experts_TK)
        y_ND = self.expert_runner(self.experts, x_ND, route.tokens_per_expert_E)
        y_TD = unpermute_and_combine(y_ND, order_N, inverse_N, route.weights_TK)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        return y_TD

    def update_aux_free_bias(self, group: dist.ProcessGroup | None = None) -> None:
        """Aux-loss-free bias update from the load since the last call (see ``TopKRouter``)."""
        self.router.update_aux_free_bias(group)

    def load_metrics(self) -> dict[str, float]:
        """Expert load of the last forward: max/mean tokens per expert, aux loss, dropped tokens (0)."""
        load_E = self.tokens_per_expert.float()
        mean = load_E.mean().clamp_min(1e-9)
        return {
            "load_max": float(load_E.max()),
            "load_mean": float(load_E.mean()),
            "load_max_over_mean": float(load_E.max() / mean),
            "aux_loss": float(self.aux_loss.detach()),
            "dropped_tokens": 0.0,
        }


def update_aux_free_biases(model: nn.Module, group: dist.ProcessGroup | None = None) -> int:
    """Update the aux-free bias of every MoE layer in ``model`` with one all-reduce over ``group``
    (the data-parallel group); call after each optimizer step. Returns the number of layers updated."""
    routers = [m for m in model.modules() if isinstance(m, TopKRouter) and m.expert_bias is not None]
    if not routers:
        return 0
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        loads_LE = torch.stack([r.load_since_update for r in routers])
        dist.all_reduce(loads_LE, group=group)
        for r, load_E in zip(routers, loads_LE):
            r.load_since_update.copy_(load_E)
    for r in routers:
        r.update_aux_free_bias(group=None)
    return len(routers)


def moe_load_metrics(
    model: nn.Module, prefix: str = "moe", group: dist.ProcessGroup | None = None
) -> dict[str, float]:
    """Per-layer load metrics of every MoE layer's last forward, keyed ``{prefix}/{module path}/{metric}``.

    With ``group`` (the data-parallel group) the loads are summed over its ranks first (one all-reduce)
    and the aux losses averaged, so every rank reports the global numbers.
    """
    layers = [(name or "moe", m) for name, m in model.named_modules() if isinstance(m, MoE)]
    if not layers:
        return {}
    loads_LE = torch.stack([m.tokens_per_expert.float() for _, m in layers])
    aux_L = torch.stack([m.aux_loss.detach().float().to(loads_LE.device) for _, m in layers])
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        packed = torch.cat([loads_LE, aux_L.unsqueeze(1)], dim=1)
        dist.all_reduce(packed, group=group)
        loads_LE, aux_L = packed[:, :-1], packed[:, -1] / dist.get_world_size(group)
    out: dict[str, float] = {}
    for (name, _), load_E, aux in zip(layers, loads_LE.tolist(), aux_L.tolist()):
        mean = sum(load_E) / len(load_E)
        out[f"{prefix}/{name}/load_max"] = max(load_E)
        out[f"{prefix}/{name}/load_mean"] = mean
        out[f"{prefix}/{name}/load_max_over_mean"] = max(load_E) / max(mean, 1e-9)
        out[f"{prefix}/{name}/aux_loss"] = aux
        out[f"{prefix}/{name}/dropped_tokens"] = 0.0
    return out
