"""ParallelPlan: what a model declares so that one shared ``parallelize`` can shard it."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

__all__ = ["ParallelPlan"]


@dataclass
class ParallelPlan:
    """Where things are in a model, by module name, and how each block is tensor-parallelised.

    Example (a Qwen-like decoder whose blocks live in ``model.layers``)::

        ParallelPlan(
            blocks="layers", embedding="tok_embeddings", norm="norm", head="output",
            block_tp={
                "attention_norm": "sequence",      # norm runs on the token shard (SP)
                "attention": "gather_seq",         # first input: token shard -> all tokens
                "attention.wq": "colwise", "attention.wk": "colwise", "attention.wv": "colwise",
                "attention.wo": "rowwise_seq",     # reduce-scatter back to the token shard
                "ffn_norm": "sequence",
                "feed_forward": "gather_seq",
                "feed_forward.w1": "colwise", "feed_forward.w3": "colwise",
                "feed_forward.w2": "rowwise_seq",
            },
            attention="attention", ffn="feed_forward",
        )

    Style names (see ``tensor_parallel.make_style``; activations are packed ``[T, D]``, SP shards
    dim 0): ``colwise``, ``rowwise``, ``rowwise_seq`` (rowwise, output reduce-scattered to the token
    shard), ``sequence`` (norm on the token shard), ``gather_seq`` (first input all-gathered),
    ``gather_scatter_seq`` (gather in, cut the replicated output back to the token shard: an MoE layer),
    ``embedding``, ``head``. With sequence parallel off, ``sequence`` / ``gather_seq`` /
    ``gather_scatter_seq`` are skipped and ``rowwise_seq`` acts as ``rowwise``. Modules not named keep
    plain parameters replicated over tp (their input is replicated, so grads agree across tp ranks).

    The model's forward must take token ids ``[T]`` and return logits ``[T, V]``. With TP the head
    returns a DTensor sharded on the vocab dim; pass it to ``logprobs_entropy`` as is.
    Attention modules must reshape with ``view(T, -1, head_dim)`` so they work with local heads.
    """

    blocks: str = "layers"
    """Attribute path of the ``nn.ModuleList`` / ``nn.ModuleDict`` of decoder blocks."""
    embedding: str | None = "tok_embeddings"
    """Token embedding module (vocab-sharded under TP, output on the token shard)."""
    norm: str | None = "norm"
    """Final norm before the head."""
    head: str | None = "output"
    """Output projection to the vocabulary (colwise, vocab-sharded logits under TP)."""
    block_tp: dict[str, str] = field(default_factory=dict)
    """Per-block TP plan: module name relative to a block -> style name."""
    attention: str = "attention"
    """Attention module inside a block (context-parallel hook target)."""
    ffn: str = "feed_forward"
    """Feed-forward (dense MLP or MoE) module inside a block."""
    experts: str | None = None
    """Experts module inside a block, relative name (e.g. ``feed_forward.experts``), for MoE blocks; its
    parent is the MoE layer handed to expert parallel, and it is FSDP-sharded over ``edp``. None if dense."""
    moe_tp: dict[str, str] = field(default_factory=dict)
    """Extra per-block TP plan applied only to MoE blocks (filled by the MoE model's plan)."""
    num_heads: int | None = None
    """Attention heads; with num_kv_heads, lets ``parallelize`` check that tp divides them."""
    num_kv_heads: int | None = None
    """Key/value heads (GQA)."""
    layer_stack: str | None = None
    """Method of the root model that runs every block in order (``h = model.<layer_stack>(h, ...)``): what
    ``CompileConfig(scope="stack")`` compiles as one graph. None: the model supports only per-block compile."""

    def block_list(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """(name, block) pairs in order, names relative to the model (``layers.0``...)."""
        container = model.get_submodule(self.blocks)
        if not isinstance(container, nn.ModuleList | nn.ModuleDict):
            raise TypeError(f"plan.blocks={self.blocks!r} must name an nn.ModuleList or nn.ModuleDict, got "
                            f"{type(container).__name__}")
        return [(f"{self.blocks}.{name}", block) for name, block in container.named_children()]

    def optional_module(self, model: nn.Module, name: str | None) -> nn.Module | None:
        if name is None:
            return None
        try:
            return model.get_submodule(name)
        except AttributeError:
            return None
