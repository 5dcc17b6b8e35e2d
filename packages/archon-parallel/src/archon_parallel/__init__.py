"""archon-parallel: meshes, the allocation-mode grammar and every parallel style Archon composes."""

from archon_parallel.allocation import AllocationMode, InferenceAllocation, TrainAllocation, parse_allocation  # noqa: F401
from archon_parallel.checkpointing import ACConfig, apply_ac, checkpoint_block, save_ops_policy  # noqa: F401
from archon_parallel.compile import CompileConfig, apply_compile  # noqa: F401
from archon_parallel.context_parallel import (  # noqa: F401
    PackedShard,
    RingAttention,
    UlyssesAttention,
    cp_token_index,
    gather_sequence,
    get_cp_attention,
    shard_packed_batch,
    ulysses_kv_repeat,
)
from archon_parallel.dims import ParallelDims, ParallelMeshes, flatten_mesh  # noqa: F401
from archon_parallel.expert_parallel import (  # noqa: F401, E501
    ExpertParallelRunner,
    all_to_all_autograd,
    apply_expert_parallel,
    copy_to_tp,
    reduce_from_tp,
)
from archon_parallel.fsdp import FSDPConfig, apply_fsdp, mixed_precision_policy  # noqa: F401
from archon_parallel.grad import clip_grad_norm_, grad_norm_sq  # noqa: F401
from archon_parallel.parallelize import parallelize  # noqa: F401
from archon_parallel.pipeline import (  # noqa: F401, E501
    StageLayout,
    available_schedules,
    build_schedule,
    prune_to_stage,
    split_layers,
    stage_ids_for_rank,
    stage_layout,
    validate_microbatches,
)
from archon_parallel.plan import ParallelPlan  # noqa: F401
from archon_parallel.replicate import all_reduce_grads  # noqa: F401
from archon_parallel.tensor_parallel import GatherSequence, apply_tp, make_style, validate_tp  # noqa: F401
from archon_parallel.vocab_parallel import logprobs_entropy, vocab_parallel_logprobs_entropy  # noqa: F401
