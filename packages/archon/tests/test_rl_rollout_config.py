"""The inference part of `allocation_mode` and the `rollout` section: every wrong combination is one
`archon: error:` line naming the rule, before any engine or process group exists."""

from pathlib import Path

import pytest
from archon.cli import main
from archon.config.fields import load_config
from archon.rl import RLConfig
from archon.rl.rollout_config import RolloutSection, resolve_rollout
from archon.rl.servers import free_port, plan_placement

ROOT = Path(__file__).resolve().parents[3]
GRPO = str(ROOT / "examples/grpo_tiny.yaml")
BASE = [f"--actor.path={ROOT / 'examples/tiny_qwen3/config.json'}", f"--reward.fn={ROOT / 'examples/rewards.py'}:"
        "digit_reward", "--device=cpu", "--log.progress_bar=false"]


def _cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("overrides, message", [
    (["--allocation_mode=vllm:d2+archon:d1"], "rule rollout-vllm-unsupported: allocation_mode 'vllm:d2\\+archon:d1'"),
    (["--allocation_mode=sglang:d1t2+archon:d1"], "rule rollout-archon-no-model-parallel.*has t2"),
    (["--allocation_mode=sglang:d2+archon:d1", "--rollout.launch=none", "--rollout.addresses=[127.0.0.1:1]"],
     "rule rollout-addresses-count.*lists 1 server"),
    (["--allocation_mode=sglang:d1+archon:d1", "--rollout.addresses=[127.0.0.1:1]"],
     "rule rollout-addresses-with-launch"),
    (["--rl.max_staleness=1"], "rule staleness-needs-servers"),
    (["--rollout.addresses=[127.0.0.1:1]"], "rule rollout-addresses-need-servers"),
    (["--allocation_mode=sglang:d1+archon:d1", "--rollout.launch=vllm"], "rollout.launch 'vllm' is not one of"),
    (["--allocation_mode=sglang:d1+archon:d1", "--rollout.weight_sync=nfs"], "rollout.weight_sync 'nfs'"),
    (["--allocation_mode=sglang:d1+archon:d1", "--rollout.weight_bucket_mb=0"], "rollout.weight_bucket_mb must be"),
    (["--rl.behav_imp_weight_cap=5"], "rl.behav_imp_weight_cap caps the decoupled-PPO weight"),
])
def test_rl_rejects_bad_rollout_settings(capsys, tmp_path, overrides, message):
    import re

    code, err = _cli(capsys, "rl", GRPO, *BASE, f"--log.dir={tmp_path}", *overrides)
    assert code == 2
    assert err.startswith("archon: error: ") and re.search(message, err), err
    assert not (tmp_path / "metrics.jsonl").exists()  # rejected before anything ran


def test_train_rejects_an_inference_part(capsys, tmp_path):
    code, err = _cli(capsys, "train", str(ROOT / "examples/sft_tiny.yaml"), "--allocation_mode=sglang:d2+archon:d1",
                     f"--actor.path={ROOT / 'examples/tiny_qwen3/config.json'}", f"--log.dir={tmp_path}")
    assert code == 2 and "rule inference-part-needs-rl" in err and "drop 'sglang:d2+'" in err, err


def test_unreachable_servers_are_one_error_line(capsys, tmp_path):
    port = free_port()  # nothing listens there
    code, err = _cli(capsys, "rl", GRPO, *BASE, f"--log.dir={tmp_path}", "--allocation_mode=sglang:d1+archon:d1",
                     "--rollout.launch=none", f"--rollout.addresses=[127.0.0.1:{port}]", "--rl.sft_warmup_steps=0",
                     "--rollout.startup_timeout_s=1")
    assert code == 1 and err.startswith("archon: error: rollout servers of rollout.addresses did not answer"), err
    assert f"127.0.0.1:{port}" in err and "Traceback" not in err


def test_sglang_launch_takes_model_parallel_servers():
    plan = resolve_rollout("sglang:d2t2+archon:d4", RolloutSection(launch="sglang"))
    assert (plan.num_servers, plan.tp, plan.gpus_per_server, plan.launch) == (2, 2, 2, "sglang")
    assert resolve_rollout("archon:d2", RolloutSection()) is None
    cfg = load_config(RLConfig, GRPO, [*BASE, "--allocation_mode=sglang:d1+archon:d1", "--rl.max_staleness=2"])
    cfg.validate()


def test_placement_inference_first_then_trainer():
    plan = resolve_rollout("sglang:d2t2+archon:d4", RolloutSection(launch="sglang"))
    p = plan_placement(plan, 4, "cuda", 8)
    assert p.server_gpus == ((0, 1), (2, 3)) and [p.trainer_device(r) for r in range(4)] == [
        "cuda:4", "cuda:5", "cuda:6", "cuda:7"]
    one = plan_placement(resolve_rollout("sglang:d1+archon:d1", RolloutSection()), 1, "cuda", 1)
    assert one.shared and one.server_gpus == ((0,),) and one.trainer_device(0) == "cuda:0"
    with pytest.raises(ValueError, match="rule placement-gpus: 2 rollout server.*need 8 GPUs on this host but 4"):
        plan_placement(plan, 4, "cuda", 4)
    cpu = plan_placement(plan, 4, "cpu", 0)
    assert cpu.server_gpus == ((), ()) and cpu.trainer_device(3) == "cpu"
