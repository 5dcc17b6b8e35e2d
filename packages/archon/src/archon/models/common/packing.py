"""Normalise model inputs to the packed form: flat tokens [T], positions [T], document boundaries.

T: packed tokens, B: batch, S: sequence, N: documents.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from archon_attn import AttnMeta


@dataclass
class PackedInput:
    tokens: torch.Tensor  # [T] token ids (or [T, D] hidden states on a pipeline stage)
    position_ids: torch.Tensor  # [T]
    cu_seqlens: torch.Tensor  # int32 [N+1]
    meta: AttnMeta
    out_shape: tuple[int, ...]  # leading shape of the caller's input ([B, S], [1, T] or [T])

    def unflatten(self, x_T: torch.Tensor) -> torch.Tensor:
        return x_T.reshape(*self.out_shape, *x_T.shape[1:])


def pack_inputs(input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None) -> PackedInput:
    """Accept [B, S] (B documents of length S), [1, T] or [T] with cu_seqlens, and return the packed form.

    `cu_seqlens` is validated by `build_attn_meta` (start at 0, non-decreasing, max length) plus a check that it
    ends at the number of tokens. Pass it on the host (with tokens on the device) and no device sync happens
    here: the meta and positions are built on the host and copied without blocking; a device `cu_seqlens`
    costs one device->host read.
    """
    from archon_attn import build_attn_meta

    if input_ids.numel() == 0:
        raise ValueError("empty batch: input_ids has no tokens")
    if input_ids.is_floating_point():  # hidden states on a pipeline stage: [T, D]
        if cu_seqlens is None:
            raise ValueError("hidden states [T, D] as input need cu_seqlens (the documents' boundaries)")
        out_shape: tuple[int, ...] = (input_ids.shape[0],)
        tokens = input_ids
    elif cu_seqlens is None:
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, S] or [T], got shape {tuple(input_ids.shape)}")
        B, S = input_ids.shape
        out_shape = (B, S)
        tokens = input_ids.reshape(-1)
        cu_seqlens = torch.arange(0, (B + 1) * S, S, dtype=torch.int32, device=input_ids.device)
        if position_ids is None:
            position_ids = torch.arange(S, device=input_ids.device).repeat(B)
    else:
        if input_ids.dim() == 2 and input_ids.shape[0] != 1:
            raise ValueError(
                f"packed input with cu_seqlens must be [T] or [1, T], got shape {tuple(input_ids.shape)}; "
                "pack documents into one row"
            )
        out_shape = tuple(input_ids.shape)
        tokens = input_ids.reshape(-1)
    T = tokens.shape[0]
    meta = build_attn_meta(cu_seqlens.to(torch.int32))
    if meta.num_tokens != T:
        raise ValueError(f"cu_seqlens ends at {meta.num_tokens} but there are {T} tokens; "
                         "the last entry must equal the number of packed tokens")
    if position_ids is None:  # also caches the document ids on the meta, so compiled blocks only read them
        meta.positions()
        meta = meta.to(tokens.device)
        position_ids = meta.positions()
    else:
        meta = meta.to(tokens.device)
        position_ids = position_ids.reshape(-1)
        if position_ids.shape[0] != T:
            raise ValueError(f"position_ids has {position_ids.shape[0]} entries for {T} tokens")
    return PackedInput(tokens, position_ids, meta.cu_seqlens, meta, out_shape)
