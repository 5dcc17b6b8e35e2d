"""Rollouts from servers (`allocation_mode: sglang:dN+archon:...`): the trainer may use any layout.

Trainer rank 0 owns the servers (started by `archon.rl.servers`, or `rollout.addresses`), the
`RolloutClient` and the asynchronous loop (`archon.rl.producer`). At each step it takes the step's batch,
checks the staleness bound, and hands the global samples to every trainer rank (one
`broadcast_object_list`); each data-parallel rank keeps its contiguous share of whole groups, as with the
embedded sampler. After the update every rank takes part in the weight sync (`archon.rl.weight_sync`) and
the loop learns the servers' new version.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from archon_rl import RolloutBatch

from archon.engine.weight_sync import BroadcastWeightSync, DiskWeightSync
from archon.rl.producer import RolloutProducer
from archon.rl.rollout_config import RolloutPlan
from archon.rl.rollouts import score_samples
from archon.rl.servers import Placement, ServerDiedError, ServerGroup, free_port, healthy, server_specs

if TYPE_CHECKING:
    from archon_rl.client import RolloutClient

log = logging.getLogger("archon")

__all__ = ["RemoteRollouts"]


class RemoteRollouts:
    """`RolloutSource` over rollout servers; see the module docstring."""

    def __init__(self, trainer, plan: RolloutPlan, placement: Placement) -> None:
        self.trainer = trainer
        self.plan = plan
        self.placement = placement
        cfg = trainer.cfg
        self.ro = cfg.rollout
        self.max_staleness = cfg.rl.max_staleness
        self.decoupled = self.max_staleness > 0
        self.rank0 = trainer.engine.rank == 0
        self._reward_errors: dict[int, int] = {}  # step -> failed reward calls (reward.on_error=zero)
        name = cfg.actor.dtype if self.ro.dtype == "auto" else self.ro.dtype
        self.dtype = {"bf16": "bfloat16", "fp32": "float32"}.get(name, name)
        self.weight_dir = self.ro.weight_dir or os.path.join(cfg.log.dir, "rollout")
        self.sync: DiskWeightSync | BroadcastWeightSync | None = None
        self.group: ServerGroup | None = None
        self.client: RolloutClient | None = None
        self._old_clients: list[RolloutClient | None] = []
        self.producer: RolloutProducer | None = None
        self.addresses: list[str] = []
        self.lost: set[int] = set()

    # -- start / stop ------------------------------------------------------------------------------
    def start(self, start_step: int) -> None:
        """Export the starting weights (collective), start or reach the servers and the loop (rank 0), and set
        up the weight sync (collective)."""
        engine, ro = self.trainer.engine, self.ro
        dtype = getattr(torch, self.dtype)
        disk = DiskWeightSync(None, self.weight_dir, dtype=dtype, bucket_mb=ro.weight_bucket_mb)
        path = os.path.abspath(disk.push(engine.model, start_step))  # READY carries the RL version
        if self.rank0:
            try:
                self._start_servers(path, start_step)
            except BaseException:
                self.close()
                raise
        if ro.weight_sync == "disk":
            disk.client = self.client
            self.sync = disk
        else:  # one GPU shared with the server: NCCL cannot pair two ranks on one device, gloo can
            nccl = engine.device.type == "cuda" and not self.placement.shared
            port = free_port(ro.host) if self.rank0 else 0
            self.sync = BroadcastWeightSync(self.client, master_address=ro.host, master_port=port, dtype=dtype,
                                            group_name=f"archon-rl-{os.getpid()}-{port}",  # servers may outlive a run
                                            bucket_mb=ro.weight_bucket_mb, backend="nccl" if nccl else "gloo",
                                            device=engine.device if nccl else "cpu", timeout=ro.request_timeout_s)
            self.sync.connect()
        if self.rank0:
            assert self.producer is not None  # made by _start_servers
            self.producer.start()

    def _start_servers(self, path: str, version: int) -> None:
        from archon_rl.client import RolloutClient, RolloutServerError

        t0 = time.perf_counter()
        if self.plan.launch != "none":
            specs = server_specs(self.plan, self.ro, self.placement, path, self.dtype)
            self.group = ServerGroup(specs, os.path.join(self.trainer.cfg.log.dir, "servers")).start()
            self.group.wait_healthy(self.ro.startup_timeout_s)
            self.addresses = self.group.addresses
        else:
            self.addresses = list(self.plan.addresses)
        client = self.client = RolloutClient(self.addresses, timeout=self.ro.request_timeout_s)
        if self.plan.launch == "none":
            try:
                client.wait_healthy(self.ro.startup_timeout_s)
            except RolloutServerError as e:
                raise ServerDiedError(f"rollout servers of rollout.addresses did not answer /health_generate within "
                                      f"rollout.startup_timeout_s={self.ro.startup_timeout_s:g}s ({e}); start them "
                                      "or fix rollout.addresses") from None
        if self.plan.launch != "archon":  # `archon serve` read the version from READY; others load v<start> now
            client.update_weights_from_disk(path, weight_version=version)
        log.info("rollout: %d server(s) ready in %.1fs (%s), weight sync by %s, max_staleness %d",
                 len(self.addresses), time.perf_counter() - t0, ", ".join(self.addresses), self.ro.weight_sync,
                 self.max_staleness)
        t = self.trainer
        s = t.cfg.sampling
        self.producer = RolloutProducer(lambda: self.client, t.prompts(version), self._score,
                                        sampling=t.sampling, seed=s.seed, group_size=t.cfg.rl.group_size,
                                        max_staleness=self.max_staleness, start_step=version,
                                        total_steps=t.cfg.total_train_steps)

    def close(self) -> None:
        if self.producer is not None:
            self.producer.stop()
        if self.sync is not None and hasattr(self.sync, "close"):
            self.sync.close()
        for c in [self.client, *self._old_clients]:
            if c is not None:
                try:
                    c.close()
                except Exception:  # noqa: BLE001 - best effort while stopping
                    pass
        self.client, self._old_clients = None, []
        if self.group is not None:
            self.group.stop()

    # -- one step ----------------------------------------------------------------------------------
    def _score(self, prompts: list, results: list, step: int) -> list[dict]:
        t = self.trainer
        g = t.cfg.rl.group_size
        ids = [p for p, _ in prompts for _ in range(g)]
        fields = [f for _, f in prompts for _ in range(g)]
        versions = [int(r.weight_version) if r.weight_version is not None else -1 for r in results]
        group_ids = [step * t.num_prompts + i // g for i in range(len(ids))]
        samples, errors = score_samples(t, ids, [r.output_ids for r in results], [r.logprobs for r in results],
                                        fields, group_ids, versions)
        self._reward_errors[step] = errors  # read by _take on the trainer thread
        return samples

    def rollout(self, step: int) -> tuple[RolloutBatch, dict[str, float]]:
        payload = [self._take(step) if self.rank0 else None]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(payload, src=0, device=torch.device("cpu"))
        got = payload[0]
        assert got is not None  # rank 0 took it; the broadcast filled the other ranks'
        samples, stats = got
        t = self.trainer
        g = t.cfg.rl.group_size
        per_rank = t.num_prompts // t.dp_world
        first = t.dp_rank * per_rank * g
        return RolloutBatch.from_sequences(samples[first:first + per_rank * g]), stats

    def _take(self, step: int) -> tuple[list[dict], dict[str, float]]:
        t0 = time.perf_counter()
        assert self.producer is not None and self.client is not None, "rank 0 after start()"
        self.check_servers()
        ready = self.producer.get(step, check=self.check_servers)
        wait = time.perf_counter() - t0
        samples = ready.samples
        lags = [step - s["version"] for s in samples]
        if min(s["version"] for s in samples) < 0:
            raise RuntimeError("a rollout server answered without meta_info.weight_version; Archon needs it to bound "
                               "staleness (SGLang >= 0.5 and `archon serve` report it)")
        if max(lags) > self.max_staleness:
            raise RuntimeError(f"step {step}: a sample of weight version {step - max(lags)} is older than "
                               f"rl.max_staleness={self.max_staleness} allows (a server that lags behind the "
                               "others' weights?)")
        rewards = [s["reward"] for s in samples]
        n = len(samples)
        stats = {"reward": sum(rewards) / n, "reward_max": max(rewards), "reward_min": min(rewards),
                 "reward/errors": float(self._reward_errors.pop(step, 0)),
                 "response_len": ready.num_tokens / n, "stop_frac": ready.stopped / n, "gen_time": ready.gen_time,
                 "gen_tokens_per_s": ready.num_tokens / max(ready.gen_time, 1e-9), "wait_time": wait,
                 "staleness_mean": sum(lags) / n, "staleness_max": float(max(lags)),
                 "server_queue": float(sum(self.client.outstanding)),
                 "batches_ahead": float(self.producer.outstanding_batches)}
        return samples, stats

    def after_update(self, step: int) -> dict[str, float]:
        """The servers get version ``step + 1`` (collective over trainer ranks)."""
        version = step + 1
        t0 = time.perf_counter()
        assert self.sync is not None, "after start()"
        if step + 1 < self.trainer.cfg.total_train_steps:  # the last step's weights serve no rollout
            if self.rank0:
                self.check_servers()
            self.sync.push(self.trainer.engine.model, version)
            if self.rank0:
                assert self.producer is not None
                self.producer.set_server_version(version)
        return {"sync_time": time.perf_counter() - t0, "server_version": float(version)}

    # -- server loss -------------------------------------------------------------------------------
    def check_servers(self) -> None:
        """Raise `ServerDiedError` naming a server whose process exited; with rollout.allow_server_loss, go on
        with the others (a new client over the live servers)."""
        if self.group is not None:
            new = [i for i in self.group.dead() if i not in self.lost]
            err = self.group.died_error(new) if new else None
        else:  # servers of launch=none: those that stopped answering (the client would retry on the others)
            new = [i for i, a in enumerate(self.addresses) if i not in self.lost and not healthy(a, "/health")]
            err = ServerDiedError("; ".join(f"rollout server {self.addresses[i]} stopped answering" for i in new),
                                  [self.addresses[i] for i in new]) if new else None
        if not new:
            return
        assert err is not None and self.sync is not None
        if not self.ro.allow_server_loss or len(self.lost) + len(new) >= len(self.addresses):
            hint = "" if self.ro.allow_server_loss else " (set rollout.allow_server_loss=true to go on without it)"
            raise ServerDiedError(f"{err}{hint}", err.names)
        from archon_rl.client import RolloutClient

        self.lost.update(new)
        log.warning("rollout: lost %s; continuing on %d server(s)", ", ".join(err.names),
                    len(self.addresses) - len(self.lost))
        live = [a for i, a in enumerate(self.addresses) if i not in self.lost]
        self._old_clients.append(self.client)  # its requests in flight finish on the live servers (retries)
        self.client = RolloutClient(live, timeout=self.ro.request_timeout_s)
        self.sync.client = self.client
