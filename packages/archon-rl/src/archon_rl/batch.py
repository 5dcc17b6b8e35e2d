"""RolloutBatch: padding-free rollout data (flat tokens + ``cu_seqlens``).

All per-token tensors [T] are aligned with ``input_ids``: the value at position ``t`` belongs to
token ``t`` (e.g. ``logprobs[t] = log p(input_ids[t] | input_ids[<t])``). The engine shifts logits
by one before filling them. The first token of a sequence has no logprob, so ``loss_mask`` is 0
there (it is 1 only on response tokens). Per-sample tensors are [N].

Shapes: T: packed tokens, N: sequences (samples).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from archon_rl.segments import seq_ids as _seq_ids
from archon_rl.segments import seq_lens as _seq_lens

__all__ = ["RolloutBatch", "TOKEN_FIELDS", "SAMPLE_FIELDS"]

# Optional per-token [T] and per-sample [N] fields; select/concat/redistribute move them generically.
TOKEN_FIELDS = ("logprobs", "token_rewards", "ref_logprobs", "prox_logprobs", "values", "advantages",
                "returns")
SAMPLE_FIELDS = ("rewards", "group_ids", "versions", "prompt_lens")


@dataclass
class RolloutBatch:
    """A batch of rollouts packed without padding.

    Construction validates shapes and values and raises ``ValueError`` naming the bad field.
    """

    input_ids: torch.Tensor
    """[T] int64 token ids of all sequences, concatenated."""
    cu_seqlens: torch.Tensor
    """[N+1] int32 cumulative sequence lengths, starting at 0, non-decreasing, ending at T."""
    loss_mask: torch.Tensor
    """[T] bool, True on response tokens (the ones trained on)."""
    logprobs: torch.Tensor | None = None
    """[T] float behaviour-policy logprobs (those of the sampler that generated the tokens)."""
    rewards: torch.Tensor | None = None
    """[N] float sequence-level rewards."""
    token_rewards: torch.Tensor | None = None
    """[T] float token-level rewards (added to the sequence reward placed on the last response token)."""
    group_ids: torch.Tensor | None = None
    """[N] int64 prompt-group id of each sample (GRPO/RLOO), globally unique across DP ranks."""
    versions: torch.Tensor | None = None
    """[N] int64 policy version that generated each sample."""
    prompt_lens: torch.Tensor | None = None
    """[N] int64 prompt length of each sample."""
    ref_logprobs: torch.Tensor | None = None
    """[T] float reference-policy logprobs (KL penalty)."""
    prox_logprobs: torch.Tensor | None = None
    """[T] float proximal-policy logprobs (decoupled PPO)."""
    values: torch.Tensor | None = None
    """[T] float critic values at rollout time (old values)."""
    advantages: torch.Tensor | None = None
    """[T] float advantages (0 off the loss mask)."""
    returns: torch.Tensor | None = None
    """[T] float critic targets."""

    def __post_init__(self) -> None:
        self.validate()

    # ---------------------------------------------------------------- validation
    def validate(self, values: bool = True) -> None:
        """Check shapes and dtypes (normalizing them) and, with ``values``, the values; raise ``ValueError``
        naming the offending field. The value checks read tensors on the host."""
        if not isinstance(self.input_ids, torch.Tensor) or self.input_ids.dim() != 1:
            raise ValueError(f"input_ids must be a 1-D tensor [T], got {_desc(self.input_ids)}")
        if self.input_ids.is_floating_point():
            raise ValueError(f"input_ids must be an integer tensor, got {self.input_ids.dtype}")
        self.input_ids = self.input_ids.long()
        cu = self.cu_seqlens
        if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 1 or cu.is_floating_point():
            raise ValueError(f"cu_seqlens must be a 1-D integer tensor [N+1], got {_desc(cu)}")
        self.cu_seqlens = cu = cu.to(torch.int32)
        num_tokens = self.input_ids.numel()
        if values:
            if int(cu[0]) != 0:
                raise ValueError(f"cu_seqlens must start at 0, got {int(cu[0])}")
            if bool((cu.diff() < 0).any()):
                raise ValueError("cu_seqlens must be non-decreasing (sequence lengths >= 0)")
            if int(cu[-1]) != num_tokens:
                raise ValueError(f"cu_seqlens must end at the number of tokens T={num_tokens}, got {int(cu[-1])}")
        self.loss_mask = self._binary("loss_mask", self.loss_mask, num_tokens, values)
        for name in TOKEN_FIELDS:
            self._check_len(name, num_tokens, "T")
        num_seqs = self.num_seqs
        for name in SAMPLE_FIELDS:
            self._check_len(name, num_seqs, "N")
        for name in ("group_ids", "versions", "prompt_lens"):
            t = getattr(self, name)
            if t is not None:
                if t.is_floating_point():
                    raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
                setattr(self, name, t.long())
        if values and self.prompt_lens is not None and bool((self.prompt_lens > self.seq_lens).any()):
            raise ValueError("prompt_lens must not exceed the sequence lengths")

    def _check_len(self, name: str, n: int, sym: str) -> None:
        t = getattr(self, name)
        if t is None:
            return
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.numel() != n:
            raise ValueError(f"{name} must be a 1-D tensor [{sym}={n}], got {_desc(t)}")

    @staticmethod
    def _binary(name: str, t: Any, n: int, values: bool = True) -> torch.Tensor:
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.numel() != n:
            raise ValueError(f"{name} must be a 1-D tensor [T={n}], got {_desc(t)}")
        if t.dtype != torch.bool:
            if values and bool(((t != 0) & (t != 1)).any()):
                raise ValueError(f"{name} must be binary (0/1 or bool)")
            t = t != 0
        return t

    def check_group_sizes(self, group_size: int | None = None) -> None:
        """Check every group holds the same number of samples (``group_size`` if given)."""
        if self.group_ids is None:
            raise ValueError("group_ids is required for group-based advantages; set it per sample")
        _, counts_G = torch.unique(self.group_ids, return_counts=True)
        if counts_G.numel() == 0:
            return
        expected = int(counts_G[0]) if group_size is None else group_size
        if bool((counts_G != expected).any()):
            raise ValueError(
                f"group sizes must all equal {expected}, got sizes {sorted(set(counts_G.tolist()))}; "
                "keep every sample of a prompt group in the batch")

    # ---------------------------------------------------------------- views
    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def seq_lens(self) -> torch.Tensor:
        """[N] int64 sequence lengths."""
        return _seq_lens(self.cu_seqlens)

    @property
    def seq_ids(self) -> torch.Tensor:
        """[T] int64 sequence index of every token."""
        return _seq_ids(self.cu_seqlens, self.num_tokens)

    def present_fields(self) -> list[str]:
        """Names of the optional fields that are set."""
        return [n for n in TOKEN_FIELDS + SAMPLE_FIELDS if getattr(self, n) is not None]

    def replace(self, **changes: Any) -> RolloutBatch:
        """Copy with some fields replaced (validated)."""
        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device | str) -> RolloutBatch:
        kw = {f.name: (v.to(device) if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
              for f in fields(self)}
        return RolloutBatch.trusted(**kw)  # validated when built: a move changes no value

    @classmethod
    def trusted(cls, **values: Any) -> RolloutBatch:
        """Build checking shapes and dtypes only (`validate(values=False)`), for views of data validated when it
        entered: a batch moved to a device, the engine's micro-batches of a validated batch. The value checks
        read tensors on the host, which on a GPU stalls the step until the device catches up."""
        names = {f.name for f in fields(cls)}
        if unknown := set(values) - names:
            raise TypeError(f"unknown RolloutBatch fields {sorted(unknown)}")
        rb = cls.__new__(cls)  # no __post_init__: validate below without the value checks
        for name in names:
            setattr(rb, name, values.get(name))
        rb.validate(values=False)
        return rb

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_sequences(cls, samples: Sequence[Mapping[str, Any]]) -> RolloutBatch:
        """Pack a list of per-sample dicts.

        Keys: ``input_ids`` (required), ``loss_mask`` or ``prompt_len`` (mask = positions >= prompt_len),
        per-token ``logprobs``/``token_rewards``/... of the same length, and per-sample ``reward``
        (or ``rewards``), ``group_id``, ``version``, ``prompt_len``. A key must be in all samples or none.
        """
        if len(samples) == 0:
            raise ValueError("from_sequences needs at least one sample")
        alias = {"reward": "rewards", "group_id": "group_ids", "version": "versions", "prompt_len": "prompt_lens"}
        keys = [{alias.get(k, k) for k in s} for s in samples]
        known = set(TOKEN_FIELDS) | set(SAMPLE_FIELDS) | {"input_ids", "loss_mask"}
        for i, k in enumerate(keys):
            if "input_ids" not in k:
                raise ValueError(f"sample {i} has no 'input_ids'")
            if unknown := k - known:
                raise ValueError(f"sample {i} has unknown keys {sorted(unknown)}; known: {sorted(known)}")
            if k != keys[0]:
                raise ValueError(f"sample {i} has keys {sorted(k)} but sample 0 has {sorted(keys[0])}; "
                                 "every sample must set the same fields")
        rows = [{alias.get(k, k): v for k, v in s.items()} for s in samples]
        ids = [torch.as_tensor(r["input_ids"], dtype=torch.long).reshape(-1) for r in rows]
        lens = torch.tensor([t.numel() for t in ids], dtype=torch.int64)
        cu = torch.zeros(len(ids) + 1, dtype=torch.int32)
        cu[1:] = lens.cumsum(0)
        kw: dict[str, Any] = {"input_ids": torch.cat(ids), "cu_seqlens": cu}
        for name in TOKEN_FIELDS + ("loss_mask",):
            if name in keys[0]:
                parts = [torch.as_tensor(r[name]).reshape(-1) for r in rows]
                for i, (p, n) in enumerate(zip(parts, lens.tolist())):
                    if p.numel() != n:
                        raise ValueError(f"sample {i}: {name} has {p.numel()} entries but input_ids has {n}")
                kw[name] = torch.cat(parts)
        for name in SAMPLE_FIELDS:
            if name in keys[0]:
                kw[name] = torch.stack([torch.as_tensor(r[name]).reshape(()) for r in rows])
        if "loss_mask" not in kw:
            if "prompt_lens" not in kw:
                raise ValueError("give each sample a 'loss_mask' or a 'prompt_len'")
            pl = kw["prompt_lens"].long()
            ids_T = _seq_ids(cu)
            pos_T = torch.arange(ids_T.numel()) - cu.long()[:-1][ids_T]
            kw["loss_mask"] = pos_T >= pl[ids_T]
        for name in ("logprobs", "rewards", "token_rewards", "ref_logprobs", "prox_logprobs", "values",
                     "advantages", "returns"):
            if name in kw and not kw[name].is_floating_point():
                kw[name] = kw[name].float()
        return cls(**kw)

    # ---------------------------------------------------------------- selection
    def token_index(self, indices_M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed token indices of the samples ``indices_M`` (in that order) and their new cu_seqlens."""
        lens_M = self.seq_lens[indices_M]
        new_cu = torch.zeros(indices_M.numel() + 1, dtype=torch.int64, device=lens_M.device)
        new_cu[1:] = lens_M.cumsum(0)
        total = int(new_cu[-1])
        starts_M = self.cu_seqlens.long()[indices_M]
        local_T = torch.arange(total, device=lens_M.device) - torch.repeat_interleave(new_cu[:-1], lens_M,
                                                                                       output_size=total)
        return torch.repeat_interleave(starts_M, lens_M, output_size=total) + local_T, new_cu

    def select(self, indices: Sequence[int] | torch.Tensor) -> RolloutBatch:
        """New batch with the samples ``indices`` in that order (duplicates allowed)."""
        idx_M = torch.as_tensor(indices, dtype=torch.long, device=self.cu_seqlens.device).reshape(-1)
        if idx_M.numel() and (int(idx_M.min()) < 0 or int(idx_M.max()) >= self.num_seqs):
            raise ValueError(f"sample indices must lie in [0, {self.num_seqs}), got {idx_M.tolist()}")
        tok_T, new_cu = self.token_index(idx_M)
        kw: dict[str, Any] = {"input_ids": self.input_ids[tok_T], "cu_seqlens": new_cu,
                              "loss_mask": self.loss_mask[tok_T]}
        for name in TOKEN_FIELDS:
            if (t := getattr(self, name)) is not None:
                kw[name] = t[tok_T]
        for name in SAMPLE_FIELDS:
            if (t := getattr(self, name)) is not None:
                kw[name] = t[idx_M]
        return RolloutBatch(**kw)

    @staticmethod
    def concat(batches: Sequence[RolloutBatch]) -> RolloutBatch:
        """Concatenate batches sample-wise; optional fields must be set in all of them or in none."""
        if len(batches) == 0:
            raise ValueError("concat needs at least one batch")
        present = batches[0].present_fields()
        for i, b in enumerate(batches):
            if b.present_fields() != present:
                raise ValueError(f"batch {i} sets fields {b.present_fields()} but batch 0 sets {present}; "
                                 "concat needs the same optional fields in every batch")
        offsets = [0]
        for b in batches:
            offsets.append(offsets[-1] + b.num_tokens)
        cu = torch.cat([batches[0].cu_seqlens[:1]] + [b.cu_seqlens[1:] + off for b, off in zip(batches, offsets)])
        kw: dict[str, Any] = {"input_ids": torch.cat([b.input_ids for b in batches]), "cu_seqlens": cu,
                              "loss_mask": torch.cat([b.loss_mask for b in batches])}
        for name in present:
            kw[name] = torch.cat([getattr(b, name) for b in batches])
        return RolloutBatch(**kw)

    def split_by_samples(self, sizes: int | Sequence[int]) -> list[RolloutBatch]:
        """Split into consecutive chunks: ``sizes`` samples each (int; last may be smaller) or the given sizes."""
        n = self.num_seqs
        if isinstance(sizes, int):
            if sizes <= 0:
                raise ValueError(f"chunk size must be positive, got {sizes}")
            sizes = [min(sizes, n - s) for s in range(0, n, sizes)]
        sizes = list(sizes)
        if any(s < 0 for s in sizes) or sum(sizes) != n:
            raise ValueError(f"chunk sizes {sizes} must be non-negative and sum to the {n} samples")
        starts = [0]
        for s in sizes:
            starts.append(starts[-1] + s)
        return [self.select(range(a, b)) for a, b in zip(starts[:-1], starts[1:])]


def _desc(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        return f"tensor of shape {tuple(t.shape)} and dtype {t.dtype}"
    return type(t).__name__
