"""Expert parallel on CPU gloo ranks == one process on the concatenated tokens (3 SGD steps).

Layouts: ep2, ep4, ep2 x tp2 with etp=1 and with etp=tp. Every dp rank (ep coordinate) feeds different
tokens, skewed so that some experts get no tokens from some ranks (uneven all-to-all, zero splits).
"""

import torch
import torch.nn.functional as F
from archon_moe import MoE, MoEArgs, moe_load_metrics, update_aux_free_biases
from archon_parallel.expert_parallel import all_to_all_autograd, apply_expert_parallel
from archon_parallel.testing import run_ranks
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

DIM, INTER, EXPERTS, TOP_K, CLASSES, STEPS, LR = 32, 16, 8, 2, 5, 3, 0.1


class Net(nn.Module):
    """Two residual MoE layers and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        args = MoEArgs(dim=DIM, moe_inter_dim=INTER, num_experts=EXPERTS, top_k=TOP_K)
        self.moes = nn.ModuleList([MoE(args), MoE(args)])
        self.head = nn.Linear(DIM, CLASSES, bias=False)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        for moe in self.moes:
            x_TD = x_TD + moe(x_TD)
        return self.head(x_TD)


def _build() -> Net:
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        for moe in net.moes:
            moe.experts.w1.normal_(std=0.1)
            moe.experts.w3.normal_(std=0.1)
            moe.experts.w2.normal_(std=0.1)
            # Feature 0 steers tokens: positive -> experts 0..3, negative -> experts 4..7.
            moe.router.gate.weight[: EXPERTS // 2, 0] += 4.0
            moe.router.gate.weight[EXPERTS // 2 :, 0] -= 4.0
    return net


def _data(num_chunks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    chunks = []
    for c in range(num_chunks):
        x_TD = torch.randn(10 + 3 * c, DIM, generator=g)
        x_TD[:, 0] = (1.0 if c % 2 == 0 else -1.0) * (1.0 + x_TD[:, 0].abs())
        chunks.append((x_TD, torch.randint(0, CLASSES, (x_TD.shape[0],), generator=g)))
    return chunks


def _train(net: Net, x_TD, labels_T, total_tokens: int, reduce_dense) -> list[dict]:
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9, foreach=False)
    history = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = F.cross_entropy(net(x_TD), labels_T, reduction="sum") / total_tokens
        loss.backward()
        record = {"loss": loss.detach().clone(), "counts": [m.tokens_per_expert.clone() for m in net.moes]}
        for name, p in net.named_parameters():
            if ".experts." not in name:
                reduce_dense(p.grad)
            g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            record[name] = g.detach().clone()
        reduce_dense(record["loss"])
        history.append(record)
        opt.step()
    return history


def _reference(num_chunks: int) -> list[dict]:
    chunks = _data(num_chunks)
    x_TD, labels_T = torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])
    return _train(_build(), x_TD, labels_T, x_TD.shape[0], lambda t: None)


def _ep_rank(rank: int, world: int, layouts: list[tuple[int, int, bool]]):
    import torch.distributed as dist

    results = []
    for ep, tp, etp in layouts:
        # A [rep, ep, tp] mesh: rep > 1 runs independent replicas of the layout (ep2 on 4 ranks).
        mesh = init_device_mesh("cpu", (world // (ep * tp), ep, tp), mesh_dim_names=("rep", "ep", "tp"))
        ep_mesh, tp_mesh = mesh["ep"], mesh["tp"]
        ep_coord, tp_coord = mesh.get_local_rank("ep"), mesh.get_local_rank("tp")
        net = _build()
        for moe in net.moes:
            apply_expert_parallel(moe, ep_mesh, tp_mesh if etp else None)
        chunks = _data(ep)
        x_TD, labels_T = chunks[ep_coord]
        total = sum(c[0].shape[0] for c in chunks)
        dp_group = ep_mesh.get_group()  # dense params are data parallel over ep; tp replicas agree

        def reduce_dense(t: torch.Tensor, group=dp_group) -> None:
            dist.all_reduce(t, group=group)

        history = _train(net, x_TD, labels_T, total, reduce_dense)
        results.append({"ep_coord": ep_coord, "tp_coord": tp_coord, "history": history})
    return results, _error_and_a2a_checks(rank, world)


def _error_and_a2a_checks(rank: int, world: int):
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    moe = MoE(MoEArgs(dim=8, moe_inter_dim=8, num_experts=6, top_k=1))
    msg = ""
    try:
        apply_expert_parallel(moe, mesh)
    except ValueError as e:
        msg = str(e)
    # Uneven all-to-all with autograd: rank r sends r + 1 rows to every peer.
    x = torch.full((world * (rank + 1), 1), float(rank), requires_grad=True)
    y = all_to_all_autograd(x, [r + 1 for r in range(world)], [rank + 1] * world, mesh.get_group())
    (y * torch.arange(1, y.shape[0] + 1).unsqueeze(1)).sum().backward()
    # On meta parameters (the integrator's build order) and with a rank that has no tokens at all.
    with torch.device("meta"):
        meta_moe = MoE(MoEArgs(dim=8, moe_inter_dim=8, num_experts=8, top_k=2))
    apply_expert_parallel(meta_moe, mesh)
    assert meta_moe.experts.w1.to_local().shape == (8 // world, 8, 8) and meta_moe.experts.w1.shape == (
        8,
        8,
        8,
    )
    torch.manual_seed(0)
    moe = MoE(MoEArgs(dim=8, moe_inter_dim=8, num_experts=8, top_k=2, aux_loss_coef=0.1))
    apply_expert_parallel(moe, mesh)
    x_empty = torch.randn(0 if rank == 1 else 6, 8, requires_grad=True)
    y_empty = moe(x_empty)
    (y_empty.sum() + moe.aux_loss).backward()
    assert y_empty.shape == x_empty.shape and torch.isfinite(moe.experts.w1.grad.to_local()).all()
    return msg, y.detach(), x.grad, _aux_free_and_metrics(rank, mesh)


def _aux_free_args() -> MoEArgs:
    return MoEArgs(
        dim=8, moe_inter_dim=8, num_experts=4, top_k=1, aux_free_bias=True, aux_free_update_rate=0.1
    )


def _aux_free_tokens(rank: int) -> torch.Tensor:
    return torch.randn(5 + rank, 8, generator=torch.Generator().manual_seed(rank))


def _aux_free_and_metrics(rank: int, mesh):
    torch.manual_seed(0)
    model = nn.Sequential(MoE(_aux_free_args()), MoE(_aux_free_args()))
    with torch.no_grad():
        model(_aux_free_tokens(rank))
    metrics = moe_load_metrics(model, group=mesh.get_group())
    update_aux_free_biases(model, group=mesh.get_group())
    return [m.router.expert_bias.clone() for m in model], metrics


def _expert_slice(name: str, ref: torch.Tensor, ep: int, tp: int, etp: bool, ep_coord: int, tp_coord: int):
    local = EXPERTS // ep
    out = ref[ep_coord * local : (ep_coord + 1) * local]
    if etp:
        dim = 2 if name.endswith("w2") else 1
        out = out.chunk(tp, dim=dim)[tp_coord]
    return out


def _check(layouts, results_per_rank):
    for li, (ep, tp, etp) in enumerate(layouts):
        ref = _reference(ep)
        saw_zero_split = False
        for rank_results in results_per_rank:
            res = rank_results[li]
            for step, (got, want) in enumerate(zip(res["history"], ref)):
                where = (
                    f"ep{ep} tp{tp} etp={etp} rank(ep={res['ep_coord']}, tp={res['tp_coord']}) step {step}"
                )
                torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-5, atol=1e-7, msg=where)
                saw_zero_split |= any(bool((c == 0).any()) for c in got["counts"])
                for name, g_ref in want.items():
                    if name in ("loss", "counts"):
                        continue
                    if ".experts." in name:
                        g_ref = _expert_slice(name, g_ref, ep, tp, etp, res["ep_coord"], res["tp_coord"])
                    torch.testing.assert_close(got[name], g_ref, rtol=1e-5, atol=1e-6, msg=f"{where} {name}")
        assert saw_zero_split, "the skewed input should leave some experts without tokens on some ranks"


def test_ep2_ep4_ep2tp2_match_one_process():
    layouts = [(2, 1, False), (4, 1, False), (2, 2, False), (2, 2, True)]
    per_rank = run_ranks(_ep_rank, 4, layouts, timeout=500)
    _check(layouts, [r[0] for r in per_rank])

    # Aux-free bias and load metrics use the global load: equal to one process on all ranks' tokens.
    torch.manual_seed(0)
    ref = nn.Sequential(MoE(_aux_free_args()), MoE(_aux_free_args()))
    with torch.no_grad():
        ref(torch.cat([_aux_free_tokens(r) for r in range(4)]))
    ref_metrics = moe_load_metrics(ref)
    update_aux_free_biases(ref)
    for _, (_, _, _, (biases, metrics)) in per_rank:
        for got, m in zip(biases, ref):
            assert torch.equal(got, m.router.expert_bias)
        assert metrics == ref_metrics

    world = 4
    for rank, (_, (msg, y, grad, _)) in enumerate(per_rank):
        assert "must divide the number of experts" in msg
        # received: r + 1 rows of value r from every rank r, in rank order
        assert y.flatten().tolist() == [float(r) for r in range(world) for _ in range(r + 1)]
        # x row j goes to peer j // (rank + 1), where it lands at offset sum_{r<rank}(r+1) + j % (rank + 1)
        want = [float(rank * (rank + 1) // 2 + j % (rank + 1) + 1) for j in range(world * (rank + 1))]
        assert grad.flatten().tolist() == want
