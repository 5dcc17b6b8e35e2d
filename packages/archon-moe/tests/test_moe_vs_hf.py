"""MoE layer == HF transformers Qwen3MoeSparseMoeBlock (fp32, forward and grads)."""

import pytest
import torch
from archon_moe import MoE, MoEArgs
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock


def assert_close_fp32(got: torch.Tensor, want: torch.Tensor) -> None:
    """fp32: rtol 1e-5, and atol 1e-5 of the tensor's largest entry (grads are sums with cancellation,
    so near-zero entries carry the rounding of their large summands)."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def _pair(dim: int, inter: int, num_experts: int, top_k: int, norm: bool, seed: int = 0):
    cfg = Qwen3MoeConfig(
        hidden_size=dim,
        moe_intermediate_size=inter,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=norm,
    )
    cfg._experts_implementation = "eager"
    torch.manual_seed(seed)
    hf = Qwen3MoeSparseMoeBlock(cfg)
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.2)
    ours = MoE(
        MoEArgs(dim=dim, moe_inter_dim=inter, num_experts=num_experts, top_k=top_k, norm_topk_prob=norm)
    )
    with torch.no_grad():
        ours.router.gate.weight.copy_(hf.gate.weight)
        ours.experts.w1.copy_(hf.experts.gate_up_proj[:, :inter])
        ours.experts.w3.copy_(hf.experts.gate_up_proj[:, inter:])
        ours.experts.w2.copy_(hf.experts.down_proj)
    return hf, ours


@pytest.mark.parametrize(
    "dim,inter,num_experts,top_k,norm",
    [(32, 16, 8, 2, True), (64, 32, 16, 4, True), (48, 24, 16, 4, False)],
)
def test_moe_matches_hf_forward_and_grads(dim, inter, num_experts, top_k, norm):
    hf, ours = _pair(dim, inter, num_experts, top_k, norm)
    torch.manual_seed(1)
    x_TD = torch.randn(2 * 37, dim)
    x_hf = x_TD.clone().view(2, 37, dim).requires_grad_(True)
    x_ours = x_TD.clone().requires_grad_(True)
    g_TD = torch.randn(2 * 37, dim)

    y_hf = hf(x_hf)
    y_hf = (y_hf[0] if isinstance(y_hf, tuple) else y_hf).reshape(-1, dim)
    y_ours = ours(x_ours)
    assert_close_fp32(y_ours, y_hf)
    (y_hf * g_TD).sum().backward()
    (y_ours * g_TD).sum().backward()

    assert_close_fp32(x_ours.grad, x_hf.grad.reshape(-1, dim))
    assert_close_fp32(ours.router.gate.weight.grad, hf.gate.weight.grad)
    gate_up = torch.cat([ours.experts.w1.grad, ours.experts.w3.grad], dim=1)
    assert_close_fp32(gate_up, hf.experts.gate_up_proj.grad)
    assert_close_fp32(ours.experts.w2.grad, hf.experts.down_proj.grad)
    counts = torch.bincount(hf.gate(x_TD)[2].reshape(-1), minlength=num_experts)
    assert torch.equal(ours.tokens_per_expert, counts)
    assert float(ours.aux_loss) == 0.0


def test_moe_bf16_close_to_hf():
    # bf16 rounding differs by operation order (HF accumulates with index_add, we sum over K); stated
    # tolerance: 2e-2 relative to the output scale.
    hf, ours = _pair(32, 16, 8, 2, True)
    hf, ours = hf.to(torch.bfloat16), ours.to(torch.bfloat16)
    ours.router.gate_fp32 = False  # HF runs the gate GEMM in the hidden dtype
    torch.manual_seed(1)
    x_TD = torch.randn(64, 32, dtype=torch.bfloat16)
    y_hf = hf(x_TD.view(1, 64, 32))
    y_hf = (y_hf[0] if isinstance(y_hf, tuple) else y_hf).reshape(64, 32)
    y = ours(x_TD)
    assert (y.float() - y_hf.float()).abs().max() <= 2e-2 * y_hf.float().abs().max()


def test_shared_experts_add_a_dense_mlp():
    args = MoEArgs(dim=32, moe_inter_dim=16, num_experts=8, top_k=2, num_shared_experts=2, shared_inter_dim=8)
    torch.manual_seed(0)
    moe = MoE(args)
    assert moe.shared_experts.w1.weight.shape == (16, 32)
    x_TD = torch.randn(10, 32)
    routed = MoE(MoEArgs(dim=32, moe_inter_dim=16, num_experts=8, top_k=2))
    routed.load_state_dict({k: v for k, v in moe.state_dict().items() if not k.startswith("shared")})
    s = moe.shared_experts
    dense = s.w2.weight @ (torch.nn.functional.silu(s.w1.weight @ x_TD.T) * (s.w3.weight @ x_TD.T))
    torch.testing.assert_close(moe(x_TD), routed(x_TD) + dense.T, rtol=1e-5, atol=1e-6)


def test_moe_rejects_bad_input_and_args():
    with pytest.raises(ValueError, match="top_k"):
        MoEArgs(dim=8, moe_inter_dim=8, num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="score_func"):
        MoEArgs(dim=8, moe_inter_dim=8, num_experts=2, top_k=1, score_func="relu")
    moe = MoE(MoEArgs(dim=8, moe_inter_dim=8, num_experts=2, top_k=1))
    with pytest.raises(ValueError, match="packed tokens"):
        moe(torch.randn(2, 3, 8))
