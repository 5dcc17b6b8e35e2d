"""SGLang `/generate` payloads <-> GenRequest / GenResult (pure Python; the server test covers the HTTP side)."""

import pytest
from archon_rl import GenRequest, GenResult, SamplingConfig
from archon_rl.protocol import (
    ProtocolError,
    decode_answer,
    encode_answer,
    encode_generate,
    encode_generate_batch,
    parse_generate,
)

V, CTX = 50, 64


def parse(body):
    return parse_generate(body, vocab_size=V, context_len=CTX)


def test_round_trip_single_and_batch():
    req = GenRequest([1, 2, 3], SamplingConfig(max_new_tokens=7, temperature=0.5, top_p=0.9, top_k=5,
                                               stop_token_ids=[4]), seed=42)
    call = parse(encode_generate(req))
    assert not call.batched and call.return_logprob == [True]
    got = call.requests[0]
    assert got.input_ids == req.input_ids and got.seed == 42
    assert got.sampling.max_new_tokens == 7 and got.sampling.top_k == 5 and got.sampling.stop_token_ids == [4]
    reqs = [req, GenRequest([9], SamplingConfig(max_new_tokens=2, top_k=0))]
    call = parse(encode_generate_batch(reqs, return_logprob=False))
    assert call.batched and [r.input_ids for r in call.requests] == [[1, 2, 3], [9]]
    assert call.requests[1].sampling.top_k == 0  # SGLang's -1 (off) is the sampler's 0
    assert encode_generate(reqs[1])["sampling_params"]["top_k"] == -1


def test_defaults_follow_sglang():
    call = parse_generate({"input_ids": [1, 2]}, vocab_size=V, context_len=1000)
    s = call.requests[0].sampling
    assert (s.max_new_tokens, s.temperature, s.top_p, s.top_k, s.stop_token_ids) == (128, 1.0, 1.0, 0, [])
    assert call.return_logprob == [False]


def test_answer_shapes():
    r = GenResult([5, 4], [-0.5, -0.25], "stop", matched_stop=4, prompt_tokens=3, weight_version="7")
    a = encode_answer(r, return_logprob=True, weight_version="7", rid="x")
    assert a["output_ids"] == [5, 4]
    m = a["meta_info"]
    assert m["finish_reason"] == {"type": "stop", "matched": 4}
    assert m["output_token_logprobs"] == [[-0.5, 5, None], [-0.25, 4, None]]
    assert (m["prompt_tokens"], m["completion_tokens"], m["weight_version"]) == (3, 2, "7")
    assert decode_answer(a) == r
    length = encode_answer(GenResult([1], [-1.0], "length", prompt_tokens=1), return_logprob=False,
                           weight_version="0", rid=None)
    assert length["meta_info"]["finish_reason"] == {"type": "length", "length": 1}
    assert "output_token_logprobs" not in length["meta_info"]
    with pytest.raises(ProtocolError, match="malformed"):
        decode_answer({"output_ids": [1]})


@pytest.mark.parametrize("body,match", [
    ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 63}}, "context length"),
    ({"input_ids": [1, V]}, "outside the vocabulary"),
    ({"input_ids": [[1], [2]], "sampling_params": [{}]}, "1 entries for 2 prompts"),
    ({"input_ids": [1], "sampling_params": {"top_k": 0}}, "top_k"),
    ({"input_ids": [1], "sampling_params": {"max_new_tokens": True}}, "max_new_tokens"),
    ({"input_ids": [1], "sampling_params": {"sampling_seed": 1.5}}, "sampling_seed"),
    ({"input_ids": [1], "sampling_params": {"stop_token_ids": [1.0]}}, "stop_token_ids"),
    ({"input_ids": [1], "logprob_start_len": 0}, "logprob_start_len"),
    ({"input_ids": [1], "return_logprob": "yes"}, "return_logprob"),
    ({"input_ids": [1], "stream": True}, "stream"),
    ({"input_ids": [1], "image_data": "x"}, "unsupported request fields"),
    ({"input_ids": [[1], []], "sampling_params": {"max_new_tokens": 2}}, r"input_ids\[1\]"),
])
def test_invalid(body, match):
    with pytest.raises(ProtocolError, match=match):
        parse(body)
