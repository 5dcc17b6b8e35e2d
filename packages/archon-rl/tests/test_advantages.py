"""Advantages vs naive per-sequence / per-group Python references."""

import math
import statistics

import pytest
import torch
from archon_rl import (
    AdvantageConfig,
    KLConfig,
    OverlongConfig,
    compute_advantages,
    gae_advantages,
    group_normalized_advantages,
    masked_whiten,
    overlong_penalty,
    place_sequence_rewards,
    rloo_advantages,
)


def ref_gae(r, v, mask, cu, gamma, lam):
    adv = [0.0] * len(r)
    ret = [0.0] * len(r)
    for i in range(len(cu) - 1):
        toks = [t for t in range(cu[i], cu[i + 1]) if mask[t]]
        last, next_v = 0.0, 0.0
        for t in reversed(toks):
            delta = r[t] + gamma * next_v - v[t]
            last = delta + gamma * lam * last
            adv[t], ret[t] = last, last + v[t]
            next_v = v[t]
    return torch.tensor(adv, dtype=torch.float64), torch.tensor(ret, dtype=torch.float64)


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0), (0.0, 0.5)])
def test_gae_matches_reference(make_batch, gamma, lam):
    b = make_batch(seed=11, lens=[6, 1, 9, 3, 1, 12, 2])
    adv, ret = gae_advantages(b.token_rewards, b.values, b.loss_mask, b.cu_seqlens, gamma, lam)
    radv, rret = ref_gae(b.token_rewards.tolist(), b.values.tolist(), b.loss_mask.tolist(),
                         b.cu_seqlens.tolist(), gamma, lam)
    torch.testing.assert_close(adv, radv, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(ret, rret, atol=1e-12, rtol=1e-12)
    assert torch.isfinite(adv).all()


def test_place_sequence_rewards(make_batch):
    b = make_batch(seed=12)
    out = place_sequence_rewards(b.rewards, b.loss_mask, b.cu_seqlens)
    cu, mask = b.cu_seqlens.tolist(), b.loss_mask.tolist()
    want = [0.0] * b.num_tokens
    for i in range(b.num_seqs):
        toks = [t for t in range(cu[i], cu[i + 1]) if mask[t]]
        if toks:
            want[toks[-1]] = float(b.rewards[i])
    torch.testing.assert_close(out, torch.tensor(want, dtype=torch.float64))


def ref_grpo(r, g, std_norm, unbiased, eps):
    out = []
    for i, x in enumerate(r):
        grp = [r[j] for j in range(len(r)) if g[j] == g[i]]
        m = sum(grp) / len(grp)
        if not std_norm:
            out.append(x - m)
            continue
        if len(grp) == 1:
            out.append(0.0)
            continue
        s = statistics.stdev(grp) if unbiased else statistics.pstdev(grp)
        out.append((x - m) / (s + eps))
    return torch.tensor(out, dtype=torch.float64)


def ref_rloo(r, g):
    out = []
    for i, x in enumerate(r):
        others = [r[j] for j in range(len(r)) if g[j] == g[i] and j != i]
        out.append(x - sum(others) / len(others) if others else 0.0)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("std_norm,unbiased", [(True, True), (True, False), (False, True)])
def test_grpo_matches_reference(std_norm, unbiased):
    g = torch.Generator().manual_seed(0)
    r = torch.randn(13, dtype=torch.float64, generator=g)
    r[9:11] = 1.0  # a group with zero std
    gid = torch.tensor([7, 7, 7, 3, 3, 3, 3, 100, 5, 9, 9, 42, 42])  # arbitrary ids, a singleton
    got = group_normalized_advantages(r, gid, std_norm, unbiased, eps=1e-6)
    torch.testing.assert_close(got, ref_grpo(r.tolist(), gid.tolist(), std_norm, unbiased, 1e-6))
    torch.testing.assert_close(rloo_advantages(r, gid), ref_rloo(r.tolist(), gid.tolist()))
    assert torch.isfinite(got).all()


def test_overlong_penalty_matches_reference():
    cfg = OverlongConfig(max_response_len=20, buffer_len=8, penalty_factor=0.5)
    lens = torch.arange(0, 30)
    want = []
    for n in lens.tolist():
        if n <= 12:
            want.append(0.0)
        elif n <= 20:
            want.append(0.5 * (12 - n) / 8)
        else:
            want.append(-0.5)
    torch.testing.assert_close(overlong_penalty(lens, cfg), torch.tensor(want))


def test_masked_whiten(make_batch):
    b = make_batch(seed=13)
    out = masked_whiten(b.values, b.loss_mask)
    sel = [float(x) for x, m in zip(b.values, b.loss_mask) if m]
    mu, sd = statistics.fmean(sel), statistics.pstdev(sel)
    want = [(float(x) - mu) / (sd + 1e-8) if m else 0.0 for x, m in zip(b.values, b.loss_mask)]
    torch.testing.assert_close(out, torch.tensor(want, dtype=torch.float64))


def test_compute_advantages_gae_with_kl_in_reward_and_overlong(make_batch):
    b = make_batch(seed=14, lens=[6, 1, 9, 3, 1, 12, 2])
    kl = KLConfig(coef=0.05, estimator="k3", in_reward=True)
    cfg = AdvantageConfig(estimator="gae", gamma=0.97, lam=0.9,
                          overlong=OverlongConfig(max_response_len=6, buffer_len=3))
    out = compute_advantages(b, cfg, kl)
    cu, mask = b.cu_seqlens.tolist(), b.loss_mask.tolist()
    r = [0.0] * b.num_tokens
    for i in range(b.num_seqs):
        toks = [t for t in range(cu[i], cu[i + 1]) if mask[t]]
        n = len(toks)
        pen = 0.0 if n <= 3 else (-1.0 if n > 6 else (3 - n) / 3)
        for t in toks:
            lr = float(b.logprobs[t] - b.ref_logprobs[t])
            r[t] += float(b.token_rewards[t]) - 0.05 * (math.exp(-lr) - 1 + lr)
        if toks:
            r[toks[-1]] += float(b.rewards[i]) + pen
    radv, rret = ref_gae(r, b.values.tolist(), mask, cu, 0.97, 0.9)
    torch.testing.assert_close(out.advantages, radv, atol=1e-6, rtol=1e-6)  # overlong penalty is fp32
    torch.testing.assert_close(out.returns, rret, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_compute_advantages_group_broadcast(make_batch, estimator):
    b = make_batch(seed=15, lens=[4, 1, 5, 3, 6, 2, 7, 3], group_size=4)
    out = compute_advantages(b, AdvantageConfig(estimator=estimator, group_size=4, std_normalize=True))
    seq_r = [float(b.rewards[i]) + sum(float(b.token_rewards[t]) for t in range(int(b.cu_seqlens[i]),
             int(b.cu_seqlens[i + 1])) if b.loss_mask[t]) for i in range(b.num_seqs)]
    gid = b.group_ids.tolist()
    ref = ref_grpo(seq_r, gid, True, True, 1e-6) if estimator == "grpo" else ref_rloo(seq_r, gid)
    want = torch.tensor([float(ref[int(s)]) if m else 0.0 for s, m in zip(b.seq_ids, b.loss_mask)],
                        dtype=torch.float64)
    torch.testing.assert_close(out.advantages, want, atol=1e-12, rtol=1e-12)
    assert out.returns is b.returns  # untouched for critic-free estimators


def test_bad_advantage_configs(make_batch):
    b = make_batch(lens=[3, 3, 3, 3, 3, 3], group_size=3)
    with pytest.raises(ValueError, match="group_size 4 must divide the number of samples 6"):
        compute_advantages(b, AdvantageConfig(group_size=4))
    with pytest.raises(ValueError, match="group sizes must all equal 2"):
        compute_advantages(b, AdvantageConfig(group_size=2))
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        AdvantageConfig(estimator="vtrace").validate()
    with pytest.raises(ValueError, match="gamma"):
        AdvantageConfig(gamma=1.5).validate()
    with pytest.raises(ValueError, match="GAE needs batch.values"):
        compute_advantages(b.replace(values=None), AdvantageConfig(estimator="gae"))
    with pytest.raises(ValueError, match="token-level estimator"):
        compute_advantages(b, AdvantageConfig(), KLConfig(coef=0.1, in_reward=True))
    with pytest.raises(ValueError, match="group_ids"):
        compute_advantages(b.replace(group_ids=None), AdvantageConfig())
    with pytest.raises(ValueError, match="buffer_len"):
        OverlongConfig(max_response_len=10, buffer_len=20).validate()
    with pytest.raises(ValueError, match="rloo needs group_size >= 2"):
        AdvantageConfig(estimator="rloo", group_size=1).validate()
