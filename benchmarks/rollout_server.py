"""Rollout server benchmark: `archon serve` vs the in-process sampler, and weight-update seconds.

    python benchmarks/rollout_server.py                      # one GPU: Qwen3-0.6B / 1.7B shapes, batch 64
    python benchmarks/rollout_server.py --tiny --device cpu  # smoke run on CPU with the tiny example model

1. Rollout tokens/s on the same prompts and seeds (batch ``--batch``, ``--prompt-len`` + ``--new-tokens``, no stop
   tokens so every row generates the same number of tokens): the in-process `SamplerBackend` in this process vs
   an `archon serve` process on the same device reached by `RolloutClient` (one HTTP request per prompt, batched
   by the server). Prints the HTTP overhead in % and checks the outputs are identical.
2. Weight-update seconds per model shape (random weights, serving dtype bf16 on GPU / fp32 on CPU), trainer =
   this process, server = an `archon serve` process on the same device:
   - disk: `DiskWeightSync` (write an HF dir, then the server's /update_weights_from_disk), next to the bound
     bytes / (sequential write + read bandwidth of this filesystem, measured on a file of the same size);
   - gloo: `BroadcastWeightSync` over loopback TCP, next to the bound bytes / (raw gloo broadcast bandwidth
     through the same server, measured by sending one tensor it drains and drops).
   NCCL cannot pair two ranks on one GPU; multi-GPU numbers belong elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import archon
import torch
from archon.engine.weight_sync import BroadcastWeightSync, DiskWeightSync
from archon.serve.backend import SamplerBackend
from archon_parallel.testing import free_port
from archon_rl import GenRequest, SamplingConfig
from archon_rl.client import RolloutClient, RolloutRequestError

ROOT = Path(__file__).resolve().parents[1]
QWEN3 = dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=151936, num_hidden_layers=28,
             num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
             rms_norm_eps=1e-6, rope_theta=1_000_000.0, tie_word_embeddings=True, bos_token_id=151643,
             eos_token_id=151645)
SHAPES = {"0.6b": dict(QWEN3, hidden_size=1024, intermediate_size=3072),
          "1.7b": dict(QWEN3, hidden_size=2048, intermediate_size=6144)}


def model_dir(cfg: dict, root: str, name: str, dtype: torch.dtype, device: str) -> tuple[str, torch.nn.Module]:
    model = archon.from_pretrained(cfg, dtype=dtype, device=device, seed=0).eval()
    out = os.path.join(root, name)
    archon.save_pretrained(model, out, dtype=dtype)
    return out, model


class Server:
    def __init__(self, path: str, device: str, dtype: str, max_batch: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "archon", "serve", path, "--port", str(self.port),
                                      "--device", device, "--dtype", dtype, "--max-batch", str(max_batch)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.client = RolloutClient([self.url], timeout=1800, retries=0)
        deadline = time.monotonic() + 600
        while not all(self.client.health()):
            if self.proc.poll() is not None:
                raise RuntimeError(f"archon serve exited: {self.proc.stderr.read()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("archon serve not healthy after 600 s")
            time.sleep(0.5)

    def close(self) -> None:
        self.client.close()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rollout_rate(args, model, server: Server, vocab: int) -> dict:
    g = torch.Generator().manual_seed(0)
    cfg = SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0)
    reqs = [GenRequest(torch.randint(4, vocab, (args.prompt_len,), generator=g).tolist(), cfg, seed=1000 + i)
            for i in range(args.batch)]
    backend = SamplerBackend(model, device=torch.device(args.device))
    backend.generate(reqs[:2])
    server.client.generate(reqs[:2])
    best_local = best_http = float("inf")
    for _ in range(args.repeats):  # alternate, keep the best of each
        sync(args.device)
        t0 = time.perf_counter()
        local = backend.generate(reqs)
        sync(args.device)
        best_local = min(best_local, time.perf_counter() - t0)
        t0 = time.perf_counter()
        remote = server.client.generate(reqs)
        best_http = min(best_http, time.perf_counter() - t0)
    tokens = sum(len(r.output_ids) for r in local)
    info = server.client.get_server_info()[0]
    return {"tokens": tokens, "in_process_tok_s": tokens / best_local, "server_tok_s": tokens / best_http,
            "http_overhead_pct": 100 * (best_http / best_local - 1),
            "identical_outputs": [r.output_ids for r in local] == [r.output_ids for r in remote],
            "server_batch_sizes": info["batch_size_histogram"]}


def disk_bound(nbytes: int, root: str) -> float:
    """Seconds to write (fsync) and read back ``nbytes`` sequentially on this filesystem."""
    path = os.path.join(root, "bandwidth.bin")
    chunk = os.urandom(1 << 20) * 64
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            left -= f.write(chunk[: min(left, len(chunk))])
        f.flush()
        os.fsync(f.fileno())
    with open(path, "rb") as f:
        while f.read(len(chunk)):
            pass
    os.unlink(path)
    return time.perf_counter() - t0


def gloo_bound(syncer: BroadcastWeightSync, nbytes: int) -> float:
    """Seconds of one raw gloo broadcast of ``nbytes`` into the server (it drains the tensor and rejects it)."""
    buf = torch.zeros(nbytes // 2, dtype=torch.bfloat16)
    t0 = time.perf_counter()
    fut = syncer.client.update_weights_from_distributed(["bench.raw"], ["bfloat16"], [[buf.numel()]],
                                                        group_name=syncer.group_name)
    syncer.group.broadcast(buf)
    try:
        fut.result(timeout=1800)
    except RolloutRequestError:
        pass  # expected: not a tensor of the model
    return time.perf_counter() - t0


def weight_updates(args, name: str, model, path: str, server: Server, root: str, dtype: torch.dtype) -> dict:
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    disk = DiskWeightSync(server.client, os.path.join(root, f"{name}_sync"), dtype=dtype, bucket_mb=args.bucket_mb)
    times = []
    for v in range(1, 3):
        t0 = time.perf_counter()
        disk.push(model, v)
        times.append(time.perf_counter() - t0)
    bcast = BroadcastWeightSync(server.client, master_address="127.0.0.1", master_port=free_port(), dtype=dtype,
                                bucket_mb=args.bucket_mb, backend="gloo", group_name=f"bench_{name}",
                                device="cpu", pause_mode="retract", timeout=1800)
    bcast.connect()
    gtimes = []
    for v in range(3, 5):
        t0 = time.perf_counter()
        bcast.push(model, v)
        gtimes.append(time.perf_counter() - t0)
    gb = gloo_bound(bcast, nbytes)
    bcast.close()
    db = disk_bound(nbytes, root)
    version = server.client.get_model_info()[0]["weight_version"]
    gib = nbytes / 2**30
    return {"bytes": nbytes, "disk_s": min(times), "disk_bound_s": db, "disk_GiB_s": gib / min(times),
            "gloo_s": min(gtimes), "gloo_bound_s": gb, "gloo_GiB_s": gib / min(gtimes),
            "server_version_after": version}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the tiny example model instead of the Qwen3 shapes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default="0.6b,1.7b", help="comma list of 0.6b, 1.7b (weight updates; rollout "
                                                         "rate on the first)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bucket-mb", type=float, default=512)
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    args = p.parse_args()
    gpu = args.device.startswith("cuda")
    dtype = torch.bfloat16 if gpu else torch.float32
    shapes = ["tiny"] if args.tiny else [s.strip() for s in args.shapes.split(",") if s.strip()]
    results: dict = {"device": torch.cuda.get_device_name() if gpu else "cpu", "batch": args.batch,
                     "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}
    with tempfile.TemporaryDirectory(prefix="archon_bench_") as root:
        for i, name in enumerate(shapes):
            cfg = json.loads((ROOT / "examples/tiny_qwen3/config.json").read_text()) if name == "tiny" else SHAPES[name]
            path, model = model_dir(cfg, root, name, dtype, args.device)
            server = Server(path, args.device, str(dtype).removeprefix("torch."), max(args.batch, 1))
            try:
                if i == 0:
                    r = rollout_rate(args, model, server, cfg["vocab_size"])
                    results["rollout"] = r
                    print(f"[{name}] rollout batch {args.batch}: in-process {r['in_process_tok_s']:,.0f} tok/s, "
                          f"archon serve {r['server_tok_s']:,.0f} tok/s, HTTP overhead {r['http_overhead_pct']:+.1f}% "
                          f"(identical outputs: {r['identical_outputs']}; server batches {r['server_batch_sizes']})")
                w = weight_updates(args, name, model, path, server, root, dtype)
                results[f"weights_{name}"] = w
                print(f"[{name}] weight update of {w['bytes'] / 2**30:.2f} GiB: disk {w['disk_s']:.2f} s "
                      f"(bound {w['disk_bound_s']:.2f} s write+read), gloo {w['gloo_s']:.2f} s "
                      f"(bound {w['gloo_bound_s']:.2f} s raw broadcast), server version {w['server_version_after']}")
            finally:
                server.close()
                del model
                if gpu:
                    torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
