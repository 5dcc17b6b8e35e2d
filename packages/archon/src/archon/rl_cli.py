"""`archon rl`: GRPO / PPO on the embedded sampler or rollout servers (config schema and driver)."""

from __future__ import annotations

from archon.rl.config import RLConfig
from archon.rl.trainer import run_rl

__all__ = ["RLConfig", "run_rl"]
