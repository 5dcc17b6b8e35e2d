"""The configuration schema: `archon train` / `archon rl` read YAML into these dataclasses.

Key names follow AReaL where users already have configs: top-level `allocation_mode`, `actor.path`,
`actor.gradient_checkpointing`, `actor.archon.{enable_compile, ac_mode, ac_memory_budget, ac_debug,
pp_schedule, offload_params}`.
"""

from __future__ import annotations

from dataclasses import dataclass

from archon.config.fields import doc
from archon.data.config import TextDataConfig


@dataclass
class ArchonEngineConfig:
    enable_compile: bool | None = doc(None, "torch.compile each decoder block; None = on for CUDA, off on CPU")
    compile_scope: str = doc("block", "what one compiled graph covers: block (each decoder block) | stack (all blocks "
                             "as one graph; not with FSDP sharding or dta; measured slower than block on one H200)")
    compile_mode: str = doc("default", "torch.compile mode: default | reduce-overhead (CUDA graphs; one GPU or "
                            "zero1 replicas, not FSDP2) | max-autotune-no-cudagraphs")
    compile_cpp_wrapper: bool = doc(False, "inductor's C++ wrapper launches each compiled graph's kernels (less "
                                    "host time per compiled call than its Python wrapper; longer first compile); "
                                    "CPU only: refused on CUDA, where inductor fails on packed batches")
    ac_mode: str = doc("none", "activation checkpointing: none | full | selective | memory_budget")
    ac_selective_every: int = doc(1, "selective AC: checkpoint every N-th block (1 = op-level SAC on every block)")
    ac_memory_budget: float = doc(0.5, "activation memory budget in (0, 1] for ac_mode=memory_budget (needs compile)")
    ac_debug: bool = doc(False, "run activation checkpointing in debug mode (determinism checks, op logs)")
    pp_schedule: str = doc("1F1B", "pipeline schedule: 1F1B | Interleaved1F1B | InterleavedZeroBubble | ZBVZeroBubble")
    pp_stages_per_rank: int = doc(1, "virtual pipeline stages per pp rank (2+ for interleaved schedules)")
    pp_microbatches: int | None = doc(None, "pipeline micro-batches per step (at least; rounded up to a multiple "
                                      "of p); None = 2 x p")
    pp_first_stage_less_layers: int = doc(1, "pipeline: the first stage holds this many fewer decoder layers "
                                          "(the embedding counts as layers)")
    pp_last_stage_less_layers: int = doc(1, "pipeline: the last stage holds this many fewer decoder layers "
                                         "(the final norm + head count as layers)")
    offload_params: bool = doc(False, "FSDP2 CPU offload of parameters, grads and optimizer state")
    dp_layout: str = doc("fsdp", "data-parallel layout: fsdp (FSDP2: parameters, grads and optimizer state sharded "
                         "over d) | zero1 (AReaL's: a full model replica per rank, grads all-reduced once per "
                         "step, AdamW state sharded by ZeroRedundancyOptimizer); zero1 needs pure data "
                         "parallel (archon:dN, no r/t/c/p/e)")
    attn_impl: str = doc("auto", "attention backend: auto | sdpa | varlen | flex (auto = varlen on CUDA, sdpa on CPU)")
    cp_impl: str = doc("ulysses", "context-parallel attention: ulysses | ring")
    reshard_after_forward: str = doc("default", "FSDP2 reshard after forward: default | always | never")
    pad_to_maximum: bool = doc(False, "pad every micro-batch to mb_max_tokens (rounded up to a multiple of t; a "
                               "longer one to a multiple of 1024) with one padding document that no real token "
                               "sees, so compiled blocks keep one static shape (compile dynamic=False; off: "
                               "dynamic=None, automatic dynamic, one recompile); flat runner of a dense model only")
    logprob_chunk_size: int = doc(4096, "tokens per chunk when computing logprobs/entropy from the LM head")
    tree_training_mode: str = doc("disabled", "prefix sharing: disabled | sparse (tree packed as one sequence, "
                                  "ancestor-only attention) | dta (depth-first walk with prefix KV reuse); "
                                  "in tree modes mb_max_tokens bounds tree tokens (each shared prefix once)")
    tree_dta_block_size: int = doc(8192, "dta: most tokens of one forward: longer trie nodes are split into "
                                   "chained blocks, sibling leaves are packed up to it; 0 = never split, no cap")


@dataclass
class OptimizerConfig:
    lr: float = doc(1e-5, "peak learning rate")
    weight_decay: float = doc(0.0, "AdamW weight decay (not applied to norms and biases)")
    beta1: float = doc(0.9, "AdamW beta1")
    beta2: float = doc(0.999, "AdamW beta2")
    eps: float = doc(1e-8, "AdamW epsilon")
    gradient_clipping: float = doc(1.0, "max global grad norm; 0 disables clipping (the norm is still reported)")
    lr_scheduler_type: str = doc("constant", "constant | linear | cosine (after warmup)")
    warmup_steps_proportion: float = doc(0.0, "fraction of total steps used for linear warmup")
    min_lr_ratio: float = doc(0.0, "final lr as a fraction of lr, for linear and cosine")


@dataclass
class LoRAEngineConfig:
    enabled: bool = doc(False, "train a LoRA adapter instead of the full model (base weights frozen)")
    r: int = doc(8, "LoRA rank")
    alpha: float = doc(16.0, "LoRA alpha (scaling = alpha / r, or alpha / sqrt(r) with use_rslora)")
    dropout: float = doc(0.0, "dropout on the LoRA branch input (use 0 with tensor parallel)")
    use_rslora: bool = doc(False, "rank-stabilised scaling alpha / sqrt(r)")
    target_modules: list[str] = doc(factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"],
                                    help="modules that get LoRA, HF (q_proj, gate_proj ...) or native (wq, w1 ...) names")
    modules_to_save: list[str] = doc(factory=list, help="modules trained in full and saved in the adapter, e.g. [lm_head]")
    expert_lora: bool = doc(False, "MoE models: also give every expert a LoRA pair on w1/w2/w3 (saved in peft's target_parameters form)")
    adapter_path: str = doc("", "PEFT adapter directory to start from (peft's or ours); empty = fresh adapter")


@dataclass
class ActorConfig:
    path: str = doc("", "HF model directory (config.json + safetensors), or a config.json to start from random init")
    init_from_scratch: bool = doc(False, "random-init from the config at `path` even if weights are present")
    dtype: str = doc("bfloat16", "compute dtype: bfloat16 (fp32 master weights) or float32")
    gradient_checkpointing: bool = doc(False, "AReaL alias: true = archon.ac_mode 'full' unless ac_mode is set")
    mb_max_tokens: int = doc(8192, "tokens of one micro-batch on one rank (c>1: micro-batches of c x this, split "
                             "over the cp ranks; tree modes: tree tokens; p>1: a multiple of p micro-batches)")
    optimizer: OptimizerConfig = doc(factory=OptimizerConfig, help="optimizer")
    archon: ArchonEngineConfig = doc(factory=ArchonEngineConfig, help="engine knobs")
    lora: LoRAEngineConfig = doc(factory=LoRAEngineConfig, help="LoRA adapter training")
    seed: int = doc(1, "random seed for init and dropout")


@dataclass
class DataConfig(TextDataConfig):
    task: str = doc("reverse", "source=synthetic: built-in task copy | reverse | sort; or 'jsonl' to read `path`")
    path: str = doc("", "task=jsonl: a file of {\"input_ids\": [...], \"loss_mask\": [...]} lines; "
                    "source=file: JSONL / Parquet / a datasets directory of text records")
    num_digits: int = doc(6, "synthetic tasks: digits per example")
    batch_size: int = doc(32, "sequences per optimizer step (global, across data-parallel ranks)")
    seed: int = doc(0, "data seed")


@dataclass
class CheckpointConfig:
    dir: str = doc("", "checkpoint root; empty = no checkpoints")
    every_n_steps: int = doc(0, "save every N steps (0 = only at the end when dir is set)")
    keep_last_n: int = doc(2, "checkpoints to keep")
    resume: int | str = doc("none", "none | auto (resume from `latest` if present) | a step number")
    async_save: bool = doc(False, "save asynchronously")
    adapter_only: bool = doc(False, "with actor.lora.enabled: save only the trainable (adapter) weights and their "
                             "optimizer state; resume rebuilds the frozen base from actor.path")


@dataclass
class WandbConfig:
    project: str = doc("", "W&B project; empty = no W&B logging")
    mode: str = doc("online", "online | offline (no network; `wandb sync` later) | disabled")
    name: str = doc("", "run name (default: W&B's)")

    def __post_init__(self) -> None:
        if self.mode not in ("online", "offline", "disabled"):
            raise ValueError(f"log.wandb.mode {self.mode!r} is not one of online, offline, disabled")


@dataclass
class LogConfig:
    dir: str = doc("runs/archon", "run directory: metrics.jsonl and exported weights go here")
    progress_bar: bool = doc(True, "show a progress bar")
    tensorboard: bool = doc(False, "also write TensorBoard scalars to <dir>/tensorboard (needs archon[tensorboard])")
    wandb: WandbConfig = doc(factory=WandbConfig, help="Weights & Biases logging (needs archon[wandb])")


@dataclass
class DistributedConfig:
    timeout_s: float = doc(1800.0, "seconds a collective may wait for the other ranks (every process group); a "
                           "stalled or dead rank ends the run within it, naming the rank. Long enough for a first "
                           "torch.compile; waits on rollout servers are not collectives")


@dataclass
class TrainConfig:
    """`archon train`: supervised / language-model training."""

    allocation_mode: str = doc("archon:d1", "parallel layout, e.g. archon:d2t2 (see docs/allocation.md)")
    total_train_steps: int = doc(100, "optimizer steps")
    device: str = doc("auto", "auto | cpu | cuda")
    max_skipped_steps: int = doc(10, "stop with an error after this many steps in a row skipped for a non-finite "
                                 "loss or gradient")
    distributed: DistributedConfig = doc(factory=DistributedConfig, help="process groups")
    actor: ActorConfig = doc(factory=ActorConfig, help="the trained model")
    data: DataConfig = doc(factory=DataConfig, help="training data")
    checkpoint: CheckpointConfig = doc(factory=CheckpointConfig, help="training checkpoints")
    log: LogConfig = doc(factory=LogConfig, help="logging")
