"""RolloutBatch construction, validation, select/concat/split vs Python-list references; config errors."""

import pytest
import torch
from archon_rl import KLConfig, PPOLossConfig, RolloutBatch, ValueLossConfig, kl_estimate
from archon_rl.segments import from_padded, segment_mean, to_padded


def _samples():
    return [
        {"input_ids": [1, 2, 3, 4], "prompt_len": 2, "logprobs": [0.0, 0.0, -0.5, -0.7], "reward": 1.0,
         "group_id": 0, "version": 3},
        {"input_ids": [5], "prompt_len": 1, "logprobs": [0.0], "reward": 0.0, "group_id": 0, "version": 3},
        {"input_ids": [6, 7, 8], "prompt_len": 1, "logprobs": [0.0, -1.0, -2.0], "reward": -1.0, "group_id": 1,
         "version": 4},
        {"input_ids": [9, 10], "prompt_len": 1, "logprobs": [0.0, -0.1], "reward": 0.5, "group_id": 1,
         "version": 4},
    ]


def test_from_sequences():
    b = RolloutBatch.from_sequences(_samples())
    assert b.input_ids.tolist() == list(range(1, 11))
    assert b.cu_seqlens.tolist() == [0, 4, 5, 8, 10] and b.cu_seqlens.dtype == torch.int32
    assert b.loss_mask.tolist() == [False, False, True, True, False, False, True, True, False, True]
    assert b.rewards.tolist() == [1.0, 0.0, -1.0, 0.5]
    assert b.group_ids.tolist() == [0, 0, 1, 1] and b.versions.tolist() == [3, 3, 4, 4]
    assert b.seq_ids.tolist() == [0, 0, 0, 0, 1, 2, 2, 2, 3, 3]
    b.check_group_sizes(2)


def _rows(b):
    """Per-sample Python view used as the reference."""
    cu = b.cu_seqlens.tolist()
    return [(b.input_ids[cu[i]:cu[i + 1]].tolist(), b.loss_mask[cu[i]:cu[i + 1]].tolist(),
             b.logprobs[cu[i]:cu[i + 1]].tolist(), float(b.rewards[i]), int(b.group_ids[i]))
            for i in range(b.num_seqs)]


def test_select_concat_split(make_batch):
    b = make_batch(seed=1)
    rows = _rows(b)
    idx = [4, 0, 0, 5, 2]
    s = b.select(idx)
    assert _rows(s) == [rows[i] for i in idx]
    assert s.present_fields() == b.present_fields()
    parts = b.split_by_samples([2, 0, 3, 1])
    assert [p.num_seqs for p in parts] == [2, 0, 3, 1]
    assert _rows(RolloutBatch.concat(parts)) == rows
    assert [p.num_seqs for p in b.split_by_samples(4)] == [4, 2]
    for name in b.present_fields():
        assert torch.equal(getattr(RolloutBatch.concat(parts), name), getattr(b, name)), name
    with pytest.raises(ValueError, match=r"sample indices must lie in \[0, 6\)"):
        b.select([6])
    with pytest.raises(ValueError, match="sum to the 6 samples"):
        b.split_by_samples([1, 2])
    with pytest.raises(ValueError, match="same optional fields"):
        RolloutBatch.concat([b, b.replace(values=None)])


def _good():
    return dict(input_ids=torch.arange(5), cu_seqlens=torch.tensor([0, 2, 5]),
                loss_mask=torch.tensor([0, 1, 0, 1, 1]), logprobs=torch.zeros(5), rewards=torch.zeros(2),
                group_ids=torch.tensor([0, 0]))


@pytest.mark.parametrize("change,match", [
    ({"cu_seqlens": torch.tensor([1, 2, 5])}, "cu_seqlens must start at 0"),
    ({"cu_seqlens": torch.tensor([0, 3, 2, 5])}, "cu_seqlens must be non-decreasing"),
    ({"cu_seqlens": torch.tensor([0, 2, 4])}, "cu_seqlens must end at the number of tokens T=5"),
    ({"cu_seqlens": torch.tensor([0.0, 5.0])}, "cu_seqlens must be a 1-D integer tensor"),
    ({"loss_mask": torch.tensor([0, 2, 0, 1, 1])}, "loss_mask must be binary"),
    ({"loss_mask": torch.ones(4)}, r"loss_mask must be a 1-D tensor \[T=5\]"),
    ({"logprobs": torch.zeros(4)}, r"logprobs must be a 1-D tensor \[T=5\]"),
    ({"rewards": torch.zeros(3)}, r"rewards must be a 1-D tensor \[N=2\]"),
    ({"group_ids": torch.tensor([0.5, 1.0])}, "group_ids must be an integer tensor"),
    ({"input_ids": torch.zeros(5)}, "input_ids must be an integer tensor"),
    ({"prompt_lens": torch.tensor([3, 1])}, "prompt_lens must not exceed"),
])
def test_validation_names_the_field(change, match):
    with pytest.raises(ValueError, match=match):
        RolloutBatch(**{**_good(), **change})


def test_group_sizes_and_from_sequences_errors():
    b = RolloutBatch(**{**_good(), "cu_seqlens": torch.tensor([0, 2, 3, 5]), "rewards": torch.zeros(3),
                        "group_ids": torch.tensor([0, 0, 1])})
    with pytest.raises(ValueError, match=r"group sizes must all equal 2, got sizes \[1, 2\]"):
        b.check_group_sizes(2)
    s = _samples()
    del s[1]["reward"]
    with pytest.raises(ValueError, match="every sample must set the same fields"):
        RolloutBatch.from_sequences(s)
    s = _samples()
    s[0]["logprobs"] = [0.0]
    with pytest.raises(ValueError, match="sample 0: logprobs has 1 entries but input_ids has 4"):
        RolloutBatch.from_sequences(s)
    with pytest.raises(ValueError, match="loss_mask' or a 'prompt_len"):
        RolloutBatch.from_sequences([{"input_ids": [1, 2]}])


@pytest.mark.parametrize("cfg,match", [
    (PPOLossConfig(eps_clip=-0.1), "eps_clip must be > 0"),
    (PPOLossConfig(eps_clip_higher=-0.2), "eps_clip_higher must be > 0"),
    (PPOLossConfig(c_clip=0.5), "c_clip"),
    (PPOLossConfig(ratio_level="seq"), "ratio_level"),
    (PPOLossConfig(kl=KLConfig(estimator="k4")), "unknown KL estimator 'k4'"),
    (PPOLossConfig(kl=KLConfig(coef=-1.0)), "KL coef must be >= 0"),
    (PPOLossConfig(loss_agg="sum"), "unknown loss_agg"),
    (PPOLossConfig(loss_agg="constant"), "needs loss_norm_constant"),
    (ValueLossConfig(value_clip=-1.0), "value_clip"),
    (ValueLossConfig(loss_type="l1"), "loss_type"),
])
def test_bad_loss_configs(cfg, match):
    with pytest.raises(ValueError, match=match):
        cfg.validate()


def test_unknown_kl_estimator_function():
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_estimate(torch.zeros(2), torch.zeros(2), "k5")


def test_padded_roundtrip_and_segment_mean(make_batch):
    b = make_batch(seed=2)
    x = torch.randn(b.num_tokens, dtype=torch.float64)
    p = to_padded(x, b.cu_seqlens)
    assert p.shape == (b.num_seqs, int(b.seq_lens.max()))
    assert torch.equal(from_padded(p, b.cu_seqlens), x)
    m = segment_mean(x, b.loss_mask.double(), b.seq_ids, b.num_seqs)
    cu = b.cu_seqlens.tolist()
    for i in range(b.num_seqs):
        sel = [float(x[t]) for t in range(cu[i], cu[i + 1]) if b.loss_mask[t]]
        assert m[i].item() == pytest.approx(sum(sel) / len(sel) if sel else 0.0)


def test_empty_batch_edge_cases():
    from archon_rl import AdvantageConfig, PPOPolicyLoss, compute_advantages, split_micro_batches

    b = RolloutBatch(input_ids=torch.zeros(0, dtype=torch.long), cu_seqlens=torch.zeros(1, dtype=torch.int32),
                     loss_mask=torch.zeros(0, dtype=torch.bool), logprobs=torch.zeros(0), values=torch.zeros(0),
                     rewards=torch.zeros(0), group_ids=torch.zeros(0, dtype=torch.long))
    assert RolloutBatch.concat([b, b.select([])]).num_seqs == 0
    assert compute_advantages(b, AdvantageConfig(estimator="gae")).advantages.numel() == 0
    assert compute_advantages(b, AdvantageConfig()).advantages.numel() == 0
    loss, stats = PPOPolicyLoss()({"logprobs": torch.zeros(0)}, b.replace(advantages=torch.zeros(0)))
    assert loss.item() == 0.0 and all(torch.isfinite(v) for v in stats.values())
    assert [mb.sample_indices for mb in split_micro_batches(b, 8, num_micro_batches=2)] == [[], []]
