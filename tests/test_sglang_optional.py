"""The same `RolloutClient` against real SGLang (`python -m sglang.launch_server`): generate + update_weights_from_disk.

Runs only where `sglang` is importable and a GPU is present; skipped otherwise (SGLang is not installed on the
CPU CI machines, so this test has not run there).
"""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("sglang")
if not torch.cuda.is_available():
    pytest.skip("real SGLang needs a GPU", allow_module_level=True)

from archon.testing import hf_model, tiny_hf_config  # noqa: E402
from archon_parallel.testing import free_port  # noqa: E402
from archon_rl import GenRequest, SamplingConfig  # noqa: E402
from archon_rl.client import RolloutClient  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900)]


def _model(path, seed: int) -> str:
    cfg = tiny_hf_config("qwen3", vocab_size=256, hidden_size=128, head_dim=64, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=512)
    hf_model(cfg, seed=seed).to(torch.bfloat16).save_pretrained(path)
    return str(path)


def test_generate_and_update_from_disk_on_sglang(tmp_path):
    m0, m1 = _model(tmp_path / "m0", 0), _model(tmp_path / "m1", 1)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sglang.launch_server", "--model-path", m0, "--host", "127.0.0.1",
                             "--port", str(port), "--skip-tokenizer-init", "--disable-cuda-graph",
                             "--mem-fraction-static", "0.2"], env=dict(os.environ), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        with RolloutClient([f"127.0.0.1:{port}"], timeout=300, retries=1) as client:
            deadline = time.monotonic() + 600
            while not all(client.health()):
                assert proc.poll() is None, proc.stderr.read()[-3000:]
                assert time.monotonic() < deadline, "SGLang not healthy in 600 s"
                time.sleep(1)
            cfg = SamplingConfig(max_new_tokens=8, temperature=0.0)
            out = client.generate([GenRequest([1, 2, 3], cfg), GenRequest([7, 8], cfg)])
            for r in out:
                assert len(r.output_ids) == 8 and all(0 <= t < 256 for t in r.output_ids)
                assert len(r.logprobs) == 8 and all(lp <= 0 for lp in r.logprobs)
                assert r.finish_reason == "length" and r.weight_version is not None
            client.update_weights_from_disk(m1, weight_version="1")
            assert client.get_model_info()[0]["weight_version"] == "1"
            after = client.generate([GenRequest([1, 2, 3], cfg)])[0]
            assert after.weight_version == "1"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=60)
