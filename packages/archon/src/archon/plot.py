"""`archon plot RUN_DIR [RUN_DIR ...] [--keys loss,reward] [--out FILE.png]`: metrics.jsonl curves, one panel
per key, every run overlaid (matplotlib, Agg backend: no display needed). Needs the `plot` extra."""

from __future__ import annotations

import json
import math
import os


def read_metrics(run: str) -> list[dict]:
    """The rows of a run's metrics.jsonl (`run` is the run directory or the file itself)."""
    path = os.path.join(run, "metrics.jsonl") if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise ValueError(f"{run!r} has no metrics.jsonl; pass the run directory of `archon train` / `archon rl` "
                         "(its log.dir)")
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {lineno}: not JSON ({e.msg}); is the file truncated?") from None
    return rows


def plot_runs(runs: list[str], keys: list[str], out: str) -> None:
    """Draw `keys` (one panel each) against `step` for every run into the PNG `out`."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("archon plot needs matplotlib: pip install 'archon[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not keys:
        raise ValueError("--keys is empty; name at least one metric, e.g. --keys loss")
    data = {run: read_metrics(run) for run in runs}
    found = [k for k in keys if any(k in row for rows in data.values() for row in rows)]
    if not found:
        have = sorted({k for rows in data.values() for row in rows for k in row} - {"step"})
        raise ValueError(f"none of --keys {keys} is in the runs' metrics; available: {have}")
    cols = min(len(found), 2)
    fig, axes = plt.subplots(math.ceil(len(found) / cols), cols, figsize=(6 * cols, 3.6 * math.ceil(len(found) / cols)),
                             squeeze=False)
    labels = _labels(runs)
    for ax, key in zip(axes.flat, found):
        for run, rows in data.items():
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "step" in r]
            if pts:
                ax.plot(*zip(*pts), label=labels[run], linewidth=1.2)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(found):]:
        ax.set_visible(False)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    missing = [k for k in keys if k not in found]
    if missing:
        print(f"archon plot: no values for {missing} in these runs (skipped)")
    print(f"archon plot: wrote {out}")


def _labels(runs: list[str]) -> dict[str, str]:
    names = {r: os.path.basename(os.path.normpath(r if os.path.isdir(r) else os.path.dirname(r) or ".")) for r in runs}
    return names if len(set(names.values())) == len(runs) else {r: r for r in runs}
