"""Worker for tests/test_engine_cp_gpu.py: train 3 steps + forward on CUDA, save the results.

Run as `python engine_cp_gpu_worker.py MODEL_DIR ALLOCATION CP_IMPL DTYPE OUT.pt [DEVICE [COMPILE]]` (one GPU) or under
`torchrun --nproc_per_node 2` (the engine initialises NCCL from the torchrun environment).
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


def main(model_dir: str, allocation: str, cp_impl: str, dtype: str, out: str, device: str = "cuda",
         compile: str = "0") -> None:
    actor = ActorConfig(path=model_dir, dtype=dtype, mb_max_tokens=96, seed=5)
    actor.optimizer.lr = 1e-3
    actor.optimizer.eps = 1e-6
    actor.archon.cp_impl = cp_impl
    actor.archon.attn_impl = "varlen"
    actor.archon.enable_compile = compile == "1"
    eng = ArchonEngine(actor, allocation_mode=allocation, total_steps=3, device=device).initialize()
    fwd = eng.forward_batch(global_batch(7), want_entropy=True)
    losses = []
    for step in range(3):
        full = global_batch(step)
        rank, world = eng.dp_rank_world()
        losses.append(eng.train_batch(full.select(list(range(rank, full.num_seqs, world))), sft_loss,
                                      target_tokens)["loss"])
    params = {n.replace("_checkpoint_wrapped_module.", ""): (p.full_tensor() if hasattr(p, "full_tensor") else p)
              .detach().float().cpu() for n, p in eng.model.state_dict().items()}
    if eng.rank == 0:
        torch.save({"losses": losses, "params": params, "fwd": fwd}, out)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:8])
