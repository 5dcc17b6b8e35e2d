"""archon-parallel."""
from archon_parallel.context_parallel import PackedShard, RingAttention, UlyssesAttention, cp_token_index, gather_sequence, get_cp_attention, shard_packed_batch, ulysses_kv_repeat  # noqa: E501
