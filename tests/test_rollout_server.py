"""`archon serve` + `RolloutClient` on CPU with a real server process on 127.0.0.1 (started once for the module).

References are independent of the server: the in-process sampler (`archon_rl.generate` on a model loaded here)
for outputs, and a single-process HF export for weights synced from multi-rank trainers.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import archon
import pytest
import torch
from archon.engine.weight_sync import BroadcastWeightSync, DiskWeightSync
from archon.hf import iter_hf_tensors
from archon.rl.sampler import decoder_forward_fn
from archon_parallel.testing import free_port, run_ranks
from archon_rl import GenRequest, SamplingConfig, generate
from archon_rl.client import RolloutClient, RolloutRequestError, RolloutServerError

pytestmark = pytest.mark.timeout(240)

TINY = json.loads((Path(__file__).parents[1] / "examples/tiny_qwen3/config.json").read_text())
PROMPTS = [[1, 5, 7, 2], [4, 4], [9, 8, 7, 6, 5, 4, 3], [2]]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, str]:
    """Three tiny checkpoints with different random weights (m0 served first)."""
    out = {}
    for seed in range(3):
        d = str(tmp_path_factory.mktemp(f"m{seed}"))
        archon.save_pretrained(archon.from_pretrained(TINY, seed=seed), d)
        out[f"m{seed}"] = d
    return out


@pytest.fixture(scope="module")
def server(dirs):
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "archon", "serve", dirs["m0"], "--host", "127.0.0.1", "--port",
                             str(port), "--device", "cpu", "--batch-wait-ms", "150"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        client = RolloutClient([url], timeout=60, retries=1)
        try:
            deadline = time.monotonic() + 120
            while not all(client.health()):
                assert proc.poll() is None, f"archon serve exited: {proc.stderr.read()}"
                assert time.monotonic() < deadline, "archon serve not healthy within 120 s"
                time.sleep(0.3)
        finally:
            client.close()
        yield {"url": url, "proc": proc}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)


@pytest.fixture
def client(server):
    with RolloutClient([server["url"]], timeout=60, retries=1) as c:
        yield c


def reference(model_dir: str, prompts, cfg: SamplingConfig, seeds=None):
    model = archon.from_pretrained(model_dir, dtype=torch.float32).eval()
    gen = generate(decoder_forward_fn(model), prompts, cfg, seeds=None if seeds is None else torch.tensor(seeds))
    return gen.responses(), gen.response_logprobs()


def assert_matches(results, ref_ids, ref_lps, version: str | None = None):
    for r, ids, lps in zip(results, ref_ids, ref_lps, strict=True):
        assert r.output_ids == ids
        assert torch.allclose(torch.tensor(r.logprobs), torch.tensor(lps), atol=1e-5, rtol=0)
        if version is not None:
            assert r.weight_version == version


def post(url: str, path: str, body: bytes | dict) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def server_weights(client: RolloutClient, names) -> dict[str, torch.Tensor]:
    return {n: torch.tensor(client.get_weights_by_name(n, truncate_size=1 << 20)[0]) for n in names}


# ------------------------------------------------------------------------------------------------------------
def test_greedy_and_seeded_equal_in_process_sampler(server, client, dirs):
    greedy = SamplingConfig(max_new_tokens=6, temperature=0.0, stop_token_ids=[3])
    ref_ids, ref_lps = reference(dirs["m0"], PROMPTS, greedy)
    assert_matches(client.generate([GenRequest(p, greedy) for p in PROMPTS]), ref_ids, ref_lps, "0")
    # one HTTP batch (input_ids as a list of lists) answers a JSON list in order
    status, answers = post(server["url"], "/generate", {"input_ids": PROMPTS, "return_logprob": True,
                                                        "sampling_params": {"max_new_tokens": 6, "temperature": 0,
                                                                            "stop_token_ids": [3]}})
    assert status == 200 and [a["output_ids"] for a in answers] == ref_ids
    fr = answers[0]["meta_info"]["finish_reason"]
    assert fr == ({"type": "stop", "matched": 3} if ref_ids[0][-1] == 3 else {"type": "length", "length": 6})
    # sampled with per-request seeds: the same tokens as the in-process sampler with those row seeds
    sampled = SamplingConfig(max_new_tokens=5, temperature=0.8, top_k=10, top_p=0.9)
    seeds = [11, 22, 33, 44]
    ref_ids, ref_lps = reference(dirs["m0"], PROMPTS, sampled, seeds)
    assert_matches(client.generate([GenRequest(p, sampled, s) for p, s in zip(PROMPTS, seeds)]), ref_ids, ref_lps)


def test_three_concurrent_clients_batched(server, dirs):
    """Three clients' requests wait in the queue together (held by a pause, so CI load cannot split them) and are
    generated in one batch; each client gets its own answer."""
    cfg = SamplingConfig(max_new_tokens=4, temperature=0.0)
    ref_ids, ref_lps = reference(dirs["m0"], PROMPTS[:3], cfg)
    out: list = [None] * 3

    def run(i: int) -> None:
        with RolloutClient([server["url"]], timeout=60) as c:
            out[i] = c.generate([GenRequest(PROMPTS[i], cfg)])[0]

    with RolloutClient([server["url"]]) as admin:
        before = admin.get_server_info()[0]["batch_size_histogram"].get("3", 0)
        admin.pause_generation("in_place")
        threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        [t.start() for t in threads]
        deadline = time.monotonic() + 60
        while admin.get_server_info()[0]["queued"] < 3:
            assert time.monotonic() < deadline, "the three requests never reached the server"
            time.sleep(0.05)
        admin.continue_generation()
        [t.join(60) for t in threads]
        assert_matches(out, ref_ids, ref_lps)
        assert admin.get_server_info()[0]["batch_size_histogram"].get("3", 0) == before + 1


BAD = [
    b"{not json",
    [1, 2, 3],
    {"sampling_params": {"max_new_tokens": 2}},
    {"input_ids": ["a", "b"]},
    {"input_ids": [1, 16]},  # the tiny vocab is 16
    {"input_ids": [-1, 2]},
    {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 255}},  # 2 + 255 > 256 positions
    {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": "5"}},
    {"input_ids": [1, 2], "sampling_params": {"temperature": -1}},
    {"input_ids": [1, 2], "sampling_params": {"top_p": 0}},
    {"input_ids": [1, 2], "sampling_params": {"frequency_penalty": 0.5}},
    {"input_ids": []},
    {"text": "hello"},
]


def test_bad_requests_get_400_and_server_keeps_serving(server, client):
    for body in BAD:
        status, answer = post(server["url"], "/generate", body if isinstance(body, (bytes, dict)) else
                              json.dumps(body).encode())
        assert status == 400, body
        assert answer["error"]["message"], body
    with pytest.raises(RolloutRequestError, match="vocabulary"):
        client.generate([GenRequest([99], SamplingConfig(max_new_tokens=2))])
    assert client.generate([GenRequest([1, 2], SamplingConfig(max_new_tokens=2, temperature=0))])[0].output_ids


def test_update_from_disk_and_failed_update_keeps_weights(client, dirs, tmp_path):
    cfg = SamplingConfig(max_new_tokens=5, temperature=0.0)
    client.update_weights_from_disk(dirs["m1"], weight_version="5")
    ref_ids, ref_lps = reference(dirs["m1"], PROMPTS, cfg)
    assert_matches(client.generate([GenRequest(p, cfg) for p in PROMPTS]), ref_ids, ref_lps, "5")
    broken = tmp_path / "broken"  # a checkpoint missing tensors is rejected before anything is copied
    partial = {n: t for n, t in iter_hf_tensors(archon.from_pretrained(dirs["m2"]))
               if "layers.1." not in n}
    from archon_ckpt import save_safetensors_sharded

    save_safetensors_sharded(partial, broken)
    with pytest.raises(RolloutRequestError, match="layers.1"):
        client.update_weights_from_disk(str(broken), weight_version="6")
    assert_matches(client.generate([GenRequest(p, cfg) for p in PROMPTS]), ref_ids, ref_lps, "5")
    assert client.get_model_info()[0]["weight_version"] == "5"


def test_update_by_gloo_broadcast_from_this_process(client, dirs, tmp_path):
    """bf16 on the wire into the fp32 server: it serves the bf16-rounded weights (reference: a bf16 export)."""
    cfg = SamplingConfig(max_new_tokens=5, temperature=0.0)
    sync = BroadcastWeightSync(client, master_address="127.0.0.1", master_port=free_port(), dtype=torch.bfloat16,
                               bucket_mb=0.02, backend="gloo", group_name="local", timeout=60)
    trainer = archon.from_pretrained(dirs["m2"])
    archon.save_pretrained(trainer, tmp_path / "m2_bf16", dtype=torch.bfloat16)
    try:
        sync.connect()
        sync.push(trainer, version=9)
        ref_ids, ref_lps = reference(str(tmp_path / "m2_bf16"), PROMPTS, cfg)
        assert_matches(client.generate([GenRequest(p, cfg) for p in PROMPTS]), ref_ids, ref_lps, "9")
        # a bad name is received and dropped: an error, and the old weights keep serving
        bad = client.update_weights_from_distributed(["nope.weight"], ["float32"], [[4]], group_name="local")
        sync.group.broadcast(torch.zeros(4))
        with pytest.raises(RolloutRequestError, match="nope.weight"):
            bad.result(timeout=60)
        assert_matches(client.generate([GenRequest(p, cfg) for p in PROMPTS]), ref_ids, ref_lps, "9")
    finally:
        sync.close()


def _sync_from_layouts(rank: int, world: int, url: str, port: int, dirs: dict, export_root: str) -> dict:
    """run_ranks target: d2 (FSDP2), t2 and p2 trainers push to the server by broadcast, then the t2 trainer by
    disk; rank 0 reads the server's weights back after each push."""
    from archon.config.schema import ActorConfig
    from archon.engine.engine import ArchonEngine

    client = RolloutClient([url], timeout=120) if rank == 0 else None
    bcast = BroadcastWeightSync(client, master_address="127.0.0.1", master_port=port, dtype=torch.float32,
                                bucket_mb=0.05, group_name="trainer", timeout=120)
    disk = DiskWeightSync(client, export_root, dtype=torch.float32, bucket_mb=0.05)
    bcast.connect()
    engines, out = {}, {}
    for key, alloc, src, sync, version in [("d2", "archon:d2", "m1", bcast, 21), ("t2", "archon:t2", "m2", bcast, 22),
                                           ("p2", "archon:p2", "m1", bcast, 23), ("t2", "archon:t2", "m2", disk, 24)]:
        if key not in engines:
            actor = ActorConfig(path=dirs[src], dtype="float32")
            actor.archon.pp_schedule = "1F1B"
            engines[key] = ArchonEngine(actor, allocation_mode=alloc, device="cpu").initialize()
        sync.push(engines[key].model, version)
        if rank == 0:
            names = [n for n, _ in iter_hf_tensors(archon.from_pretrained(dirs[src]))]
            out[f"{key}/{version}"] = (src, client.get_model_info()[0]["weight_version"],
                                       server_weights(client, names))
    bcast.close()
    if client is not None:
        client.close()
    return out


def test_sync_from_fsdp2_tp_and_pp_trainers_bit_for_bit(server, client, dirs, tmp_path):
    res = run_ranks(_sync_from_layouts, 2, server["url"], free_port(), dirs, str(tmp_path / "exports"),
                    timeout=220)[0]
    assert len(res) == 4
    for key, (src, got_version, weights) in res.items():
        assert got_version == key.split("/")[1]
        ref = dict(iter_hf_tensors(archon.from_pretrained(dirs[src])))  # single-process export
        assert weights.keys() == ref.keys()
        for n, t in ref.items():
            assert torch.equal(weights[n], t), f"{key}: {n}"
    assert sorted(os.listdir(tmp_path / "exports")) == ["v000024"]


def test_pause_abort_and_continue(client):
    cfg = SamplingConfig(max_new_tokens=3, temperature=0.0)
    client.pause_generation("in_place")
    held = client.generate_async([GenRequest([1, 2], cfg)])
    time.sleep(0.3)
    assert not held.done()  # paused: queued, not generated
    client.pause_generation("abort")
    r = held.result(timeout=30)[0]
    assert r.finish_reason == "abort" and r.output_ids == []
    later = client.generate_async([GenRequest([1, 2], cfg)])
    time.sleep(0.3)
    assert not later.done()
    client.continue_generation()
    assert len(later.result(timeout=30)[0].output_ids) == 3


def test_dead_or_hung_server_raises_within_timeout(server, client):
    hung = socket.socket()  # accepts connections, never answers
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)
    try:
        with RolloutClient([f"127.0.0.1:{hung.getsockname()[1]}"], timeout=2, retries=2) as c:
            t0 = time.monotonic()
            with pytest.raises(RolloutServerError, match="no answer within the client timeout of 2s"):
                c.generate([GenRequest([1], SamplingConfig(max_new_tokens=1))])
            assert time.monotonic() - t0 < 6  # a timeout is not retried
    finally:
        hung.close()
    # kill the server while a request is in flight (held in its queue by a pause): a clear error, never a hang
    client.pause_generation("in_place")
    fut = client.generate_async([GenRequest([1, 2], SamplingConfig(max_new_tokens=2))])
    time.sleep(0.5)
    assert not fut.done()
    server["proc"].kill()
    server["proc"].wait(timeout=15)
    t0 = time.monotonic()
    with pytest.raises(RolloutServerError, match="failed after"):
        fut.result(timeout=60)
    with pytest.raises(RolloutServerError):
        client.generate([GenRequest([1], SamplingConfig(max_new_tokens=1))])
    assert time.monotonic() - t0 < 30
