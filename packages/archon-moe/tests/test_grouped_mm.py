"""Grouped experts: the CPU path equals a naive per-(token, choice) reference; CUDA kernel == CPU path."""

import pytest
import torch
import torch.nn.functional as F
from archon_moe import GroupedExperts, grouped_mm, grouped_mm_reference, uses_grouped_kernel


def _naive(x_ND, experts_N, w1, w3, w2):
    rows = []
    for n in range(x_ND.shape[0]):  # one row at a time, no grouping
        e = int(experts_N[n])
        h = F.silu(F.linear(x_ND[n], w1[e])) * F.linear(x_ND[n], w3[e])
        rows.append(F.linear(h, w2[e]))
    return torch.stack(rows)


def test_grouped_experts_cpu_equals_naive_fwd_bwd():
    torch.manual_seed(0)
    num_experts, dim, inter = 6, 32, 16
    experts = GroupedExperts(num_experts, dim, inter)
    counts_E = torch.tensor([3, 0, 5, 1, 0, 7])  # empty groups included
    experts_N = torch.repeat_interleave(torch.arange(num_experts), counts_E)
    x_ND = torch.randn(int(counts_E.sum()), dim, requires_grad=True)
    x_ref = x_ND.detach().clone().requires_grad_(True)
    w_ref = [w.detach().clone().requires_grad_(True) for w in (experts.w1, experts.w3, experts.w2)]
    g_ND = torch.randn(x_ND.shape[0], dim)

    y = experts(x_ND, counts_E)
    y_ref = _naive(x_ref, experts_N, *w_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    (y * g_ND).sum().backward()
    (y_ref * g_ND).sum().backward()
    torch.testing.assert_close(x_ND.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    for w, r in zip((experts.w1, experts.w3, experts.w2), w_ref):
        torch.testing.assert_close(w.grad, r.grad, rtol=1e-5, atol=1e-6)
    assert experts.w1.grad[1].abs().sum() == 0 and experts.w1.grad[4].abs().sum() == 0


def test_grouped_mm_rejects_mismatched_counts():
    with pytest.raises(ValueError, match="groups"):
        grouped_mm(torch.randn(4, 8), torch.randn(3, 5, 8), torch.tensor([2, 2]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_grouped_kernel_matches_reference_bf16():
    # Tolerance: bf16 outputs of K=256-long dot products; the kernel and the per-group cuBLAS matmuls
    # accumulate in fp32 in different orders, so we allow 1 bf16 ulp-ish (rel 1e-2) on outputs and grads.
    torch.manual_seed(0)
    dev = "cuda"
    counts_E = torch.tensor([0, 17, 64, 1, 0, 200, 3, 35], device=dev)
    x = torch.randn(int(counts_E.sum()), 256, device=dev, dtype=torch.bfloat16)
    w = torch.randn(8, 128, 256, device=dev, dtype=torch.bfloat16) * 0.05
    g = torch.randn(x.shape[0], 128, device=dev, dtype=torch.bfloat16)
    assert uses_grouped_kernel(x)
    outs = []
    for fn in (grouped_mm, grouped_mm_reference):
        xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = fn(xi, wi, counts_E)
        (y.float() * g.float()).sum().backward()
        outs.append((y.float(), xi.grad.float(), wi.grad.float()))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2 * float(b.abs().max()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_moe_layer_matches_cpu_fp32():
    # The whole layer on CUDA in bf16 (grouped kernel, no host sync) against the same weights on CPU in
    # fp32 (per-expert loop). Tolerance: bf16 activations carry ~3 significant digits; outputs and
    # grads within 3e-2 of each tensor's largest entry (routing is identical: gate GEMM in fp32).
    from archon_moe import MoE, MoEArgs

    torch.manual_seed(0)
    cpu = MoE(MoEArgs(dim=256, moe_inter_dim=128, num_experts=16, top_k=4))
    with torch.no_grad():
        for p in cpu.parameters():  # bf16-representable weights: both sides start from the same values
            p.copy_(p.to(torch.bfloat16).float())
    gpu = MoE(MoEArgs(dim=256, moe_inter_dim=128, num_experts=16, top_k=4)).cuda().to(torch.bfloat16)
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(512, 256).to(torch.bfloat16).float()
    x_cpu, x_gpu = x.clone().requires_grad_(True), x.cuda().to(torch.bfloat16).requires_grad_(True)
    y_cpu, y_gpu = cpu(x_cpu), gpu(x_gpu)
    assert torch.equal(cpu.tokens_per_expert, gpu.tokens_per_expert.cpu())
    y_cpu.pow(2).sum().backward()
    y_gpu.float().pow(2).sum().backward()
    pairs = [(y_gpu, y_cpu), (x_gpu.grad, x_cpu.grad)]
    pairs += [(getattr(gpu.experts, n).grad, getattr(cpu.experts, n).grad) for n in ("w1", "w2", "w3")]
    for got, want in pairs:
        got = got.float().cpu()
        assert (got - want).abs().max() <= 3e-2 * want.abs().max()
