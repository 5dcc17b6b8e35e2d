"""Where a step's rollouts come from: a strategy object chosen once from the resolved config.

- `ColocatedRollouts`: the embedded sampler, every rank samples its share of the step's prompt groups with
  the trainer's own weights (needs full replicas: `archon:dN` with the ZeRO-1 layout, `Zero1Layout`);
- `archon.rl.remote.RemoteRollouts`: rollout servers (`sglang:dN+archon:...`) fed by an asynchronous loop,
  with any training layout.

Both give the trainer this rank's share of the step's samples (dicts for `RolloutBatch.from_sequences`)
and global stats, and are told after each update so they can move the weights along.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol

from archon_rl import RolloutBatch

from archon.rl.rollout import RolloutSampler
from archon.rl.sampler import EmbeddedSampler

__all__ = ["RolloutSource", "ColocatedRollouts", "SAMPLERS", "score_samples"]

SAMPLERS = {"embedded": EmbeddedSampler, "rollout": RolloutSampler}
"""`sampling.engine` -> the in-process sampler class: ``cls(model, SamplingConfig, seed=, device=, autocast=,
**options)``."""


class RolloutSource(Protocol):
    decoupled: bool
    """True when samples may be older than the policy being trained (the decoupled PPO loss applies)."""

    def start(self, start_step: int) -> None: ...

    def rollout(self, step: int) -> tuple[RolloutBatch, dict[str, float]]: ...

    def after_update(self, step: int) -> dict[str, float]: ...

    def close(self) -> None: ...


def score_samples(trainer, prompt_ids: Sequence[list[int]], responses: Sequence[list[int]],
                  logprobs: Sequence[list[float]], fields: Sequence[dict], group_ids: Sequence[int],
                  versions: Sequence[int]) -> tuple[list[dict[str, Any]], int]:
    """One `RolloutBatch.from_sequences` dict per response, scored by ``trainer.score`` (the reward pool), and
    the number of failed reward calls."""
    rewards, errors = trainer.score(list(prompt_ids), list(responses), list(fields))
    return [{"input_ids": p + r, "prompt_len": len(p), "logprobs": [0.0] * len(p) + lp, "reward": rw,
             "group_id": g, "version": v}
            for p, r, lp, rw, g, v in zip(prompt_ids, responses, logprobs, rewards, group_ids, versions)], errors


class ColocatedRollouts:
    """The embedded sampler on the trainer's own weights; every rank samples its contiguous share of whole
    groups. Each response samples from its own seed (seed, step, global index), so the rollouts equal one
    process's whatever the number of ranks."""

    decoupled = False

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        cfg, engine = trainer.cfg, trainer.engine
        sampler_cls = SAMPLERS[cfg.sampling.engine]
        self.sampler = sampler_cls(engine.model, trainer.sampling, seed=cfg.sampling.seed, device=engine.device,
                                   autocast=engine._autocast, **cfg.sampling.engine_options())

    def start(self, start_step: int) -> None:
        self._prompts = self.trainer.prompts(start_step)

    def rollout(self, step: int) -> tuple[RolloutBatch, dict[str, float]]:
        t = self.trainer
        prompts = next(self._prompts)
        g = t.cfg.rl.group_size
        per_rank = len(prompts) // t.dp_world
        first = t.dp_rank * per_rank
        mine = prompts[first:first + per_rank]
        prompt_ids = [p for p, _ in mine for _ in range(g)]
        fields = [f for _, f in mine for _ in range(g)]
        t0 = time.perf_counter()
        gen = self.sampler.generate(prompt_ids, step, indices=range(first * g, (first + per_rank) * g))
        gen_time = time.perf_counter() - t0
        group_ids = [step * t.num_prompts + first + i // g for i in range(len(prompt_ids))]
        samples, errors = score_samples(t, prompt_ids, gen.responses(), gen.response_logprobs(), fields,
                                group_ids, [step] * len(prompt_ids))
        rewards = [s["reward"] for s in samples]
        n, r_sum, len_sum, stops, n_err, r_max, r_min, gen_time = t.global_stats(
            [len(rewards), sum(rewards), float(gen.lengths_B.float().sum()), float(gen.stopped_B.float().sum()),
             float(errors)], [max(rewards), -min(rewards), gen_time])
        stats = {"reward": r_sum / n, "reward_max": r_max, "reward_min": -r_min, "reward/errors": n_err,
                 "response_len": len_sum / n,
                 "stop_frac": stops / n, "gen_time": gen_time, "gen_tokens_per_s": len_sum / max(gen_time, 1e-9),
                 "wait_time": 0.0}
        engine = getattr(self.sampler, "engine", None)
        if engine is not None:  # this rank's KV slots: fewer than its rows means they decoded in waves
            stats["gen_slots"] = float(engine.last_slots)
        return RolloutBatch.from_sequences(samples), stats

    def after_update(self, step: int) -> dict[str, float]:
        return {}  # the sampler shares the trainer's parameters

    def close(self) -> None:
        pass
