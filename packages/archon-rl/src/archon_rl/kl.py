"""Per-token KL(pi || pi_ref) estimators from samples of pi.

With ``log_r = logp - ref_logp`` (T: packed tokens):

- k1 = log_r                      unbiased, high variance, can be negative
- k2 = log_r^2 / 2                biased, low variance, gradient equals that of KL for small steps
- k3 = exp(-log_r) - 1 + log_r    unbiased, non-negative, low variance (Schulman's estimator)
"""

from __future__ import annotations

import torch

from archon_rl.config import KL_ESTIMATORS, KLConfig

__all__ = ["kl_estimate", "kl_penalized_rewards"]


def kl_estimate(logp_T: torch.Tensor, ref_logp_T: torch.Tensor, estimator: str = "k3",
                clamp: float | None = None) -> torch.Tensor:
    """Per-token KL estimate [T]; differentiable w.r.t. both inputs."""
    log_r_T = logp_T - ref_logp_T
    if estimator == "k1":
        kl_T = log_r_T
    elif estimator == "k2":
        kl_T = 0.5 * log_r_T.square()
    elif estimator == "k3":
        kl_T = torch.expm1(-log_r_T) + log_r_T
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {KL_ESTIMATORS}")
    if clamp is not None:
        kl_T = kl_T.clamp(-clamp, clamp)
    return kl_T


def kl_penalized_rewards(token_rewards_T: torch.Tensor, logp_T: torch.Tensor, ref_logp_T: torch.Tensor,
                         mask_T: torch.Tensor, config: KLConfig) -> torch.Tensor:
    """``token_rewards - coef * kl`` on masked tokens (KL in reward; no gradient)."""
    config.validate()
    mask_T = mask_T.bool()
    ref_T = ref_logp_T.detach()
    kl_T = kl_estimate(torch.where(mask_T, logp_T.detach(), ref_T), ref_T, config.estimator, config.clamp)
    return token_rewards_T - config.coef * kl_T.to(token_rewards_T.dtype)
