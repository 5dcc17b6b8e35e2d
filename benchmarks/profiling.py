"""Shared by the benchmarks: profile one extra step and write its kernel and CPU tables, plus how long the GPU
sat idle between kernels."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch


def profile_step(step: Callable[[], object], tag: str, out_dir: str | None) -> None:
    """Run `step` once under the profiler; write DIR/profile_TAG.txt with wall vs GPU-busy time (a host-bound
    step shows busy well below wall), the GPU idle gaps, the kernels by device time and the ops by CPU time."""
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
        try:
            f.write(idle_report(prof))
        except Exception as ex:  # the report is a diagnosis aid: never lose the tables over it
            f.write(f"(idle report failed: {ex!r})\n")
        f.write(avg.table(sort_by="self_device_time_total", row_limit=45, max_name_column_width=70))
        f.write(avg.table(sort_by="cpu_time_total", row_limit=35, max_name_column_width=70))


def idle_report(prof, min_gap_us: float = 20.0) -> str:
    """GPU idle time between the first and the last kernel, in gaps longer than `min_gap_us` (launch-bound or
    host-synchronised stretches), and the longest gaps."""
    from torch.autograd import DeviceType

    kernels = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                     if e.device_type == DeviceType.CUDA)
    if not kernels:
        return "(no kernels)\n"
    gaps, end = [], kernels[0][1]
    for s, e in kernels[1:]:
        if s - end > min_gap_us:
            gaps.append(s - end)
        end = max(end, e)
    span = end - kernels[0][0]
    longest = ", ".join(f"{g / 1e3:.2f}" for g in sorted(gaps, reverse=True)[:8])
    return (f"GPU span {span / 1e3:.1f} ms (first to last kernel), idle {sum(gaps) / 1e3:.1f} ms in {len(gaps)} gaps "
            f"> {min_gap_us:.0f} us; longest (ms): {longest}\n")
