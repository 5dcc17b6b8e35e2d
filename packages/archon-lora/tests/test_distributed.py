"""LoRA under FSDP2 and TP2 (CPU gloo) equals one process after 3 AdamW steps."""

import torch
import torch.nn.functional as F
from archon_lora import (
    LoRAConfig,
    LoRATensorParallel,
    check_same_trainable,
    init_lora_weights,
    inject_lora,
    load_peft_adapter,
    lora_modules,
    lora_state_dict,
    lora_tp_plan,
    merged_state_dict,
    place_lora_like_base,
    save_peft_adapter,
)
from archon_moe import GroupedExperts
from archon_parallel.testing import run_ranks
from torch import nn

STEPS = 3


class Block(nn.Module):
    """Attention-like (wq colwise -> wo rowwise) then MLP (w1 colwise -> w2 rowwise)."""

    def __init__(self, dim: int = 32, hidden: int = 64):
        super().__init__()
        self.wq = nn.Linear(dim, dim)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim)

    def forward(self, x):
        x = x + self.wo(torch.tanh(self.wq(x)))
        return x + self.w2(F.silu(self.w1(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


CFG = LoRAConfig(r=4, alpha=8, use_rslora=True, target_modules=["wq", "wo", "w1", "w2"])


def build() -> Net:
    torch.manual_seed(0)
    model = inject_lora(Net(), CFG)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
    return model


def data(step: int, rank: int | None) -> torch.Tensor:
    """Batch of 4 rows for ``step``; rank r of 2 gets rows [2r, 2r+2)."""
    x = torch.randn(4, 5, 32, generator=torch.Generator().manual_seed(100 + step))
    return x if rank is None else x[2 * rank: 2 * rank + 2]


def train(model: nn.Module, rank: int | None) -> list[dict[str, torch.Tensor]]:
    """3 AdamW steps; returns per step the full LoRA grads, and the final LoRA params."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    history = []
    for step in range(STEPS):
        x = data(step, rank)
        loss = model(x).pow(2).mean()
        loss.backward()
        grads = {}
        for n, p in model.named_parameters():
            if p.requires_grad:
                g = p.grad
                grads[n] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
            else:
                assert p.grad is None, n
        history.append(grads)
        opt.step()
        opt.zero_grad()
    params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
              for n, p in model.named_parameters() if p.requires_grad}
    history.append(params)
    return history


def ranks_fn(rank: int, world_size: int, adapter_dir: str) -> dict[str, list]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (world_size,))
    out: dict[str, list] = {}

    # FSDP2: each rank sees half of the batch; mean loss over rows matches the full batch.
    model = build()
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    check_same_trainable(model)
    out["fsdp"] = train(model, rank)

    # TP2: every rank sees the full batch.
    model = build()
    plan = {"wq": LoRATensorParallel(ColwiseParallel()), "wo": LoRATensorParallel(RowwiseParallel()),
            "w1": LoRATensorParallel(ColwiseParallel()), "w2": LoRATensorParallel(RowwiseParallel())}

    def tp(model):
        for layer in model.layers:
            parallelize_module(layer, mesh, plan)
        return model

    tp(model)
    blk = model.layers[0]
    assert tuple(blk.wq.lora_A.placements) == (Replicate(),) and tuple(blk.wq.lora_B.placements) == (Shard(0),)
    assert tuple(blk.wo.lora_A.placements) == (Shard(1),) and tuple(blk.wo.lora_B.placements) == (Replicate(),)
    assert not blk.wq.weight.requires_grad and blk.wq.lora_A.requires_grad
    out["tp"] = train(model, None)
    out["tp_merged"] = merged_state_dict(model)  # gathers DTensors
    save_peft_adapter(model, adapter_dir, CFG, to_hf_name=lambda n: n)  # rank 0 writes
    dist.barrier()
    fresh = tp(build())
    load_peft_adapter(fresh, adapter_dir, from_hf_name=lambda n: n)  # each rank takes its shard
    out["tp_loaded"] = lora_state_dict(fresh)

    # Meta-device build -> inject -> FSDP2 -> to_empty -> init_lora_weights (the engine's order).
    with torch.device("meta"):
        model = inject_lora(Net(), LoRAConfig(r=4, alpha=8, target_modules=["wq", "w2"]))
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    init_lora_weights(model)
    lora_a = model.layers[0].wq.lora_A.full_tensor()
    out["meta_init"] = (float(model.layers[1].w2.lora_B.full_tensor().abs().max()), float(lora_a.abs().max()))

    out["ep"] = expert_parallel(rank, mesh)

    # Plain TP styles, then LoRA placed from the base weights: same placements as lora_tp_plan.
    model = build()
    parallelize_module(model.layers[0], mesh, {"wq": ColwiseParallel(), "wo": RowwiseParallel()})
    for name, style in (("wq", "colwise"), ("wo", "rowwise")):
        mod = getattr(model.layers[0], name)
        place_lora_like_base(mod)
        got = {k: tuple(getattr(mod, k).placements) for k in ("lora_A", "lora_B")}
        assert got == lora_tp_plan(style), (name, got)
    holder = build_experts()
    holder.experts.w1 = nn.Parameter(distribute_tensor(holder.experts.w1.detach(), mesh, [Shard(1)]),
                                     requires_grad=False)
    try:
        place_lora_like_base(holder.experts)
        out["etp_error"] = ""
    except ValueError as err:
        out["etp_error"] = str(err)

    # A rank with a different trainable set would hang FSDP2/TP collectives: the check names it instead.
    model = build()
    if rank == 1:
        model.layers[0].wq.weight.requires_grad_(True)
    try:
        check_same_trainable(model)
        out["mismatch_error"] = ""
    except ValueError as err:
        out["mismatch_error"] = str(err)
    return out


EP_COUNTS = [3, 0, 4, 2]  # tokens per expert, sorted by expert; expert 1 gets none


def build_experts() -> nn.Module:
    torch.manual_seed(0)
    holder = nn.Module()
    holder.experts = GroupedExperts(len(EP_COUNTS), 16, 24)
    inject_lora(holder, LoRAConfig(r=3, alpha=6, target_modules=["experts"]))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for w in holder.experts.lora_targets:
            b = holder.experts.lora_pair(w)[1]
            b.copy_(torch.randn(b.shape, generator=g) * 0.2)
    return holder


def expert_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(6)
    return torch.randn(sum(EP_COUNTS), 16, generator=g), torch.randn(sum(EP_COUNTS), 16, generator=g)


def expert_single() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    holder = build_experts()
    x, g = expert_data()
    y = holder.experts(x, torch.tensor(EP_COUNTS))
    y.backward(g)
    return y.detach(), {n: p.grad for n, p in holder.experts.named_parameters() if p.requires_grad}


def expert_parallel(rank: int, mesh) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """EP2: experts (and their LoRA pairs) sharded on dim 0; each rank runs its experts' tokens."""
    from torch.distributed.tensor import Shard, distribute_tensor

    holder = build_experts()
    ex = holder.experts
    for w in ("w1", "w2", "w3"):
        ex.register_parameter(w, nn.Parameter(distribute_tensor(getattr(ex, w).detach(), mesh, [Shard(0)]),
                                              requires_grad=False))
    place_lora_like_base(ex)
    assert tuple(ex.lora_A_w2.placements) == (Shard(0),) and tuple(ex.lora_B_w2.placements) == (Shard(0),)
    x, g = expert_data()
    local = len(EP_COUNTS) // 2
    start = sum(EP_COUNTS[: rank * local])
    counts = EP_COUNTS[rank * local: (rank + 1) * local]
    rows = slice(start, start + sum(counts))
    y = ex(x[rows], torch.tensor(counts))
    y.backward(g[rows])
    grads = {n: p.grad.full_tensor() for n, p in ex.named_parameters() if p.requires_grad}
    return torch.cat([t for t in dist_all_gather(y.detach())]), grads


def dist_all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    """All-gather of tensors whose first dim differs per rank."""
    import torch.distributed as dist

    sizes = [None] * dist.get_world_size()
    dist.all_gather_object(sizes, t.shape[0])
    out = [t.new_empty(n, *t.shape[1:]) for n in sizes]
    padded = [t.new_zeros(max(sizes), *t.shape[1:]) for _ in sizes]
    mine = t.new_zeros(max(sizes), *t.shape[1:])
    mine[: t.shape[0]] = t
    dist.all_gather(padded, mine)
    for o, p, n in zip(out, padded, sizes):
        o.copy_(p[:n])
    return out


def _close(got, want):
    for step, (g, w) in enumerate(zip(got, want)):
        assert set(g) == set(w), step
        for name in w:
            torch.testing.assert_close(g[name], w[name], rtol=1e-5, atol=1e-6, msg=f"step {step} {name}")


def test_fsdp2_and_tp2_match_single_process(tmp_path):
    ref_model = build()
    ref = train(ref_model, None)
    assert any(v.abs().max() > 0 for v in ref[0].values())
    ref_merged = merged_state_dict(ref_model)
    ep_ref = expert_single()
    results = run_ranks(ranks_fn, 2, str(tmp_path), timeout=240)
    for rank_out in results:
        _close([rank_out["tp_merged"], rank_out["tp_loaded"]], [ref_merged, ref[-1]])
        ep_y, ep_grads = rank_out["ep"]
        torch.testing.assert_close(ep_y, ep_ref[0], rtol=1e-5, atol=1e-6)
        _close([ep_grads], [ep_ref[1]])
        assert "not expert-tensor parallel" in rank_out["etp_error"]
        b_max, a_max = rank_out["meta_init"]
        assert b_max == 0 and 0 < a_max <= 1 / 32**0.5
        assert "ranks disagree on the trainable parameters" in rank_out["mismatch_error"]
        _close(rank_out["fsdp"], ref)
        _close(rank_out["tp"], ref)
