"""Loss and advantage configs: plain dataclasses, each with one ``validate()`` naming the broken rule."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["KLConfig", "PPOLossConfig", "ValueLossConfig", "AdvantageConfig", "OverlongConfig",
           "KL_ESTIMATORS", "LOSS_AGGREGATIONS", "ADVANTAGE_ESTIMATORS"]

KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "constant")
ADVANTAGE_ESTIMATORS = ("gae", "grpo", "rloo")


@dataclass
class KLConfig:
    """KL(pi || pi_ref) penalty, estimated per token from samples of the policy."""

    coef: float = 0.0
    """Penalty coefficient; 0 disables the penalty."""
    estimator: str = "k3"
    """k1: log r; k2: (log r)^2 / 2; k3: exp(-log r) - 1 + log r, with log r = logp - ref_logp."""
    in_reward: bool = False
    """True: subtract coef * kl (of the behaviour policy) from token rewards; False: add it to the loss."""
    clamp: float | None = None
    """Clamp each token's KL estimate to [-clamp, clamp] (None: no clamp)."""

    def validate(self) -> None:
        if self.estimator not in KL_ESTIMATORS:
            raise ValueError(f"unknown KL estimator {self.estimator!r}; choose one of {KL_ESTIMATORS}")
        if self.coef < 0:
            raise ValueError(f"KL coef must be >= 0, got {self.coef}")
        if self.clamp is not None and self.clamp <= 0:
            raise ValueError(f"KL clamp must be positive or None, got {self.clamp}")


def _check_agg(name: str, agg: str, constant: float | None) -> None:
    if agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown {name} {agg!r}; choose one of {LOSS_AGGREGATIONS}")
    if agg == "constant" and (constant is None or constant <= 0):
        raise ValueError(f"{name}='constant' needs loss_norm_constant > 0 (e.g. the max response length), "
                         f"got {constant}")


@dataclass
class PPOLossConfig:
    """Clipped PPO policy objective (token or sequence ratios, dual clip, decoupled, KL, entropy)."""

    eps_clip: float = 0.2
    """Lower clip: ratio >= 1 - eps_clip (and upper clip when eps_clip_higher is None)."""
    eps_clip_higher: float | None = None
    """Upper clip: ratio <= 1 + eps_clip_higher (DAPO clip-higher); None uses eps_clip."""
    c_clip: float | None = None
    """Dual clip (> 1): for negative advantages the loss is capped at -c_clip * A; None disables."""
    ratio_level: str = "token"
    """'token': per-token ratio; 'sequence': GSPO geometric mean over each sequence's masked tokens."""
    behav_imp_weight_cap: float | None = None
    """Decoupled PPO: truncate the importance weight pi_prox / pi_behav at this value (None: no cap)."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient (needs outputs['entropy'])."""
    kl: KLConfig = field(default_factory=KLConfig)
    """KL penalty; only added to the loss when kl.coef > 0 and not kl.in_reward (needs ref_logprobs)."""
    loss_agg: str = "token_mean"
    """Normaliser, see archon_rl.losses: token_mean | seq_mean_token_mean | seq_mean_token_sum | constant."""
    loss_norm_constant: float | None = None
    """For loss_agg='constant': the loss is sum / (loss_norm_constant * num_seqs) (Dr.GRPO)."""

    @property
    def clip_high(self) -> float:
        return self.eps_clip if self.eps_clip_higher is None else self.eps_clip_higher

    def validate(self) -> None:
        if not self.eps_clip > 0:
            raise ValueError(f"eps_clip must be > 0, got {self.eps_clip}")
        if self.eps_clip >= 1:
            raise ValueError(f"eps_clip must be < 1 (the ratio floor 1 - eps_clip must stay positive), "
                             f"got {self.eps_clip}")
        if self.eps_clip_higher is not None and not self.eps_clip_higher > 0:
            raise ValueError(f"eps_clip_higher must be > 0 or None, got {self.eps_clip_higher}")
        if self.c_clip is not None and not self.c_clip > 1:
            raise ValueError(f"c_clip (dual clip) must be > 1 or None, got {self.c_clip}")
        if self.ratio_level not in ("token", "sequence"):
            raise ValueError(f"ratio_level must be 'token' or 'sequence', got {self.ratio_level!r}")
        if self.behav_imp_weight_cap is not None and not self.behav_imp_weight_cap > 0:
            raise ValueError(f"behav_imp_weight_cap must be > 0 or None, got {self.behav_imp_weight_cap}")
        if self.entropy_coef < 0:
            raise ValueError(f"entropy_coef must be >= 0, got {self.entropy_coef}")
        self.kl.validate()
        _check_agg("loss_agg", self.loss_agg, self.loss_norm_constant)


@dataclass
class ValueLossConfig:
    """Critic loss: (clipped) MSE or Huber against returns."""

    value_clip: float | None = 0.2
    """Clip new values to old +- value_clip and take the worse of clipped/unclipped; None disables."""
    loss_type: str = "mse"
    """'mse' (0.5 * err^2) or 'huber' (quadratic inside huber_delta, linear outside)."""
    huber_delta: float = 1.0
    loss_agg: str = "token_mean"
    loss_norm_constant: float | None = None

    def validate(self) -> None:
        if self.value_clip is not None and not self.value_clip > 0:
            raise ValueError(f"value_clip must be > 0 or None, got {self.value_clip}")
        if self.loss_type not in ("mse", "huber"):
            raise ValueError(f"value loss_type must be 'mse' or 'huber', got {self.loss_type!r}")
        if not self.huber_delta > 0:
            raise ValueError(f"huber_delta must be > 0, got {self.huber_delta}")
        _check_agg("loss_agg", self.loss_agg, self.loss_norm_constant)


@dataclass
class OverlongConfig:
    """DAPO soft overlong punishment on the response length L.

    Penalty: 0 if L <= max_len - buffer_len; -(L - (max_len - buffer_len)) / buffer_len inside the
    buffer; -1 beyond max_len; all scaled by penalty_factor.
    """

    max_response_len: int
    buffer_len: int
    penalty_factor: float = 1.0

    def validate(self) -> None:
        if self.max_response_len <= 0:
            raise ValueError(f"max_response_len must be > 0, got {self.max_response_len}")
        if not 0 < self.buffer_len <= self.max_response_len:
            raise ValueError(f"overlong buffer_len must be in (0, max_response_len={self.max_response_len}], "
                             f"got {self.buffer_len}")
        if self.penalty_factor < 0:
            raise ValueError(f"overlong penalty_factor must be >= 0, got {self.penalty_factor}")


@dataclass
class AdvantageConfig:
    """Advantage estimator and its parameters."""

    estimator: str = "grpo"
    """'gae' (needs values), 'grpo' (group mean/std), or 'rloo' (leave-one-out baseline)."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 1.0
    """GAE lambda."""
    std_normalize: bool = True
    """GRPO: divide by the group std; False gives Dr.GRPO (mean only)."""
    unbiased_std: bool = True
    """GRPO: Bessel-corrected group std (n - 1)."""
    eps: float = 1e-6
    """GRPO: added to the group std."""
    group_size: int | None = None
    """Expected samples per group; when set, checked against the batch."""
    whiten: bool = False
    """GAE: normalise advantages to zero mean / unit variance over masked tokens."""
    overlong: OverlongConfig | None = None
    """Optional DAPO overlong reward shaping, applied to sequence rewards before the estimator."""

    def validate(self, num_samples: int | None = None) -> None:
        if self.estimator not in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"unknown advantage estimator {self.estimator!r}; choose one of "
                             f"{ADVANTAGE_ESTIMATORS}")
        if not 0 <= self.gamma <= 1:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")
        if not 0 <= self.lam <= 1:
            raise ValueError(f"lam must be in [0, 1], got {self.lam}")
        if self.eps < 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")
        if self.group_size is not None:
            if self.group_size < 1:
                raise ValueError(f"group_size must be >= 1, got {self.group_size}")
            if self.estimator == "rloo" and self.group_size < 2:
                raise ValueError("rloo needs group_size >= 2 (the baseline leaves one sample out)")
            if num_samples is not None and num_samples % self.group_size:
                raise ValueError(f"group_size {self.group_size} must divide the number of samples "
                                 f"{num_samples}; generate group_size responses per prompt")
        if self.overlong is not None:
            self.overlong.validate()
