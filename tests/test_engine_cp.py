"""The engine under context parallelism (Ulysses and ring), alone and with TP2 / FSDP2, on CPU gloo ranks
equals one process: forward logprobs/entropy, and losses + parameters after 3 AdamW steps (fp32, 1e-5 rel).

The tiny qwen3 has 4 query heads and 2 kv heads, so c2t2 Ulysses repeats each tp rank's single kv head
for the two cp ranks. Batches are varlen packed documents whose lengths need padding for every layout.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from engine_parallel_common import assert_same, global_batch, train_steps  # noqa: E402

from archon.config.schema import ActorConfig  # noqa: E402
from archon.config.validate import validate_cp, validate_engine  # noqa: E402
from archon.engine.engine import ArchonEngine  # noqa: E402
from archon.testing import hf_model, tiny_hf_config  # noqa: E402
from archon_parallel.dims import ParallelDims  # noqa: E402
from archon_parallel.testing import run_ranks  # noqa: E402


def forward_outputs(model_dir: str, allocation: str, **archon_kw) -> dict[str, torch.Tensor]:
    actor = ActorConfig(path=model_dir, dtype="float32", mb_max_tokens=64, seed=5)
    for k, v in archon_kw.items():
        setattr(actor.archon, k, v)
    eng = ArchonEngine(actor, allocation_mode=allocation, device="cpu").initialize()
    return eng.forward_batch(global_batch(7), want_entropy=True)


def _layouts(rank, world, model_dir, layouts):
    sys.path.insert(0, str(Path(__file__).parent))
    out = {}
    for alloc, impl in layouts:
        out[f"{alloc}/{impl}/fwd"] = forward_outputs(model_dir, alloc, cp_impl=impl)
        out[f"{alloc}/{impl}"] = train_steps(model_dir, alloc, cp_impl=impl)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    hf_model(tiny_hf_config("qwen3", vocab_size=64, num_hidden_layers=2)).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def reference(model_dir):
    return {"train": train_steps(model_dir, "archon:d1"), "fwd": forward_outputs(model_dir, "archon:d1")}


def _check(reference, res, key):
    ref_fwd, got_fwd = reference["fwd"], res[f"{key}/fwd"]
    for name in ("logprobs", "entropy"):
        torch.testing.assert_close(got_fwd[name], ref_fwd[name], rtol=1e-5, atol=1e-5, msg=f"{key} {name}")
    assert_same(reference["train"], res[key])


def test_cp2_ulysses_and_ring(model_dir, reference):
    layouts = [("archon:c2", "ulysses"), ("archon:c2", "ring")]
    for res in run_ranks(_layouts, 2, model_dir, layouts, timeout=400):
        for alloc, impl in layouts:
            _check(reference, res, f"{alloc}/{impl}")


def test_cp2_with_tp2_and_fsdp2(model_dir, reference):
    layouts = [("archon:c2t2", "ulysses"), ("archon:d2c2", "ring")]
    for res in run_ranks(_layouts, 4, model_dir, layouts, timeout=600):
        for alloc, impl in layouts:
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
