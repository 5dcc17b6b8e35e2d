"""RL on top of the engine: embedded sampler, actor / critic, rewards, and the GRPO / PPO trainer."""

from archon.rl.actor import PPOActor
from archon.rl.config import RLConfig
from archon.rl.convert import from_packed, minibatches, to_packed
from archon.rl.critic import PPOCritic, load_backbone_from_lm
from archon.rl.rewards import load_reward_fn, prompt_stream
from archon.rl.rollout import RolloutSampler, build_rollout_engine, decoder_cache_layout, decoder_step_fn
from archon.rl.sampler import EmbeddedSampler, decoder_forward_fn
from archon.rl.trainer import RLTrainer, WeightCallback, run_rl

__all__ = [
    "EmbeddedSampler", "PPOActor", "PPOCritic", "RLConfig", "RLTrainer", "WeightCallback", "decoder_forward_fn",
    "load_backbone_from_lm", "RolloutSampler", "build_rollout_engine", "decoder_cache_layout", "decoder_step_fn",
    "from_packed", "load_reward_fn", "minibatches", "prompt_stream", "run_rl", "to_packed",
]
