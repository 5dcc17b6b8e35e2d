"""The model heads: `LMHead` (vocab projection with fused, chunked logprobs) and `ValueHead` (one scalar per token).

A head is built whole: its tensor-parallel mesh (the weight is then a vocab shard over it, this rank's first
vocab id follows) and the compile backend of its logprob kernels are constructor arguments, never set on it
afterwards. Under tensor parallelism the input arrives on the sequence shard (sequence parallel) and is
all-gathered; with labels the head returns per-token logprobs / entropy computed from the local vocab shard by
`archon.models.common.logprobs.head_logprobs` (per-token statistics are all-reduced, the logits never are).
Without labels (plain `model(ids)` calls) the logits are gathered over the vocab, fine for small evaluations.

T: packed tokens, D: model dim, V: vocab.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from archon.models.common.logprobs import head_logprobs


@dataclass(frozen=True)
class LogprobRequest:
    """Ask the LM head for per-token (logprobs, entropy) of `labels` instead of logits (`Decoder.forward`)."""

    labels: torch.Tensor
    """[T] the token each position is scored for (or [P] with `rows`)."""
    rows: torch.Tensor | None = None
    """[P] the position each label is scored at (tree training: one token may predict several children)."""
    want_entropy: bool = False
    chunk_size: int = 4096
    """Tokens per chunk: full-vocab logits never exist for more tokens at once."""
    keep_last_logits: bool = False
    """Keep the last chunk's logits for backward: for callers whose backward follows the forward directly."""


class LMHead(nn.Linear):
    """The vocab projection. Called with labels it returns per-token (logprobs, entropy) of those labels,
    chunked so full-vocab fp32 logits never exist for all tokens at once. Doing this inside the head's
    own forward keeps it correct when the head is an FSDP2 unit (its weight is unsharded only here).

    `weight`: an existing [V, D] parameter to use (a tied embedding, or the head being rebuilt); `tp_mesh`: shard
    it on the vocab dim over this mesh (unless it already is a DTensor); `compile_backend`: compile the logprob
    kernels with this torch.compile backend (None: eager)."""

    def __init__(self, dim: int, vocab_size: int, *, weight: nn.Parameter | None = None, tp_mesh=None,
                 compile_backend: str | None = None) -> None:
        super().__init__(dim, vocab_size, bias=False, device="meta" if weight is not None else None)
        if weight is not None:
            self.weight = weight
        self.tp_mesh = tp_mesh
        self.vocab_start = 0
        self.compile_backend = compile_backend
        if tp_mesh is not None:
            from torch.distributed.tensor import DTensor, Shard, distribute_tensor

            w = self.weight
            if not isinstance(w, DTensor):  # a tied weight may already be sharded by the embedding's plan
                self.weight = nn.Parameter(distribute_tensor(w, tp_mesh, [Shard(0)]), requires_grad=w.requires_grad)
            self.vocab_start = tp_mesh.get_local_rank() * -(-vocab_size // tp_mesh.size())

    @classmethod
    def like(cls, head: LMHead, *, tp_mesh=None, compile_backend: str | None = None) -> LMHead:
        """A head over `head`'s weight with these settings; other attributes `head` carries (e.g. the mark
        `archon_lora` sets on a `modules_to_save` copy) and its train/eval mode are kept."""
        new = cls(head.in_features, head.out_features, weight=head.weight, tp_mesh=tp_mesh,
                  compile_backend=compile_backend)
        for k, v in vars(head).items():
            if k not in vars(new):
                setattr(new, k, v)
        new.train(head.training)
        return new

    def forward(self, h_TD: torch.Tensor, labels_T: torch.Tensor | None = None, *, chunk_size: int = 4096,
                want_entropy: bool = False, keep_last_logits: bool = False):
        w = self.weight
        if self.tp_mesh is not None:
            h_TD = _full_sequence(h_TD, self.tp_mesh)
        elif hasattr(w, "to_local"):
            w = w.to_local()  # FSDP2-only: unsharded inside forward
        if labels_T is None:
            logits = h_TD @ w.t()
            return logits.full_tensor() if self.tp_mesh is not None else logits
        tp: dict[str, Any] = {}
        if self.tp_mesh is not None:  # h: replicated DTensor; its gradient from this vocab shard is a partial sum
            from torch.distributed.tensor import Partial

            h_TD, w = h_TD.to_local(grad_placements=[Partial()]), w.to_local()
            tp = dict(tp_group=self.tp_mesh.get_group(), vocab_start=self.vocab_start)
        return head_logprobs(h_TD, w, labels_T, chunk_size=chunk_size, want_entropy=want_entropy,
                             keep_last_logits=keep_last_logits, compile_backend=self.compile_backend, **tp)


class ValueHead(nn.Linear):
    """A scalar value per token: [.., D] -> [..] (the critic's head; HF's `score` with one label)."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim, 1, bias=True)

    def forward(self, h_TD: torch.Tensor) -> torch.Tensor:
        return super().forward(h_TD).squeeze(-1)


def _full_sequence(h: torch.Tensor, mesh):
    # Stay a DTensor: the head's matmul against the vocab-sharded weight then yields vocab-sharded
    # logits, and in backward DTensor sums the partial input grads of the vocab shards.
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(h, DTensor):
        h = DTensor.from_local(h, mesh, [Shard(0)], run_check=False)
    return h.redistribute(mesh, [Replicate()])
