"""Pipeline parallelism: split a model into stages by layer count, place stages on pp ranks, and build a
`torch.distributed.pipelining` schedule by name.

A model is cut into ``pp * stages_per_rank`` stages. The embedding and the head count as layers, so the
first and last stages get fewer transformer blocks (``first_less`` / ``last_less``, 1 each by default).
Stage placement is "loop" (stage s on rank s % pp) for 1F1B / GPipe / Interleaved schedules and "v"
(rank r holds stages r and 2*pp-1-r) for ZBVZeroBubble, where adjacent stages share a rank at the turn.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from .plan import ParallelPlan

__all__ = ["StageLayout", "available_schedules", "build_schedule", "prune_to_stage", "split_layers",
           "stage_ids_for_rank", "stage_layout", "validate_microbatches"]

# name -> (torch class name, multi-stage schedule, stage placement)
_SCHEDULES: dict[str, tuple[str, bool, str]] = {
    "GPipe": ("ScheduleGPipe", False, "loop"),
    "1F1B": ("Schedule1F1B", False, "loop"),
    "Interleaved1F1B": ("ScheduleInterleaved1F1B", True, "loop"),
    "InterleavedZeroBubble": ("ScheduleInterleavedZeroBubble", True, "loop"),
    "ZBVZeroBubble": ("ScheduleZBVZeroBubble", True, "v"),
}


def available_schedules() -> list[str]:
    """Schedule names the installed torch provides (zero-bubble schedules need a recent torch)."""
    import torch.distributed.pipelining as pipelining

    return [name for name, (cls, _, _) in _SCHEDULES.items() if hasattr(pipelining, cls)]


def split_layers(num_layers: int, num_stages: int, *, first_less: int = 1, last_less: int = 1) -> list[range]:
    """Consecutive block ranges per stage, as even as possible once the first stage is charged `first_less`
    extra layers (the embedding) and the last `last_less` (norm + head).

    >>> split_layers(28, 4)
    [range(0, 7), range(7, 14), range(14, 21), range(21, 28)]
    >>> split_layers(6, 4)
    [range(0, 1), range(1, 3), range(3, 5), range(5, 6)]
    """
    if num_stages < 1:
        raise ValueError(f"number of pipeline stages must be >= 1, got {num_stages}")
    if first_less < 0 or last_less < 0:
        raise ValueError(f"pp_first_stage_less_layers / pp_last_stage_less_layers must be >= 0, got "
                         f"{first_less} / {last_less}")
    if num_stages == 1:
        return [range(0, num_layers)]
    total = num_layers + first_less + last_less
    # ideal boundaries in the extended layer space, then shifted back by the embedding's virtual layers
    bounds = [min(max(round(total * s / num_stages) - first_less, 0), num_layers) for s in range(num_stages + 1)]
    bounds[0], bounds[-1] = 0, num_layers
    ranges = [range(bounds[s], bounds[s + 1]) for s in range(num_stages)]
    empty = [s for s, r in enumerate(ranges) if len(r) == 0 and 0 < s < num_stages - 1]
    if num_layers < num_stages - 2 or empty:
        raise ValueError(f"{num_layers} layers cannot fill {num_stages} pipeline stages (first/last stage "
                         f"count {first_less}/{last_less} extra layers); use fewer stages (p or "
                         f"pp_stages_per_rank) or lower pp_first_stage_less_layers / pp_last_stage_less_layers")
    return ranges


def stage_ids_for_rank(pp_rank: int, pp_size: int, stages_per_rank: int, style: str = "loop") -> list[int]:
    """Stage indices held by `pp_rank`: loop style (s % pp == rank) or V style (rank, 2*pp-1-rank)."""
    if style == "loop":
        return [pp_rank + k * pp_size for k in range(stages_per_rank)]
    if style == "v":
        if stages_per_rank != 2:
            raise ValueError(f"V-shaped schedules (ZBVZeroBubble) need pp_stages_per_rank=2, got {stages_per_rank}")
        return [pp_rank, 2 * pp_size - 1 - pp_rank]
    raise ValueError(f"stage placement style must be 'loop' or 'v', got {style!r}")


@dataclass(frozen=True)
class StageLayout:
    """Where this rank's stages sit: indices, their layer ranges, and which rank owns each stage."""

    schedule: str
    num_stages: int
    stage_ids: tuple[int, ...]
    layers: tuple[range, ...]  # per local stage
    owner: tuple[int, ...]  # pp rank owning each stage (all stages)

    def is_first(self, stage_id: int) -> bool:
        return stage_id == 0

    def is_last(self, stage_id: int) -> bool:
        return stage_id == self.num_stages - 1


def stage_layout(schedule: str, num_layers: int, pp_rank: int, pp_size: int, stages_per_rank: int = 1, *,
                 first_less: int = 1, last_less: int = 1) -> StageLayout:
    """The stages `pp_rank` holds under `schedule`, with their layer ranges."""
    if schedule not in _SCHEDULES:
        raise ValueError(f"pipeline schedule {schedule!r} is not one of {list(_SCHEDULES)}")
    cls, multi, style = _SCHEDULES[schedule]
    if not multi and stages_per_rank != 1:
        raise ValueError(f"schedule {schedule} runs one stage per rank; set pp_stages_per_rank=1 or use "
                         "Interleaved1F1B / InterleavedZeroBubble / ZBVZeroBubble")
    if multi and style == "loop" and stages_per_rank < 1:
        raise ValueError(f"pp_stages_per_rank must be >= 1, got {stages_per_rank}")
    num_stages = pp_size * stages_per_rank
    ranges = split_layers(num_layers, num_stages, first_less=first_less, last_less=last_less)
    ids = stage_ids_for_rank(pp_rank, pp_size, stages_per_rank, style)
    owner = [0] * num_stages
    for r in range(pp_size):
        for s in stage_ids_for_rank(r, pp_size, stages_per_rank, style):
            owner[s] = r
    return StageLayout(schedule, num_stages, tuple(ids), tuple(ranges[s] for s in ids), tuple(owner))


def validate_microbatches(schedule: str, n_microbatches: int, pp_size: int, stages_per_rank: int = 1) -> None:
    """Reject micro-batch counts the schedule cannot run, saying what to change."""
    if n_microbatches < pp_size:
        raise ValueError(f"pipeline schedule {schedule} needs at least pp={pp_size} micro-batches per step, got "
                         f"{n_microbatches}; raise actor.archon.pp_microbatches (or lower p)")
    if _SCHEDULES[schedule][1] and n_microbatches % pp_size != 0:
        raise ValueError(f"pipeline schedule {schedule} needs a micro-batch count that is a multiple of pp={pp_size}, "
                         f"got {n_microbatches}; set actor.archon.pp_microbatches to a multiple of {pp_size}")


def prune_to_stage(model: nn.Module, plan: ParallelPlan, layers: Sequence[int], *, first: bool, last: bool) -> nn.Module:
    """Keep only blocks `layers` (their keys stay the global layer indices) and, on the first / last stage,
    the embedding / final norm + head; the others are set to None. In place; returns `model`."""
    container = model.get_submodule(plan.blocks)
    if not isinstance(container, nn.ModuleDict):
        raise TypeError(f"pipeline stages need plan.blocks={plan.blocks!r} to be an nn.ModuleDict keyed by layer "
                        f"index (stable checkpoint names), got {type(container).__name__}")
    keep = {str(i) for i in layers}
    for key in [k for k in container if k not in keep]:
        del container[key]
    drop = ([] if first else [plan.embedding]) + ([] if last else [plan.norm, plan.head])
    for name in drop:
        if name is not None and plan.optional_module(model, name) is not None:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, None)
    return model


def build_schedule(schedule: str, stages: list, n_microbatches: int, loss_fn: Callable | None) -> object:
    """The torch schedule object for `schedule` over this rank's `PipelineStage`s.

    Gradients are never scaled by the schedule (`scale_grads=False` where torch has it): callers normalise
    the loss themselves (global token count), so a micro-batch count change cannot change the step.
    """
    import torch.distributed.pipelining as pipelining

    if schedule not in _SCHEDULES:
        raise ValueError(f"pipeline schedule {schedule!r} is not one of {list(_SCHEDULES)}")
    cls_name, multi, _ = _SCHEDULES[schedule]
    cls = getattr(pipelining, cls_name, None)
    if cls is None:
        raise ValueError(f"pipeline schedule {schedule} needs torch.distributed.pipelining.{cls_name}, which "
                         f"this torch does not have; available: {available_schedules()}")
    kwargs = {}
    if "scale_grads" in inspect.signature(cls.__init__).parameters:
        kwargs["scale_grads"] = False
    if multi:
        return cls(stages, n_microbatches=n_microbatches, loss_fn=loss_fn, **kwargs)
    if len(stages) != 1:
        raise ValueError(f"schedule {schedule} runs exactly one stage per rank, got {len(stages)}")
    return cls(stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn, **kwargs)
