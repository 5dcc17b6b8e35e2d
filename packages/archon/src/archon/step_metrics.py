"""Per-step throughput and MoE router metrics added to the training metrics (`archon train`, `archon rl`).

- `tokens_per_s_per_gpu`, `tflops_per_gpu`, `mfu` (against `mfu_peak_tflops`, see `archon.mfu`);
- MoE models: `moe_load_max` / `moe_load_mean` (tokens per expert in the most loaded layer, over the
  data-parallel ranks), `moe_load_max_over_mean` (that layer's imbalance), `moe_aux_loss` (the summed
  load-balancing loss added to the training loss; 0 when `router_aux_loss_coef` is 0). Routing counts are
  those of the step's last micro-batch forward.
"""

from __future__ import annotations

from archon.mfu import device_peak_tflops, flops_per_token, mean_attn_len


class StepMetrics:
    """Built once per engine; `__call__(batch, tokens, seconds)` returns the step's extra metrics."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.args = engine.model.args
        self.peak, self.peak_source = device_peak_tflops(engine.device)
        self.is_moe = self.args.num_experts > 0

    def __call__(self, batch, tokens: float, seconds: float) -> dict[str, float]:
        """`tokens`: the global batch's tokens (all ranks); `batch`: this rank's PackedBatch."""
        per_gpu = tokens / max(seconds, 1e-9) / self.engine.world_size
        tflops = flops_per_token(self.args, mean_attn_len(batch.cu_seqlens)) * per_gpu / 1e12
        out = {"tokens_per_s_per_gpu": per_gpu, "tflops_per_gpu": tflops, "mfu": tflops / self.peak,
               "mfu_peak_tflops": self.peak}
        if self.is_moe:
            out.update(moe_summary(self.engine))
        return out


def moe_summary(engine) -> dict[str, float]:
    """Router load of the most imbalanced MoE layer and the summed aux loss (collective over the dp group)."""
    from archon_moe import moe_load_metrics

    per_layer = moe_load_metrics(engine.model, prefix="moe", group=engine.dp_group)
    if not per_layer:
        return {}
    layers = sorted({k.rsplit("/", 1)[0] for k in per_layer})
    worst = max(layers, key=lambda p: per_layer[f"{p}/load_max_over_mean"])
    return {"moe_load_max": per_layer[f"{worst}/load_max"], "moe_load_mean": per_layer[f"{worst}/load_mean"],
            "moe_load_max_over_mean": per_layer[f"{worst}/load_max_over_mean"],
            "moe_aux_loss": sum(per_layer[f"{p}/aux_loss"] for p in layers)}
