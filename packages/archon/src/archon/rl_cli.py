"""`archon rl`: GRPO / PPO with the embedded sampler (config schema and driver)."""

from __future__ import annotations

from dataclasses import dataclass

from archon.config.fields import doc
from archon.config.schema import ActorConfig, CheckpointConfig, LogConfig


@dataclass
class RLConfig:
    """`archon rl`: GRPO (or PPO with a critic) on a reward function, with the embedded sampler."""

    allocation_mode: str = doc("archon:d1", "parallel layout of the trainer (see docs/allocation.md)")
    total_train_steps: int = doc(50, "RL steps (one rollout batch + policy update each)")
    device: str = doc("auto", "auto | cpu | cuda")
    actor: ActorConfig = doc(factory=ActorConfig, help="the policy")
    checkpoint: CheckpointConfig = doc(factory=CheckpointConfig, help="training checkpoints")
    log: LogConfig = doc(factory=LogConfig, help="logging")


def run_rl(cfg: RLConfig) -> list[dict]:
    raise ValueError("archon rl is not available in this build yet; use `archon train` (see README)")
