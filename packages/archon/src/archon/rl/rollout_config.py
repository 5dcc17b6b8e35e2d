"""The `rollout` section of `archon rl`: where rollouts come from when `allocation_mode` has an inference part.

``allocation_mode: sglang:d2+archon:d2`` means 2 rollout servers speaking SGLang's HTTP API and a trainer of
layout ``archon:d2``. ``rollout.launch`` says what to start for them; `RolloutPlan` is the resolved,
validated result (`resolve_rollout`), built before any engine or process group exists.
"""

from __future__ import annotations

from dataclasses import dataclass

from archon_parallel.allocation import parse_allocation

from archon.config.fields import doc

__all__ = ["RolloutSection", "RolloutPlan", "resolve_rollout", "LAUNCHES", "WEIGHT_SYNCS"]

LAUNCHES = ("archon", "sglang", "none")
WEIGHT_SYNCS = ("disk", "broadcast")
_DTYPES = ("auto", "bfloat16", "float32")


@dataclass
class RolloutSection:
    launch: str = doc("archon", "what serves the `sglang:dN` part: archon (N `archon serve` processes) | sglang "
                      "(N `python -m sglang.launch_server`, when installed) | none (connect to rollout.addresses)")
    addresses: list[str] = doc(factory=list, help="launch=none: the N servers as host:port (or http://host:port)")
    weight_sync: str = doc("disk", "how new weights reach the servers after a step: disk (an HF directory per "
                           "version under rollout.weight_dir; works with every server) | broadcast (a "
                           "torch.distributed group of trainer rank 0 and the servers)")
    weight_dir: str = doc("", "disk sync / launch: directory of the exported versions (empty = <log.dir>/rollout)")
    weight_bucket_mb: int = doc(256, "weight sync: gather and send full tensors in buckets of at most this size")
    dtype: str = doc("auto", "weights sent to (and served by) the servers: auto (= actor.dtype) | bfloat16 | float32")
    host: str = doc("127.0.0.1", "launch=archon|sglang: address the started servers listen on")
    server_device: str = doc("auto", "launch=archon: device of `archon serve` (auto = cuda when the trainer "
                             "runs on cuda, else cpu)")
    max_batch: int = doc(64, "launch=archon: most requests one `archon serve` batches into one generate call")
    startup_timeout_s: float = doc(600.0, "seconds a started server may take to answer /health_generate")
    request_timeout_s: float = doc(600.0, "seconds one generate or weight-update request may take")
    allow_server_loss: bool = doc(False, "a server that dies mid-run: false = stop the run naming it; true = "
                                  "log it and continue on the others (the run fails when none is left)")


@dataclass(frozen=True)
class RolloutPlan:
    """The resolved inference part: ``num_servers`` servers of ``gpus_per_server`` GPUs each."""

    backend: str
    num_servers: int
    tp: int
    pp: int
    ep: int
    launch: str
    addresses: tuple[str, ...]

    @property
    def gpus_per_server(self) -> int:
        return self.tp * self.pp


def resolve_rollout(allocation_mode: str, rollout: RolloutSection, *, max_staleness: int = 0) -> RolloutPlan | None:
    """The inference part of ``allocation_mode`` checked against ``rollout``; None for the colocated sampler.

    Raises ValueError naming the rule (rollout-*) and what to change."""
    infer = parse_allocation(allocation_mode).inference
    if rollout.launch not in LAUNCHES:
        raise ValueError(f"rollout.launch {rollout.launch!r} is not one of {LAUNCHES}")
    if rollout.weight_sync not in WEIGHT_SYNCS:
        raise ValueError(f"rollout.weight_sync {rollout.weight_sync!r} is not one of {WEIGHT_SYNCS}")
    if rollout.dtype not in _DTYPES:
        raise ValueError(f"rollout.dtype {rollout.dtype!r} is not one of {_DTYPES}")
    if rollout.server_device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"rollout.server_device {rollout.server_device!r} is not one of auto, cpu, cuda")
    for key in ("weight_bucket_mb", "max_batch", "startup_timeout_s", "request_timeout_s"):
        if not getattr(rollout, key) > 0:
            raise ValueError(f"rollout.{key} must be > 0, got {getattr(rollout, key)}")
    if max_staleness < 0:
        raise ValueError(f"rl.max_staleness must be >= 0 (0 = synchronous), got {max_staleness}")
    if infer is None:
        if max_staleness > 0:
            raise ValueError(f"rule staleness-needs-servers: rl.max_staleness={max_staleness} overlaps generation "
                             "with training on rollout servers; add an inference part to allocation_mode (e.g. "
                             f"sglang:d1+{allocation_mode}) or set rl.max_staleness=0")
        if rollout.addresses:
            raise ValueError("rule rollout-addresses-need-servers: rollout.addresses is set but allocation_mode "
                             f"{allocation_mode!r} has no inference part; add e.g. sglang:d{len(rollout.addresses)}+ "
                             "in front of it, or drop rollout.addresses")
        return None
    if infer.backend == "vllm":
        raise ValueError(f"rule rollout-vllm-unsupported: allocation_mode {allocation_mode!r} has a vllm: part; "
                         "Archon's rollout client speaks SGLang's HTTP API only: use sglang:dN (with "
                         "rollout.launch=archon, sglang or none)")
    dims = infer.dims
    n, tp, pp, ep = dims.get("d", 1), dims.get("t", 1), dims.get("p", 1), dims.get("e", 1)
    if rollout.launch == "archon" and (tp > 1 or pp > 1 or ep > 1):
        bad = ", ".join(f"{k}{v}" for k, v in (("t", tp), ("p", pp), ("e", ep)) if v > 1)
        raise ValueError(f"rule rollout-archon-no-model-parallel: rollout.launch=archon starts `archon serve`, "
                         f"which has no tensor / pipeline / expert parallelism, but the inference part has {bad}; "
                         f"use sglang:d{n} (one GPU per server) or rollout.launch=sglang")
    if rollout.allow_server_loss and rollout.weight_sync == "broadcast":
        raise ValueError("rule server-loss-needs-disk-sync: rollout.allow_server_loss goes on without a lost server, "
                         "but a torch.distributed broadcast group cannot lose a member; use "
                         "rollout.weight_sync=disk or allow_server_loss=false")
    if rollout.launch == "none":
        if len(rollout.addresses) != n:
            raise ValueError(f"rule rollout-addresses-count: rollout.launch=none connects to rollout.addresses, "
                             f"which lists {len(rollout.addresses)} server(s) but the inference part says "
                             f"sglang:d{n}; give exactly {n} host:port entries")
    elif rollout.addresses:
        raise ValueError(f"rule rollout-addresses-with-launch: rollout.addresses is only read with "
                         f"rollout.launch=none, but launch={rollout.launch} starts its own servers; drop "
                         "rollout.addresses or set rollout.launch=none")
    return RolloutPlan(backend=infer.backend, num_servers=n, tp=tp, pp=pp, ep=ep, launch=rollout.launch,
                       addresses=tuple(rollout.addresses))
