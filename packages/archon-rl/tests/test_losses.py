"""Losses vs a naive per-sequence, per-token Python reference in fp64 (values, grads, stats)."""

import math

import pytest
import torch
from archon_rl import (
    KLConfig,
    PPOLossConfig,
    PPOPolicyLoss,
    ValueLoss,
    ValueLossConfig,
    kl_estimate,
)


def ref_kl(lr, est):
    if est == "k1":
        return lr
    if est == "k2":
        return 0.5 * lr * lr
    return torch.exp(-lr) - 1 + lr


def ref_policy(logp, b, ent, cfg):
    """Loop reference. Returns (normalised loss, stats dict of floats)."""
    cu = b.cu_seqlens.tolist()
    mask = b.loss_mask.tolist()
    behav, adv = b.logprobs, b.advantages
    prox = b.prox_logprobs
    anchor = prox if prox is not None else behav
    hi = cfg.eps_clip if cfg.eps_clip_higher is None else cfg.eps_clip_higher
    total = 0.0
    n_tok = n_clip = n_dual = 0
    ratios = []
    nonempty = 0
    for i in range(len(cu) - 1):
        toks = [t for t in range(cu[i], cu[i + 1]) if mask[t]]
        if not toks:
            continue
        nonempty += 1
        seq_lr = sum(logp[t] - anchor[t] for t in toks) / len(toks)
        for t in toks:
            lr = seq_lr if cfg.ratio_level == "sequence" else logp[t] - anchor[t]
            r = torch.exp(lr)
            ratios.append(float(r))
            a = float(adv[t])
            l1 = -a * r
            l2 = -a * min(max(r, torch.tensor(1 - cfg.eps_clip, dtype=r.dtype)), torch.tensor(1 + hi, dtype=r.dtype))
            loss = l1 if l1 >= l2 else l2
            n_clip += int(float(l2) > float(l1))
            if cfg.c_clip is not None and a < 0 and float(loss) > -a * cfg.c_clip:
                loss = loss * 0 + (-a * cfg.c_clip)
                n_dual += 1
            if prox is not None:
                w = math.exp(float(prox[t]) - float(behav[t]))
                if cfg.behav_imp_weight_cap is not None:
                    w = min(w, cfg.behav_imp_weight_cap)
                loss = loss * w
            if cfg.entropy_coef > 0:
                loss = loss - cfg.entropy_coef * ent[t]
            if cfg.kl.coef > 0 and not cfg.kl.in_reward:
                loss = loss + cfg.kl.coef * ref_kl(logp[t] - b.ref_logprobs[t], cfg.kl.estimator)
            w_tok = 1.0 / len(toks) if cfg.loss_agg == "seq_mean_token_mean" else 1.0
            total = total + w_tok * loss
            n_tok += 1
    norm = {"token_mean": n_tok, "seq_mean_token_mean": nonempty, "seq_mean_token_sum": nonempty,
            "constant": (cfg.loss_norm_constant or 0) * (len(cu) - 1)}[cfg.loss_agg]
    stats = {"clip_frac": n_clip / max(n_tok, 1), "dual_clip_frac": n_dual / max(n_tok, 1),
             "ratio_min": min(ratios), "ratio_max": max(ratios), "ratio_mean": sum(ratios) / len(ratios)}
    return total / norm, stats


CONFIGS = [
    PPOLossConfig(),
    PPOLossConfig(eps_clip=0.1, eps_clip_higher=0.28, loss_agg="seq_mean_token_mean"),
    PPOLossConfig(c_clip=1.5, eps_clip=0.05, loss_agg="seq_mean_token_sum"),
    PPOLossConfig(ratio_level="sequence", eps_clip=0.05, eps_clip_higher=0.08),
    PPOLossConfig(behav_imp_weight_cap=1.1, entropy_coef=0.01, kl=KLConfig(coef=0.1, estimator="k1")),
    PPOLossConfig(kl=KLConfig(coef=0.2, estimator="k2"), loss_agg="constant", loss_norm_constant=16.0),
    PPOLossConfig(kl=KLConfig(coef=0.2, estimator="k3"), c_clip=1.02, ratio_level="sequence", eps_clip=0.01),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=range(len(CONFIGS)))
@pytest.mark.parametrize("decoupled", [False, True])
def test_policy_loss_matches_reference(make_batch, cfg, decoupled):
    b = make_batch(seed=3)
    if not decoupled:
        b = b.replace(prox_logprobs=None)
    logp0 = b.logprobs + 0.25 * torch.randn(b.num_tokens, generator=torch.Generator().manual_seed(1),
                                            dtype=torch.float64)
    ent0 = torch.rand(b.num_tokens, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    logp, ent = logp0.clone().requires_grad_(), ent0.clone().requires_grad_()
    loss_fn = PPOPolicyLoss(cfg)
    loss_sum, stats = loss_fn({"logprobs": logp, "entropy": ent}, b)
    loss = loss_sum / loss_fn.loss_weight(b)
    loss.backward()

    rlogp, rent = logp0.clone().requires_grad_(), ent0.clone().requires_grad_()
    rloss, rstats = ref_policy(rlogp, b, rent, cfg)
    rloss.backward()
    torch.testing.assert_close(loss, rloss.detach(), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(logp.grad, rlogp.grad, atol=1e-10, rtol=1e-10)
    if cfg.entropy_coef > 0:
        torch.testing.assert_close(ent.grad, rent.grad, atol=1e-10, rtol=1e-10)
    for k, v in rstats.items():
        assert stats[k].item() == pytest.approx(v, abs=1e-10), k
    assert not stats[k].requires_grad
    assert stats["num_tokens"].item() == b.loss_mask.sum().item()
    if cfg.c_clip is not None:
        assert stats["dual_clip_frac"].item() > 0  # the config is tight enough to exercise dual clip
    assert stats["clip_frac"].item() > 0


def test_policy_loss_no_nan_with_garbage_off_mask(make_batch):
    b = make_batch(seed=4)
    logp = b.logprobs.clone()
    logp[~b.loss_mask] = -1e4  # padding-like garbage far from the behaviour logprobs
    logp.requires_grad_()
    for cfg in CONFIGS:
        loss_sum, stats = PPOPolicyLoss(cfg)({"logprobs": logp, "entropy": torch.zeros_like(logp)}, b)
        loss_sum.backward()
        assert torch.isfinite(loss_sum) and torch.isfinite(logp.grad).all()
        assert all(torch.isfinite(v) for v in stats.values())
        assert (logp.grad[~b.loss_mask] == 0).all()
        logp.grad = None


def test_all_masked_batch_gives_zero_loss(make_batch):
    b = make_batch(seed=5)
    b = b.replace(loss_mask=torch.zeros_like(b.loss_mask))
    logp = b.logprobs.clone().requires_grad_()
    for cfg in CONFIGS:
        loss_sum, stats = PPOPolicyLoss(cfg)({"logprobs": logp, "entropy": torch.ones_like(logp)}, b)
        assert loss_sum.item() == 0.0 and all(torch.isfinite(v) for v in stats.values())


def test_sequence_ratio_is_geometric_mean(make_batch):
    b = make_batch(seed=6, empty_mask_seq=None).replace(prox_logprobs=None)
    logp = b.logprobs + 0.1
    _, stats = PPOPolicyLoss(PPOLossConfig(ratio_level="sequence"))({"logprobs": logp}, b)
    assert stats["ratio_min"].item() == pytest.approx(math.exp(0.1))
    assert stats["ratio_max"].item() == pytest.approx(math.exp(0.1))


def ref_value(v, b, cfg):
    cu, mask = b.cu_seqlens.tolist(), b.loss_mask.tolist()
    total, n_tok, nonempty, n_clip = 0.0, 0, 0, 0

    def f(x):
        if cfg.loss_type == "mse":
            return 0.5 * x * x
        return 0.5 * x * x if abs(float(x)) <= cfg.huber_delta else cfg.huber_delta * (abs(x) - 0.5 * cfg.huber_delta)

    for i in range(len(cu) - 1):
        toks = [t for t in range(cu[i], cu[i + 1]) if mask[t]]
        nonempty += bool(toks)
        for t in toks:
            old, ret = float(b.values[t]), float(b.returns[t])
            loss = f(v[t] - ret)
            if cfg.value_clip is not None:
                vc = old + min(max(v[t] - old, torch.tensor(-cfg.value_clip, dtype=v.dtype)),
                               torch.tensor(cfg.value_clip, dtype=v.dtype))
                lc = f(vc - ret)
                n_clip += int(float(lc) > float(loss))
                loss = loss if loss >= lc else lc
            total = total + (1.0 / len(toks) if cfg.loss_agg == "seq_mean_token_mean" else 1.0) * loss
            n_tok += 1
    norm = n_tok if cfg.loss_agg == "token_mean" else nonempty
    return total / norm, n_clip / n_tok


@pytest.mark.parametrize("cfg", [ValueLossConfig(), ValueLossConfig(value_clip=None),
                                 ValueLossConfig(loss_type="huber", huber_delta=0.5, value_clip=0.1),
                                 ValueLossConfig(loss_type="huber", loss_agg="seq_mean_token_mean")])
def test_value_loss_matches_reference(make_batch, cfg):
    b = make_batch(seed=7)
    v0 = b.values + 0.5 * torch.randn(b.num_tokens, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    v, rv = v0.clone().requires_grad_(), v0.clone().requires_grad_()
    fn = ValueLoss(cfg)
    loss_sum, stats = fn({"values": v}, b)
    loss = loss_sum / fn.loss_weight(b)
    loss.backward()
    rloss, rclip = ref_value(rv, b, cfg)
    rloss.backward()
    torch.testing.assert_close(loss, rloss.detach(), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(v.grad, rv.grad, atol=1e-10, rtol=1e-10)
    assert stats["value_clip_frac"].item() == pytest.approx(rclip)


@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
def test_kl_estimators(est):
    g = torch.Generator().manual_seed(0)
    p = torch.randn(20, dtype=torch.float64, generator=g)
    q = torch.randn(20, dtype=torch.float64, generator=g)
    got = kl_estimate(p, q, est)
    for i in range(20):
        lr = float(p[i] - q[i])
        want = {"k1": lr, "k2": 0.5 * lr * lr, "k3": math.exp(-lr) - 1 + lr}[est]
        assert got[i].item() == pytest.approx(want, abs=1e-12)
    assert kl_estimate(p, q, est, clamp=0.1).abs().max() <= 0.1


def test_k3_is_unbiased_kl():
    # Sampling from p, mean of k3 estimates KL(p || q) for two categorical distributions.
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(5, dtype=torch.float64, generator=g), 0)
    logq = torch.log_softmax(torch.randn(5, dtype=torch.float64, generator=g), 0)
    exact = (logp.exp() * (logp - logq)).sum()
    est = (logp.exp() * kl_estimate(logp, logq, "k3")).sum()  # expectation under p
    assert est.item() == pytest.approx(exact.item(), rel=1e-10)


def test_loss_sum_normalises_globally_over_micro_batches(make_batch):
    """Sum of per-micro-batch sums / global weight equals the loss on the whole batch."""
    b = make_batch(seed=8)
    logp = b.logprobs + 0.1
    for agg in ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"]:
        fn = PPOPolicyLoss(PPOLossConfig(loss_agg=agg))
        full = fn({"logprobs": logp}, b)[0] / fn.loss_weight(b)
        parts = [b.select([0, 2, 4]), b.select([1, 3, 5])]
        tok = [torch.cat([logp[b.token_index(torch.tensor(i))[0]]]) for i in ([0, 2, 4], [1, 3, 5])]
        total = sum(fn.loss_weight(p) for p in parts)
        split = sum(fn({"logprobs": t}, p)[0] for t, p in zip(tok, parts)) / total
        torch.testing.assert_close(split, full, atol=1e-12, rtol=1e-12)


def test_missing_inputs_raise(make_batch):
    b = make_batch()
    with pytest.raises(ValueError, match="entropy"):
        PPOPolicyLoss(PPOLossConfig(entropy_coef=0.1))({"logprobs": b.logprobs}, b)
    with pytest.raises(ValueError, match="ref_logprobs"):
        PPOPolicyLoss(PPOLossConfig(kl=KLConfig(coef=0.1)))({"logprobs": b.logprobs}, b.replace(ref_logprobs=None))
    with pytest.raises(ValueError, match="advantages"):
        PPOPolicyLoss()({"logprobs": b.logprobs}, b.replace(advantages=None))
    with pytest.raises(ValueError, match="returns"):
        ValueLoss()({"values": b.values}, b.replace(returns=None))
