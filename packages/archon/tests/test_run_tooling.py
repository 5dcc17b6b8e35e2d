"""Around a run: TensorBoard and offline W&B receive the logged metrics, MFU / tokens-per-GPU and MoE router load
are in the metrics (FLOPs counted against the HF model's own weights), `archon plot` draws a PNG, and
`archon.from_pretrained(config.json)` random-inits like the CLI."""

import glob
import json
import shutil
from pathlib import Path

import pytest
import torch
from archon.cli import main
from archon.testing import tiny_hf_config

ROOT = Path(__file__).resolve().parents[3]
KEYS = {"loss", "grad_norm", "lr", "tokens_per_s", "tokens_per_s_per_gpu", "tflops_per_gpu", "mfu"}


def _rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _wandb_records(path: str) -> list:
    """Records of a W&B transaction log (`run-*.wandb`: ':W&B' header, then 32 KiB blocks of
    [crc32, length u16, type u8] chunks holding protobuf `Record`s)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if left < 7 or kind == 0:  # block trailer / zero padding
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def _items(items) -> dict:
    return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("sft") / "run"
    assert main(["train", str(ROOT / "examples/sft_tiny.yaml"), f"--actor.path={ROOT / 'examples/tiny_qwen3/config.json'}",
                 "--total_train_steps=3", "--device=cpu", f"--log.dir={run}", "--log.progress_bar=false",
                 "--log.tensorboard=true", "--log.wandb.project=archon-test", "--log.wandb.mode=offline"]) == 0
    return run


def test_tensorboard_and_offline_wandb_hold_the_logged_metrics(sft_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = _rows(sft_run)
    assert len(rows) == 3 and KEYS <= set(rows[-1])
    acc = EventAccumulator(str(sft_run / "tensorboard"))
    acc.Reload()
    assert KEYS <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3]
    assert [e.value for e in acc.Scalars("loss")] == pytest.approx([r["loss"] for r in rows], rel=1e-6)

    (log,) = glob.glob(str(sft_run / "wandb" / "offline-run-*" / "run-*.wandb"))
    records = _wandb_records(log)
    history = [_items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update(_items(r.summary.update))
    assert [h["_step"] for h in history] == [1, 2, 3]
    assert [h["loss"] for h in history] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    assert KEYS <= set(history[-1]) and KEYS <= set(summary)
    assert summary["mfu"] == pytest.approx(rows[-1]["mfu"], rel=1e-6)


def test_plot_writes_a_png_of_overlaid_runs(sft_run, tmp_path):
    import matplotlib.image

    other = tmp_path / "other"
    other.mkdir()
    rows = _rows(sft_run)
    (other / "metrics.jsonl").write_text("".join(json.dumps({**r, "loss": r["loss"] / 2}) + "\n" for r in rows))
    out = tmp_path / "plots" / "curves.png"
    assert main(["plot", str(sft_run), str(other), "--keys", "loss,grad_norm,reward", "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000
    img = matplotlib.image.imread(str(out))[..., :3]
    assert img.shape[0] > 200 and img.shape[1] > 600
    non_white = (img < 0.95).any(axis=-1).mean()
    assert 0.01 < non_white < 0.6, non_white  # axes, ticks and curves drawn, not a blank or black canvas
    colored = ((img.max(-1) - img.min(-1)) > 0.3).mean()  # the two runs' curves are coloured lines
    assert colored > 0.001
    assert main(["plot", str(sft_run), "--keys", "nothing", "--out", str(out)]) == 2


@pytest.mark.parametrize("moe", [False, True], ids=["qwen3", "qwen3_moe"])
def test_flops_per_token_counts_the_hf_models_matmul_weights(moe):
    from archon.hf import build_model
    from archon.mfu import dense_params_per_token, flops_per_token
    from transformers import AutoModelForCausalLM

    cfg = tiny_hf_config("qwen3_moe" if moe else "qwen3")
    hf = AutoModelForCausalLM.from_config(cfg)
    n = 0.0
    for name, p in hf.named_parameters():
        if "embed_tokens" in name or p.dim() < 2:
            continue
        if ".experts." in name:  # each token meets top_k of num_experts experts
            n += p.numel() * cfg.num_experts_per_tok / cfg.num_experts
        else:
            n += p.numel()
    args = build_model(cfg, device="meta").args
    assert dense_params_per_token(args) == n
    L, H, hd = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim
    assert flops_per_token(args, 100.0) == 6 * n + 6 * L * H * hd * 100.0


def test_moe_router_load_and_aux_loss_in_metrics(tmp_path):
    cfg_dir = tmp_path / "moe"
    cfg_dir.mkdir()
    tiny_hf_config("qwen3_moe", vocab_size=16, router_aux_loss_coef=0.01).to_json_file(str(cfg_dir / "config.json"))
    run = tmp_path / "run"
    assert main(["train", str(ROOT / "examples/sft_tiny.yaml"), f"--actor.path={cfg_dir / 'config.json'}",
                 "--total_train_steps=1", "--device=cpu", f"--log.dir={run}", "--log.progress_bar=false",
                 "--data.batch_size=4", "--actor.mb_max_tokens=100000"]) == 0
    (row,) = _rows(run)
    # one micro-batch: every token is routed to top_k = 2 of 8 experts in each layer
    assert row["moe_load_mean"] == pytest.approx(row["tokens"] * 2 / 8)
    assert row["moe_load_max"] >= row["moe_load_mean"]
    assert row["moe_load_max_over_mean"] == pytest.approx(row["moe_load_max"] / row["moe_load_mean"], rel=1e-5)
    assert row["moe_aux_loss"] > 0


def test_from_pretrained_config_json_random_inits_like_the_cli(tmp_path):
    import archon
    from archon.config.schema import ActorConfig
    from archon.engine.engine import ArchonEngine

    config = tmp_path / "config.json"
    shutil.copy(ROOT / "examples/tiny_qwen3/config.json", config)
    model = archon.from_pretrained(str(config), seed=7)
    engine = ArchonEngine(ActorConfig(path=str(config), dtype="float32", seed=7), device="cpu").initialize()
    want = engine.model.state_dict()
    got = model.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    other = archon.from_pretrained(str(tmp_path), seed=8, dtype=torch.bfloat16)  # the directory works too
    assert other.tok_embeddings.weight.dtype == torch.bfloat16
    assert not torch.equal(other.tok_embeddings.weight.float(), model.tok_embeddings.weight)


def test_step_clock_includes_the_data_read(tmp_path, monkeypatch):
    """tokens/s and MFU time a whole step: a data read of 0.3 s (slow tokenization, a slow disk) is in it."""
    import time

    import archon.train

    real, delay = archon.train._data, 0.3

    def slow_data(*args, **kwargs):
        for batch in real(*args, **kwargs):
            time.sleep(delay)
            yield batch

    monkeypatch.setattr(archon.train, "_data", slow_data)
    run = tmp_path / "run"
    assert main(["train", str(ROOT / "examples/sft_tiny.yaml"), f"--actor.path={ROOT / 'examples/tiny_qwen3/config.json'}",
                 "--total_train_steps=3", "--device=cpu", f"--log.dir={run}", "--log.progress_bar=false",
                 "--data.batch_size=2"]) == 0
    rows = _rows(run)
    for r in rows[1:]:  # the first batch is read (and checked) before the first step's clock starts
        step_s = r["tokens"] / r["tokens_per_s"]
        assert step_s >= delay, (step_s, r["step_time"])
        assert step_s - r["step_time"] >= delay * 0.9  # train_batch's own time does not hold the read
        assert r["tokens_per_s_per_gpu"] == pytest.approx(r["tokens_per_s"], rel=1e-5)
