"""LoRALinear and injection against naive references."""

import math

import pytest
import torch
from archon_lora import (
    LoRAConfig,
    LoRALinear,
    inject_lora,
    lora_disabled,
    lora_modules,
    lora_state_dict,
    trainable_parameters,
)
from torch import nn


def naive(x, w, b, a, bb, scale):
    return x @ w.T + b + scale * (x @ a.T) @ bb.T


@pytest.mark.parametrize("rslora", [False, True])
def test_forward_backward_matches_naive(rslora):
    torch.manual_seed(0)
    base = nn.Linear(24, 40)
    lora = LoRALinear.from_linear(base, r=4, alpha=6, use_rslora=rslora)
    assert lora.weight is base.weight and lora.bias is base.bias  # wraps without copying
    scale = 6 / math.sqrt(4) if rslora else 6 / 4
    assert lora.scaling == pytest.approx(scale)
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(3, 5, 24)
    y = lora(x)
    g = torch.randn_like(y)
    y.backward(g)

    a = lora.lora_A.detach().clone().requires_grad_()
    bb = lora.lora_B.detach().clone().requires_grad_()
    xr = x.clone().requires_grad_()
    yr = naive(xr, base.weight.detach(), base.bias.detach(), a, bb, scale)
    yr.backward(g)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lora.lora_A.grad, a.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lora.lora_B.grad, bb.grad, rtol=1e-5, atol=1e-5)
    assert base.weight.grad is None and base.bias.grad is None
    assert not base.weight.requires_grad and not base.bias.requires_grad


def test_init_like_peft_and_zero_update():
    torch.manual_seed(0)
    lora = LoRALinear(64, 32, r=8, alpha=16)
    assert torch.count_nonzero(lora.lora_B) == 0
    bound = 1 / math.sqrt(64)
    assert lora.lora_A.abs().max() <= bound and lora.lora_A.abs().max() > 0.5 * bound
    x = torch.randn(4, 64)
    torch.testing.assert_close(lora(x), nn.functional.linear(x, lora.weight, lora.bias))


def test_dropout_only_on_lora_branch():
    torch.manual_seed(0)
    lora = LoRALinear(16, 8, r=2, alpha=2, dropout=0.5, bias=False)
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(6, 16)
    lora.eval()
    ref = x @ lora.weight.T + (x @ lora.lora_A.T) @ lora.lora_B.T
    torch.testing.assert_close(lora(x), ref, rtol=1e-5, atol=1e-5)
    lora.train()
    torch.manual_seed(1)
    out = lora(x)
    torch.manual_seed(1)
    mask = nn.functional.dropout(torch.ones_like(x), 0.5)
    torch.testing.assert_close(out, x @ lora.weight.T + ((x * mask) @ lora.lora_A.T) @ lora.lora_B.T,
                               rtol=1e-5, atol=1e-5)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.wq = nn.Linear(16, 16)
        self.wo = nn.Linear(16, 16, bias=False)
        self.norm = nn.LayerNorm(16)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 16)
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(16, 10, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, ids):
        h = self.embed(ids)
        for layer in self.layers:
            h = layer.norm(h + layer.wo(layer.wq(h)))
        return self.head(h)


def test_inject_aliases_freeze_and_save():
    torch.manual_seed(0)
    model = Tiny()
    cfg = LoRAConfig(r=2, alpha=4, target_modules=["q_proj", "layers.1.wo"], modules_to_save=["lm_head"])
    inject_lora(model, cfg, name_aliases={"q_proj": "wq", "lm_head": "head"})
    assert sorted(lora_modules(model)) == ["layers.0.wq", "layers.1.wo", "layers.1.wq"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"layers.0.wq.lora_A", "layers.0.wq.lora_B", "layers.1.wq.lora_A", "layers.1.wq.lora_B",
                         "layers.1.wo.lora_A", "layers.1.wo.lora_B", "head.weight"}
    assert model.head.weight is not model.embed.weight  # the trainable copy unties the head
    torch.testing.assert_close(model.head.weight, model.embed.weight)
    assert len(trainable_parameters(model)) == 7
    assert set(lora_state_dict(model)) == trainable
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    assert model.embed.weight.grad is None and model.head.weight.grad is not None


def test_lora_disabled_restores_base():
    torch.manual_seed(0)
    model = Tiny()
    ids = torch.tensor([[1, 4, 7]])
    with torch.no_grad():
        ref = model(ids)
    inject_lora(model, LoRAConfig(r=2, alpha=4, target_modules=["wq", "wo"]))
    for m in lora_modules(model).values():
        nn.init.normal_(m.lora_B)
    with torch.no_grad():
        assert (model(ids) - ref).abs().max() > 1e-3
        with lora_disabled(model):
            torch.testing.assert_close(model(ids), ref)
        assert (model(ids) - ref).abs().max() > 1e-3


def test_inject_errors():
    with pytest.raises(ValueError, match=r"\['q_proj'\].*available.*'wo', 'wq'"):
        inject_lora(Tiny(), LoRAConfig(target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="norm"):
        inject_lora(Tiny(), LoRAConfig(target_modules=["norm"]))
    with pytest.raises(ValueError, match="modules_to_save.*lm_head"):
        inject_lora(Tiny(), LoRAConfig(target_modules=["wq"], modules_to_save=["lm_head"]))
    model = inject_lora(Tiny(), LoRAConfig(target_modules=["wq"]))
    with pytest.raises(ValueError, match="already has LoRA"):
        inject_lora(model, LoRAConfig(target_modules=["wq"]))


@pytest.mark.parametrize("kwargs, match", [
    ({"r": 0}, "rank r"), ({"alpha": -1.0}, "alpha"), ({"dropout": 1.0}, "dropout"),
    ({"target_modules": []}, "target_modules"), ({"modules_to_save": ["q_proj"]}, "both"),
    ({"expert_params": ["w4"]}, "expert_params"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRAConfig(**kwargs)


def test_meta_injection_then_init():
    with torch.device("meta"):
        model = Tiny()
    inject_lora(model, LoRAConfig(r=2, alpha=4, target_modules=["wq"]))
    assert model.layers[0].wq.lora_A.is_meta
    model.to_empty(device="cpu")
    from archon_lora import init_lora_weights

    init_lora_weights(model)
    assert torch.count_nonzero(model.layers[0].wq.lora_B) == 0
    assert model.layers[0].wq.lora_A.abs().max() > 0
