"""Per-step metrics to the console (a progress bar) and to a JSONL file."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import torch


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    except Exception:  # pragma: no cover
        return 0.0


def _json_number(v: Any) -> Any:
    """Strict JSON: a non-finite float is written as null (JSON has no NaN / Infinity)."""
    if isinstance(v, float):
        return round(v, 6) if math.isfinite(v) else None
    return v


class MetricsLogger:
    """Writes one JSON object per step to `run_dir/metrics.jsonl` (rank 0 only) and updates a tqdm bar."""

    def __init__(self, run_dir: str, total_steps: int, *, enabled: bool = True, progress_bar: bool = True,
                 start_step: int = 0, bar_keys: tuple[str, ...] = ("loss", "reward", "grad_norm", "lr", "tokens_per_s"),
                 sinks: list | None = None) -> None:
        self.enabled = enabled
        self.bar_keys = bar_keys
        self.sinks = list(sinks or [])  # archon.logging_sinks (TensorBoard, W&B), built on the logging rank
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.bar = None
        if enabled:
            os.makedirs(run_dir, exist_ok=True)
            if progress_bar:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total_steps, initial=start_step, desc="archon", dynamic_ncols=True)
        self._t0 = time.perf_counter()

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _json_number(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")
        for sink in self.sinks:
            sink.log(step, row)
        if self.bar is not None:
            self.bar.set_postfix({k: f"{row[k]:.4g}" for k in self.bar_keys if row.get(k) is not None})
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        for sink in self.sinks:
            sink.close()
