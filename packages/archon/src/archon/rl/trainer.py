"""`archon rl`: the GRPO / PPO loop with the embedded sampler.

One step: sample ``batch_size / group_size`` prompts -> ``group_size`` responses each with the embedded
sampler (the trainer's own weights) -> rewards -> old logprobs / reference logprobs / values ->
advantages -> PPO update over ``n_minibatches`` (actor, and critic for GAE) -> optional weight export
and in-memory weight callbacks. Every source of randomness is a function of (seed, step), so a run is
reproducible and resumable.

Under ``torchrun`` with ``archon:dN`` and ``dp_layout: zero1`` every rank holds a full replica, samples its
share of the step's prompt groups, and the update sums gradients over ranks. Each response samples from its own
seed (seed, step, global index), so with ``n_minibatches: 1`` the run equals one process's.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections.abc import Callable, Sequence

import torch
from archon_rl import RolloutBatch

from archon.engine.engine import ArchonEngine
from archon.engine.metrics import MetricsLogger, peak_memory_gb
from archon.rl.actor import PPOActor
from archon.rl.config import RLConfig
from archon.rl.convert import to_packed
from archon.rl.critic import PPOCritic, load_backbone_from_lm
from archon.rl.rewards import load_reward_fn, prompt_stream
from archon.rl.rollout import RolloutSampler
from archon.rl.sampler import EmbeddedSampler

SAMPLERS = {"embedded": EmbeddedSampler, "rollout": RolloutSampler}
"""`sampling.engine` -> the sampler class: ``cls(model, SamplingConfig, seed=, device=, autocast=, **options)``."""

log = logging.getLogger("archon")

__all__ = ["RLTrainer", "run_rl", "WeightCallback"]

WeightCallback = Callable[[dict[str, torch.Tensor], int], None]
"""Called after every RL step with (full state dict, weight version), e.g. to push weights to a sampler."""


class RLTrainer:
    """Builds the engines and runs RL steps; ``run()`` is the whole `archon rl` command."""

    def __init__(self, cfg: RLConfig, *, weight_callbacks: Sequence[WeightCallback] = ()) -> None:
        cfg.validate()
        self.cfg = cfg
        r = cfg.rl
        self.reward_fn = load_reward_fn(cfg.reward.fn)
        total_opt_steps = cfg.total_train_steps * r.n_minibatches + r.sft_warmup_steps
        self.engine = ArchonEngine(cfg.actor, allocation_mode=cfg.allocation_mode, total_steps=total_opt_steps,
                                   device=cfg.device).initialize()
        self.dp_rank, self.dp_world = self.engine.dp_rank_world()
        if self.engine.world_size > 1:
            _check_replicas(cfg, self.engine)
        self.actor = PPOActor(self.engine, r.loss(), r.advantage(), n_minibatches=r.n_minibatches,
                              recompute_logprobs=r.recompute_logprobs, seed=cfg.sampling.seed)
        self.critic = None
        if r.estimator == "gae":
            self.critic = PPOCritic(self._critic_engine(), r.value_loss(), n_minibatches=r.n_minibatches,
                                    seed=cfg.sampling.seed)
        self.ref = None
        if r.kl_coef > 0:
            self.ref = ArchonEngine(cfg.actor, allocation_mode=cfg.allocation_mode, device=cfg.device).initialize()
        sampler_cls = SAMPLERS[cfg.sampling.engine]
        self.sampler = sampler_cls(self.engine.model, cfg.sampling.build(), seed=cfg.sampling.seed,
                                   device=self.engine.device, autocast=self.engine._autocast,
                                   **cfg.sampling.engine_options())
        self.weight_callbacks = list(weight_callbacks)
        self.num_prompts = r.batch_size // r.group_size
        if self.num_prompts % self.dp_world:
            raise ValueError(f"rl.batch_size / rl.group_size = {self.num_prompts} prompts per step must be divisible "
                             f"by the {self.dp_world} data-parallel ranks (each rank samples whole groups)")

    def _critic_engine(self) -> ArchonEngine:
        """critic.path set: a value-head checkpoint (or config.json). Empty: the actor's backbone + a new head."""
        cfg = self.cfg
        ccfg = copy.deepcopy(cfg.critic)
        from_actor = not ccfg.path
        if from_actor:
            ccfg.path, ccfg.init_from_scratch = cfg.actor.path, True
        engine = ArchonEngine(ccfg, allocation_mode=cfg.allocation_mode,
                              total_steps=cfg.total_train_steps * cfg.rl.n_minibatches, device=cfg.device,
                              head="value").initialize()
        if from_actor and _has_weights(cfg.actor.path) and not cfg.actor.init_from_scratch:
            load_backbone_from_lm(engine.model, cfg.actor.path)
        return engine

    # ---------------------------------------------------------------------------------------------
    def sft_warmup(self) -> list[dict]:
        """A few supervised steps on the synthetic task answers so the policy emits the answer format."""
        from archon.data import synthetic_batches
        from archon.train import sft_loss, target_tokens

        d, n = self.cfg.data, self.cfg.rl.sft_warmup_steps
        data = synthetic_batches(d.task, self.cfg.rl.batch_size, d.num_digits, d.seed + 7919, rank=self.dp_rank,
                                 world=self.dp_world)
        rows = [self.engine.train_batch(next(data), sft_loss, target_tokens) for _ in range(n)]
        if self.ref is not None:  # the reference policy is the warmed-up one
            self.ref.model.load_state_dict(self.engine.model.state_dict())
        return rows

    def rollout(self, prompts: list[tuple[list[int], dict]], step: int) -> tuple[RolloutBatch, dict[str, float]]:
        """Generate ``group_size`` responses per prompt, score them, and pack a RolloutBatch.

        ``prompts`` is the step's global list (the same on every rank); this rank samples its contiguous share
        of whole groups. Every response samples from its own seed (seed, step, global index), so the rollouts,
        and with one minibatch the whole run, equal one process's whatever the number of ranks. Stats are over
        the global batch."""
        g = self.cfg.rl.group_size
        per_rank = len(prompts) // self.dp_world
        first = self.dp_rank * per_rank
        mine = prompts[first:first + per_rank]
        prompt_ids = [p for p, _ in mine for _ in range(g)]
        fields = [f for _, f in mine for _ in range(g)]
        t0 = time.perf_counter()
        gen = self.sampler.generate(prompt_ids, step, indices=range(first * g, (first + per_rank) * g))
        gen_time = time.perf_counter() - t0
        responses, logps = gen.responses(), gen.response_logprobs()
        rewards = [float(self.reward_fn(p, r, **f)) for p, r, f in zip(prompt_ids, responses, fields)]
        samples = [{"input_ids": p + r, "prompt_len": len(p), "logprobs": [0.0] * len(p) + lp, "reward": rw,
                    "group_id": step * self.num_prompts + first + i // g, "version": self.engine.version}
                   for i, (p, r, lp, rw) in enumerate(zip(prompt_ids, responses, logps, rewards))]
        batch = RolloutBatch.from_sequences(samples)
        lens = gen.lengths_B.float()
        n, r_sum, len_sum, stops, r_max, r_min, gen_time = self._global_stats(
            [len(rewards), sum(rewards), float(lens.sum()), float(gen.stopped_B.float().sum())],
            [max(rewards), -min(rewards), gen_time])
        stats = {"reward": r_sum / n, "reward_max": r_max, "reward_min": -r_min, "response_len": len_sum / n,
                 "stop_frac": stops / n, "gen_time": gen_time, "gen_tokens_per_s": len_sum / max(gen_time, 1e-9)}
        return batch, stats

    def _global_stats(self, sums: list[float], maxes: list[float]) -> list[float]:
        """``sums`` summed and ``maxes`` maxed over the data-parallel ranks (as they are on one rank)."""
        if self.dp_world == 1:
            return [float(v) for v in sums + maxes]
        import torch.distributed as dist

        group, device = self.engine.dp_group, self.engine.device
        s = torch.tensor(sums, dtype=torch.float64, device=device)
        m = torch.tensor(maxes, dtype=torch.float64, device=device)
        dist.all_reduce(s, group=group)
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        return s.tolist() + m.tolist()

    def step(self, step: int, prompts: list[tuple[list[int], dict]]) -> dict[str, float]:
        t0 = time.perf_counter()
        batch, stats = self.rollout(prompts, step)
        ref_lp = self.ref.forward_batch(to_packed(batch))["logprobs"] if self.ref is not None else None
        values = self.critic.compute_values(batch) if self.critic is not None else None
        batch = self.actor.prepare(batch, ref_logprobs=ref_lp, values=values)
        t1 = time.perf_counter()
        stats.update(self.actor.ppo_update(batch, step))
        if self.critic is not None:
            stats.update(self.critic.ppo_update(batch, step))
        dt = time.perf_counter() - t0
        (tokens,) = self._global_stats([float(batch.num_tokens)], [])
        stats.update(train_time=time.perf_counter() - t1, step_time=dt, version=self.engine.version,
                     tokens_per_s=tokens / max(dt, 1e-9), peak_mem_gb=peak_memory_gb(self.engine.device))
        stats["kl"] = stats.get("kl", stats.get("approx_kl", 0.0))
        self._after_update(step)
        return stats

    def _after_update(self, step: int) -> None:
        if self.weight_callbacks:
            sd = self.engine.state_dict_for_sampler()
            for cb in self.weight_callbacks:
                cb(sd, self.engine.version)
        r = self.cfg.rl
        last = step + 1 == self.cfg.total_train_steps
        if r.export_dir and (last or (r.export_every_n_steps and (step + 1) % r.export_every_n_steps == 0)):
            self.export()

    def export(self) -> str:
        """Write ``export_dir/v<version>`` (HF safetensors + READY) and point ``export_dir/latest.json`` at it."""
        from archon_ckpt import atomic_write_text

        r = self.cfg.rl
        out = os.path.join(r.export_dir, f"v{self.engine.version:06d}")
        dtype = torch.bfloat16 if r.export_dtype == "bfloat16" else torch.float32
        self.engine.export_weights(out, dtype=dtype)
        atomic_write_text(os.path.join(r.export_dir, "latest.json"),
                          json.dumps({"version": self.engine.version, "path": os.path.abspath(out)}))
        return out

    def run(self) -> list[dict]:
        cfg = self.cfg
        ckpt, start = None, 0
        if cfg.checkpoint.dir:
            from archon.engine.checkpoint import EngineCheckpointer

            ckpt = EngineCheckpointer(self.engine, cfg.checkpoint)
            start = ckpt.maybe_resume()
        metrics = MetricsLogger(cfg.log.dir, cfg.total_train_steps, enabled=self.engine.rank == 0,
                                progress_bar=cfg.log.progress_bar, start_step=start)
        if start == 0 and cfg.rl.sft_warmup_steps:
            warm = self.sft_warmup()
            log.info("sft warmup: %d steps, loss %.3f -> %.3f", len(warm), warm[0]["loss"], warm[-1]["loss"])
        d = cfg.data
        prompts = prompt_stream(d.task, self.num_prompts, num_digits=d.num_digits, seed=d.seed, path=d.path,
                                start_step=start)
        history = []
        for step in range(start, cfg.total_train_steps):
            stats = self.step(step, next(prompts))
            metrics.log(step + 1, stats)
            history.append(stats)
            if ckpt is not None:
                ckpt.after_step(step + 1)
        if ckpt is not None:
            ckpt.finish(cfg.total_train_steps)
        metrics.close()
        log.info("done: %d RL steps, metrics in %s", cfg.total_train_steps, metrics.path)
        return history


def _check_replicas(cfg: RLConfig, engine: ArchonEngine) -> None:
    """Several ranks: each samples from its own full replica, so every engine must be `archon:dN` with
    dp_layout=zero1 (an FSDP2-sharded model would need every rank in every decode step)."""
    if engine.dims.dp_shard * engine.dims.dp_replicate != engine.world_size:
        raise ValueError(f"archon rl on {engine.world_size} ranks is data parallel only: use allocation_mode="
                         f"archon:d{engine.world_size} with actor.archon.dp_layout=zero1")
    engines = [("actor", cfg.actor)] + ([("critic", cfg.critic)] if cfg.rl.estimator == "gae" else [])
    for name, c in engines:
        if c.archon.dp_layout != "zero1":
            raise ValueError(f"archon rl on {engine.world_size} ranks samples on every rank from a full model "
                             f"replica: set {name}.archon.dp_layout=zero1 (FSDP2 shards the weights the sampler "
                             "needs)")


def _has_weights(path: str) -> bool:
    from archon.engine.build import _has_weights as has

    return has(path)


def run_rl(cfg: RLConfig, *, weight_callbacks: Sequence[WeightCallback] = ()) -> list[dict]:
    """Run `archon rl` for ``cfg``; returns the per-step metrics."""
    return RLTrainer(cfg, weight_callbacks=weight_callbacks).run()
