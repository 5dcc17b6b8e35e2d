"""Engine training checkpoints (DCP, resharding, exact resume) and `archon export-hf`."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("archon")


class EngineCheckpointer:
    """Saves/loads model, optimizer, LR scheduler, RNG, step and data position of an ArchonEngine."""

    def __init__(self, engine, cfg) -> None:
        from archon_ckpt import Checkpointer

        self.engine = engine
        self.cfg = cfg
        self.ckpt = Checkpointer(cfg.dir, keep_last_n=cfg.keep_last_n or None, async_save=cfg.async_save)
        self.train_state = {"step": 0, "version": 0}

    def _state(self) -> dict:
        from archon_ckpt import ModelState, OptimizerState, RNGState, SchedulerState

        e = self.engine
        return {"model": ModelState(e.model), "optim": OptimizerState(e.model, e.optimizer),
                "sched": SchedulerState(e.scheduler), "rng": RNGState(), "train": self.train_state}

    def save(self, step: int) -> None:
        self.train_state.update(step=step, version=self.engine.version)
        self.ckpt.save(step, self._state())

    def maybe_resume(self) -> int:
        """Resume per `checkpoint.resume` (none | auto | step number); returns the step to continue from."""
        mode = str(self.cfg.resume)
        if mode == "none":
            return 0
        if mode == "auto":
            if self.ckpt.latest_step() is None:
                log.info("checkpoint.resume=auto: no checkpoint under %s, starting fresh", self.cfg.dir)
                return 0
            step = self.ckpt.load(self._state())
        elif mode.isdigit():
            step = self.ckpt.load(self._state(), int(mode))
        else:
            raise ValueError(f"checkpoint.resume must be none, auto or a step number, got {mode!r}")
        self.engine.version = int(self.train_state.get("version", step))
        log.info("resumed from step %d", step)
        return step

    def close(self) -> None:
        self.ckpt.close()


def export_checkpoint_to_hf(checkpoint: str, out_dir: str, model_config: str, dtype: str = "bfloat16") -> None:
    """Convert a DCP training checkpoint (root with `latest`, or one step dir) into an HF directory."""
    import json
    import os

    from archon_ckpt import Checkpointer, atomic_write_text, iter_dcp_tensors, save_safetensors_sharded

    from archon.hf import hf_config_dict, load_hf_config, build_model
    from archon.spec import get_model_spec

    step_dir = checkpoint
    if not os.path.exists(os.path.join(checkpoint, ".metadata")):
        c = Checkpointer(checkpoint)
        step = c.latest_step()
        if step is None:
            raise ValueError(f"{checkpoint!r} has no checkpoint (no `latest` and no .metadata)")
        step_dir = str(c.step_path(step))
    hf_cfg = load_hf_config(model_config)
    model = build_model(hf_cfg, device="meta")
    adapter = get_model_spec(hf_cfg.model_type).state_dict_adapter(model.args)
    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[dtype]
    tied = model.args.tie_embeddings

    def tensors():
        for name, t in iter_dcp_tensors(step_dir, prefix="model."):
            if adapter.is_native_only(name) or (tied and name == "output.weight"):
                continue
            yield from adapter.to_hf(name, t)

    save_safetensors_sharded(tensors(), out_dir, dtype=torch_dtype)
    cfg = hf_config_dict(model)
    cfg["dtype"] = dtype
    atomic_write_text(os.path.join(out_dir, "config.json"), json.dumps(cfg, indent=2, sort_keys=True, default=str))
