"""Move an engine's parameters, gradients and optimizer state to host memory and back.

Used for colocation: an inference engine on the same GPUs gets the memory between training steps. The
round trip copies tensors bit for bit and each tensor returns to the device it came from, so training
after it is identical to training without it.
"""

from __future__ import annotations

import torch


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _engine_tensors(engine):
    for t in list(engine.model.parameters()) + list(engine.model.buffers()):
        yield _local(t)
        if t.grad is not None:
            yield _local(t.grad)
    for state in engine.layout.local_optimizer(engine.optimizer).state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                yield _local(v)


def offload_engine(engine) -> None:
    if engine._offloaded:
        return
    moved = []
    seen = set()
    for t in _engine_tensors(engine):
        if id(t) in seen or t.device.type == "cpu":
            continue
        seen.add(id(t))
        moved.append((t, t.device))
        t.data = t.data.to("cpu")
    engine._offload_record = moved
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
        torch.cuda.empty_cache()
    engine._offloaded = True


def onload_engine(engine) -> None:
    if not engine._offloaded:
        return
    for t, device in getattr(engine, "_offload_record", []):
        t.data = t.data.to(device)
    engine._offload_record = []
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    engine._offloaded = False
