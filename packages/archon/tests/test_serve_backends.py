"""`archon serve --engine rollout` generates what the embedded sampler backend does (CPU, fp32)."""

import torch
from archon.hf import from_pretrained
from archon.serve.backend import make_backend
from archon_rl import GenRequest, SamplingConfig

CONFIG = "examples/tiny_qwen3/config.json"


def test_rollout_backend_equals_sampler_backend():
    torch.manual_seed(0)
    model = from_pretrained(CONFIG, dtype=torch.float32).eval()
    greedy = SamplingConfig(max_new_tokens=6, temperature=0.0, stop_token_ids=[3])
    sampled = SamplingConfig(max_new_tokens=5, temperature=1.0, top_k=8)
    prompts = [[1, 5, 6, 7, 2], [1, 9, 2], [1, 4, 4, 4, 4, 4, 2], [1, 8, 2]]
    reqs = [GenRequest(p, greedy) for p in prompts] + [GenRequest(p, sampled, seed=100 + i) for i, p in enumerate(prompts)]
    ref = make_backend(model, device=torch.device("cpu")).generate(reqs)
    out = make_backend(model, device=torch.device("cpu"), engine="rollout", kv_cache_gb=0.01).generate(reqs)
    for r, o in zip(ref, out):
        assert o.output_ids == r.output_ids and o.finish_reason == r.finish_reason
        assert o.prompt_tokens == r.prompt_tokens
        torch.testing.assert_close(torch.tensor(o.logprobs), torch.tensor(r.logprobs), atol=1e-5, rtol=0)
    # unseeded requests still complete (seeds drawn by the backend)
    assert len(make_backend(model, device=torch.device("cpu"), engine="rollout").generate(
        [GenRequest([1, 5, 2], sampled)])[0].output_ids) > 0
