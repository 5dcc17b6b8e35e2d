"""PPO-family policy loss and critic value loss on packed tokens.

Normalisation contract
----------------------
Every loss returns a weighted per-token SUM, never a local mean, so that the engine can normalise by
the GLOBAL weight of the whole step (all micro-batches on all DP ranks)::

    loss_fn(outputs, batch) -> (loss_sum, stats)        # loss_sum = sum_t w_t * l_t
    loss_weight_fn(batch)   -> float                    # this micro-batch's share of the normaliser

    total = all_reduce(sum(loss_weight_fn(mb) for mb in my_micro_batches), dp_group)
    for mb in my_micro_batches:
        (loss_fn(model(mb), mb)[0] / total).backward()  # times dp_size if the DP wrapper averages grads

``loss_agg`` picks the per-token weights ``w_t`` and the normaliser (M_i: masked tokens of sequence i):

- ``token_mean``:           w_t = 1,       normaliser = number of masked tokens
- ``seq_mean_token_mean``:  w_t = 1 / M_i, normaliser = number of sequences with M_i > 0
- ``seq_mean_token_sum``:   w_t = 1,       normaliser = number of sequences with M_i > 0
- ``constant``:             w_t = 1,       normaliser = loss_norm_constant * number of sequences (Dr.GRPO)

A sequence must not be split across micro-batches (true for archon_rl.microbatch). ``outputs`` is a
mapping with ``logprobs`` [T] (current policy, aligned with ``batch.input_ids``), optionally
``entropy`` [T], or ``values`` [T] for the critic. Stats are dicts of detached scalar tensors, means
over this micro-batch's masked tokens, plus ``num_tokens`` so callers can weight them when averaging.

Shapes: T: packed tokens, N: sequences.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from archon_rl.batch import RolloutBatch
from archon_rl.config import PPOLossConfig, ValueLossConfig
from archon_rl.kl import kl_estimate
from archon_rl.segments import masked_mean, segment_mean, segment_sum, seq_ids

__all__ = ["token_loss_weights", "loss_normaliser", "ppo_policy_loss", "value_loss", "PPOPolicyLoss",
           "ValueLoss"]

Stats = dict[str, torch.Tensor]


def _mask_counts(mask_T: torch.Tensor, cu_seqlens_N1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ids_T = seq_ids(cu_seqlens_N1, mask_T.numel())
    return ids_T, segment_sum(mask_T.double(), ids_T, cu_seqlens_N1.numel() - 1)


def token_loss_weights(mask_T: torch.Tensor, cu_seqlens_N1: torch.Tensor, loss_agg: str) -> torch.Tensor:
    """Per-token weights w_t [T] (float64, 0 off the mask) for ``loss_agg``."""
    w_T = mask_T.double()
    if loss_agg == "seq_mean_token_mean":
        ids_T, count_N = _mask_counts(mask_T, cu_seqlens_N1)
        w_T = w_T / count_N.clamp(min=1.0)[ids_T]
    return w_T


def loss_normaliser(mask_T: torch.Tensor, cu_seqlens_N1: torch.Tensor, loss_agg: str,
                    loss_norm_constant: float | None = None) -> float:
    """This batch's share of the global normaliser for ``loss_agg`` (see module docstring)."""
    if loss_agg == "token_mean":
        return float(mask_T.sum())
    num_seqs = cu_seqlens_N1.numel() - 1
    if loss_agg == "constant":
        assert loss_norm_constant is not None
        return float(loss_norm_constant) * num_seqs
    _, count_N = _mask_counts(mask_T, cu_seqlens_N1)
    return float((count_N > 0).sum())


def _masked_stats(x_T: torch.Tensor, mask_T: torch.Tensor, prefix: str) -> Stats:
    """Mean / min / max of ``x_T`` over the mask (1 for an empty mask), on the device: no host read, no
    boolean indexing, so the loss never waits for the GPU."""
    x_T = x_T.detach()
    any_ = mask_T.any()
    one = x_T.new_ones(())
    mean = torch.where(any_, masked_mean(x_T, mask_T), one)
    inf = x_T.new_full((1,), torch.inf)  # the identity of min, so an empty batch reduces too
    lo = torch.where(any_, torch.cat([torch.where(mask_T, x_T, inf), inf]).amin(), one)
    hi = torch.where(any_, torch.cat([torch.where(mask_T, x_T, -inf), -inf]).amax(), one)
    return {f"{prefix}_mean": mean, f"{prefix}_min": lo, f"{prefix}_max": hi}


def ppo_policy_loss(logp_T: torch.Tensor, behav_logp_T: torch.Tensor, adv_T: torch.Tensor,
                    mask_T: torch.Tensor, cu_seqlens_N1: torch.Tensor, config: PPOLossConfig, *,
                    prox_logp_T: torch.Tensor | None = None, entropy_T: torch.Tensor | None = None,
                    ref_logp_T: torch.Tensor | None = None) -> tuple[torch.Tensor, Stats]:
    """Weighted sum of the clipped PPO loss over masked tokens, and stats.

    The ratio is pi / pi_prox (pi_prox = pi_behav unless ``prox_logp_T`` is given); with a proximal
    policy (decoupled PPO) each token is also weighted by pi_prox / pi_behav (detached, optionally
    capped). ``ratio_level='sequence'`` replaces the token ratio by the geometric mean of the token
    ratios over each sequence's masked tokens (GSPO), broadcast back to the tokens.
    """
    mask_T = mask_T.bool()
    num_seqs = cu_seqlens_N1.numel() - 1
    ids_T = seq_ids(cu_seqlens_N1, logp_T.numel())
    anchor_T = (behav_logp_T if prox_logp_T is None else prox_logp_T).detach().to(logp_T.dtype)
    adv_T = adv_T.detach().to(logp_T.dtype)
    # Zero the log ratio off the mask so garbage logprobs there cannot overflow exp() into NaN grads.
    tok_log_ratio_T = torch.where(mask_T, logp_T - anchor_T, torch.zeros_like(logp_T))
    if config.ratio_level == "sequence":
        seq_log_ratio_N = segment_mean(tok_log_ratio_T, mask_T.to(logp_T.dtype), ids_T, num_seqs)
        log_ratio_T = torch.where(mask_T, seq_log_ratio_N[ids_T], torch.zeros_like(logp_T))
    else:
        log_ratio_T = tok_log_ratio_T
    ratio_T = torch.exp(log_ratio_T)

    pg_unclipped_T = -adv_T * ratio_T
    pg_clipped_T = -adv_T * ratio_T.clamp(1.0 - config.eps_clip, 1.0 + config.clip_high)
    pg_T = torch.maximum(pg_unclipped_T, pg_clipped_T)
    clipped_T = (pg_clipped_T > pg_unclipped_T) & mask_T
    dual_T = torch.zeros_like(mask_T)
    if config.c_clip is not None:
        cap_T = -adv_T * config.c_clip
        neg_T = adv_T < 0
        dual_T = neg_T & (pg_T > cap_T) & mask_T
        pg_T = torch.where(neg_T, torch.minimum(pg_T, cap_T), pg_T)

    stats: Stats = {}
    if prox_logp_T is not None:
        behav_w_T = torch.exp(torch.where(mask_T, prox_logp_T.detach() - behav_logp_T.detach(),
                                          torch.zeros_like(prox_logp_T))).to(logp_T.dtype)
        if config.behav_imp_weight_cap is not None:
            behav_w_T = behav_w_T.clamp(max=config.behav_imp_weight_cap)
        pg_T = pg_T * behav_w_T
        stats["behav_imp_weight_mean"] = masked_mean(behav_w_T, mask_T).detach()

    loss_T = pg_T
    if config.entropy_coef > 0:
        if entropy_T is None:
            raise ValueError("entropy_coef > 0 needs outputs['entropy'] (per-token entropy [T])")
        loss_T = loss_T - config.entropy_coef * entropy_T
    if config.kl.coef > 0 and not config.kl.in_reward:
        if ref_logp_T is None:
            raise ValueError("a KL penalty in the loss needs batch.ref_logprobs (reference-policy logprobs [T])")
        ref_T = ref_logp_T.detach().to(logp_T.dtype)
        # Off the mask, evaluate at logp = ref (KL 0) so garbage there cannot give inf * 0 = NaN.
        kl_T = kl_estimate(torch.where(mask_T, logp_T, ref_T), ref_T, config.kl.estimator, config.kl.clamp)
        loss_T = loss_T + config.kl.coef * kl_T
        stats["kl"] = masked_mean(kl_T, mask_T).detach()

    w_T = token_loss_weights(mask_T, cu_seqlens_N1, config.loss_agg).to(logp_T.dtype)
    loss_sum = (torch.where(mask_T, loss_T, torch.zeros_like(loss_T)) * w_T).sum()

    maskf_T = mask_T.to(logp_T.dtype)
    stats.update({
        "policy_loss": masked_mean(pg_T, mask_T).detach(),
        "clip_frac": masked_mean(clipped_T.to(logp_T.dtype), mask_T).detach(),
        "dual_clip_frac": masked_mean(dual_T.to(logp_T.dtype), mask_T).detach(),
        # k3 estimate of KL(pi_prox || pi) from the token ratios.
        "approx_kl": masked_mean(torch.expm1(tok_log_ratio_T) - tok_log_ratio_T, mask_T).detach(),
        "num_tokens": maskf_T.sum().detach(),
    })
    stats.update(_masked_stats(ratio_T, mask_T, "ratio"))
    if entropy_T is not None:
        stats["entropy"] = masked_mean(entropy_T, mask_T).detach()
    return loss_sum, stats


def value_loss(values_T: torch.Tensor, old_values_T: torch.Tensor, returns_T: torch.Tensor,
               mask_T: torch.Tensor, cu_seqlens_N1: torch.Tensor,
               config: ValueLossConfig) -> tuple[torch.Tensor, Stats]:
    """Weighted sum of the (clipped) critic loss over masked tokens, and stats."""
    mask_T = mask_T.bool()
    old_T = old_values_T.detach().to(values_T.dtype)
    ret_T = returns_T.detach().to(values_T.dtype)

    def err_loss(v_T: torch.Tensor) -> torch.Tensor:
        if config.loss_type == "huber":
            return F.huber_loss(v_T, ret_T, reduction="none", delta=config.huber_delta)
        return 0.5 * (v_T - ret_T).square()

    loss_T = err_loss(values_T)
    clipped_T = torch.zeros_like(mask_T)
    if config.value_clip is not None:
        v_clip_T = old_T + (values_T - old_T).clamp(-config.value_clip, config.value_clip)
        loss_clip_T = err_loss(v_clip_T)
        clipped_T = (loss_clip_T > loss_T) & mask_T
        loss_T = torch.maximum(loss_T, loss_clip_T)
    w_T = token_loss_weights(mask_T, cu_seqlens_N1, config.loss_agg).to(values_T.dtype)
    loss_sum = (torch.where(mask_T, loss_T, torch.zeros_like(loss_T)) * w_T).sum()
    stats = {
        "value_loss": masked_mean(loss_T, mask_T).detach(),
        "value_clip_frac": masked_mean(clipped_T.to(values_T.dtype), mask_T).detach(),
        "value_mean": masked_mean(values_T, mask_T).detach(),
        "returns_mean": masked_mean(ret_T, mask_T).detach(),
        "num_tokens": mask_T.to(values_T.dtype).sum().detach(),
    }
    return loss_sum, stats


class PPOPolicyLoss:
    """``loss_fn(outputs, batch)`` / ``loss_weight(batch)`` pair for the actor (see module docstring).

    Needs ``outputs['logprobs']`` and ``batch.logprobs`` (behaviour) and ``batch.advantages``; uses
    ``batch.prox_logprobs`` (decoupled PPO) and ``batch.ref_logprobs`` (KL in loss) when present.
    """

    def __init__(self, config: PPOLossConfig | None = None) -> None:
        self.config = config or PPOLossConfig()
        self.config.validate()

    @property
    def token_separable(self) -> bool:
        """d loss / d logprob of a token depends on that token alone (not with GSPO's sequence-level ratio)."""
        return self.config.ratio_level == "token"

    def __call__(self, outputs: Mapping[str, torch.Tensor], batch: RolloutBatch) -> tuple[torch.Tensor, Stats]:
        if "logprobs" not in outputs:
            raise ValueError("outputs must hold 'logprobs' [T] of the current policy")
        if batch.logprobs is None or batch.advantages is None:
            raise ValueError("the policy loss needs batch.logprobs (behaviour) and batch.advantages; "
                             "compute advantages before training")
        return ppo_policy_loss(outputs["logprobs"], batch.logprobs, batch.advantages, batch.loss_mask,
                               batch.cu_seqlens, self.config, prox_logp_T=batch.prox_logprobs,
                               entropy_T=outputs.get("entropy"), ref_logp_T=batch.ref_logprobs)

    def loss_weight(self, batch: RolloutBatch) -> float:
        return loss_normaliser(batch.loss_mask, batch.cu_seqlens, self.config.loss_agg,
                               self.config.loss_norm_constant)


class ValueLoss:
    """``loss_fn`` / ``loss_weight`` pair for the critic: ``outputs['values']`` vs ``batch.returns``."""

    def __init__(self, config: ValueLossConfig | None = None) -> None:
        self.config = config or ValueLossConfig()
        self.config.validate()

    token_separable = True  # per-token (clipped) regression

    def __call__(self, outputs: Mapping[str, torch.Tensor], batch: RolloutBatch) -> tuple[torch.Tensor, Stats]:
        if "values" not in outputs:
            raise ValueError("outputs must hold 'values' [T] of the current critic")
        if batch.values is None or batch.returns is None:
            raise ValueError("the value loss needs batch.values (old values) and batch.returns")
        return value_loss(outputs["values"], batch.values, batch.returns, batch.loss_mask, batch.cu_seqlens,
                          self.config)

    def loss_weight(self, batch: RolloutBatch) -> float:
        return loss_normaliser(batch.loss_mask, batch.cu_seqlens, self.config.loss_agg,
                               self.config.loss_norm_constant)
