"""`archon rl`: GRPO / PPO with the embedded sampler (config schema and driver)."""

from __future__ import annotations

from archon.rl.config import RLConfig
from archon.rl.trainer import run_rl

__all__ = ["RLConfig", "run_rl"]
