"""`archon train` resumes exactly: 6 steps straight == 3 steps + checkpoint, a crash, then NEW processes resuming
with --checkpoint.resume=auto for 3 more (2 gloo ranks, fp32): bitwise equal losses / metrics and final params."""

import json
from pathlib import Path

import torch
from archon_parallel.testing import run_ranks

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = str(ROOT / "examples" / "sft_tiny.yaml")
TIMING = ("step_time", "tokens_per_s", "peak_mem_gb", "tokens_per_s_per_gpu", "tflops_per_gpu", "mfu", "mfu_peak_tflops")  # wall clock, measured peak


class _Crash(BaseException):
    """Not an Exception: it passes the CLI's error boundary like a kill would."""


def _runs(rank, world, runs):
    return [_train_cli(rank, world, args, crash_after) for args, crash_after in runs]


def _train_cli(rank, world, args, crash_after):
    """`archon train` through the CLI entry point; optionally crash (exception) on optimizer step crash_after + 1."""
    from archon.cli import main
    from archon.engine.engine import ArchonEngine

    history = []
    original = ArchonEngine.train_batch

    def train_batch(self, *a, **kw):
        if crash_after is not None and len(history) == crash_after:
            raise _Crash()
        stats = original(self, *a, **kw)
        history.append(dict(stats))
        return stats

    ArchonEngine.train_batch = train_batch
    try:
        rc = main(["train", EXAMPLE, *args])
        assert rc == 0
    except _Crash:
        pass
    finally:
        ArchonEngine.train_batch = original
    return [h["loss"] for h in history]


def _final_params(ckpt_root: Path) -> dict[str, torch.Tensor]:
    from archon_ckpt import Checkpointer, iter_dcp_tensors

    c = Checkpointer(str(ckpt_root))
    return dict(iter_dcp_tensors(str(c.step_path(c.latest_step())), prefix="model."))


def _metrics(log_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_cli_resume_is_exact_on_two_ranks(tmp_path):
    common = ["--allocation_mode=archon:d2", "--device=cpu", "--total_train_steps=6", "--data.batch_size=8",
              "--data.num_digits=4", "--log.progress_bar=false", "--actor.mb_max_tokens=64",
              "--actor.optimizer.warmup_steps_proportion=0.34"]  # cosine + warmup: the schedule must resume too
    a = common + [f"--log.dir={tmp_path / 'a'}", f"--checkpoint.dir={tmp_path / 'ca'}"]
    b = common + [f"--log.dir={tmp_path / 'b'}", f"--checkpoint.dir={tmp_path / 'cb'}"]
    res = run_ranks(_runs, 2, [(a, None), (b + ["--checkpoint.every_n_steps=3"], 3)], timeout=400)
    straight, first = [r[0] for r in res], [r[1] for r in res]
    resumed = run_ranks(_train_cli, 2, b + ["--checkpoint.resume=auto"], None, timeout=300)  # new processes
    assert len(straight[0]) == 6 and len(first[0]) == 3 and len(resumed[0]) == 3
    for r in range(2):
        assert first[r] + resumed[r] == straight[r]  # bitwise
    assert _metrics(tmp_path / "a") == _metrics(tmp_path / "b")
    assert [r["step"] for r in _metrics(tmp_path / "b")] == [1, 2, 3, 4, 5, 6]
    want, got = _final_params(tmp_path / "ca"), _final_params(tmp_path / "cb")
    assert want.keys() == got.keys() and len(want) > 0
    for k in want:
        assert torch.equal(want[k], got[k]), k
