"""Advantage estimators on packed rollouts: GAE, GRPO group normalisation (and Dr.GRPO), RLOO,
DAPO overlong reward shaping, and critic returns.

GAE runs over each sequence's masked (response) tokens in order; unmasked tokens in between (e.g.
tool output in multi-turn rollouts) are skipped, and the value after the last response token is 0
(terminal). It is vectorised over sequences with a reverse scan over a padded [N, S] view; the only
Python loop is over time steps S.

Shapes: T: packed tokens, N: sequences, M: masked tokens, S: longest masked run, G: groups.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from archon_rl.batch import RolloutBatch
from archon_rl.config import AdvantageConfig, KLConfig, OverlongConfig
from archon_rl.kl import kl_penalized_rewards
from archon_rl.segments import from_padded, group_index, segment_sum, seq_ids, to_padded

__all__ = ["gae_advantages", "group_normalized_advantages", "rloo_advantages", "overlong_penalty",
           "place_sequence_rewards", "masked_whiten", "compute_advantages"]


def gae_advantages(rewards_T: torch.Tensor, values_T: torch.Tensor, mask_T: torch.Tensor,
                   cu_seqlens_N1: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages and returns [T] over each sequence's masked tokens (0 off the mask)."""
    mask_T = mask_T.bool()
    num_seqs = cu_seqlens_N1.numel() - 1
    ids_T = seq_ids(cu_seqlens_N1, mask_T.numel())
    pos_M = mask_T.nonzero().squeeze(-1)
    count_N = torch.bincount(ids_T[pos_M], minlength=num_seqs)
    cu_M = torch.zeros(num_seqs + 1, dtype=torch.long, device=count_N.device)
    cu_M[1:] = count_N.cumsum(0)
    r_NS = to_padded(rewards_T[pos_M].double(), cu_M)
    v_NS = to_padded(values_T[pos_M].double(), cu_M)
    adv_NS = torch.zeros_like(r_NS)
    # Padding holds r = v = 0, so the value after the last step is 0 and padded steps stay 0.
    last_gae_N = r_NS.new_zeros(num_seqs)
    next_v_N = r_NS.new_zeros(num_seqs)
    for s in range(r_NS.shape[1] - 1, -1, -1):
        delta_N = r_NS[:, s] + gamma * next_v_N - v_NS[:, s]
        last_gae_N = delta_N + gamma * lam * last_gae_N
        adv_NS[:, s] = last_gae_N
        next_v_N = v_NS[:, s]
    adv_M = from_padded(adv_NS, cu_M)
    adv_T = torch.zeros_like(rewards_T, dtype=torch.float64)
    adv_T[pos_M] = adv_M
    ret_T = torch.where(mask_T, adv_T + values_T.double(), torch.zeros_like(adv_T))
    return adv_T.to(rewards_T.dtype), ret_T.to(rewards_T.dtype)


def group_normalized_advantages(rewards_N: torch.Tensor, group_ids_N: torch.Tensor, std_normalize: bool = True,
                                unbiased_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: (r - group mean) / (group std + eps); Dr.GRPO when ``std_normalize`` is False.

    A group of one sample gets advantage 0.
    """
    gidx_N, num_groups = group_index(group_ids_N)
    r_N = rewards_N.double()
    count_G = torch.bincount(gidx_N, minlength=num_groups).double()
    mean_G = segment_sum(r_N, gidx_N, num_groups) / count_G
    centered_N = r_N - mean_G[gidx_N]
    if not std_normalize:
        return centered_N.to(rewards_N.dtype)
    dof_G = (count_G - 1.0).clamp(min=1.0) if unbiased_std else count_G
    std_G = (segment_sum(centered_N.square(), gidx_N, num_groups) / dof_G).sqrt()
    return (centered_N / (std_G[gidx_N] + eps)).to(rewards_N.dtype)


def rloo_advantages(rewards_N: torch.Tensor, group_ids_N: torch.Tensor) -> torch.Tensor:
    """RLOO: r_i minus the mean reward of the other samples of its group (0 for a group of one)."""
    gidx_N, num_groups = group_index(group_ids_N)
    r_N = rewards_N.double()
    count_N = torch.bincount(gidx_N, minlength=num_groups).double()[gidx_N]
    others_N = (segment_sum(r_N, gidx_N, num_groups)[gidx_N] - r_N) / (count_N - 1.0).clamp(min=1.0)
    return torch.where(count_N > 1, r_N - others_N, torch.zeros_like(r_N)).to(rewards_N.dtype)


def overlong_penalty(response_lens_N: torch.Tensor, config: OverlongConfig) -> torch.Tensor:
    """DAPO soft overlong penalty [N] (<= 0) for response lengths [N]."""
    config.validate()
    lens_N = response_lens_N.double()
    free = config.max_response_len - config.buffer_len
    pen_N = ((free - lens_N) / config.buffer_len).clamp(min=-1.0, max=0.0)
    return (config.penalty_factor * pen_N).float()


def place_sequence_rewards(rewards_N: torch.Tensor, mask_T: torch.Tensor,
                           cu_seqlens_N1: torch.Tensor) -> torch.Tensor:
    """Token rewards [T] with each sequence reward on its last masked token (dropped if none)."""
    mask_T = mask_T.bool()
    ids_T = seq_ids(cu_seqlens_N1, mask_T.numel())
    pos_M = mask_T.nonzero().squeeze(-1)
    last_N = torch.full_like(rewards_N, -1, dtype=torch.long).scatter_reduce(
        0, ids_T[pos_M], pos_M, reduce="amax", include_self=True)
    has_N = last_N >= 0
    out_T = torch.zeros(mask_T.numel(), dtype=rewards_N.dtype, device=rewards_N.device)
    out_T[last_N[has_N]] = rewards_N[has_N]
    return out_T


def masked_whiten(x_T: torch.Tensor, mask_T: torch.Tensor, group: dist.ProcessGroup | None = None,
                  eps: float = 1e-8) -> torch.Tensor:
    """Zero-mean unit-variance over masked tokens (across ``group`` if given); 0 off the mask."""
    mask_T = mask_T.bool()
    m_T = mask_T.double()
    x64_T = x_T.double()
    moments = torch.stack([m_T.sum(), (x64_T * m_T).sum(), (x64_T.square() * m_T).sum()])
    if group is not None:
        dist.all_reduce(moments, group=group)
    count = moments[0].clamp(min=1.0)
    mean = moments[1] / count
    var = (moments[2] / count - mean.square()).clamp(min=0.0)
    out_T = (x64_T - mean) / (var.sqrt() + eps)
    return torch.where(mask_T, out_T, torch.zeros_like(out_T)).to(x_T.dtype)


def compute_advantages(batch: RolloutBatch, config: AdvantageConfig, kl: KLConfig | None = None,
                       group: dist.ProcessGroup | None = None) -> RolloutBatch:
    """Return ``batch`` with ``advantages`` (and ``returns`` for GAE) filled in.

    Sequence rewards are ``batch.rewards`` plus the overlong penalty (if configured). GAE adds
    ``batch.token_rewards`` and, with ``kl.in_reward``, the KL penalty of the behaviour policy;
    GRPO/RLOO use the sequence reward plus the masked sum of ``token_rewards``. ``group``: DP group
    for whitening (GAE with ``whiten``); GRPO/RLOO groups must be complete on this rank.
    """
    config.validate(batch.num_seqs)
    if kl is not None:
        kl.validate()
    n, mask_T = batch.num_seqs, batch.loss_mask
    ids_T = batch.seq_ids
    float_dtype = batch.logprobs.dtype if batch.logprobs is not None else torch.float32
    rewards_N = (batch.rewards if batch.rewards is not None
                 else torch.zeros(n, dtype=float_dtype, device=mask_T.device)).to(float_dtype)
    if config.overlong is not None:
        resp_lens_N = segment_sum(mask_T.double(), ids_T, n)
        rewards_N = rewards_N + overlong_penalty(resp_lens_N, config.overlong).to(rewards_N)
    kl_in_reward = kl is not None and kl.coef > 0 and kl.in_reward

    if config.estimator == "gae":
        if batch.values is None:
            raise ValueError("GAE needs batch.values (critic values at rollout time)")
        tok_r_T = place_sequence_rewards(rewards_N, mask_T, batch.cu_seqlens)
        if batch.token_rewards is not None:
            tok_r_T = tok_r_T + batch.token_rewards.to(tok_r_T) * mask_T
        if kl_in_reward:
            assert kl is not None
            if batch.ref_logprobs is None or batch.logprobs is None:
                raise ValueError("KL in reward needs batch.logprobs and batch.ref_logprobs")
            tok_r_T = kl_penalized_rewards(tok_r_T, batch.logprobs, batch.ref_logprobs, mask_T, kl)
        adv_T, ret_T = gae_advantages(tok_r_T, batch.values.to(tok_r_T), mask_T, batch.cu_seqlens,
                                      config.gamma, config.lam)
        if config.whiten:
            adv_T = masked_whiten(adv_T, mask_T, group)
        return batch.replace(advantages=adv_T, returns=ret_T)

    if kl_in_reward:
        raise ValueError(f"KL in reward needs a token-level estimator ('gae'); with {config.estimator!r} "
                         "set kl.in_reward=False to put the KL penalty in the loss")
    if batch.group_ids is None:
        raise ValueError(f"{config.estimator} needs batch.group_ids (one id per prompt group)")
    batch.check_group_sizes(config.group_size)
    if batch.token_rewards is not None:
        rewards_N = rewards_N + segment_sum((batch.token_rewards * mask_T).to(rewards_N), ids_T, n)
    if config.estimator == "grpo":
        adv_N = group_normalized_advantages(rewards_N, batch.group_ids, config.std_normalize,
                                            config.unbiased_std, config.eps)
    else:
        adv_N = rloo_advantages(rewards_N, batch.group_ids)
    adv_T = adv_N[ids_T] * mask_T.to(adv_N.dtype)
    return batch.replace(advantages=adv_T)
