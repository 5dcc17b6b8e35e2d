"""`archon train`: language-model / SFT training driven by a TrainConfig."""

from __future__ import annotations

import itertools
import logging
import os
import time

import torch

from archon.config.schema import TrainConfig
from archon.config.validate import validate_no_inference
from archon.engine.batch import PackedBatch
from archon.engine.engine import ArchonEngine
from archon.engine.metrics import MetricsLogger, peak_memory_gb
from archon.engine.setup import resolve_setup
from archon.logging_sinks import make_sinks
from archon.run_guard import RunGuard, check_token_ids, init_process_group
from archon.step_metrics import StepMetrics

log = logging.getLogger("archon")


def sft_loss(outputs: dict[str, torch.Tensor], mb: PackedBatch) -> tuple[torch.Tensor, dict]:
    """Negative log-likelihood summed over the micro-batch's target tokens (the engine normalises)."""
    mask = mb.loss_mask.to(outputs["logprobs"].device)
    n = mask.sum().clamp(min=1)
    nll = -(outputs["logprobs"] * mask).sum()
    stats = {"entropy": (outputs["entropy"] * mask).sum().detach() / n} if "entropy" in outputs else {}
    return nll, stats


sft_loss.token_separable = True  # type: ignore[attr-defined]  # per-token NLL: DTA may skip its outputs pass


def target_tokens(mb: PackedBatch) -> float:
    return float(mb.loss_mask.sum())


def _data(cfg: TrainConfig, engine: ArchonEngine, start_step: int):
    from archon.data import jsonl_batches, synthetic_batches

    dp_rank, dp_world = engine.dp_rank_world()
    if cfg.data.task == "jsonl":
        return jsonl_batches(cfg.data.path, cfg.data.batch_size, rank=dp_rank, world=dp_world, start_step=start_step)
    return synthetic_batches(cfg.data.task, cfg.data.batch_size, cfg.data.num_digits, cfg.data.seed,
                             rank=dp_rank, world=dp_world, start_step=start_step)


def _config_dict(cfg) -> dict:
    import dataclasses

    return dataclasses.asdict(cfg)


def _text_data(cfg: TrainConfig, engine: ArchonEngine):
    """SFT examples from text records (a resumable Stateful: the checkpoint keeps its position)."""
    from archon.data.text import SFTData, build_chat, check_vocab, open_records

    d = cfg.data
    chat = build_chat(d, cfg.actor.path)
    check_vocab(chat.tok, engine.model.args.vocab_size)
    dp_rank, dp_world = engine.dp_rank_world()
    return SFTData(d, chat, open_records(d, d.path, d.seed), d.batch_size, d.seed, rank=dp_rank, world=dp_world)


def run_train(cfg: TrainConfig) -> list[dict]:
    validate_no_inference(cfg.allocation_mode)
    cfg.data.validate_text(cfg.data.path, "train")
    setup = resolve_setup(cfg.actor, allocation_mode=cfg.allocation_mode, total_steps=cfg.total_train_steps,
                          device=cfg.device)  # every rule checked before the process group exists
    init_process_group(setup.device, cfg.distributed.timeout_s)
    engine = ArchonEngine(setup).initialize()
    ckpt = None
    start = 0
    text = _text_data(cfg, engine) if cfg.data.source != "synthetic" else None
    if cfg.checkpoint.dir:
        from archon.engine.checkpoint import EngineCheckpointer

        ckpt = EngineCheckpointer(engine, cfg.checkpoint)
        if text is not None:
            ckpt.extra_state["data"] = text
        start = ckpt.maybe_resume()
    guard = RunGuard(max_skipped_steps=cfg.max_skipped_steps, timeout_s=cfg.distributed.timeout_s)
    guard.check_start(start, cfg.total_train_steps, cfg.checkpoint.dir)
    vocab = engine.model.args.vocab_size if text is None and cfg.data.task == "jsonl" else None
    if text is not None:
        data = iter(text)  # its position came back with the checkpoint
    else:
        data = _data(cfg, engine, start)
        first = next(data)  # read (and check) the data before anything is written
        if vocab is not None:
            check_token_ids(first.input_ids, vocab, f"data.path {cfg.data.path!r}")
        data = itertools.chain([first], data)
    metrics = MetricsLogger(cfg.log.dir, cfg.total_train_steps, enabled=engine.rank == 0,
                            progress_bar=cfg.log.progress_bar, start_step=start,
                            sinks=make_sinks(cfg.log, _config_dict(cfg)) if engine.rank == 0 else [])
    step_metrics = StepMetrics(engine)
    history = []
    for step in range(start, cfg.total_train_steps):
        # The step's clock (tokens/s, MFU) runs from this boundary, where the previous step's kernels have all
        # ended, through the data (read, tokenized, packed on the host) and train_batch to its last kernel.
        t0 = time.perf_counter()
        batch = next(data)
        if vocab is not None:
            check_token_ids(batch.input_ids, vocab, f"data.path {cfg.data.path!r}")
        with guard.step(step + 1):
            stats = engine.train_batch(batch, sft_loss, target_tokens)
            if engine.device.type == "cuda":  # the step's kernels, not just their launch
                torch.cuda.synchronize(engine.device)
        dt = time.perf_counter() - t0
        stats.update(tokens_per_s=stats["tokens"] / max(dt, 1e-9),  # the global batch's tokens (all DP ranks)
                     peak_mem_gb=peak_memory_gb(engine.device), **step_metrics(batch, stats["tokens"], dt))
        metrics.log(step + 1, stats)
        history.append(stats)
        guard.after_step(step + 1, stats)
        if ckpt is not None:
            ckpt.after_step(step + 1)
    if ckpt is not None:
        ckpt.finish(cfg.total_train_steps)
    guard.close()
    metrics.close()
    if engine.rank == 0:
        log.info("done: %d steps, metrics in %s", cfg.total_train_steps, os.path.join(cfg.log.dir, "metrics.jsonl"))
    return history
