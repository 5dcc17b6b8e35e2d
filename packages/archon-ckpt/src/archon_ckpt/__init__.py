"""archon-ckpt: crash-safe training checkpoints (DCP, resharding) and Hugging Face safetensors I/O.

Training state::

    ckpt = Checkpointer("runs/x/ckpt", keep_last_n=3)
    state = {"model": ModelState(model), "optim": OptimizerState(model, opt),
             "sched": SchedulerState(sched), "rng": RNGState(), "train": {"step": 0}}
    step = ckpt.load(state) if ckpt.latest_step() is not None else 0   # resume=auto
    ckpt.save(step, state)

HF weights::

    load_into_module(model, SafetensorsReader(hf_dir), native_to_hf=adapter)
    save_safetensors_sharded(named_tensors, out_dir, max_shard_size="5GB", dtype=torch.bfloat16)
    save_safetensors_multi_writer(stage_tensors, out_dir, writers=pp_group)  # each pipeline stage its shards
"""

from archon_ckpt.atomic import atomic_directory, atomic_write_text, user_file_mode
from archon_ckpt.checkpointer import (
    Checkpointer,
    CheckpointError,
    iter_dcp_tensors,
    read_metadata,
    step_dir_name,
)
from archon_ckpt.hf_load import HFSource, LoadReport, clean_fqn, load_into_module
from archon_ckpt.multi_writer import save_safetensors_multi_writer
from archon_ckpt.safe_load import SafeFileSystemReader, UnsafeCheckpointError, safe_torch_load
from archon_ckpt.safetensors_io import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    SafetensorsReader,
    parse_size,
    save_safetensors_sharded,
)
from archon_ckpt.state import ModelState, OptimizerState, RNGState, SchedulerState
from archon_ckpt.writer_lock import WriterLock, WriterLockError

__all__ = [
    "atomic_directory",
    "atomic_write_text",
    "user_file_mode",
    "Checkpointer",
    "CheckpointError",
    "iter_dcp_tensors",
    "read_metadata",
    "SafeFileSystemReader",
    "UnsafeCheckpointError",
    "safe_torch_load",
    "step_dir_name",
    "HFSource",
    "LoadReport",
    "clean_fqn",
    "load_into_module",
    "SafetensorsReader",
    "save_safetensors_sharded",
    "save_safetensors_multi_writer",
    "parse_size",
    "SAFE_WEIGHTS_NAME",
    "SAFE_WEIGHTS_INDEX_NAME",
    "ModelState",
    "OptimizerState",
    "RNGState",
    "SchedulerState",
    "WriterLock",
    "WriterLockError",
]
