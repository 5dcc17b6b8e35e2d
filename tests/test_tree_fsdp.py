"""Tree training under FSDP2 on 2 gloo ranks with tree-aware DP balance equals single-process flat
training (fp32, 3 AdamW steps): DTA (blocks, several micro-batches, padding micro-batches) and sparse."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from archon.config.schema import ActorConfig  # noqa: E402
from archon.engine.batch import PackedBatch  # noqa: E402
from archon.engine.engine import ArchonEngine  # noqa: E402
from archon.engine.loss import token_separable  # noqa: E402
from archon.testing import hf_model, tiny_hf_config  # noqa: E402
from archon.train import sft_loss, target_tokens  # noqa: E402
from archon_parallel.testing import run_ranks  # noqa: E402
from engine_parallel_common import assert_same  # noqa: E402

VOCAB = 64


def tree_global_batch(step: int) -> PackedBatch:
    """GRPO groups and multi-turn chains of different sizes, so ranks get different trees."""
    from archon_attn.tree.testing import grpo_batch, multiturn_batch

    g = torch.Generator().manual_seed(200 + step)
    seqs = grpo_batch(g, 3, 3, 7, 6, vocab=VOCAB) + multiturn_batch(g, 2, 3, 4, vocab=VOCAB)
    masks = [(torch.rand(len(s), generator=g) > 0.2).float().tolist() for s in seqs]
    return PackedBatch.from_sequences([s.tolist() for s in seqs], masks)


def tree_train_steps(model_dir: str, allocation: str, mode: str, steps: int = 3, mb_max_tokens: int = 4096,
                     separable: bool = True, **archon_kw) -> dict:
    """``separable=False`` hides sft_loss's token-separable mark (DTA then runs its outputs pass first)."""
    from archon.tree import balance_for_tree

    actor = ActorConfig(path=model_dir, dtype="float32", mb_max_tokens=mb_max_tokens, seed=5)
    actor.optimizer.lr = 1e-3
    actor.archon.tree_training_mode = mode
    for k, v in archon_kw.items():
        setattr(actor.archon, k, v)
    eng = ArchonEngine(actor, allocation_mode=allocation, total_steps=steps, device="cpu").initialize()
    losses, stats = [], []
    for step in range(steps):
        full = tree_global_batch(step)
        rank, world = eng.dp_rank_world()
        mine = balance_for_tree(full, rank, world) if world > 1 else full
        s = eng.train_batch(mine, sft_loss if separable else token_separable(sft_loss, False), target_tokens)
        losses.append(s["loss"])
        stats.append(s)
    params = {n: p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone()
              for n, p in eng.model.state_dict().items()}
    clean = {n.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", ""): v for n, v in params.items()}
    return {"losses": losses, "params": clean, "stats": stats}


def _tree_layouts(rank, world, model_dir, layouts):
    return {name: tree_train_steps(model_dir, "archon:d2", **kw) for name, kw in layouts.items()}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tree_fsdp")
    hf_model(tiny_hf_config("qwen3", vocab_size=VOCAB, num_hidden_layers=2)).save_pretrained(d)
    return str(d)


def test_tree_modes_fsdp2_two_ranks_equal_flat_single_process(model_dir):
    torch.set_num_threads(1)
    ref = tree_train_steps(model_dir, "archon:d1", "disabled")
    layouts = {
        "dta": dict(mode="dta", tree_dta_block_size=3, mb_max_tokens=30),
        "dta/ac": dict(mode="dta", tree_dta_block_size=0, ac_mode="full"),
        "dta/outputs_pass": dict(mode="dta", tree_dta_block_size=2, mb_max_tokens=40, separable=False),
        "sparse": dict(mode="sparse", mb_max_tokens=30),
    }
    res = run_ranks(_tree_layouts, 2, model_dir, layouts, timeout=500)
    for name in layouts:
        for r in res:
            assert_same(ref, r[name])
        s0, s1 = res[0][name]["stats"], res[1][name]["stats"]
        for a, b, full in zip(s0, s1, (tree_global_batch(i) for i in range(3))):
            assert a["flat_tokens"] == b["flat_tokens"] == full.num_tokens  # summed over both ranks
            assert a["tree_tokens"] == b["tree_tokens"] < full.num_tokens
            assert a["tree_cost_imbalance"] == b["tree_cost_imbalance"] >= 1.0
