"""Tree modes through the real engine equal flat packed training (fp32, CPU): loss, every parameter
gradient, and forward_batch logprobs / entropy, on batches with and without shared prefixes.

The reference is `tree_training_mode=disabled` (FlatRunner), which runs each sequence on its own.
"""

import pytest
import torch
from archon.config.schema import ActorConfig
from archon.engine.batch import PackedBatch
from archon.engine.engine import ArchonEngine
from archon.engine.loss import token_separable
from archon.testing import hf_model, tiny_hf_config
from archon.train import sft_loss, target_tokens
from archon_attn.tree.testing import grpo_batch, multiturn_batch

VOCAB = 64


def _batch(seqs: list[torch.Tensor], seed: int) -> PackedBatch:
    g = torch.Generator().manual_seed(seed)
    masks = [(torch.rand(len(s), generator=g) > 0.25).float().tolist() for s in seqs]
    b = PackedBatch.from_sequences([s.tolist() for s in seqs], masks)
    b.token_extras["old_logprobs"] = -torch.rand(b.num_tokens, generator=g) * 4
    b.token_extras["advantages"] = torch.randn(b.num_tokens, generator=g)
    return b


def _batches() -> dict[str, PackedBatch]:
    g = torch.Generator().manual_seed(7)
    grpo = grpo_batch(g, 2, 3, 6, 5, vocab=VOCAB)
    chains = multiturn_batch(g, 2, 3, 4, vocab=VOCAB)
    base = torch.randint(0, VOCAB, (9,), generator=g)
    prefix = [base, base[:4].clone(), torch.cat([base, torch.tensor([3, 5])]), base[:4].clone()]
    lone = [torch.randint(0, VOCAB, (int(n),), generator=g) + i * 0 for i, n in enumerate([5, 7, 1, 4])]
    lone = [torch.cat([torch.tensor([i]), s]) for i, s in enumerate(lone)]  # distinct first tokens: no sharing
    return {"grpo": _batch(grpo, 1), "multiturn": _batch(chains, 2), "prefix": _batch(prefix, 3),
            "no_sharing": _batch(lone, 4)}


def ppo_like_loss(out: dict[str, torch.Tensor], mb: PackedBatch):
    """Clipped-ratio policy loss with an entropy bonus: non-linear in logprobs, uses entropy's gradient."""
    mask = mb.loss_mask
    ratio = torch.exp(out["logprobs"] - mb["old_logprobs"])
    adv = mb["advantages"]
    pg = -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
    return ((pg - 0.01 * out["entropy"]) * mask).sum(), {"ratio": (ratio * mask).sum().detach() / mask.sum()}


# sft_loss is marked token-separable (DTA's one-walk path); ppo_like_loss is not (outputs pass, then the walk);
# the marked PPO loss and the unmarked SFT loss run the other path on the same references.
LOSSES = {"sft": sft_loss, "ppo": ppo_like_loss}
OTHER_PATH = {"sft": token_separable(sft_loss, False), "ppo": token_separable(ppo_like_loss)}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tree_m")
    hf_model(tiny_hf_config("qwen3", vocab_size=VOCAB, num_hidden_layers=2)).save_pretrained(d)
    return str(d)


def _engine(model_dir: str, mode: str, mb_max_tokens: int = 4096, **archon_kw) -> ArchonEngine:
    actor = ActorConfig(path=model_dir, dtype="float32", mb_max_tokens=mb_max_tokens, seed=3)
    actor.archon.tree_training_mode = mode
    for k, v in archon_kw.items():
        setattr(actor.archon, k, v)
    return ArchonEngine(actor, device="cpu").initialize()


def _grads(eng: ArchonEngine, batch: PackedBatch, loss_fn) -> tuple[dict, dict[str, torch.Tensor]]:
    eng.optimizer.zero_grad(set_to_none=True)
    stats = eng.accumulate_grads(batch, loss_fn, target_tokens)
    grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad.detach().clone()
             for n, p in eng.model.named_parameters()}
    return stats, grads


def _assert_close(ref: torch.Tensor, got: torch.Tensor, what: str, tol: float = 1e-5) -> None:
    rel = float((ref - got).norm() / ref.norm().clamp(min=1e-30))
    assert rel <= tol, f"{what}: relative diff {rel:.2e}"


CONFIGS = {
    "sparse": dict(mode="sparse"),
    "sparse/small_mb": dict(mode="sparse", mb_max_tokens=24),
    "dta": dict(mode="dta", tree_dta_block_size=0),
    "dta/block3/small_mb": dict(mode="dta", tree_dta_block_size=3, mb_max_tokens=24),
    "dta/block2/full_ac": dict(mode="dta", tree_dta_block_size=2, ac_mode="full"),
}


@pytest.fixture(scope="module")
def flat(model_dir):
    return _engine(model_dir, "disabled")


@pytest.fixture(scope="module")
def references(flat):
    batches = _batches()
    ref = {}
    for name, b in batches.items():
        out = flat.forward_batch(b, want_entropy=True)
        for loss_name, loss_fn in LOSSES.items():
            ref[name, loss_name] = _grads(flat, b, loss_fn)
        ref[name, "forward"] = out
    return batches, ref


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_tree_mode_equals_flat(model_dir, references, config):
    batches, ref = references
    kw = dict(CONFIGS[config])
    eng = _engine(model_dir, kw.pop("mode"), **kw)
    for name, b in batches.items():
        out = eng.forward_batch(b, want_entropy=True)
        for k in ("logprobs", "entropy"):
            torch.testing.assert_close(out[k], ref[name, "forward"][k], rtol=1e-5, atol=1e-5, msg=f"{name} {k}")
        losses = list(LOSSES.items())
        if config.startswith("dta"):
            losses += [(n, OTHER_PATH[n]) for n in LOSSES]
        for loss_name, loss_fn in losses:
            ref_stats, ref_grads = ref[name, loss_name]
            stats, grads = _grads(eng, b, loss_fn)
            assert abs(stats["loss"] - ref_stats["loss"]) <= 1e-5 * abs(ref_stats["loss"]), (name, loss_name)
            for k in ref_stats.keys() & {"entropy", "ratio"}:
                assert abs(stats[k] - ref_stats[k]) <= 1e-5 * abs(ref_stats[k]), (name, loss_name, k)
            assert grads.keys() == ref_grads.keys()
            for n, g in ref_grads.items():
                _assert_close(g, grads[n], f"{config} {name} {loss_name} {n}")
            assert stats["flat_tokens"] == b.num_tokens
            assert stats["tree_tokens"] <= b.num_tokens
            if name == "no_sharing":
                assert stats["tree_compression"] == 1.0
            if name == "grpo":
                assert stats["tree_compression"] > 1.3


def value_loss(out: dict[str, torch.Tensor], mb: PackedBatch):
    return (((out["values"] - mb["advantages"]) ** 2) * mb.loss_mask).sum()


def test_value_head_tree_modes_equal_flat(model_dir):
    batches = _batches()
    engines = {}
    for mode, kw in (("disabled", {}), ("sparse", {}), ("dta", dict(tree_dta_block_size=3))):
        actor = ActorConfig(path=model_dir, init_from_scratch=True, dtype="float32", seed=3)
        actor.archon.tree_training_mode = mode
        for k, v in kw.items():
            setattr(actor.archon, k, v)
        engines[mode] = ArchonEngine(actor, device="cpu", head="value").initialize()
    for name in ("grpo", "prefix"):
        b = batches[name]
        ref_v = engines["disabled"].forward_batch(b)["values"]
        ref_stats, ref_grads = _grads(engines["disabled"], b, value_loss)
        for mode in ("sparse", "dta"):
            torch.testing.assert_close(engines[mode].forward_batch(b)["values"], ref_v, rtol=1e-5, atol=1e-5)
            for loss_fn in (value_loss, token_separable(value_loss)):
                stats, grads = _grads(engines[mode], b, loss_fn)
                assert abs(stats["loss"] - ref_stats["loss"]) <= 1e-5 * abs(ref_stats["loss"])
                for n, g in ref_grads.items():
                    _assert_close(g, grads[n], f"value {mode} {name} {n}")


@pytest.mark.parametrize("block_size", [0, 2])
def test_dta_separable_loss_walks_once(model_dir, block_size):
    """A token-separable loss skips DTA's outputs pass: one model forward per unit instead of two, plus (block 2:
    the path's kept graphs are capped at 2 tokens) one no-grad forward per internal unit beyond the keep budget."""
    eng = _engine(model_dir, "dta", tree_dta_block_size=block_size)
    b = _batches()["multiturn" if block_size else "grpo"]
    calls = []
    handle = eng.model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        counts = []
        for loss_fn in (token_separable(sft_loss, False), sft_loss):
            calls.clear()
            _grads(eng, b, loss_fn)
            counts.append(len(calls))
    finally:
        handle.remove()
    units = eng.runner._plan(b).units  # one micro-batch: the whole batch fits mb_max_tokens
    if block_size == 0:
        assert sum(u.internal for u in units) >= 2 and any(len(u.seg_lens) > 1 for u in units)  # sharing, packing
        assert counts == [2 * len(units), len(units)], counts
    else:
        recomputed = counts[1] - len(units)
        assert counts[0] - counts[1] == len(units)  # the outputs pass
        assert 0 < recomputed < sum(u.internal for u in units), counts  # some internal graphs kept, some not
