"""archon_parallel.pipeline: stage split, placement, pruning, schedules (checked against brute force / torch)."""

import itertools

import pytest
import torch
from archon_parallel.pipeline import (
    available_schedules,
    build_schedule,
    prune_to_stage,
    split_layers,
    stage_ids_for_rank,
    stage_layout,
    validate_microbatches,
)
from archon_parallel.plan import ParallelPlan
from torch import nn


def _best_max_cost(num_layers: int, num_stages: int, first_less: int, last_less: int) -> int:
    """Brute force: the smallest possible max stage cost over every contiguous split."""
    best = None
    for cuts in itertools.combinations_with_replacement(range(num_layers + 1), num_stages - 1):
        bounds = (0, *cuts, num_layers)
        costs = [bounds[s + 1] - bounds[s] for s in range(num_stages)]
        costs[0] += first_less
        costs[-1] += last_less
        best = max(costs) if best is None else min(best, max(costs))
    return best


@pytest.mark.parametrize("num_layers,num_stages,first,last", [
    (28, 4, 1, 1), (14, 6, 1, 1), (6, 4, 1, 1), (4, 4, 1, 1), (2, 2, 1, 1), (7, 3, 0, 0), (10, 4, 2, 0), (5, 2, 0, 2),
])
def test_split_layers_contiguous_and_balanced(num_layers, num_stages, first, last):
    ranges = split_layers(num_layers, num_stages, first_less=first, last_less=last)
    assert [i for r in ranges for i in r] == list(range(num_layers))
    costs = [len(r) for r in ranges]
    costs[0] += first
    costs[-1] += last
    assert max(costs) == _best_max_cost(num_layers, num_stages, first, last)
    assert max(costs) - min(costs) <= 1


def test_split_layers_rejects_too_many_stages():
    with pytest.raises(ValueError, match="cannot fill"):
        split_layers(2, 8)
    with pytest.raises(ValueError, match=">= 1"):
        split_layers(4, 0)


@pytest.mark.parametrize("pp,spr,style", [(2, 1, "loop"), (4, 2, "loop"), (2, 3, "loop"), (4, 2, "v")])
def test_stage_placement_covers_every_stage_once(pp, spr, style):
    held = [s for r in range(pp) for s in stage_ids_for_rank(r, pp, spr, style)]
    assert sorted(held) == list(range(pp * spr))
    if style == "v":  # the turn of the V: stages pp-1 and pp share the last rank
        assert stage_ids_for_rank(pp - 1, pp, 2, "v") == [pp - 1, pp]
    else:
        assert all(s % pp == r for r in range(pp) for s in stage_ids_for_rank(r, pp, spr, style))


def test_stage_layout_and_errors():
    lay = stage_layout("Interleaved1F1B", 4, 1, 2, 2)
    assert lay.stage_ids == (1, 3) and lay.owner == (0, 1, 0, 1)
    assert [list(r) for r in lay.layers] == [[1], [3]]
    with pytest.raises(ValueError, match="one stage per rank"):
        stage_layout("1F1B", 4, 0, 2, 2)
    with pytest.raises(ValueError, match="not one of"):
        stage_layout("Bogus", 4, 0, 2)
    with pytest.raises(ValueError, match="pp_stages_per_rank=2"):
        stage_ids_for_rank(0, 2, 3, "v")


def test_validate_microbatches():
    validate_microbatches("1F1B", 3, 2)
    with pytest.raises(ValueError, match="at least pp=4"):
        validate_microbatches("1F1B", 2, 4)
    with pytest.raises(ValueError, match="multiple of pp=2"):
        validate_microbatches("Interleaved1F1B", 3, 2, 2)


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(8, 4)
        self.layers = nn.ModuleDict({str(i): nn.Linear(4, 4) for i in range(4)})
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 8)


def test_prune_to_stage_keeps_names():
    plan = ParallelPlan(blocks="layers", embedding="embed", norm="norm", head="head")
    mid = prune_to_stage(_Toy(), plan, [1, 2], first=False, last=False)
    assert sorted(n for n, _ in mid.named_parameters()) == [
        "layers.1.bias", "layers.1.weight", "layers.2.bias", "layers.2.weight"]
    assert mid.embed is None and mid.norm is None and mid.head is None
    first = prune_to_stage(_Toy(), plan, [0], first=True, last=False)
    assert first.embed is not None and first.head is None and list(first.layers) == ["0"]
    with pytest.raises(TypeError, match="ModuleDict"):
        toy = _Toy()
        toy.layers = nn.ModuleList(toy.layers.values())
        prune_to_stage(toy, plan, [0], first=True, last=False)


def test_schedules_feature_detected():
    names = available_schedules()
    assert {"1F1B", "Interleaved1F1B", "GPipe"} <= set(names)
    with pytest.raises(ValueError, match="not one of"):
        build_schedule("Bogus", [], 2, None)


# ---- two gloo ranks: a toy MLP pipelined equals one process --------------------------------------------------
def _pipelined_grads(rank, world, configs):
    return {cfg: _one_schedule(rank, world, *cfg) for cfg in configs}


def _one_schedule(rank, world, schedule, spr):
    from torch.distributed.pipelining import PipelineStage

    torch.manual_seed(0)
    full = nn.ModuleDict({str(i): nn.Linear(8, 8) for i in range(4)})
    x_MD = torch.randn(4, 8)
    y_MD = torch.randn(4, 8)
    lay = stage_layout(schedule, 4, rank, world, spr, first_less=0, last_less=0)
    stages, mods = [], []
    for sid, layers in zip(lay.stage_ids, lay.layers):
        mod = nn.Sequential(*[full[str(i)] for i in layers])
        mods.append(mod)
        meta = torch.empty(1, 8, device="meta", requires_grad=True)
        stages.append(PipelineStage(mod, sid, lay.num_stages, torch.device("cpu"), input_args=meta,
                                    output_args=meta))
    sched = build_schedule(schedule, stages, 4, lambda out, y: ((out - y) ** 2).sum())
    args = (x_MD,) if 0 in lay.stage_ids else ()
    kw = {"target": y_MD, "losses": []} if lay.num_stages - 1 in lay.stage_ids else {}
    sched.step(*args, **kw)
    return {f"{i}.{n}": p.grad.clone() for i in set(i for r in lay.layers for i in r)
            for n, p in full[str(i)].named_parameters()}


def test_pipelined_toy_equals_single_process():
    from archon_parallel.testing import run_ranks

    torch.manual_seed(0)
    full = nn.ModuleDict({str(i): nn.Linear(8, 8) for i in range(4)})
    x_MD, y_MD = torch.randn(4, 8), torch.randn(4, 8)
    out = x_MD
    for i in range(4):
        out = full[str(i)](out)
    ((out - y_MD) ** 2).sum().backward()  # summed, never scaled by the micro-batch count
    ref = {f"{i}.{n}": p.grad for i in range(4) for n, p in full[str(i)].named_parameters()}
    configs = [("1F1B", 1), ("Interleaved1F1B", 2)]
    per_rank = run_ranks(_pipelined_grads, 2, configs, timeout=120)
    for cfg in configs:
        got: dict = {}
        for r in per_rank:
            got.update(r[cfg])
        assert got.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6)
