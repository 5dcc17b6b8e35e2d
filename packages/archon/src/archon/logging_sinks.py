"""Where per-step metrics go besides metrics.jsonl: TensorBoard (`log.tensorboard: true`) and Weights & Biases
(`log.wandb: {project: NAME, mode: offline}`). Each sink is built once from the `log` config on rank 0; the
metrics logger calls `log(step, row)` on every sink and `close()` at the end."""

from __future__ import annotations

import os
from typing import Any, Literal, Protocol, cast

WandbMode = Literal["online", "offline", "disabled"]


class MetricsSink(Protocol):
    def log(self, step: int, row: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardSink:
    """Scalars into `run_dir/tensorboard` (torch.utils.tensorboard; needs the `tensorboard` package)."""

    def __init__(self, run_dir: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("log.tensorboard=true needs the tensorboard package: pip install 'archon[tensorboard]'"
                             ) from None
        self.dir = os.path.join(run_dir, "tensorboard")
        self.writer = SummaryWriter(log_dir=self.dir)

    def log(self, step: int, row: dict[str, Any]) -> None:
        for key, value in _scalars(row).items():
            self.writer.add_scalar(key, value, global_step=step)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """One W&B run per training run, files under `run_dir/wandb`; `mode: offline` needs no network
    (`wandb sync run_dir/wandb/offline-run-*` uploads it later)."""

    def __init__(self, run_dir: str, project: str, mode: WandbMode, name: str, config: dict | None = None) -> None:
        try:
            import wandb
        except ImportError:
            raise ValueError("log.wandb needs the wandb package: pip install 'archon[wandb]'") from None
        self.run = wandb.init(project=project, mode=mode, dir=run_dir, name=name or None, config=config,
                              reinit="create_new")

    def log(self, step: int, row: dict[str, Any]) -> None:
        self.run.log(_scalars(row), step=step)

    def close(self) -> None:
        self.run.finish()


def make_sinks(log_cfg, config: dict | None = None) -> list[MetricsSink]:
    """The sinks `log_cfg` (a LogConfig) asks for; call on the rank that writes metrics only."""
    sinks: list[MetricsSink] = []
    if log_cfg.tensorboard:
        sinks.append(TensorBoardSink(log_cfg.dir))
    wb = log_cfg.wandb
    if wb.project:
        # wb.mode is one of WandbMode: WandbConfig checks it when the config loads
        sinks.append(WandbSink(log_cfg.dir, wb.project, cast(WandbMode, wb.mode), wb.name, config))
    return sinks
