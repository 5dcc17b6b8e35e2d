"""The training engine: builds a parallelized model from config and runs forward/train steps.

One engine serves a single device and any `torchrun` layout: the parallel layout comes from the allocation
mode, and the engine never branches on it beyond building meshes and applying `archon_parallel`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from archon.config.schema import ActorConfig
from archon.engine.batch import PackedBatch
from archon.engine.dp_layout import DataParallelLayout, make_dp_layout
from archon.engine.loss import LossFn, WeightFn
from archon.engine.optim import build_scheduler
from archon.engine.runner import FlatRunner, Runner
from archon.engine.setup import EngineSetup, resolve_setup
from archon_ckpt import clean_fqn

log = logging.getLogger("archon")


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Initialise the default process group when launched by torchrun; returns (rank, world_size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # gloo next to NCCL: host-side collectives (metadata, objects) work too
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ArchonEngine:
    """Model + optimizer + schedule for one role (actor with an LM head, or critic with a value head)."""

    def __init__(self, cfg: ActorConfig | EngineSetup, *, allocation_mode: str = "archon:d1", total_steps: int = 1,
                 device: str = "auto", head: str = "lm") -> None:
        """`cfg`: an `EngineSetup` (`archon.engine.setup.resolve_setup`), or an ActorConfig resolved here with
        the keyword arguments; either way every rule is checked before the process group is created."""
        setup = cfg if isinstance(cfg, EngineSetup) else resolve_setup(
            cfg, allocation_mode=allocation_mode, total_steps=total_steps, device=device, head=head)
        self.setup = setup
        self.cfg = setup.cfg
        self.allocation_mode = setup.allocation_mode
        self.total_steps = setup.total_steps
        self.head = setup.head
        self.device = setup.device
        self.dtype = setup.dtype
        self.dims = setup.dims
        self.micro_batches = setup.micro_batches  # mb_max_tokens in the runner's units: the one planner
        self.rank, self.world_size = init_distributed(self.device)
        self.meshes = self.dims.build_meshes(self.device.type) if self.world_size > 1 else None
        self.layout: DataParallelLayout = make_dp_layout(self.cfg.archon.dp_layout, self.dims, group=self.dp_group)
        self.version = 0
        self.model: Any = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self._offloaded = False
        self._trainable: list[torch.Tensor] | None = None
        self._aux_free_moe: bool | None = None

    # -- set-up ---------------------------------------------------------------------------------------
    def initialize(self) -> ArchonEngine:
        from archon.engine.build import build_parallel_model

        t0 = time.perf_counter()
        self.model = build_parallel_model(self.setup, self.meshes, self.layout)
        self._trainable = self._aux_free_moe = None  # per-model lookups, made on first use
        self.runner = make_runner(self.setup, self.model, autocast=self._autocast, meshes=self.meshes,
                                  dp_group=self.dp_group)
        self.optimizer = self.layout.build_optimizer(self.model, self.cfg.optimizer, self.device.type)
        self.scheduler = build_scheduler(self.optimizer, self.cfg.optimizer, self.total_steps)
        if self.rank == 0:
            log.info("archon engine: %s | model %s (%s head) built in %.1fs on %s", describe_dims(self.dims),
                     self.model.args.model_type, self.head, time.perf_counter() - t0, self.device)
        return self

    @property
    def dp_group(self):
        """Ranks that see different data (and whose loss weights are summed): dp x cp."""
        return self.meshes.group("dp_cp") if self.meshes is not None else None

    def dp_rank_world(self) -> tuple[int, int]:
        """This rank's data-parallel index and the number of data-parallel replicas (ranks that differ in data)."""
        if self.meshes is None or self.meshes["dp"] is None:
            return 0, 1
        mesh = self.meshes["dp"]
        return mesh.get_local_rank(), mesh.size()

    def _fix_expert_grad_scale(self) -> None:
        """Rescale expert grads from FSDP's mean over `edp` to the dp_cp mean the loss was scaled for.

        Each rank's loss is multiplied by dp_cp (dense grads are averaged over dp_cp, tp ranks compute one copy
        of the loss). An expert's grad arrives already summed over every (token, choice) row of its ep group by
        the all-to-all, each row once: in the plain form tp ranks are ep_rep replicas (same rows, same grads), in
        the hybrid form the ranks of a tp group that share an ep group each dispatch a distinct slice of the rows
        (`archon_parallel.expert_folding`). The edp groups together cover every row once, so FSDP's mean over
        edp leaves `dp_cp / edp` times the global-token mean in both forms."""
        if self.meshes is None or not self.dims.ep_enabled:
            return
        factor = self.dims.edp / self.dims.dp_cp
        for name, p in self.model.named_parameters():
            if p.grad is not None and ".moe.experts." in clean_fqn(name):
                p.grad.mul_(factor)

    def _autocast(self):
        if not self.layout.needs_autocast(self.dtype):
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    # -- forward --------------------------------------------------------------------------------------
    def _micro_batches(self, batch: PackedBatch) -> list[list[int]]:
        from archon_rl import sync_num_micro_batches

        plan = self.micro_batches.plan(batch)
        if self.dp_group is not None:  # every rank must run the same number of forward/backward passes
            n = sync_num_micro_batches(len(plan), self.dp_group, device=self.device if self.device.type == "cuda" else "cpu")
            plan = self.micro_batches.plan(batch, num_micro_batches=n)
        return plan

    @torch.no_grad()
    def forward_batch(self, batch: PackedBatch, *, want_entropy: bool = False) -> dict[str, torch.Tensor]:
        """Token-aligned logprobs (and entropy) for an LM head, or values for a value head; on CPU, [T]."""
        self._ensure_onloaded()
        self.model.eval()
        outs: dict[str, torch.Tensor] = {}
        order: list[int] = []
        plan = self._micro_batches(batch)
        results = self.runner.forward_all([batch.select(idx) if idx else _dummy_batch(batch) for idx in plan],
                                          want_entropy)
        for idx, res in zip(plan, results):
            if not idx:
                continue
            order.extend(idx)
            for k, v in res.items():
                outs.setdefault(k, []).append(v.detach().float().cpu())
        cat = {k: torch.cat(v) for k, v in outs.items()}
        inv = batch.token_index(order)  # back to the caller's sequence order
        return {k: torch.empty_like(v).index_copy_(0, inv, v) for k, v in cat.items()}

    # -- train ----------------------------------------------------------------------------------------
    def train_batch(self, batch: PackedBatch, loss_fn: LossFn, loss_weight_fn: WeightFn) -> dict[str, float]:
        """One optimizer step over `batch`, split into micro-batches by the token budget.

        `loss_fn(outputs, mb)` returns the loss SUMMED over the micro-batch's weighted tokens (optionally with a
        stats dict of micro-batch means, reported as weighted means over the global batch, and counts named
        `num_*`, reported as global sums); `loss_weight_fn(mb)` returns that weight (e.g. the number of loss
        tokens). The engine divides by the global weight, summed over micro-batches and data-parallel ranks,
        so the step equals one big batch however the batch was split or sharded.
        """
        t0 = time.perf_counter()
        opt, sched = self.optimizer, self.scheduler
        if opt is None or sched is None:
            raise RuntimeError("ArchonEngine.train_batch before initialize(): call engine.initialize() first")
        finish_stats = self._accumulate(batch, loss_fn, loss_weight_fn)  # stats are read after the update is queued
        if _skips_on_device(opt):
            # Clipping and the non-finite skip happen inside the fused AdamW kernel: it divides every grad by
            # grad_scale (norm / max_norm when over the limit: no separate pass over the grads) and skips its
            # update (undoing the step count) where found_inf is 1. The norm is read after the step is queued,
            # so the GPU never waits for the host between backward and the update.
            norm = self._clip_grad_norm(scale_grads=False)
            max_norm = self.cfg.optimizer.gradient_clipping
            finite_t = torch.isfinite(norm)
            scale = torch.clamp(norm / max_norm, min=1.0) if max_norm > 0 else torch.ones_like(norm)
            opt.grad_scale = torch.where(finite_t, scale, torch.ones_like(scale)).float()
            opt.found_inf = (~finite_t).float()
            opt.step()
            opt.grad_scale = opt.found_inf = None
            grad_norm = float(norm)
            finite = math.isfinite(grad_norm)
        else:
            norm = self._clip_grad_norm()
            grad_norm = float(norm)
            finite = math.isfinite(grad_norm)
            if finite:
                opt.step()
        opt.zero_grad(set_to_none=True)
        lr = sched.get_last_lr()[0]
        sched.step()
        if finite:
            self.version += 1
            self._after_optimizer_step()
        stats = finish_stats()
        stats.update(grad_norm=grad_norm, lr=lr, update_skipped=float(not finite), step_time=time.perf_counter() - t0)
        return stats

    def accumulate_grads(self, batch: PackedBatch, loss_fn: LossFn, loss_weight_fn: WeightFn) -> dict[str, float]:
        """Forward + backward of every micro-batch of `batch` into `.grad` (no optimizer step); the loss and the
        loss function's stats as weighted means over the global batch (all micro-batches and DP ranks)."""
        return self._accumulate(batch, loss_fn, loss_weight_fn)()

    def _accumulate(self, batch: PackedBatch, loss_fn: LossFn, loss_weight_fn: WeightFn
                    ) -> Callable[[], dict[str, float]]:
        """`accumulate_grads` up to the stats: returns the function that reads them, so a caller can queue more
        device work (the optimizer update) before the host waits for the values."""
        self._ensure_onloaded()
        if not self.model.training:  # train() walks every module: a few ms of host time per step on 28 layers
            self.model.train()
        plan = self._micro_batches(batch)
        mbs = [batch.select(idx) if idx else None for idx in plan]
        weights = [float(loss_weight_fn(mb)) if mb is not None else 0.0 for mb in mbs]
        total_w = sum(weights)
        if self.dp_group is not None:  # on the engine's device: a process group set up by the caller may be NCCL only
            total = torch.tensor(total_w, dtype=torch.float64, device=self.device)
            dist.all_reduce(total, group=self.dp_group)
            total_w = float(total)
        if total_w <= 0:
            raise ValueError("loss_weight_fn gave a total weight of 0 over the batch: no token to train on")
        scale_world = self.layout.loss_scale_world()
        loss_sum = 0.0
        stats_acc: dict[str, Any] = {}
        scales = [scale_world / total_w if mb is not None else 0.0 for mb in mbs]
        held = self.layout.hold_grads(self.model)
        results = self.runner.forward_backward_all([mb if mb is not None else _dummy_batch(batch) for mb in mbs],
                                                   loss_fn, scales, [w * s for w, s in zip(weights, scales)])
        self.layout.sync_grads(self.model, held)
        # Sum on the device and read everything once at the end: a host read per micro-batch would stall the
        # CPU until the GPU drained its queue, leaving the GPU idle while the next micro-batch is launched.
        # Padding micro-batches (mb None) add their stats keys with weight 0, so every data-parallel rank holds
        # the same keys for the one all-reduce below.
        for mb, w, (loss, stats) in zip(mbs, weights, results):
            if mb is not None:
                loss_sum = loss_sum + loss.detach().double()
            for k, v in stats.items():
                v = v.detach().double() if isinstance(v, torch.Tensor) else float(v)
                weight = (1.0 if k.startswith("num_") else w) if mb is not None else 0.0  # counts add up
                stats_acc[k] = stats_acc.get(k, 0.0) + v * weight
        self._fix_expert_grad_scale()
        keys = sorted(stats_acc)
        sums = self._global_sums([loss_sum, float(batch.num_tokens), *(stats_acc[k] for k in keys)])

        def finish() -> dict[str, float]:
            values = sums.tolist()  # the one device->host read of the step's stats
            # weighted means over the global batch (every micro-batch of every data-parallel rank)
            out_stats = {k: v if k.startswith("num_") else v / total_w for k, v in zip(keys, values[2:])}
            out_stats.update(loss=values[0] / total_w, tokens=values[1])  # tokens: the global batch's
            out_stats.update(self.runner.pop_stats())
            return out_stats

        return finish

    def _global_sums(self, values: list) -> torch.Tensor:
        """float64 [len(values)] of floats and device scalars, summed over the data-parallel ranks, built and
        reduced without a host sync (host floats travel through pinned memory)."""
        from archon_attn import to_device

        dev = self.device if self.dp_group is not None or any(isinstance(v, torch.Tensor) for v in values) \
            else torch.device("cpu")
        host = to_device(torch.tensor([0.0 if isinstance(v, torch.Tensor) else float(v) for v in values],
                                      dtype=torch.float64), dev)  # one non-blocking copy for every host float
        t = torch.stack([v.to(dev, torch.float64).reshape(()) if isinstance(v, torch.Tensor) else host[i]
                         for i, v in enumerate(values)])
        if self.dp_group is not None:
            dist.all_reduce(t, group=self.dp_group)
        return t

    def _clip_grad_norm(self, scale_grads: bool = True) -> torch.Tensor:
        """The global grad norm (before clipping); grads clipped in place unless `scale_grads` is False."""
        from archon_parallel.grad import clip_grad_norm_

        max_norm = self.cfg.optimizer.gradient_clipping
        return clip_grad_norm_(self._trainable_params(), max_norm if max_norm > 0 and scale_grads else float("inf"),
                               pp_group=self.meshes.group("pp") if self.meshes is not None and self.dims.pp > 1 else None)

    def _trainable_params(self) -> list[torch.Tensor]:
        """Parameters that require grad, listed once (the module tree is fixed after `initialize`; walking it
        costs milliseconds of host time per step, while the GPU waits for the step's first launch)."""
        if self._trainable is None:
            self._trainable = [p for p in self.model.parameters() if p.requires_grad]
        return self._trainable

    def _after_optimizer_step(self) -> None:
        if self._aux_free_moe is None:  # looked up once: a dense model skips the per-step module walk
            from archon_moe import TopKRouter

            self._aux_free_moe = any(isinstance(m, TopKRouter) and m.expert_bias is not None
                                     for m in self.model.modules())
        if self._aux_free_moe:
            from archon_moe import update_aux_free_biases

            update_aux_free_biases(self.model, group=self.dp_group)

    # -- state ----------------------------------------------------------------------------------------
    def offload(self) -> None:
        """Move parameters, gradients and optimizer state to host memory (e.g. for a colocated sampler)."""
        from archon.engine.offload import offload_engine

        offload_engine(self)

    def onload(self) -> None:
        from archon.engine.offload import onload_engine

        onload_engine(self)

    def _ensure_onloaded(self) -> None:
        if self._offloaded:
            raise RuntimeError("the engine is offloaded; call engine.onload() before forward/train")

    def export_weights(self, out_dir: str, *, dtype: torch.dtype | None = torch.bfloat16, merged: bool = True,
                       extra_files=None) -> None:
        """Write HF safetensors (config.json last) and a ready file carrying the weight version.

        With LoRA: `merged=True` ships base weights with the adapter folded in, `merged=False` the PEFT adapter.
        """
        from archon.engine.export import export_hf_weights

        export_hf_weights(self, out_dir, dtype=dtype, merged=merged, extra_files=extra_files)

    def save_adapter(self, out_dir: str) -> None:
        """Write the LoRA adapter in PEFT format with HF names (collective; rank 0 writes)."""
        from archon.lora_integration import save_adapter

        save_adapter(self.model, out_dir, base_path=self.cfg.path or None)

    def state_dict_for_sampler(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) native state dict in memory on every rank, for an embedded sampler (LoRA folded into
        the base; every pipeline stage's layers under p>1). Collective."""
        from archon.engine.export import sampler_state_dict

        return sampler_state_dict(self.model, self.device)


def make_runner(setup: EngineSetup, model, *, autocast: Callable[[], AbstractContextManager], meshes=None,
                dp_group=None) -> Runner:
    """The micro-batch runner of `setup`: context parallel (c>1, on `meshes["cp"]`), pipeline (p>1), a tree mode
    (`tree_training_mode`) or flat packed batches. `dp_group`: the ranks that see different data (tree metrics)."""
    a = setup.cfg.archon
    kw = dict(head=setup.head, device=setup.device, autocast=autocast, pad_multiple=setup.dims.tp,
              logprob_chunk_size=a.logprob_chunk_size)
    if setup.dims.cp > 1:  # validate_engine rejects cp with pp, tree modes or pad_to_maximum
        from archon.engine.cp_runner import ContextParallelRunner

        return ContextParallelRunner(model, cp_mesh=meshes["cp"], cp_impl=a.cp_impl, **kw)
    if setup.dims.pp > 1:  # pipeline stages (build_parallel_model builds them when pp > 1)
        from archon.engine.pipeline_runner import PipelineRunner

        return PipelineRunner(model, **kw)
    if a.tree_training_mode == "disabled":
        return FlatRunner(model, pad_to_tokens=setup.micro_batches.pad_to_tokens,
                          cuda_graphs=a.compile_mode == "reduce-overhead", **kw)
    from archon.tree import make_tree_runner

    return make_tree_runner(setup, model, dp_group=dp_group, **kw)


def describe_dims(dims) -> str:
    """One line with every parallel degree, logged at start-up."""
    return (f"pp={dims.pp}, dp_replicate={dims.dp_replicate}, dp_shard={dims.dp_shard}, tp={dims.tp}, "
            f"cp={dims.cp}, ep={dims.ep}, etp={dims.etp}, world_size={dims.world_size}")


def _skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer` can skip a non-finite step on the device (`found_inf`): torch's fused AdamW on plain
    CUDA tensors. DTensor parameters (FSDP2 / TP) and wrapped optimizers (ZeRO-1) take the host-side check."""
    if type(optimizer) is not torch.optim.AdamW or not getattr(optimizer, "_step_supports_amp_scaling", False):
        return False
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return all(g.get("fused") for g in optimizer.param_groups) and all(
        type(p) is torch.nn.Parameter and p.is_cuda for p in params)


def _dummy_batch(like: PackedBatch) -> PackedBatch:
    """A 2-token batch for ranks with no real micro-batch left (all ranks must run the same passes)."""
    ids = like.input_ids[:1].repeat(2)
    return PackedBatch(ids, torch.tensor([0, 2], dtype=torch.int32), torch.zeros(2),
                       {k: v[:1].repeat(2) for k, v in like.token_extras.items()},
                       {k: v[:1] for k, v in like.seq_extras.items()})
