"""Shared pieces of the multi-rank engine tests: a deterministic global batch and a train loop."""

import torch
from archon.config.schema import ActorConfig
from archon.engine.batch import PackedBatch
from archon.engine.engine import ArchonEngine
from archon.train import sft_loss, target_tokens


def global_batch(step: int, n: int = 8, vocab: int = 64) -> PackedBatch:
    g = torch.Generator().manual_seed(100 + step)
    lengths = torch.randint(3, 30, (n,), generator=g).tolist()
    seqs = [torch.randint(0, vocab, (L,), generator=g).tolist() for L in lengths]
    masks = [(torch.rand(L, generator=g) > 0.2).float().tolist() for L in lengths]
    return PackedBatch.from_sequences(seqs, masks)


def train_steps(model_dir: str, allocation: str, ac: str = "none", steps: int = 3, mb_max_tokens: int = 96,
                **archon_kw) -> dict:
    actor = ActorConfig(path=model_dir, dtype="float32", mb_max_tokens=mb_max_tokens, seed=5)
    # AdamW turns fp32 reduction-order noise in near-zero grads into +-lr sign flips (m / sqrt(v) ~ +-1);
    # a larger eps damps that so parameters compare at 1e-5 like the losses do.
    actor.optimizer.lr = 1e-3
    actor.optimizer.eps = 1e-6
    actor.archon.ac_mode = ac
    for k, v in archon_kw.items():
        setattr(actor.archon, k, v)
    eng = ArchonEngine(actor, allocation_mode=allocation, total_steps=steps, device="cpu").initialize()
    losses = []
    for step in range(steps):
        full = global_batch(step)
        rank, world = eng.dp_rank_world()
        mine = full.select(list(range(rank, full.num_seqs, world)))
        losses.append(eng.train_batch(mine, sft_loss, target_tokens)["loss"])
    params = {n: p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone()
              for n, p in eng.model.state_dict().items()}
    clean = {n.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", ""): v for n, v in params.items()}
    return {"losses": losses, "params": clean}


def assert_same(ref: dict, got: dict, tol: float = 1e-5) -> None:
    for i, (a, b) in enumerate(zip(ref["losses"], got["losses"])):
        assert abs(a - b) <= tol * max(abs(a), 1e-8), f"step {i}: loss {b} vs single-process {a}"
    assert ref["params"].keys() == got["params"].keys()
    for n, a in ref["params"].items():
        b = got["params"][n]
        rel = float((a - b).norm() / a.norm().clamp(min=1e-30))
        assert rel <= tol, f"{n}: relative diff {rel:.2e}"


def run_layouts(rank: int, world: int, model_dir: str, layouts: list[tuple[str, str]]) -> dict:
    """run_ranks target: train every (allocation, ac mode) layout in this spawn."""
    return {f"{alloc}/{ac}": train_steps(model_dir, alloc, ac) for alloc, ac in layouts}
