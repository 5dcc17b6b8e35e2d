"""Shared by the benchmarks: profile one extra step and write its kernel and CPU tables."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch


def profile_step(step: Callable[[], object], tag: str, out_dir: str | None) -> None:
    """Run `step` once under the profiler; write DIR/profile_TAG.txt with wall vs GPU-busy time (a host-bound
    step shows busy well below wall), the kernels by device time and the ops by CPU time."""
    if not out_dir:
        return
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    wall = time.perf_counter() - t
    avg = prof.key_averages()
    busy = sum(e.self_device_time_total for e in avg if e.device_type == DeviceType.CUDA) / 1e3
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"profile_{tag}.txt"), "w") as f:
        f.write(f"{tag}: wall {wall * 1e3:.1f} ms (profiled), GPU kernels busy {busy:.1f} ms\n")
        f.write(avg.table(sort_by="self_device_time_total", row_limit=45, max_name_column_width=70))
        f.write(avg.table(sort_by="cpu_time_total", row_limit=35, max_name_column_width=70))
