"""`archon export-adapter CKPT OUT --config RUN.yaml` (the LoRA adapter of a training checkpoint in PEFT's
format) and `archon export-hf CKPT OUT --merge-lora --config RUN.yaml` (base weights with the adapter folded in).

A training checkpoint holds tensors, not the LoRA hyper-parameters, so both read the run's YAML (its `actor`
section: `path`, `lora.*`; `--key=value` overrides apply as for `archon train`). The model is rebuilt on the CPU
in one process like the run built it, then the checkpoint's model state (full or `adapter_only`) is loaded.
"""

from __future__ import annotations

import os
import re

import torch

from archon.config.fields import apply_overrides, from_dict
from archon.config.schema import ActorConfig

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def actor_from_run_config(yaml_path: str, overrides: list[str]) -> ActorConfig:
    """The `actor` section of a run's YAML (`archon train` or `archon rl`), with `--actor.x=y` overrides."""
    import yaml

    with open(yaml_path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{yaml_path}: the top level must be a mapping")
    data = apply_overrides(data, overrides)
    actor = data.get("actor") or {}
    if not isinstance(actor, dict):
        raise ValueError(f"{yaml_path}: `actor` must be a mapping")
    return from_dict(ActorConfig, actor, prefix="actor.")


def _step_dir(checkpoint: str) -> tuple[str, int]:
    from archon_ckpt import Checkpointer

    if os.path.exists(os.path.join(checkpoint, ".metadata")):
        m = re.search(r"(\d+)$", os.path.basename(os.path.normpath(checkpoint)))
        if m is None:
            raise ValueError(f"{checkpoint!r}: a step directory's name ends with its step number")
        return os.path.dirname(os.path.normpath(checkpoint)), int(m.group(1))
    step = Checkpointer(checkpoint).latest_step()
    if step is None:
        raise ValueError(f"{checkpoint!r} has no checkpoint (no `latest` and no .metadata)")
    return checkpoint, step


def load_lora_checkpoint(checkpoint: str, actor: ActorConfig):
    """An `ArchonEngine` (one CPU process) whose model holds the checkpoint's weights and LoRA adapter."""
    from archon_ckpt import Checkpointer, ModelState, read_metadata

    from archon.engine.checkpoint import AdapterState
    from archon.engine.engine import ArchonEngine
    from archon.lora_integration import is_lora_param

    if not actor.lora.enabled:
        raise ValueError("actor.lora.enabled is false in the run config: this command needs the LoRA settings the "
                         "checkpoint was trained with (a full fine-tune exports with `archon export-hf CKPT OUT --model`)")
    root, step = _step_dir(checkpoint)
    step_path = str(Checkpointer(root).step_path(step))
    keys = [k for k in read_metadata(step_path).state_dict_metadata if k.startswith("model.")]
    if not any(is_lora_param(k) for k in keys):
        raise ValueError(f"{step_path!r} holds no LoRA factors: it is not a LoRA training checkpoint")
    # built like the run was (an `adapter_path` sets the adapter's scaling); the checkpoint then supplies the tensors
    engine = ArchonEngine(actor, allocation_mode="archon:d1", device="cpu").initialize()
    adapter_only = all(is_lora_param(k) or k.removeprefix("model.") in _saved_module_params(engine.model)
                       for k in keys)
    state = AdapterState(engine.model) if adapter_only else ModelState(engine.model)
    Checkpointer(root).load({"model": state}, step, strict=False)
    return engine


def _saved_module_params(model) -> set[str]:
    from archon_lora.merge import clean_name

    return {clean_name(n) for n, p in model.named_parameters() if p.requires_grad}


def export_adapter(checkpoint: str, out_dir: str, run_config: str, overrides: list[str], *,
                   overwrite: bool = False) -> None:
    """`archon export-adapter`: the checkpoint's LoRA adapter as a PEFT adapter directory."""
    from archon.export_guard import check_export_target

    check_export_target(checkpoint, out_dir, overwrite=overwrite, command="export-adapter")
    engine = load_lora_checkpoint(checkpoint, actor_from_run_config(run_config, overrides))
    engine.save_adapter(out_dir)


def export_merged(checkpoint: str, out_dir: str, run_config: str, overrides: list[str], dtype: str, *,
                  overwrite: bool = False) -> None:
    """`archon export-hf --merge-lora`: base weights with the checkpoint's adapter folded in, as an HF directory."""
    from archon.export_guard import check_export_target

    check_export_target(checkpoint, out_dir, overwrite=overwrite)  # never over a checkpoint or data we did not write
    if dtype not in _DTYPES:
        raise ValueError(f"export dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    engine = load_lora_checkpoint(checkpoint, actor_from_run_config(run_config, overrides))
    engine.export_weights(out_dir, dtype=_DTYPES[dtype], merged=True)
