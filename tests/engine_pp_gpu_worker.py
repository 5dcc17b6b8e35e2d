"""Worker for tests/test_engine_pp_gpu.py: train 3 steps + forward on CUDA, save this rank's results.

Run as `python engine_pp_gpu_worker.py MODEL_DIR ALLOCATION DTYPE OUT_PREFIX SCHEDULE STAGES_PER_RANK COMPILE` (one
GPU) or under `torchrun --nproc_per_node N` (the engine initialises NCCL from the torchrun environment). Each rank
writes OUT_PREFIX.rank{R}.pt holding its stages' parameters.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from archon.config.schema import ActorConfig  # noqa: E402
from archon.engine.engine import ArchonEngine  # noqa: E402
from archon.train import sft_loss, target_tokens  # noqa: E402
from engine_parallel_common import global_batch  # noqa: E402


def main(model_dir: str, allocation: str, dtype: str, out: str, schedule: str, spr: str, compile: str) -> None:
    actor = ActorConfig(path=model_dir, dtype=dtype, mb_max_tokens=96, seed=5)
    actor.optimizer.lr = 1e-3
    actor.optimizer.eps = 1e-6
    actor.archon.attn_impl = "varlen"
    actor.archon.enable_compile = compile == "1"
    actor.archon.pp_schedule = schedule
    actor.archon.pp_stages_per_rank = int(spr)
    eng = ArchonEngine(actor, allocation_mode=allocation, total_steps=3, device="cuda").initialize()
    rank, world = eng.dp_rank_world()
    losses = []
    for step in range(3):
        full = global_batch(step)
        losses.append(eng.train_batch(full.select(list(range(rank, full.num_seqs, world))), sft_loss,
                                      target_tokens)["loss"])
    fwd = {k: v.cpu() for k, v in eng.forward_batch(global_batch(7), want_entropy=True).items()}
    params = {n.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", ""):
              (p.full_tensor() if hasattr(p, "full_tensor") else p.detach()).float().cpu()
              for n, p in eng.model.state_dict().items()}
    r = dist.get_rank() if dist.is_initialized() else 0
    torch.save({"losses": losses, "fwd": fwd, "params": params}, f"{out}.rank{r}.pt")
    torch.cuda.synchronize()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
