"""FSDP2 / HSDP / TP+SP / FSDP2xTP2 with AC none & selective equal a single-process run (gloo, fp32).

The tiny decoder below declares a ParallelPlan the way real models do, so the generic ``parallelize``
is what gets tested. T: packed tokens, D: model dim, V: vocab.
"""

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from archon_parallel.checkpointing import ACConfig
from archon_parallel.compile import CompileConfig
from archon_parallel.dims import ParallelDims
from archon_parallel.fsdp import FSDPConfig
from archon_parallel.parallelize import parallelize
from archon_parallel.plan import ParallelPlan
from archon_parallel.tensor_parallel import validate_tp
from archon_parallel.testing import run_ranks
from archon_parallel.vocab_parallel import logprobs_entropy
from torch import nn
from torch.distributed.tensor import DTensor

VOCAB, DIM, HEADS, KV_HEADS, HIDDEN, LAYERS = 64, 32, 4, 2, 48, 2
NUM_SEQS, SEQ_LEN, STEPS, LR = 4, 16, 3, 1e-2

PLAN = ParallelPlan(
    blocks="layers", embedding="tok_embeddings", norm="norm", head="output",
    block_tp={
        "attention_norm": "sequence",
        "attention": "gather_seq",
        "attention.wq": "colwise", "attention.wk": "colwise", "attention.wv": "colwise",
        "attention.wo": "rowwise_seq",
        "ffn_norm": "sequence",
        "feed_forward": "gather_seq",
        "feed_forward.w1": "colwise", "feed_forward.w3": "colwise",
        "feed_forward.w2": "rowwise_seq",
    },
)


# MoE-like block under TP: the whole MLP runs replicated over tp on all tokens (gather in, cut out)
PLAN_REPLICATED_MLP = ParallelPlan(
    blocks="layers", embedding="tok_embeddings", norm="norm", head="output",
    block_tp={k: v for k, v in PLAN.block_tp.items() if not k.startswith("feed_forward")}
    | {"feed_forward": "gather_scatter_seq"},
    num_heads=HEADS, num_kv_heads=KV_HEADS,
)
PLANS = {"dense": PLAN, "replicated_mlp": PLAN_REPLICATED_MLP}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x_TD):
        return x_TD * torch.rsqrt(x_TD.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.head_dim = DIM // HEADS
        self.wq = nn.Linear(DIM, HEADS * self.head_dim, bias=True)
        self.wk = nn.Linear(DIM, KV_HEADS * self.head_dim, bias=False)  # k bias has zero grad
        self.wv = nn.Linear(DIM, KV_HEADS * self.head_dim, bias=True)
        self.wo = nn.Linear(HEADS * self.head_dim, DIM, bias=False)

    def forward(self, x_TD):
        T = x_TD.shape[0]
        q_THd = self.wq(x_TD).view(T, -1, self.head_dim)  # local heads under TP
        k_TKd = self.wk(x_TD).view(T, -1, self.head_dim)
        v_TKd = self.wv(x_TD).view(T, -1, self.head_dim)
        rep = q_THd.shape[1] // k_TKd.shape[1]
        k_THd, v_THd = k_TKd.repeat_interleave(rep, dim=1), v_TKd.repeat_interleave(rep, dim=1)
        o_HTd = F.scaled_dot_product_attention(q_THd.transpose(0, 1), k_THd.transpose(0, 1),
                                               v_THd.transpose(0, 1), is_causal=True)
        return self.wo(o_HTd.transpose(0, 1).reshape(T, -1))


class SwiGLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Linear(DIM, HIDDEN, bias=False)
        self.w3 = nn.Linear(DIM, HIDDEN, bias=False)
        self.w2 = nn.Linear(HIDDEN, DIM, bias=False)

    def forward(self, x_TD):
        return self.w2(F.silu(self.w1(x_TD)) * self.w3(x_TD))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention_norm, self.attention = RMSNorm(DIM), Attention()
        self.ffn_norm, self.feed_forward = RMSNorm(DIM), SwiGLU()

    def forward(self, x_TD):
        h_TD = x_TD + self.attention(self.attention_norm(x_TD))
        return h_TD + self.feed_forward(self.ffn_norm(h_TD))


class TinyDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = RMSNorm(DIM)
        self.output = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens_T):
        h_TD = self.tok_embeddings(tokens_T)
        for layer in self.layers:
            h_TD = layer(h_TD)
        return self.output(self.norm(h_TD))


def make_model() -> TinyDecoder:
    torch.manual_seed(0)
    model = TinyDecoder()
    with torch.no_grad():  # non-trivial norm weights so their sharding is exercised
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (NUM_SEQS, SEQ_LEN), generator=g)
    labels = torch.randint(0, VOCAB, (NUM_SEQS, SEQ_LEN), generator=g)
    return tokens, labels


def seq_loss(model, tokens_T, labels_T):
    logprobs_T, _ = logprobs_entropy(model(tokens_T), labels_T, chunk_size=5)
    return -logprobs_T.mean()


def clean(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def train(model, seq_ids, reduce_group=None):
    """3 AdamW steps; each step's loss is the mean over ``seq_ids`` (this rank's share)."""
    tokens, labels = make_data()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    losses = []
    for _ in range(STEPS):
        loss = sum(seq_loss(model, tokens[i], labels[i]) for i in seq_ids) / len(seq_ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        reported = loss.detach().clone()
        if reduce_group is not None:
            dist.all_reduce(reported, group=reduce_group)
            reported /= dist.get_world_size(reduce_group)
        losses.append(reported.item())
    params = {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if isinstance(p, DTensor) else p
        params[clean(name)] = full.detach().clone()
    return losses, params


def reference():
    return train(make_model(), list(range(NUM_SEQS)))


def _layout_run(rank, world_size, alloc, ac, fsdp=(), plan="dense"):
    dims = ParallelDims.from_allocation(alloc, world_size)
    cfg = FSDPConfig(param_dtype="float32", **dict(fsdp)) if fsdp else None
    model = parallelize(make_model(), dims, PLANS[plan], ac=ac, fsdp=cfg)
    dp_rank = dims.build_meshes()["dp"].get_local_rank() if dims.dp_enabled else 0
    per_rank = NUM_SEQS // dims.dp
    seq_ids = list(range(dp_rank * per_rank, (dp_rank + 1) * per_rank))
    return train(model, seq_ids, reduce_group=dist.group.WORLD)


def _layouts(rank, world_size, layouts):
    return {layout: _layout_run(rank, world_size, *layout) for layout in layouts}


MESH_ALLOCS = ["archon:d2t2e2", "archon:d4e2", "archon:r2d2", "archon:(attn:d2t2|ffn:e4)",
               "archon:(attn:d2t2|ffn:e2t2)", "archon:t2c2"]
MESH_NAMES = ["pp", "dp_replicate", "dp_shard", "cp", "tp", "dp", "dp_shard_cp", "dp_cp", "edp", "ep", "ep_rep",
              "etp"]


def _mesh_groups(rank, world_size):
    out = {}
    for alloc in MESH_ALLOCS:
        meshes = ParallelDims.from_allocation(alloc, world_size).build_meshes("cpu")
        groups = {name: sorted(dist.get_process_group_ranks(meshes.group(name))) for name in MESH_NAMES}
        groups["fsdp"] = meshes["fsdp"].mesh.tolist()
        out[alloc] = groups
    return out


def _four_ranks(rank, world_size, layouts):
    return {"meshes": _mesh_groups(rank, world_size), **_layouts(rank, world_size, layouts)}


# rank 1's groups on 4 ranks, worked out by hand from the documented layout (dense mesh
# (pp, dp_replicate, dp_shard, cp, tp); expert mesh (pp, edp, ep, ep_rep, etp) over the same order)
EXPECTED_RANK1 = {
    "archon:d2t2e2": dict(dp_shard=[1, 3], tp=[0, 1], dp=[1, 3], dp_cp=[1, 3], ep=[1, 3], ep_rep=[0, 1],
                          edp=[1], etp=[1], fsdp=[1, 3]),
    "archon:d4e2": dict(dp_shard=[0, 1, 2, 3], tp=[1], ep=[0, 1], edp=[1, 3], ep_rep=[1], fsdp=[0, 1, 2, 3]),
    "archon:r2d2": dict(dp_replicate=[1, 3], dp_shard=[0, 1], dp=[0, 1, 2, 3], dp_cp=[0, 1, 2, 3],
                        fsdp=[[0, 1], [2, 3]], edp=[0, 1, 2, 3]),
    "archon:(attn:d2t2|ffn:e4)": dict(tp=[0, 1], dp_shard=[1, 3], ep=[0, 1, 2, 3], edp=[1], etp=[1]),
    "archon:(attn:d2t2|ffn:e2t2)": dict(tp=[0, 1], ep=[1, 3], etp=[0, 1], edp=[1]),
    "archon:t2c2": dict(cp=[1, 3], tp=[0, 1], dp_shard=[1], dp_shard_cp=[1, 3], dp_cp=[1, 3], fsdp=[1, 3]),
}


# (allocation, AC mode, FSDPConfig overrides as a tuple of pairs)
LAYOUTS_2 = [("archon:d2", "none"), ("archon:d2", "selective"), ("archon:t2", "none"),
             ("archon:t2", "selective"), ("archon:d2", "full", (("reshard_after_forward", "always"),)),
             ("archon:t2", "selective:2"), ("archon:d2", "none", (("cpu_offload", True),)),
             ("archon:d2", "selective", (("reshard_after_forward", "never"),)),
             ("archon:t2", "none", (), "replicated_mlp")]
LAYOUTS_4 = [("archon:d4", "none"), ("archon:d4", "selective"), ("archon:r2d2", "none"),
             ("archon:r2d2", "selective"), ("archon:d2t2", "none"), ("archon:d2t2", "selective"),
             ("archon:d2t2", "none", (), "replicated_mlp")]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _assert_matches(results, ref):
    ref_losses, ref_params = ref
    for key, per_rank in results.items():
        for losses, params in per_rank:
            for step, (got, want) in enumerate(zip(losses, ref_losses)):
                assert abs(got - want) <= 1e-5 * abs(want), (key, step, got, want)
            assert params.keys() == ref_params.keys(), key
            for name, want in ref_params.items():
                assert _rel(params[name], want) <= 1e-5, (key, name, _rel(params[name], want))


@pytest.fixture(scope="module")
def ref():
    return reference()


def _collect(results_per_rank):
    return {key: [r[key] for r in results_per_rank] for key in results_per_rank[0]}


def test_two_ranks_fsdp_tp_match_single_process(ref):
    results = run_ranks(_layouts, 2, LAYOUTS_2, timeout=240)
    _assert_matches(_collect(results), ref)


def test_four_ranks_meshes_and_fsdp_hsdp_fsdp_x_tp_match_single_process(ref):
    results = run_ranks(_four_ranks, 4, LAYOUTS_4, timeout=400)
    meshes = [r.pop("meshes") for r in results]
    for alloc, expected in EXPECTED_RANK1.items():
        for name, ranks in expected.items():
            assert meshes[1][alloc][name] == ranks, (alloc, name, meshes[1][alloc][name])
    _assert_matches(_collect(results), ref)


def test_single_device_ac_and_compile_match_reference(ref):
    for ac in ("full", "selective", "selective:2"):
        model = parallelize(make_model(), ParallelDims(world_size=1), PLAN, ac=ac)
        _assert_matches({ac: [train(model, list(range(NUM_SEQS)))]}, ref)
    model = parallelize(make_model(), ParallelDims(world_size=1), PLAN, ac="full",
                        compile=CompileConfig(enabled=True, backend="eager"))
    _assert_matches({"compile": [train(model, list(range(NUM_SEQS)))]}, ref)


def test_memory_budget_needs_compile():
    with pytest.raises(ValueError, match="needs compile"):
        parallelize(make_model(), ParallelDims(world_size=1), PLAN, ac="memory_budget")
    import torch._functorch.config as functorch_config

    before = functorch_config.activation_memory_budget
    try:
        parallelize(make_model(), ParallelDims(world_size=1), PLAN, ac="memory_budget:0.3",
                    compile=CompileConfig(enabled=True, backend="eager"))
        assert math.isclose(functorch_config.activation_memory_budget, 0.3)
    finally:
        functorch_config.activation_memory_budget = before


def test_ac_config_errors():
    assert ACConfig.parse("selective:3").every_n_layers == 3
    with pytest.raises(ValueError, match="unknown activation checkpointing mode"):
        ACConfig.parse("sometimes")
    with pytest.raises(ValueError, match="selective:N"):
        ACConfig.parse("selective:x")


def test_validate_tp():
    validate_tp(8, 4, 4)
    with pytest.raises(ValueError, match=r"num_kv_heads 2 is not divisible\); pick tp in \[1, 2\]"):
        validate_tp(8, 2, 4)


def test_parallelize_checks_heads_against_tp():
    plan = ParallelPlan(**{**PLAN.__dict__, "num_heads": 4, "num_kv_heads": 1})
    with pytest.raises(ValueError, match="tensor parallel size 2 must divide the attention heads"):
        parallelize(make_model(), ParallelDims(tp=2, world_size=2, dp_shard=1), plan)


def test_plan_typo_is_rejected():
    bad = ParallelPlan(block_tp={"attention.wz": "colwise"})
    from archon_parallel.tensor_parallel import apply_tp

    with pytest.raises(ValueError, match="no block has"):
        apply_tp(make_model(), None, bad)


def test_apply_tp_builds_styles_with_the_given_factory():
    asked = []

    def record(name, **opts):  # None = nothing to apply, so no mesh is needed
        asked.append((name, opts["sequence_parallel"], opts["loss_parallel"]))
        return None

    from archon_parallel.tensor_parallel import apply_tp

    apply_tp(make_model(), None, PLAN, sequence_parallel=False, style_factory=record)
    expected = ["embedding", "sequence", "head"] + list(PLAN.block_tp.values()) * LAYERS
    assert sorted(n for n, _, _ in asked) == sorted(expected)
    assert {(sp, lp) for _, sp, lp in asked} == {(False, True)}


def _tp_with_hooks(rank, world_size):
    from archon_parallel.tensor_parallel import make_style

    asked, ep_calls = [], []

    def record(name, **opts):
        asked.append(name)
        return make_style(name, **opts)

    dims = ParallelDims(tp=2, world_size=world_size, dp_shard=1)
    model = parallelize(make_model(), dims, PLAN, style_factory=record,
                        after_expert_parallel=lambda *a: ep_calls.append(a))
    return sorted(set(asked)), ep_calls, isinstance(model.layers[0].attention.wq.weight, DTensor)


def test_parallelize_uses_style_factory_hook():
    for asked, ep_calls, sharded in run_ranks(_tp_with_hooks, 2, timeout=120):
        assert asked == sorted({"embedding", "sequence", "head", *PLAN.block_tp.values()})
        assert ep_calls == [] and sharded  # no EP in this layout: the EP hook is never called


def _grad_norms(rank, world_size):
    from archon_parallel.grad import clip_grad_norm_, grad_norm_sq

    tokens, labels = make_data()
    out = {}
    for alloc in ("archon:d4", "archon:r2d2", "archon:d2t2"):
        dims = ParallelDims.from_allocation(alloc, world_size)
        model = parallelize(make_model(), dims, PLAN)
        seq_loss(model, tokens[rank % NUM_SEQS], labels[rank % NUM_SEQS]).backward()
        # independent reference: every grad gathered whole by DTensor, squared and summed
        naive = sum(float(p.grad.full_tensor().pow(2).sum()) for p in model.parameters())
        fast = float(grad_norm_sq(model.parameters()))
        clip_grad_norm_(list(model.parameters()), max_norm=0.5 * math.sqrt(naive))
        clipped = sum(float(p.grad.full_tensor().pow(2).sum()) for p in model.parameters())
        out[alloc] = (naive, fast, clipped)
    return out


def test_grad_norm_across_fsdp_hsdp_tp_meshes():
    for res in run_ranks(_grad_norms, 4, timeout=300):
        for alloc, (naive, fast, clipped) in res.items():
            assert math.isclose(fast, naive, rel_tol=1e-5), (alloc, fast, naive)
            assert math.isclose(clipped, 0.25 * naive, rel_tol=1e-4), (alloc, clipped, naive)
