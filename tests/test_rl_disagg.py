"""`archon rl` with rollout servers (`sglang:dN+archon:...`) on CPU, against the colocated run as the reference.

Two `archon serve` processes (127.0.0.1, free ports) are started once for the module; each run connects to them
with `rollout.launch=none` and loads its own starting weights on them, so every run is independent. With
max_staleness 0 every response samples from the seed (seed, step, index) on a server holding the trainer's fp32
weights, so a disaggregated run equals the colocated one: the same rollouts, and weights equal up to float
summation order (the servers' behaviour logprobs come from other batch compositions).
"""

import json
import os
import signal
import sys
from pathlib import Path

import archon
import pytest
import torch
from archon.config.fields import load_config
from archon.rl import RLConfig, RLTrainer
from archon.rl.servers import ServerDiedError, ServerGroup, ServerSpec, free_port
from archon_parallel.testing import run_ranks

pytestmark = pytest.mark.timeout(400)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples/tiny_qwen3/config.json"
TIMINGS = {"gen_time", "gen_tokens_per_s", "step_time", "train_time", "tokens_per_s", "peak_mem_gb", "wait_time",
           "sync_time", "server_queue", "batches_ahead", "staleness_mean", "staleness_max", "server_version"}
ROLLOUT_KEYS = ("reward", "reward_max", "reward_min", "response_len", "stop_frac")
BASE = ["--total_train_steps=3", "--rl.sft_warmup_steps=2", "--rl.batch_size=32", "--rl.n_minibatches=1",
        "--log.progress_bar=false", "--device=cpu", f"--actor.path={TINY}",
        f"--reward.fn={ROOT / 'examples/rewards.py'}:digit_reward"]


SERVER_GROUP: list[ServerGroup] = []  # the module's servers (a test stops one of them)


def _run(log_dir: str, *overrides: str, callbacks=()) -> dict:
    cfg = load_config(RLConfig, str(ROOT / "examples/grpo_tiny.yaml"), [*BASE, f"--log.dir={log_dir}", *overrides])
    trainer = RLTrainer(cfg, weight_callbacks=callbacks)
    history = trainer.run()
    params = {n: p.full_tensor() if hasattr(p, "full_tensor") else p for n, p in
              trainer.engine.state_dict_for_sampler().items()}
    return {"history": history, "params": {n: p.detach().clone() for n, p in params.items()}}


def _remote(addresses: list[str]) -> list[str]:
    return ["--rollout.launch=none", f"--rollout.addresses=[{','.join(addresses)}]"]


def _ranks(rank: int, world: int, log_dir: str, extra: list[str]) -> dict:
    return _run(f"{log_dir}/r{rank}", *extra)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("served"))
    archon.save_pretrained(archon.from_pretrained(json.loads(TINY.read_text()), seed=5), model_dir)  # every run loads its own
    specs = []
    for i in range(2):
        port = free_port()
        specs.append(ServerSpec(f"server {i}", [sys.executable, "-m", "archon", "serve", model_dir, "--host",
                                                "127.0.0.1", "--port", str(port), "--device", "cpu"],
                                "127.0.0.1", port, {"OMP_NUM_THREADS": "1"}))
    with ServerGroup(specs, str(tmp_path_factory.mktemp("server_logs"))) as group:
        group.wait_healthy(240)
        SERVER_GROUP[:] = [group]
        yield group.addresses


@pytest.fixture(scope="module")
def colocated(tmp_path_factory) -> dict:
    return _run(str(tmp_path_factory.mktemp("colocated")))


def _assert_same_run(ref: dict, got: dict, weight_tol: float) -> None:
    assert len(ref["history"]) == len(got["history"])
    for a, b in zip(ref["history"], got["history"]):
        for key in ROLLOUT_KEYS:  # the same rollouts
            assert a[key] == b[key], (key, a[key], b[key])
        for key in sorted(k for k in a.keys() & b.keys() if k not in TIMINGS):
            assert abs(a[key] - b[key]) <= 1e-4 * max(abs(a[key]), 1e-3), (key, a[key], b[key])
    for n, p in ref["params"].items():
        err = float((got["params"][n] - p).abs().max())
        assert err <= weight_tol, f"{n}: max |diff| {err:.2e}"


def test_one_server_synchronous_equals_colocated(servers, colocated, tmp_path):
    got = _run(str(tmp_path), "--allocation_mode=sglang:d1+archon:d1", *_remote(servers[:1]))
    _assert_same_run(colocated, got, 1e-6)
    assert all(h["staleness_max"] == 0 for h in got["history"])


def _layouts(rank: int, world: int, log_dir: str, runs: list[list[str]]) -> list[dict]:
    return [_run(f"{log_dir}/{i}/r{rank}", *extra) for i, extra in enumerate(runs)]


def test_fsdp2_tp_pp_trainers_equal_colocated(servers, colocated, tmp_path):
    """2 servers + FSDP2 d2, then 1 server + t2 and + p2, in the same two ranks (one spawn)."""
    runs = [["--allocation_mode=sglang:d2+archon:d2", *_remote(servers)],  # dp_layout fsdp (the default)
            ["--allocation_mode=sglang:d1+archon:t2", *_remote(servers[1:])],
            ["--allocation_mode=sglang:d1+archon:p2", *_remote(servers[:1])]]
    for rank_runs in run_ranks(_layouts, 2, str(tmp_path), runs, timeout=380):
        for got in rank_runs:
            # Rollouts equal; weights within 5e-5: gradients summed in another order differ by ~1e-7, and AdamW's
            # normalised steps (lr 2e-3) lift that on near-zero gradients to ~1e-5 (as between zero1 replicas).
            _assert_same_run(colocated, got, 5e-5)


def test_staleness_two_is_bounded_and_uses_the_decoupled_loss(servers, tmp_path):
    """Weights by gloo broadcast to both servers while generation runs ahead."""
    got = _run(str(tmp_path), "--allocation_mode=sglang:d2+archon:d1", "--rl.max_staleness=2",
               "--total_train_steps=5", "--rollout.weight_sync=broadcast", *_remote(servers))
    lags = [h["staleness_max"] for h in got["history"]]
    assert max(lags) <= 2 and lags[0] == 0, lags
    assert max(lags) >= 1, lags  # batches 0-2 were sent before the first update: the loop ran ahead
    assert all("behav_imp_weight_mean" in h for h in got["history"])  # decoupled PPO (prox logprobs)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in got["history"])


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _killer(seen: dict, kill):
    def callback(_sd, _version):  # after the first step's update
        if "killed" not in seen:
            seen["killed"] = kill(seen["trainer"])
    return callback


def test_a_lost_server_is_dropped_with_allow_server_loss(servers, tmp_path):
    """Server 1 of the module is killed after step 1 (no later test uses it); the run goes on with server 0."""
    seen: dict = {}

    def kill(_trainer):
        group = SERVER_GROUP[0]
        os.kill(group.pids[1], signal.SIGKILL)
        group.procs[1].wait(10)
        return servers[1]

    cfg = load_config(RLConfig, str(ROOT / "examples/grpo_tiny.yaml"),
                      [*BASE, f"--log.dir={tmp_path}", "--allocation_mode=sglang:d2+archon:d1", *_remote(servers),
                       "--rollout.allow_server_loss=true"])
    seen["trainer"] = trainer = RLTrainer(cfg, weight_callbacks=[_killer(seen, kill)])
    history = trainer.run()
    assert seen["killed"] and len(history) == 3 and trainer.source.lost == {1}


def test_a_killed_server_stops_the_run_naming_it(tmp_path):
    """The run starts its own server (launch=archon); it is killed after step 1: a clear error, nothing left."""
    seen: dict = {}

    def kill(trainer):
        group = trainer.source.group
        seen["pids"] = list(group.pids)
        os.kill(group.pids[0], signal.SIGKILL)
        group.procs[0].wait(10)
        return group.specs[0].name

    cfg = load_config(RLConfig, str(ROOT / "examples/grpo_tiny.yaml"),
                      [*BASE, f"--log.dir={tmp_path}", "--allocation_mode=sglang:d1+archon:d1",
                       "--rollout.startup_timeout_s=240"])
    seen["trainer"] = trainer = RLTrainer(cfg, weight_callbacks=[_killer(seen, kill)])
    with pytest.raises(ServerDiedError) as info:
        trainer.run()
    message = str(info.value)
    assert seen["killed"] in message and "exited" in message and "rollout.allow_server_loss" in message
    assert not any(_alive(p) for p in seen["pids"])  # nothing left behind


@pytest.fixture
def slow_only(request):
    if "slow" not in (request.config.getoption("-m") or ""):
        pytest.skip("long-running: run with -m slow")


@pytest.mark.slow
def test_two_servers_learn_like_colocated(slow_only, tmp_path):
    """The issue's bar: 2 servers + an FSDP2 d2 trainer gain >= 0.3 mean reward within the steps the colocated
    run needs; so does max_staleness 2 (here with a d1 trainer). 20 RL steps of the full example batch."""
    steps = ["--total_train_steps=20", "--rl.batch_size=128", "--rl.sft_warmup_steps=20", "--rl.n_minibatches=2"]
    ref = _run(str(tmp_path / "colocated"), *steps)["history"]
    # the servers are the run's own (launch=archon), started and stopped with it
    two = run_ranks(_ranks, 2, str(tmp_path / "d2"), [*steps, "--allocation_mode=sglang:d2+archon:d2"],
                    timeout=1800)[0]["history"]
    stale = _run(str(tmp_path / "stale"), *steps, "--allocation_mode=sglang:d2+archon:d1",
                 "--rl.max_staleness=2")["history"]

    def gain(h):
        return sum(x["reward"] for x in h[-3:]) / 3 - h[0]["reward"]

    print(f"reward gain over 20 steps: colocated {gain(ref):.3f}, 2 servers + d2 {gain(two):.3f}, "
          f"max_staleness 2 {gain(stale):.3f}")
    assert gain(ref) >= 0.3 and gain(two) >= 0.3 and gain(stale) >= 0.3
    assert max(x["staleness_max"] for x in stale) <= 2
