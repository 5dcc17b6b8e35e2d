"""archon-moe: token-choice top-k router, grouped experts, token dispatch, the MoE layer."""

from .args import MoEArgs
from .dispatch import ExpertRunner, LocalExpertRunner, permute_by_expert, unpermute_and_combine
from .experts import GroupedExperts, SharedExperts, local_tensor
from .grouped_mm import grouped_mm, grouped_mm_reference, uses_grouped_kernel
from .moe import MoE, moe_load_metrics, update_aux_free_biases
from .router import RouterOutput, TopKRouter, count_tokens_per_expert, load_balancing_loss

__all__ = [
    "MoEArgs",
    "MoE",
    "TopKRouter",
    "RouterOutput",
    "GroupedExperts",
    "SharedExperts",
    "ExpertRunner",
    "LocalExpertRunner",
    "grouped_mm",
    "grouped_mm_reference",
    "uses_grouped_kernel",
    "permute_by_expert",
    "unpermute_and_combine",
    "count_tokens_per_expert",
    "load_balancing_loss",
    "local_tensor",
    "update_aux_free_biases",
    "moe_load_metrics",
]
