"""Router: aux loss vs HF's load_balancing_loss_func, sigmoid/route_scale vs a naive formula,
aux-loss-free bias evens a skewed load."""

import torch
from archon_moe import MoE, MoEArgs, TopKRouter, moe_load_metrics, update_aux_free_biases
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func


def test_aux_loss_matches_hf_and_has_grad():
    args = MoEArgs(dim=32, moe_inter_dim=16, num_experts=8, top_k=2, aux_loss_coef=0.01)
    torch.manual_seed(0)
    moe = MoE(args)
    x_TD = torch.randn(50, 32)
    moe(x_TD)
    logits_TE = x_TD @ moe.router.gate.weight.T
    ref = 0.01 * load_balancing_loss_func((logits_TE,), num_experts=8, top_k=2)
    torch.testing.assert_close(moe.aux_loss, ref, rtol=1e-5, atol=1e-7)
    moe.aux_loss.backward()
    assert moe.router.gate.weight.grad.abs().sum() > 0
    metrics = moe_load_metrics(torch.nn.Sequential(moe))
    assert metrics["moe/0/dropped_tokens"] == 0.0
    assert metrics["moe/0/load_max_over_mean"] >= 1.0
    moe.eval()
    moe(x_TD)
    assert float(moe.aux_loss) == 0.0


def test_sigmoid_scores_norm_and_route_scale_match_naive():
    args = MoEArgs(
        dim=16,
        moe_inter_dim=8,
        num_experts=8,
        top_k=3,
        score_func="sigmoid",
        norm_topk_prob=True,
        route_scale=2.5,
    )
    torch.manual_seed(0)
    router = TopKRouter(args)
    x_TD = torch.randn(20, 16)
    out = router(x_TD)
    scores = torch.sigmoid(x_TD.double() @ router.gate.weight.double().T)
    for t in range(20):  # naive per-token reference
        top = sorted(range(8), key=lambda e: -float(scores[t, e]))[:3]
        assert sorted(out.experts_TK[t].tolist()) == sorted(top)
        w = {e: float(scores[t, e]) / sum(float(scores[t, j]) for j in top) * 2.5 for e in top}
        for k in range(3):
            assert abs(float(out.weights_TK[t, k]) - w[int(out.experts_TK[t, k])]) < 1e-5


def test_aux_free_bias_selects_only_and_is_a_checkpointed_buffer():
    args = MoEArgs(dim=16, moe_inter_dim=8, num_experts=4, top_k=1, aux_free_bias=True, norm_topk_prob=False)
    torch.manual_seed(0)
    router = TopKRouter(args)
    assert "expert_bias" in router.state_dict() and "load_since_update" not in router.state_dict()
    x_TD = torch.randn(8, 16)
    with torch.no_grad():
        router.expert_bias.copy_(torch.tensor([10.0, 0.0, 0.0, 0.0]))
    out = router(x_TD)
    assert (out.experts_TK == 0).all()
    probs = torch.softmax(x_TD @ router.gate.weight.T, dim=-1)
    torch.testing.assert_close(out.weights_TK[:, 0], probs[:, 0])  # weight from unbiased scores


def test_aux_free_bias_evens_skewed_load():
    num_experts = 8
    args = MoEArgs(
        dim=16,
        moe_inter_dim=8,
        num_experts=num_experts,
        top_k=2,
        aux_free_bias=True,
        aux_free_update_rate=0.003,
    )
    torch.manual_seed(0)
    model = torch.nn.Sequential(MoE(args), MoE(args))
    with torch.no_grad():
        for m in model:  # skew: experts 0 and 1 win for almost every token
            m.router.gate.weight[:2, 0] += 3.0
    x_TD = torch.randn(128, 16)
    x_TD[:, 0] = 1.0 + x_TD[:, 0].abs()

    def max_over_mean(loads_LE: torch.Tensor) -> float:
        return float((loads_LE.max(dim=1).values / loads_LE.mean(dim=1)).max())

    history = []
    for _ in range(150):
        with torch.no_grad():
            history.append(torch.stack([m.router(x_TD).tokens_per_expert_E.float() for m in model]))
        assert update_aux_free_biases(model) == 2
    # A fixed batch makes the sign update settle into a small cycle: judge the load averaged over it.
    before, after = max_over_mean(history[0]), max_over_mean(torch.stack(history[-50:]).mean(0))
    assert before > 3.0, before
    assert after < 2.0 and after < before / 2, (before, after)
