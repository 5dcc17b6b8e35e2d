"""Expert LoRA on archon_moe.GroupedExperts against a naive per-expert loop; MoE layer; adapter round trip."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from archon_lora import (
    ExpertLoRA,
    LoRAConfig,
    inject_lora,
    load_peft_adapter,
    lora_modules,
    lora_state_dict,
    merge_lora,
    merged_state_dict,
    save_peft_adapter,
)
from archon_moe import GroupedExperts, MoE, MoEArgs
from torch import nn

E, D, INTER, R = 4, 16, 24, 3


def randomize_b(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            for w in getattr(m, "lora_targets", ()):
                b = m.lora_pair(w)[1]
                b.copy_(torch.randn(b.shape, generator=g) * 0.2)


def naive_experts(x_TD, counts, w, lora, scale):
    """Loop over experts and their tokens with plain matmuls."""
    outs, start = [], 0
    for e, n in enumerate(counts):
        x = x_TD[start:start + n]
        start += n

        def proj(name, inp, e=e):
            y = inp @ w[name][e].T
            if name in lora:
                a, b = lora[name]
                y = y + scale * (inp @ a[e].T) @ b[e].T
            return y

        outs.append(proj("w2", F.silu(proj("w1", x)) * proj("w3", x)))
    return torch.cat(outs)


@pytest.mark.parametrize("targets", [["w1", "w2", "w3"], ["w2"]])
def test_expert_lora_matches_naive_loop(targets):
    torch.manual_seed(0)
    experts = GroupedExperts(E, D, INTER)
    holder = nn.Module()
    holder.experts = experts
    inject_lora(holder, LoRAConfig(r=R, alpha=5, use_rslora=True, target_modules=["experts"], expert_params=targets))
    assert isinstance(holder.experts, ExpertLoRA) and holder.experts is experts  # same object, params kept
    randomize_b(holder)
    counts = torch.tensor([3, 0, 5, 2])  # expert 1 gets no tokens
    x = torch.randn(10, D, requires_grad=True)
    y = experts(x, counts)
    g = torch.randn_like(y)
    y.backward(g)

    w = {n: getattr(experts, n).detach() for n in ("w1", "w2", "w3")}
    lora = {n: tuple(t.detach().clone().requires_grad_() for t in experts.lora_pair(n)) for n in targets}
    xr = x.detach().clone().requires_grad_()
    yr = naive_experts(xr, counts.tolist(), w, lora, experts.scaling)
    yr.backward(g)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    for n in targets:
        a, b = experts.lora_pair(n)
        torch.testing.assert_close(a.grad, lora[n][0].grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.grad, lora[n][1].grad, rtol=1e-5, atol=1e-5)
        assert a.grad[1].abs().max() == 0 and b.grad[1].abs().max() == 0  # zero, not None: no FSDP skew
    assert all(getattr(experts, n).grad is None for n in ("w1", "w2", "w3"))


def tiny_moe() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Module()
    model.moe = MoE(MoEArgs(dim=D, moe_inter_dim=INTER, num_experts=E, top_k=2, num_shared_experts=1))
    return model


def test_moe_layer_and_merge_match_updated_weights(tmp_path):
    base = tiny_moe()
    model = inject_lora(copy.deepcopy(base), LoRAConfig(r=R, alpha=7, target_modules=["experts", "shared_experts.w2"]))
    randomize_b(model)
    with torch.no_grad():
        model.moe.shared_experts.w2.lora_B.normal_()
    x = torch.randn(9, D)

    # Reference: the plain MoE with W + scale * B[e] @ A[e] written into its weights by hand.
    ref_model = copy.deepcopy(base)
    ex = model.moe.experts
    sw2 = model.moe.shared_experts.w2
    with torch.no_grad():
        for n in ("w1", "w2", "w3"):
            a, b = ex.lora_pair(n)
            delta = torch.stack([b[e] @ a[e] for e in range(E)]) * ex.scaling
            getattr(ref_model.moe.experts, n).add_(delta)
        ref_model.moe.shared_experts.w2.weight.add_(sw2.scaling * sw2.lora_B @ sw2.lora_A)
        ref = ref_model.moe(x)
        torch.testing.assert_close(model.moe(x), ref, rtol=1e-5, atol=1e-5)
        merged = merged_state_dict(model)
        for k, v in ref_model.state_dict().items():
            torch.testing.assert_close(merged[k], v, rtol=1e-5, atol=1e-6, msg=k)
        merge_lora(model)
        torch.testing.assert_close(model.moe(x), ref, rtol=1e-5, atol=1e-5)


def test_expert_adapter_round_trip(tmp_path):
    cfg = LoRAConfig(r=R, alpha=6, target_modules=["experts"])
    src = inject_lora(tiny_moe(), cfg)
    randomize_b(src)
    to_hf = lambda n: n.replace("moe.experts.", "mlp.experts.")
    from_hf = lambda n: n.replace("mlp.experts.", "moe.experts.")
    save_peft_adapter(src, str(tmp_path), cfg, to_hf_name=to_hf)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert meta["r"] == 2 * R and meta["lora_alpha"] == 12.0 and not meta["rank_pattern"]  # same scaling 6/R
    dst = inject_lora(tiny_moe(), LoRAConfig(r=R, alpha=1, target_modules=["experts"]))
    load_peft_adapter(dst, str(tmp_path), from_hf_name=from_hf)
    want, got = lora_state_dict(src), lora_state_dict(dst)
    assert set(got) == set(want) and "moe.experts.lora_A_w1" in got
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    assert dst.moe.experts.scaling == src.moe.experts.scaling

    bad = inject_lora(tiny_moe(), LoRAConfig(r=R + 1, alpha=6, target_modules=["experts"]))
    with pytest.raises(ValueError, match=r"rank-6 pair over the fused gate_up_proj cannot be loaded into expert LoRA of "
                                         r"rank 4"):
        load_peft_adapter(bad, str(tmp_path), from_hf_name=from_hf)


def _peft_form(tmp_path, a_gate_up, b_gate_up, r, alpha=6.0):
    """A peft-written adapter over the fused gate_up_proj only ([E*r, D] / [2I, E*r])."""
    from safetensors.torch import save_file

    save_file({"base_model.model.mlp.experts.lora_A.weight": a_gate_up,
               "base_model.model.mlp.experts.lora_B.weight": b_gate_up}, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": None,
         "target_parameters": ["mlp.experts.gate_up_proj"]}))


def test_peft_shared_a_gate_up_loads_as_gate_and_up_pairs(tmp_path):
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(E * R, D, generator=g), torch.randn(2 * INTER, E * R, generator=g)
    _peft_form(tmp_path, a, b, R)
    dst = inject_lora(tiny_moe(), LoRAConfig(r=R, alpha=6, target_modules=["experts"], expert_params=["w1", "w3"]))
    load_peft_adapter(dst, str(tmp_path), from_hf_name=lambda n: n.replace("mlp.", "moe."))
    ex = dst.moe.experts
    for e in range(E):  # peft: A_e = rows e*R.., B_e[:, k] = B[:, k*E + e]; gate rows first
        delta = b[:, e::E] @ a[e * R:(e + 1) * R] * (6.0 / R)
        torch.testing.assert_close(ex.delta_weight("w1")[e], delta[:INTER], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ex.delta_weight("w3")[e], delta[INTER:], rtol=1e-6, atol=1e-6)
    gate_only = inject_lora(tiny_moe(), LoRAConfig(r=R, alpha=6, target_modules=["experts"], expert_params=["w1"]))
    with pytest.raises(ValueError, match="updates the up half of gate_up_proj but the expert LoRA at 'moe.experts' "
                                         "has no w3 pair"):
        load_peft_adapter(gate_only, str(tmp_path), from_hf_name=lambda n: n.replace("mlp.", "moe."))


def test_expert_lora_with_dropout_is_refused_at_save(tmp_path):
    cfg = LoRAConfig(r=R, alpha=6, dropout=0.1, target_modules=["experts"])
    with pytest.raises(ValueError, match="peft's target_parameters LoRA has no dropout"):
        save_peft_adapter(inject_lora(tiny_moe(), cfg), str(tmp_path), cfg,
                          to_hf_name=lambda n: n.replace("moe.", "mlp."))
    assert not (tmp_path / "adapter_model.safetensors").exists()


def test_former_archon_expert_layout_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": R, "lora_alpha": 6, "target_modules": ["q_proj"],
         "archon_expert_lora": ["mlp.experts.w1"]}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="archon's former own layout"):
        load_peft_adapter(inject_lora(tiny_moe(), LoRAConfig(r=R, target_modules=["experts"])), str(tmp_path),
                          from_hf_name=lambda n: n)
