"""`archon rl` configuration: sections for prompts, sampling, the PPO/GRPO algorithm and the reward.

`RLConfig.validate()` builds the archon_rl configs and runs their checks, so a bad value (group size
not dividing the batch, a negative clip, an unknown estimator, ...) fails before any model is built.
"""

from __future__ import annotations

from dataclasses import dataclass

from archon_rl import (
    DECODE_KERNELS,
    AdvantageConfig,
    KLConfig,
    PPOLossConfig,
    SamplingConfig,
    ValueLossConfig,
)

from archon.config.fields import doc
from archon.config.schema import ActorConfig, CheckpointConfig, DistributedConfig, LogConfig
from archon.data.config import TextDataConfig
from archon.rl.rollout_config import RolloutSection, resolve_rollout

__all__ = ["PromptConfig", "SamplingSection", "PPOConfig", "RewardConfig", "RLConfig"]

PROMPT_TASKS = ("copy", "reverse", "sort", "jsonl")
SAMPLING_ENGINES = ("embedded", "rollout")


@dataclass
class PromptConfig(TextDataConfig):
    task: str = doc("reverse", "source=synthetic: digit prompts (copy | reverse | sort, see archon.data) or 'jsonl'")
    path: str = doc("", "task=jsonl: lines of {\"prompt_ids\": [...], ...}, other keys go to the reward fn; "
                    "source=file: JSONL / Parquet / a datasets directory of text records")
    num_digits: int = doc(4, "synthetic tasks: digits per prompt")
    seed: int = doc(0, "prompt sampling seed")


@dataclass
class SamplingSection:
    max_new_tokens: int = doc(16, "response length limit")
    temperature: float = doc(1.0, "sampling temperature (0 = greedy)")
    top_p: float = doc(1.0, "nucleus sampling threshold (1 = off)")
    top_k: int = doc(0, "top-k sampling (0 = off)")
    stop_token_ids: list[int] | None = doc(None, "a response ends after one of these; null = the tokenizer's eos + "
                                           "generation_config's eos_token_id for text data, [3] (synthetic eos) "
                                           "otherwise")
    pad_token_id: int | None = doc(None, "padding token id; null = the tokenizer's pad (else eos) for text data, "
                                   "0 otherwise")
    seed: int = doc(0, "sampling seed (each step uses its own generator; the global RNG is untouched)")
    engine: str = doc("rollout", "rollout: static KV cache, continuous batching, CUDA-graph decode with fused "
                                 "kernels, shared prompt prefills | embedded: one eager forward per token over a "
                                 "per-call cache")
    kv_cache_gb: float | None = doc(None, "engine=rollout: KV cache budget in GiB (null: 1 GiB on CPU, "
                                          "kv_cache_fraction of free GPU memory on CUDA)")
    kv_cache_fraction: float = doc(0.5, "engine=rollout, kv_cache_gb null: share of the free GPU memory (the "
                                        "trainer's freed but cached blocks included) for the cache; the trainer's "
                                        "weights, grads and optimizer state stay resident beside it")
    compile_decode: bool | None = doc(None, "engine=rollout: compile each decode bucket's step (torch.compile, static "
                                            "shapes) before capturing it (null: off; slower on an H100)")
    cascade: bool = doc(False, "engine=rollout: the samples of one prompt read its KV from one shared copy "
                               "(cascade attention) instead of per-row copies")
    release_memory: bool = doc(True, "engine=rollout: free the KV cache and captured graphs after each step's "
                                     "generation so training gets the memory back (allocated and captured again "
                                     "at the next step)")
    kernels: str = doc("auto", "engine=rollout: fused decode ops: auto (Triton on CUDA, the model's own forward on "
                               "CPU) | triton | torch (eager reference) | none (the model's own forward)")

    def engine_options(self) -> dict:
        """Keyword arguments of the sampler class `SAMPLER_ENGINES[engine]` beyond (model, config)."""
        if self.engine == "rollout":
            return dict(kv_cache_gb=self.kv_cache_gb, kv_cache_fraction=self.kv_cache_fraction,
                        compile_decode=self.compile_decode, cascade=self.cascade, kernels=self.kernels,
                        release_memory=self.release_memory)
        return {}

    def build(self, stop_token_ids: list[int] | None = None, pad_token_id: int | None = None) -> SamplingConfig:
        """The sampler config; the arguments fill in stop / pad ids the config leaves null (default: synthetic)."""
        stop = self.stop_token_ids if self.stop_token_ids is not None else (stop_token_ids or [3])
        pad = self.pad_token_id if self.pad_token_id is not None else (pad_token_id or 0)
        return SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, stop_token_ids=list(stop), pad_token_id=pad)


@dataclass
class PPOConfig:
    batch_size: int = doc(64, "rollouts per step = prompts x group_size")
    group_size: int = doc(8, "responses per prompt (GRPO / RLOO groups)")
    n_minibatches: int = doc(1, "optimizer steps per rollout batch (samples shuffled, split evenly)")
    recompute_logprobs: bool = doc(False, "recompute old logprobs with the trainer instead of the sampler's")
    estimator: str = doc("grpo", "advantage estimator: grpo | rloo | gae (gae trains a critic)")
    std_normalize: bool = doc(True, "grpo: divide by the group std (false = Dr.GRPO)")
    gamma: float = doc(1.0, "gae discount")
    lam: float = doc(1.0, "gae lambda")
    eps_clip: float = doc(0.2, "PPO clip: ratio >= 1 - eps_clip")
    eps_clip_higher: float | None = doc(None, "upper clip (DAPO clip-higher); null = eps_clip")
    c_clip: float | None = doc(None, "dual clip (> 1); null = off")
    loss_agg: str = doc("token_mean", "token_mean | seq_mean_token_mean | seq_mean_token_sum | constant")
    loss_norm_constant: float | None = doc(None, "loss_agg=constant: the normaliser per sequence (Dr.GRPO)")
    entropy_coef: float = doc(0.0, "entropy bonus")
    kl_coef: float = doc(0.0, "KL(policy || reference) penalty in the loss; > 0 builds a frozen reference model")
    kl_estimator: str = doc("k3", "k1 | k2 | k3")
    value_clip: float | None = doc(0.2, "critic value clip; null = off")
    sft_warmup_steps: int = doc(0, "SFT steps on the synthetic task answers before RL (teaches the format)")
    export_dir: str = doc("", "write HF weights + READY (version) to export_dir/v<version> for inference engines")
    export_every_n_steps: int = doc(0, "export every N RL steps (0 = only at the end when export_dir is set)")
    export_dtype: str = doc("bfloat16", "exported weight dtype: bfloat16 | float32")
    max_staleness: int = doc(0, "rollout servers: a step trains on samples generated at most this many weight "
                             "versions ago (0 = synchronous; > 0 overlaps generation with training and uses the "
                             "decoupled PPO loss with proximal logprobs recomputed by the trainer)")
    behav_imp_weight_cap: float | None = doc(None, "max_staleness > 0: cap of the pi_prox / pi_behav token weight "
                                             "(null = no cap)")

    def loss(self) -> PPOLossConfig:
        return PPOLossConfig(eps_clip=self.eps_clip, eps_clip_higher=self.eps_clip_higher, c_clip=self.c_clip,
                             entropy_coef=self.entropy_coef, loss_agg=self.loss_agg,
                             behav_imp_weight_cap=self.behav_imp_weight_cap,
                             loss_norm_constant=self.loss_norm_constant,
                             kl=KLConfig(coef=self.kl_coef, estimator=self.kl_estimator))

    def advantage(self) -> AdvantageConfig:
        group = self.group_size if self.estimator in ("grpo", "rloo") else None
        return AdvantageConfig(estimator=self.estimator, gamma=self.gamma, lam=self.lam,
                               std_normalize=self.std_normalize, group_size=group)

    def value_loss(self) -> ValueLossConfig:
        return ValueLossConfig(value_clip=self.value_clip, loss_agg=self.loss_agg,
                               loss_norm_constant=self.loss_norm_constant)


@dataclass
class RewardConfig:
    fn: str = doc("", "reward function 'module:function' or 'path/file.py:function' (built in: "
                      "archon.rewards:math_verify, archon.rewards:reasoning_gym)")
    input: str = doc("tokens", "tokens: fn(prompt_ids, response_ids, **fields) | text: fn(prompt, response, **fields) "
                     "with the prompt as the model saw it and the response decoded (no special tokens)")
    num_workers: int = doc(0, "reward worker processes (0 = call in the trainer process, no timeout)")
    timeout_s: float = doc(0.0, "per-call limit in seconds (needs num_workers >= 1; 0 = none); a call past it is "
                           "killed and counts as an error")
    on_error: str = doc("raise", "a call that raises, hangs or returns a non-number: raise (stop the run with the "
                        "sample) | zero (score 0, counted as reward/errors)")


@dataclass
class RLConfig:
    """`archon rl`: GRPO (or PPO with a critic) on a reward function; rollouts from the embedded sampler, or from
    rollout servers when allocation_mode has an inference part (sglang:dN+archon:...)."""

    allocation_mode: str = doc("archon:d1", "trainer layout (archon:...), optionally after rollout servers: "
                               "sglang:d2+archon:d2t2 (see rollout.*); without servers the embedded sampler "
                               "samples on every rank (archon:dN with the ZeRO-1 dp_layout: full replicas)")
    total_train_steps: int = doc(50, "RL steps (one rollout batch + policy update each)")
    device: str = doc("auto", "auto | cpu | cuda")
    max_skipped_steps: int = doc(10, "stop with an error after this many updates in a row skipped for a "
                                 "non-finite loss or gradient")
    distributed: DistributedConfig = doc(factory=DistributedConfig, help="process groups")
    actor: ActorConfig = doc(factory=ActorConfig, help="the policy")
    critic: ActorConfig = doc(factory=ActorConfig, help="the critic (rl.estimator=gae); empty path = actor.path")
    data: PromptConfig = doc(factory=PromptConfig, help="prompts")
    sampling: SamplingSection = doc(factory=SamplingSection, help="sampling (embedded sampler or servers)")
    rl: PPOConfig = doc(factory=PPOConfig, help="the RL algorithm")
    reward: RewardConfig = doc(factory=RewardConfig, help="the reward")
    rollout: RolloutSection = doc(factory=RolloutSection, help="rollout servers (allocation_mode sglang:dN+...)")
    checkpoint: CheckpointConfig = doc(factory=CheckpointConfig, help="training checkpoints")
    log: LogConfig = doc(factory=LogConfig, help="logging")

    def validate(self) -> None:
        """Raise ValueError naming the bad key (before anything is built)."""
        r = self.rl
        if self.total_train_steps < 1:
            raise ValueError(f"total_train_steps must be >= 1, got {self.total_train_steps}")
        if r.batch_size < 1 or r.group_size < 1:
            raise ValueError(f"rl.batch_size and rl.group_size must be >= 1, got {r.batch_size}, {r.group_size}")
        if r.batch_size % r.group_size:
            raise ValueError(f"rl.group_size {r.group_size} must divide rl.batch_size {r.batch_size} "
                             "(each step samples batch_size / group_size prompts, group_size responses each)")
        if self.sampling.engine not in SAMPLING_ENGINES:
            raise ValueError(f"sampling.engine must be one of {SAMPLING_ENGINES}, got {self.sampling.engine!r}")
        if self.sampling.kv_cache_gb is not None and self.sampling.kv_cache_gb <= 0:
            raise ValueError(f"sampling.kv_cache_gb must be > 0 (or null), got {self.sampling.kv_cache_gb}")
        if not 0 < self.sampling.kv_cache_fraction <= 1:
            raise ValueError(f"sampling.kv_cache_fraction must be in (0, 1], got {self.sampling.kv_cache_fraction}")
        if self.sampling.kernels not in DECODE_KERNELS:
            raise ValueError(f"sampling.kernels must be one of {list(DECODE_KERNELS)}, got {self.sampling.kernels!r}")
        if self.sampling.compile_decode and self.sampling.kernels not in ("auto", "none"):
            raise ValueError(f"sampling.kernels {self.sampling.kernels!r} and sampling.compile_decode are "
                             "alternatives (inductor fuses the compiled step itself): set one")
        for name, check in (("rl", lambda: r.loss().validate()),
                            ("rl", lambda: r.advantage().validate(r.batch_size)),
                            ("rl", lambda: r.value_loss().validate()),
                            ("sampling", lambda: self.sampling.build().validate())):
            try:
                check()
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        if not 1 <= r.n_minibatches <= r.batch_size:
            raise ValueError(f"rl.n_minibatches must be in [1, rl.batch_size={r.batch_size}], got {r.n_minibatches}")
        if r.export_every_n_steps < 0 or (r.export_every_n_steps and not r.export_dir):
            raise ValueError("rl.export_every_n_steps needs rl.export_dir (and must be >= 0)")
        if r.export_dtype not in ("bfloat16", "float32"):
            raise ValueError(f"rl.export_dtype must be bfloat16 or float32, got {r.export_dtype!r}")
        if r.sft_warmup_steps < 0:
            raise ValueError(f"rl.sft_warmup_steps must be >= 0, got {r.sft_warmup_steps}")
        if r.sft_warmup_steps and (self.data.task == "jsonl" or self.data.source != "synthetic"):
            raise ValueError("rl.sft_warmup_steps uses the synthetic task answers; it needs data.task != jsonl")
        self.data.validate_text(self.data.path, "rl")
        w = self.reward
        if w.input not in ("tokens", "text") or w.on_error not in ("raise", "zero"):
            raise ValueError(f"reward.input must be tokens | text and reward.on_error raise | zero, got {w.input!r}, "
                             f"{w.on_error!r}")
        if w.num_workers < 0 or w.timeout_s < 0 or (w.timeout_s and not w.num_workers):
            raise ValueError("reward.timeout_s needs reward.num_workers >= 1 (a call in the trainer process cannot be "
                             "cut); both must be >= 0")
        if w.input == "text" and self.data.source == "synthetic":
            raise ValueError("reward.input=text needs text prompts: set data.source to file or reasoning_gym")
        if self.data.source != "synthetic":
            return self._check_reward()
        if self.data.task not in PROMPT_TASKS:
            raise ValueError(f"data.task {self.data.task!r} is not one of {PROMPT_TASKS}")
        if self.data.task == "jsonl" and not self.data.path:
            raise ValueError("data.task=jsonl needs data.path (a file of {\"prompt_ids\": [...]} lines)")
        if self.data.task != "jsonl" and self.data.num_digits < 1:
            raise ValueError(f"data.num_digits must be >= 1, got {self.data.num_digits}")
        resolve_rollout(self.allocation_mode, self.rollout, max_staleness=r.max_staleness)
        if r.behav_imp_weight_cap is not None and r.max_staleness == 0:
            raise ValueError("rl.behav_imp_weight_cap caps the decoupled-PPO weight, which only rl.max_staleness > 0 "
                             "uses; drop it or set rl.max_staleness")
        self._check_reward()

    def _check_reward(self) -> None:
        if not self.reward.fn:
            raise ValueError("reward.fn is empty: set it to 'module:function' (e.g. examples/rewards.py:digit_reward)")
