"""`archon rl`: the GRPO / PPO loop, on the embedded sampler or on rollout servers.

One step: ``batch_size / group_size`` prompts -> ``group_size`` responses each from the rollout source ->
rewards -> old logprobs / reference logprobs / values -> advantages -> PPO update over ``n_minibatches``
(actor, and critic for GAE) -> new weights to the rollout side, optional export and in-memory weight
callbacks. Every source of randomness is a function of (seed, step), so a run is reproducible and resumable.

The rollout source is chosen once from the allocation (`archon.rl.rollouts`): without an inference part the
embedded sampler samples on every rank (``archon:dN`` with the ZeRO-1 ``dp_layout``, full replicas; each response
samples from its own seed (seed, step, global index), so with ``n_minibatches: 1`` the run equals one
process's); with ``sglang:dN+archon:...`` rollout servers generate and the trainer may use any layout.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from archon.data.text import TextPrompts
from archon.engine.engine import ArchonEngine
from archon.engine.metrics import MetricsLogger, peak_memory_gb
from archon.engine.setup import resolve_device
from archon.logging_sinks import make_sinks
from archon.reward_pool import RewardPool
from archon.rl.actor import PPOActor
from archon.rl.config import RLConfig
from archon.rl.convert import to_packed
from archon.rl.critic import PPOCritic, load_backbone_from_lm
from archon.rl.rewards import prompt_stream
from archon.rl.rollout_config import resolve_rollout
from archon.rl.rollouts import ColocatedRollouts, RolloutSource
from archon.rl.setup import resolve_rl_setup
from archon.run_guard import RunGuard, check_prompt_lengths, init_process_group
from archon.step_metrics import moe_summary

log = logging.getLogger("archon")

BAR_KEYS = ("reward", "loss", "grad_norm", "gen_tokens_per_s", "gen_time", "wait_time", "train_time", "sync_time",
            "staleness_max", "server_queue", "step_time")
"""Shown on the progress bar (every metric goes to metrics.jsonl); absent keys (colocated runs) are skipped."""

__all__ = ["RLTrainer", "run_rl", "WeightCallback"]

WeightCallback = Callable[[dict[str, torch.Tensor], int], None]
"""Called after every RL step with (full state dict, weight version), e.g. to push weights to a sampler."""


class RLTrainer:
    """Builds the engines and runs RL steps; ``run()`` is the whole `archon rl` command."""

    def __init__(self, cfg: RLConfig, *, weight_callbacks: Sequence[WeightCallback] = ()) -> None:
        cfg.validate()
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.cfg = cfg
        r = cfg.rl
        self.plan = resolve_rollout(cfg.allocation_mode, cfg.rollout, max_staleness=r.max_staleness)
        device = cfg.device
        self.placement = None
        if self.plan is not None:
            from archon.rl.servers import plan_placement

            dev = resolve_device(cfg.device).type
            self.placement = plan_placement(self.plan, world, dev, torch.cuda.device_count() if dev == "cuda" else 0)
            device = self.placement.trainer_device(int(os.environ.get("LOCAL_RANK", "0")))
        self.device = device
        self.setup = resolve_rl_setup(cfg, device=device)  # every rule, RL ones included, before any process group
        w = cfg.reward
        self.rewards = RewardPool(w.fn, num_workers=w.num_workers, timeout_s=w.timeout_s, on_error=w.on_error)
        init_process_group(resolve_device(cfg.device), cfg.distributed.timeout_s)
        self.engine = ArchonEngine(self.setup.actor).initialize()
        self.dp_rank, self.dp_world = self.engine.dp_rank_world()
        self.actor = PPOActor(self.engine, r.loss(), r.advantage(), n_minibatches=r.n_minibatches,
                              recompute_logprobs=r.recompute_logprobs, seed=cfg.sampling.seed)
        self.critic = None
        if r.estimator == "gae":
            self.critic = PPOCritic(self._critic_engine(), r.value_loss(), n_minibatches=r.n_minibatches,
                                    seed=cfg.sampling.seed)
        self.ref = None
        if self.setup.ref is not None:  # kl_coef > 0
            self.ref = ArchonEngine(self.setup.ref).initialize()
        self.weight_callbacks = list(weight_callbacks)
        self.num_prompts = r.batch_size // r.group_size  # resolve_rl_setup checked it splits over dp_world
        self.text = None
        if cfg.data.source != "synthetic":
            self.text = TextPrompts(cfg.data, cfg.actor.path, self.engine.model.args.vocab_size, self.num_prompts)
        stop_pad = (self.text.stop_ids, self.text.pad_id) if self.text is not None else ()
        self.sampling = cfg.sampling.build(*stop_pad)  # stop / pad ids from the tokenizer for text data
        if self.plan is None or self.placement is None:
            self.source: RolloutSource = ColocatedRollouts(self)
        else:
            from archon.rl.remote import RemoteRollouts

            self.source = RemoteRollouts(self, self.plan, self.placement)

    def prompts(self, start_step: int):
        """The prompt stream from ``start_step`` on. Synthetic / jsonl: step s's prompts depend only on
        (data.seed, s); text data: the resumable stream whose position the checkpoint restored."""
        if self.text is not None:
            return iter(self.text.data)
        return self._id_prompts(start_step)

    def _id_prompts(self, start_step: int):
        d = self.cfg.data
        stream = prompt_stream(d.task, self.num_prompts, num_digits=d.num_digits, seed=d.seed, path=d.path,
                               start_step=start_step)
        context = self.engine.model.args.max_position_embeddings  # the config as the engine read it
        source = f"data.path {d.path!r}" if d.task == "jsonl" else f"data.task {d.task!r}"
        for batch in stream:
            check_prompt_lengths([p for p, _ in batch], self.cfg.sampling.max_new_tokens, context, source)
            yield batch

    def _critic_engine(self) -> ArchonEngine:
        """critic.path set: a value-head checkpoint (or config.json). Empty: the actor's backbone + a new head."""
        cfg = self.cfg
        assert self.setup.critic is not None  # resolved for estimator gae, the only caller
        engine = ArchonEngine(self.setup.critic).initialize()
        if self.setup.critic_from_actor and _has_weights(cfg.actor.path) and not cfg.actor.init_from_scratch:
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

    def score(self, prompt_ids: list[list[int]], responses: list[list[int]], fields: list[dict]
              ) -> tuple[list[float], int]:
        """Rewards and the number of failed calls (reward.input tokens: the ids; text: the prompt text and the
        decoded response), through the reward pool (workers, timeout, reward.on_error)."""
        calls: list[tuple[tuple[Any, Any], dict]]
        if self.cfg.reward.input == "tokens":
            calls = [((p, r), f) for p, r, f in zip(prompt_ids, responses, fields)]
        else:
            text = self.text
            assert text is not None  # reward.input=text is validated to need text data
            calls = [((f["prompt_text"], text.decode(r)), {k: v for k, v in f.items() if k != "prompt_text"})
                     for r, f in zip(responses, fields)]
        return self.rewards(calls)

    def global_stats(self, sums: list[float], maxes: list[float]) -> list[float]:
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

    def step(self, step: int) -> dict[str, float]:
        """One RL step: rollouts (from the source), old / reference logprobs, values, advantages, the PPO
        update, then the weights to the rollout side. Time split: ``wait_time`` (blocked on rollouts),
        ``train_time``, ``sync_time``; ``gen_time`` is the generation of this step's batch (overlapping the
        previous steps' training when rl.max_staleness > 0)."""
        t0 = time.perf_counter()
        batch, stats = self.source.rollout(step)
        t1 = time.perf_counter()
        if self.source.decoupled:  # decoupled PPO: ratio to the current (proximal) policy, weighted by prox / behav
            batch = batch.replace(prox_logprobs=self.actor.compute_logp(batch))
        ref_lp = self.ref.forward_batch(to_packed(batch))["logprobs"] if self.ref is not None else None
        values = self.critic.compute_values(batch) if self.critic is not None else None
        batch = self.actor.prepare(batch, ref_logprobs=ref_lp, values=values)
        stats.update(self.actor.ppo_update(batch, step))
        if self.critic is not None:
            stats.update(self.critic.ppo_update(batch, step))
        t2 = time.perf_counter()
        stats.update(self.source.after_update(step))
        self._after_update(step)
        dt = time.perf_counter() - t0
        (tokens,) = self.global_stats([float(batch.num_tokens)], [])
        stats.update(train_time=t2 - t1, step_time=dt, version=self.engine.version,
                     tokens_per_s=tokens / max(dt, 1e-9), peak_mem_gb=peak_memory_gb(self.engine.device))
        stats.setdefault("sync_time", 0.0)
        stats["kl"] = stats.get("kl", stats.get("approx_kl", 0.0))
        if self.engine.model.args.num_experts > 0:
            stats.update(moe_summary(self.engine))
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
        extra = None
        if self.text is not None:  # the tokenizer and generation_config, so inference engines load `out` directly
            from archon.tokenizer import save_for_serving

            extra = lambda d: save_for_serving(d, self.text.chat.tok, self.text.stop_ids)
        self.engine.export_weights(out, dtype=dtype, extra_files=extra)
        atomic_write_text(os.path.join(r.export_dir, "latest.json"),
                          json.dumps({"version": self.engine.version, "path": os.path.abspath(out)}))
        return out

    def run(self) -> list[dict]:
        cfg = self.cfg
        ckpt, start = None, 0
        if cfg.checkpoint.dir:
            from archon.engine.checkpoint import EngineCheckpointer

            ckpt = EngineCheckpointer(self.engine, cfg.checkpoint)
            if self.text is not None:
                ckpt.extra_state["data"] = self.text.data
            start = ckpt.maybe_resume()
        guard = RunGuard(max_skipped_steps=cfg.max_skipped_steps, timeout_s=cfg.distributed.timeout_s)
        guard.check_start(start, cfg.total_train_steps, cfg.checkpoint.dir)
        if self.text is None:
            next(self.prompts(start))  # read (and check) the first prompts before anything is written
        metrics = MetricsLogger(cfg.log.dir, cfg.total_train_steps, enabled=self.engine.rank == 0,
                                progress_bar=cfg.log.progress_bar, start_step=start, bar_keys=BAR_KEYS,
                                sinks=make_sinks(cfg.log, dataclasses.asdict(cfg)) if self.engine.rank == 0 else [])
        if start == 0 and cfg.rl.sft_warmup_steps:
            warm = self.sft_warmup()
            log.info("sft warmup: %d steps, loss %.3f -> %.3f", len(warm), warm[0]["loss"], warm[-1]["loss"])
        history = []
        try:
            self.source.start(start)
            for step in range(start, cfg.total_train_steps):
                with guard.step(step + 1):
                    stats = self.step(step)
                metrics.log(step + 1, stats)
                history.append(stats)
                guard.after_step(step + 1, stats)
                if ckpt is not None:
                    ckpt.after_step(step + 1)
        finally:
            self.source.close()
            self.rewards.close()
        if ckpt is not None:
            ckpt.finish(cfg.total_train_steps)
        guard.close()
        metrics.close()
        if self.engine.rank == 0:
            log_time_split(history)
        log.info("done: %d RL steps, metrics in %s", cfg.total_train_steps, metrics.path)
        return history


def log_time_split(history: list[dict]) -> None:
    """Log the mean time split over the steps after the first (which includes warm-up work)."""
    rows = history[1:] or history
    if not rows:
        return
    keys = ("gen_time", "wait_time", "train_time", "sync_time", "step_time", "gen_tokens_per_s")
    mean = {k: sum(r.get(k, 0.0) for r in rows) / len(rows) for k in keys}
    log.info("time split (mean of %d steps): generate %.3fs, wait %.3fs, train %.3fs, sync %.3fs | step %.3fs | "
             "rollout %.0f tok/s", len(rows), *(mean[k] for k in keys))


def _has_weights(path: str) -> bool:
    from archon.engine.build import _has_weights as has

    return has(path)


def run_rl(cfg: RLConfig, *, weight_callbacks: Sequence[WeightCallback] = ()) -> list[dict]:
    """Run `archon rl` for ``cfg``; returns the per-step metrics."""
    return RLTrainer(cfg, weight_callbacks=weight_callbacks).run()
