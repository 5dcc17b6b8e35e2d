"""The engine under context parallelism (Ulysses and ring), alone and with TP2 / FSDP2, on CPU gloo ranks
equals one process: forward logprobs/entropy, and losses + parameters after 3 AdamW steps (fp32, 1e-5 rel).

The tiny qwen3 has 4 query heads and 2 kv heads, so c2t2 Ulysses repeats each tp rank's single kv head
for the two cp ranks. Batches are varlen packed documents whose lengths need padding for every layout.
Also: a value head (critic) under c2 ring, full AC under d2c2 ring, and qwen3_moe with EP on the cp ranks
(c2e2).
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from archon.config.schema import ActorConfig  # noqa: E402
from archon.config.validate import validate_cp, validate_engine  # noqa: E402
from archon.engine.engine import ArchonEngine  # noqa: E402
from archon.testing import hf_model, tiny_hf_config  # noqa: E402
from archon_parallel.dims import ParallelDims  # noqa: E402
from archon_parallel.testing import run_ranks  # noqa: E402
from engine_parallel_common import assert_same, global_batch, train_steps  # noqa: E402


def forward_outputs(model_dir: str, allocation: str, head: str = "lm", **archon_kw) -> dict[str, torch.Tensor]:
    # a value head is not in the HF checkpoint: seeded random init, identical on every layout
    actor = ActorConfig(path=model_dir, dtype="float32", mb_max_tokens=64, seed=5, init_from_scratch=head == "value")
    for k, v in archon_kw.items():
        setattr(actor.archon, k, v)
    eng = ArchonEngine(actor, allocation_mode=allocation, device="cpu", head=head).initialize()
    return eng.forward_batch(global_batch(7), want_entropy=True)


def _layouts(rank, world, model_dir, layouts, value_head=(), moe=None):
    sys.path.insert(0, str(Path(__file__).parent))
    out = {}
    for alloc, impl, ac in layouts:
        out[f"{alloc}/{impl}/fwd"] = forward_outputs(model_dir, alloc, cp_impl=impl)
        out[f"{alloc}/{impl}"] = train_steps(model_dir, alloc, ac, cp_impl=impl)
    for alloc, impl in value_head:
        out[f"{alloc}/{impl}/value"] = forward_outputs(model_dir, alloc, head="value", cp_impl=impl)
    if moe is not None:
        moe_dir, alloc = moe
        out["moe"] = train_steps(moe_dir, alloc, cp_impl="ulysses")
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    hf_model(tiny_hf_config("qwen3", vocab_size=64, num_hidden_layers=2)).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    # aux loss off: CP computes it per rank on its own tokens (averaged over cp), not on the whole batch
    d = tmp_path_factory.mktemp("moe")
    hf_model(tiny_hf_config("qwen3_moe", vocab_size=64, num_hidden_layers=2, router_aux_loss_coef=0.0)).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def reference(model_dir):
    return {"train": train_steps(model_dir, "archon:d1"), "fwd": forward_outputs(model_dir, "archon:d1"),
            "value": forward_outputs(model_dir, "archon:d1", head="value")}


def _check(reference, res, key):
    ref_fwd, got_fwd = reference["fwd"], res[f"{key}/fwd"]
    for name in ("logprobs", "entropy"):
        torch.testing.assert_close(got_fwd[name], ref_fwd[name], rtol=1e-5, atol=1e-5, msg=f"{key} {name}")
    assert_same(reference["train"], res[key])


def test_cp2_ulysses_and_ring(model_dir, moe_dir, reference):
    layouts = [("archon:c2", "ulysses", "none"), ("archon:c2", "ring", "none")]
    moe_ref = train_steps(moe_dir, "archon:d1")
    for res in run_ranks(_layouts, 2, model_dir, layouts, [("archon:c2", "ring")], (moe_dir, "archon:c2e2"),
                         timeout=400):
        # qwen3_moe with EP borrowing the cp ranks (c2e2)
        assert_same(moe_ref, res["moe"])
        for alloc, impl, _ in layouts:
            _check(reference, res, f"{alloc}/{impl}")
        # a critic (value head) runs through the same runner
        torch.testing.assert_close(res["archon:c2/ring/value"]["values"], reference["value"]["values"],
                                   rtol=1e-5, atol=1e-5)


def test_cp2_with_tp2_and_fsdp2(model_dir, reference):
    # full activation checkpointing recomputes the ring's send/recv in backward: same result as no AC
    layouts = [("archon:c2t2", "ulysses", "none"), ("archon:d2c2", "ring", "full")]
    for res in run_ranks(_layouts, 4, model_dir, layouts, timeout=600):
        for alloc, impl, _ in layouts:
            _check(reference, res, f"{alloc}/{impl}")


def test_bad_head_cp_combinations_raise(model_dir):
    # 4 heads: Ulysses needs cp | 4 / tp; ring takes any cp.
    validate_cp("ulysses", 4, 2, cp=4, tp=1)
    validate_cp("ulysses", 4, 2, cp=2, tp=2)  # kv heads after TP (1) are repeated for the 2 cp ranks
    validate_cp("ring", 4, 2, cp=3, tp=2)
    with pytest.raises(ValueError, match=r"rule ulysses-cp-divides-heads.*4 heads / tp 2 = 2.*pick cp in \[1, 2\]"):
        validate_cp("ulysses", 4, 2, cp=4, tp=2)
    with pytest.raises(ValueError, match=r"pick cp in \[1, 2, 4\].*cp_impl=ring"):
        validate_cp("ulysses", 4, 2, cp=3, tp=1)
    actor = ActorConfig(path=model_dir)
    with pytest.raises(ValueError, match="ulysses-cp-divides-heads"):
        validate_engine(actor, ParallelDims(cp=4, tp=2, world_size=8), torch.device("cpu"))
    actor.archon.cp_impl = "ring"
    validate_engine(actor, ParallelDims(cp=4, tp=2, world_size=8), torch.device("cpu"))
    with pytest.raises(ValueError, match="cp-with-pp"):
        validate_engine(actor, ParallelDims(cp=2, pp=2, world_size=4), torch.device("cpu"))
