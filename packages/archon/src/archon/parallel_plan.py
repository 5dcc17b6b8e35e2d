"""The Qwen family's parallel plan: which modules are colwise / rowwise, where the experts live."""

from __future__ import annotations

from archon_parallel.plan import ParallelPlan

from archon.models.common.args import ModelArgs


def qwen_parallel_plan(args: ModelArgs) -> ParallelPlan:
    block_tp = {
        "attention_norm": "sequence",
        "attention": "gather_seq",
        "attention.wq": "colwise", "attention.wk": "colwise", "attention.wv": "colwise",
        "attention.wo": "rowwise_seq",
        "ffn_norm": "sequence",
    }
    moe_tp: dict[str, str] = {}
    if args.num_experts == 0 or args.mlp_only_layers or args.decoder_sparse_step > 1:
        block_tp.update({"feed_forward": "gather_seq", "feed_forward.w1": "colwise",
                         "feed_forward.w3": "colwise", "feed_forward.w2": "rowwise_seq"})
    if args.num_experts > 0:
        # Experts see all tokens of the tp group (etp=1 replicas or etp=tp shards); the router is replicated.
        moe_tp = {"moe": "gather_scatter_seq"}
    # The head is built vocab-parallel by archon.models.common.head.LMHead (tp_mesh), not by the generic plan.
    return ParallelPlan(blocks="layers", embedding="tok_embeddings", norm="norm", head=None,
                        block_tp=block_tp, attention="attention",
                        ffn="moe" if args.num_experts > 0 else "feed_forward",
                        experts="moe.experts" if args.num_experts > 0 else None, moe_tp=moe_tp,
                        layer_stack="run_layers")
