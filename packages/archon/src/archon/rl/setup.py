"""`RLSetup`: every engine of `archon rl` resolved and checked (RL rules included) before any engine is built."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from archon.engine.setup import EngineSetup, resolve_setup
from archon.rl.config import RLConfig


@dataclass(frozen=True)
class RLSetup:
    """The engines of one RL run: the actor, the critic (GAE) and the frozen reference policy (kl_coef > 0)."""

    actor: EngineSetup
    critic: EngineSetup | None
    ref: EngineSetup | None
    critic_from_actor: bool
    """critic.path was empty: the critic starts from the actor's backbone with a new value head."""

    @property
    def dp_world(self) -> int:
        """Data-parallel replicas: each samples and trains its share of every step's prompt groups."""
        return self.actor.dims.dp


def resolve_rl_setup(cfg: RLConfig, *, device: str | None = None) -> RLSetup:
    """Check `cfg` (RL keys, each engine's layout, the multi-rank replica rule, the prompt split) and resolve
    every engine's setup; creates no process group and no model. ``device`` overrides ``cfg.device`` (the
    trainer's GPU when rollout servers take the first ones)."""
    from archon.config.validate import validate_rl_replicas

    cfg.validate()
    r = cfg.rl
    device = cfg.device if device is None else device
    total_opt_steps = cfg.total_train_steps * r.n_minibatches + r.sft_warmup_steps
    actor = resolve_setup(cfg.actor, allocation_mode=cfg.allocation_mode, total_steps=total_opt_steps,
                          device=device)
    validate_rl_replicas(cfg, actor.dims, actor.world_size)
    critic, from_actor = None, not cfg.critic.path
    if r.estimator == "gae":
        ccfg = copy.deepcopy(cfg.critic)
        if from_actor:
            ccfg.path, ccfg.init_from_scratch = cfg.actor.path, True
        critic = resolve_setup(ccfg, allocation_mode=cfg.allocation_mode, device=device, head="value",
                               total_steps=cfg.total_train_steps * r.n_minibatches)
    ref = resolve_setup(cfg.actor, allocation_mode=cfg.allocation_mode, device=device) if r.kl_coef > 0 else None
    setup = RLSetup(actor=actor, critic=critic, ref=ref, critic_from_actor=from_actor)
    num_prompts = r.batch_size // r.group_size
    if num_prompts % setup.dp_world:
        raise ValueError(f"rl.batch_size / rl.group_size = {num_prompts} prompts per step must be divisible "
                         f"by the {setup.dp_world} data-parallel ranks (each rank samples whole groups)")
    return setup
