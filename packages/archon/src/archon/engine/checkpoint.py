"""Engine training checkpoints (DCP, resharding, exact resume) and `archon export-hf`."""

from __future__ import annotations

import logging

import torch
from archon.errors import UserError
from torch.distributed.checkpoint.stateful import Stateful

log = logging.getLogger("archon")


class AdapterState(Stateful):
    """Only the trainable parameters (LoRA factors, `modules_to_save` copies): `checkpoint.adapter_only`.

    The frozen base is not saved; a resume rebuilds it from `actor.path` like the first run did.
    """

    def __init__(self, model) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        if not any(p.requires_grad for p in model.parameters()) or all(p.requires_grad for p in model.parameters()):
            raise ValueError("checkpoint.adapter_only=true needs a LoRA engine (actor.lora.enabled=true)")
        self.model = model
        self.options = StateDictOptions(strict=False)

    def _trainable(self) -> set[str]:
        from archon_lora.merge import clean_name

        return {clean_name(n) for n, p in self.model.named_parameters() if p.requires_grad}

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        keep = self._trainable()
        return {k: v for k, v in get_model_state_dict(self.model, options=self.options).items() if k in keep}

    def load_state_dict(self, state_dict: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        missing = self._trainable() - set(state_dict)
        if missing:
            raise ValueError(f"adapter-only checkpoint lacks trainable parameters {sorted(missing)[:5]}; was it "
                             "saved with the same actor.lora target_modules / modules_to_save?")
        set_model_state_dict(self.model, state_dict, options=self.options)


class EngineCheckpointer:
    """Saves/loads model, optimizer, LR scheduler, RNG, step and data position of an ArchonEngine."""

    def __init__(self, engine, cfg) -> None:
        from archon_ckpt import Checkpointer

        self.engine = engine
        self.cfg = cfg
        self.ckpt = Checkpointer(cfg.dir, keep_last_n=cfg.keep_last_n or None, async_save=cfg.async_save,
                                 writer=True)
        self.train_state = {"step": 0, "version": 0}
        self.extra_state: dict[str, Stateful] = {}  # e.g. "data": the data stream's position

    def _state(self) -> dict:
        from archon_ckpt import ModelState, RNGState, SchedulerState

        e = self.engine
        model = AdapterState(e.model) if getattr(self.cfg, "adapter_only", False) else ModelState(e.model)
        optim = e.layout.optimizer_state(e.model, e.optimizer)
        return {"model": model, "optim": optim,
                "sched": SchedulerState(e.scheduler), "rng": RNGState(), "train": self.train_state,
                **self.extra_state}

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

    def after_step(self, step: int) -> None:
        """Save if `checkpoint.every_n_steps` says step `step` (1-based, completed) is a checkpoint step."""
        if self.cfg.every_n_steps and step % self.cfg.every_n_steps == 0:
            self.save(step)

    def finish(self, total_steps: int) -> None:
        """Save the final state (unless that step was just saved) and wait for pending async saves."""
        if self.train_state.get("step") != total_steps:
            self.save(total_steps)
        self.close()

    def close(self) -> None:
        self.ckpt.close()


def export_checkpoint_to_hf(checkpoint: str, out_dir: str, model_config: str, dtype: str = "bfloat16",
                            tokenizer: str = "", *, overwrite: bool = False) -> None:
    """Convert a DCP training checkpoint (root with `latest`, or one step dir) into an HF directory, with the
    tokenizer (``tokenizer``, else the one beside ``model_config`` if any) and its generation_config.

    Checked before anything is written (`archon.export_guard`): `out_dir` is not the checkpoint or a folder
    holding it, is empty unless `overwrite`, and the model of `model_config` has the checkpoint's shapes."""
    import json
    import os

    from archon.export_guard import check_export_target, check_shapes_match
    from archon.hf import build_model, hf_config_dict, load_hf_config
    from archon.spec import get_model_spec
    from archon_ckpt import (
        Checkpointer,
        atomic_write_text,
        iter_dcp_tensors,
        read_metadata,
        save_safetensors_sharded,
    )

    if not os.path.isdir(checkpoint):
        raise UserError(f"export-hf: checkpoint {checkpoint!r} is not a directory")
    check_export_target(checkpoint, out_dir, overwrite=overwrite)
    step_dir = checkpoint
    if not os.path.exists(os.path.join(checkpoint, ".metadata")):
        c = Checkpointer(checkpoint)
        step = c.latest_step()
        if step is None:
            raise ValueError(f"{checkpoint!r} has no checkpoint (no `latest` and no .metadata)")
        step_dir = str(c.step_path(step))
    dtypes = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"export dtype {dtype!r} is not one of {sorted(dtypes)}")
    torch_dtype = dtypes[dtype]
    _reject_lora_checkpoint(step_dir)
    hf_cfg = load_hf_config(model_config)
    model = build_model(hf_cfg, device="meta")
    adapter = get_model_spec(hf_cfg.model_type).state_dict_adapter(model.args)
    tied = model.args.tie_embeddings
    saved = {k[len("model."):]: tuple(md.size) for k, md in read_metadata(step_dir).state_dict_metadata.items()
             if k.startswith("model.") and hasattr(md, "size")}
    check_shapes_match({n: tuple(t.shape) for n, t in model.state_dict().items()}, saved, model_config, step_dir)

    def tensors():
        for name, t in iter_dcp_tensors(step_dir, prefix="model."):
            if adapter.is_native_only(name) or (tied and name == "output.weight"):
                continue
            yield from adapter.to_hf(name, t)

    tok = _serving_tokenizer(tokenizer, model_config)  # fails before anything is written
    save_safetensors_sharded(tensors(), out_dir, dtype=torch_dtype)
    if tok is not None:
        from archon.tokenizer import save_for_serving, stop_token_ids

        save_for_serving(out_dir, tok, stop_token_ids(tok, model_config))
    cfg = hf_config_dict(model)
    cfg["dtype"] = dtype
    atomic_write_text(os.path.join(out_dir, "config.json"), json.dumps(cfg, indent=2, sort_keys=True, default=str))


def _serving_tokenizer(spec: str, model_config: str):
    from archon.tokenizer import load_tokenizer

    try:
        return load_tokenizer(spec, model_config)
    except ValueError:
        if spec:
            raise
        return None  # no tokenizer beside the model config: a weights-only export


def _reject_lora_checkpoint(step_dir: str) -> None:
    from archon.lora_integration import is_lora_param
    from archon_ckpt import read_metadata

    keys = read_metadata(step_dir).state_dict_metadata
    if any(k.startswith("model.") and is_lora_param(k) for k in keys):
        raise ValueError(f"{step_dir!r} is a LoRA training checkpoint: add --merge-lora --config RUN.yaml to fold "
                         "the adapter into the base weights, or write the adapter with `archon export-adapter CKPT "
                         "OUT --config RUN.yaml`")
