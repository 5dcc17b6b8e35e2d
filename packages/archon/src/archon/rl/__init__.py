"""RL on top of the engine: embedded sampler, actor / critic, rewards, and the GRPO / PPO trainer."""

from archon.rl.sampler import EmbeddedSampler, decoder_forward_fn

__all__ = ["EmbeddedSampler", "decoder_forward_fn"]
