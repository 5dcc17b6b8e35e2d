"""archon-rl: PPO/GRPO losses, advantages, rollout batches, micro-batching and DP redistribution.

Everything works on padding-free packed tokens (flat [T] tensors + ``cu_seqlens`` [N+1]).
"""

from archon_rl.advantages import (
    compute_advantages,
    gae_advantages,
    group_normalized_advantages,
    masked_whiten,
    overlong_penalty,
    place_sequence_rewards,
    rloo_advantages,
)
from archon_rl.balance import BALANCE_METHODS, attention_cost, partition_balanced, token_cost
from archon_rl.batch import SAMPLE_FIELDS, TOKEN_FIELDS, RolloutBatch
from archon_rl.config import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    AdvantageConfig,
    KLConfig,
    OverlongConfig,
    PPOLossConfig,
    ValueLossConfig,
)
from archon_rl.decode_kernels import (
    DECODE_KERNELS,
    DecodeKernels,
    TorchDecodeKernels,
    select_decode_kernels,
    triton_runs_here,
)
from archon_rl.decode_state import StepFn
from archon_rl.kl import kl_estimate, kl_penalized_rewards
from archon_rl.kv_cache import CacheLayout, SlotKVCache, slot_count
from archon_rl.losses import (
    PPOPolicyLoss,
    ValueLoss,
    loss_normaliser,
    ppo_policy_loss,
    token_loss_weights,
    value_loss,
)
from archon_rl.microbatch import MicroBatch, plan_micro_batches, split_micro_batches, sync_num_micro_batches
from archon_rl.protocol import ProtocolError, decode_answer, encode_answer, encode_generate, parse_generate
from archon_rl.redistribute import Redistributed, plan_redistribution, redistribute
from archon_rl.requests import GenerationBackend, GenRequest, GenResult
from archon_rl.rollout_engine import RolloutEngine, batch_buckets
from archon_rl.row_sampling import sample_rows
from archon_rl.sampler import (
    ForwardFn,
    Generation,
    KVCache,
    SamplingConfig,
    generate,
    sample_tokens,
    sequence_seeds,
)
from archon_rl.segments import (
    from_padded,
    group_index,
    masked_mean,
    segment_mean,
    segment_sum,
    seq_ids,
    seq_lens,
    to_padded,
    token_positions,
)
from archon_rl.weight_group import WeightGroup, init_weight_group

_CLIENT = ("RolloutClient", "RolloutServerError", "RolloutRequestError")


def __getattr__(name: str):
    """The HTTP client needs the `client` extra (aiohttp): imported on first use, not with the package."""
    if name in _CLIENT:
        from archon_rl import client

        return getattr(client, name)
    raise AttributeError(f"module 'archon_rl' has no attribute {name!r}")


__all__ = [
    *_CLIENT,
    "ProtocolError", "decode_answer", "encode_answer", "encode_generate", "parse_generate",
    "WeightGroup", "init_weight_group",
    "GenRequest",
    "GenResult",
    "GenerationBackend",
    "DECODE_KERNELS", "DecodeKernels", "TorchDecodeKernels", "select_decode_kernels", "triton_runs_here",
    "CacheLayout", "RolloutEngine", "SlotKVCache", "StepFn", "batch_buckets", "sample_rows", "slot_count",
    "ADVANTAGE_ESTIMATORS", "BALANCE_METHODS", "KL_ESTIMATORS", "LOSS_AGGREGATIONS", "SAMPLE_FIELDS",
    "TOKEN_FIELDS",
    "AdvantageConfig", "KLConfig", "MicroBatch", "OverlongConfig", "PPOLossConfig", "PPOPolicyLoss",
    "Redistributed", "RolloutBatch", "ValueLoss", "ValueLossConfig",
    "attention_cost", "compute_advantages", "from_padded", "gae_advantages", "group_index",
    "group_normalized_advantages", "kl_estimate", "kl_penalized_rewards", "loss_normaliser", "masked_mean",
    "masked_whiten", "overlong_penalty", "partition_balanced", "place_sequence_rewards", "plan_micro_batches",
    "plan_redistribution", "ppo_policy_loss", "redistribute", "rloo_advantages", "segment_mean", "segment_sum",
    "seq_ids", "seq_lens", "split_micro_batches", "sync_num_micro_batches", "to_padded", "token_cost",
    "token_loss_weights", "token_positions", "value_loss",
    "ForwardFn", "Generation", "KVCache", "SamplingConfig", "generate", "sample_tokens", "sequence_seeds",
]
