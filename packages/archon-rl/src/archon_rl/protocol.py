"""SGLang's native `/generate` payloads <-> `GenRequest` / `GenResult`, shared by `RolloutClient` and `archon serve`.

Pure Python (no HTTP library). Field names and shapes follow SGLang's `managers/io_struct.py`
(`GenerateReqInput`, the `meta_info` of its answers) and `sampling/sampling_params.py`; docs/rollout.md names
the version. Only the token-id subset is supported (no `text`: `archon serve` has no tokenizer, like SGLang's
`--skip-tokenizer-init`). Every malformed request raises `ProtocolError` naming the field, which a server turns
into HTTP 400 `{"error": {"message": ...}}`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from archon_rl.requests import GenRequest, GenResult
from archon_rl.sampler import SamplingConfig

__all__ = ["ProtocolError", "GenerateCall", "parse_generate", "encode_answer", "encode_generate", "encode_generate_batch", "decode_answer",
           "finish_reason_json", "SGLANG_DEFAULT_MAX_NEW_TOKENS"]

SGLANG_DEFAULT_MAX_NEW_TOKENS = 128
"""SGLang's default ``max_new_tokens`` when a request leaves it out."""

# sampling_params keys that change nothing when token ids go in and out (text-only options of SGLang).
_TEXT_ONLY_KEYS = {"skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim"}
_SAMPLING_KEYS = {"max_new_tokens", "temperature", "top_p", "top_k", "stop_token_ids", "sampling_seed",
                  "ignore_eos"} | _TEXT_ONLY_KEYS
_TOP_KEYS = {"input_ids", "sampling_params", "return_logprob", "logprob_start_len", "rid", "stream", "text",
             "return_text_in_logprobs", "top_logprobs_num"}


class ProtocolError(ValueError):
    """A request that does not follow the protocol (HTTP 400)."""


@dataclass
class GenerateCall:
    """A parsed `/generate` body."""

    requests: list[GenRequest]
    return_logprob: list[bool]
    rids: list[str | None]
    batched: bool
    """``input_ids`` was a list of lists: the answer is a JSON list in request order."""


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


def _per_item(value: Any, n: int, name: str, batched: bool) -> list[Any]:
    if batched and isinstance(value, list):
        if len(value) != n:
            raise ProtocolError(f"{name} has {len(value)} entries for {n} prompts")
        return value
    return [value] * n


def _sampling(params: Any, idx: str) -> tuple[SamplingConfig, int | None]:
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ProtocolError(f"sampling_params{idx} must be a JSON object, got {type(params).__name__}")
    unknown = sorted(set(params) - _SAMPLING_KEYS)
    if unknown:
        raise ProtocolError(f"sampling_params{idx} has unsupported keys {unknown}; supported: {sorted(_SAMPLING_KEYS)}")
    p = dict(params)
    max_new = p.get("max_new_tokens", SGLANG_DEFAULT_MAX_NEW_TOKENS)
    if not _is_int(max_new) or max_new < 1:
        raise ProtocolError(f"sampling_params{idx}.max_new_tokens must be an integer >= 1, got {max_new!r}")
    temp = p.get("temperature", 1.0)
    if not _is_num(temp) or temp < 0:
        raise ProtocolError(f"sampling_params{idx}.temperature must be a number >= 0 (0 = greedy), got {temp!r}")
    top_p = p.get("top_p", 1.0)
    if not _is_num(top_p) or not 0 < top_p <= 1:
        raise ProtocolError(f"sampling_params{idx}.top_p must be in (0, 1], got {top_p!r}")
    top_k = p.get("top_k", -1)
    if not _is_int(top_k) or (top_k < 1 and top_k != -1):
        raise ProtocolError(f"sampling_params{idx}.top_k must be -1 (off) or >= 1, got {top_k!r}")
    stops = p.get("stop_token_ids") or []
    if not isinstance(stops, list) or not all(_is_int(t) for t in stops):
        raise ProtocolError(f"sampling_params{idx}.stop_token_ids must be a list of integers, got {stops!r}")
    seed = p.get("sampling_seed")
    if seed is not None and not _is_int(seed):
        raise ProtocolError(f"sampling_params{idx}.sampling_seed must be an integer, got {seed!r}")
    if "ignore_eos" in p and not isinstance(p["ignore_eos"], bool):
        raise ProtocolError(f"sampling_params{idx}.ignore_eos must be true or false")
    cfg = SamplingConfig(max_new_tokens=max_new, temperature=float(temp), top_p=float(top_p),
                         top_k=0 if top_k == -1 else top_k, stop_token_ids=list(stops))
    return cfg, seed


def parse_generate(body: Any, *, vocab_size: int, context_len: int) -> GenerateCall:
    """Validate a `/generate` body; token ids must lie in ``[0, vocab_size)`` and prompt + max_new_tokens
    within ``context_len`` (the model's ``max_position_embeddings``)."""
    if not isinstance(body, dict):
        raise ProtocolError(f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - _TOP_KEYS)
    if unknown:
        raise ProtocolError(f"unsupported request fields {unknown}; supported: {sorted(_TOP_KEYS)}")
    if body.get("text") is not None:
        raise ProtocolError("'text' needs a tokenizer; this server takes token ids only: send input_ids")
    if body.get("stream"):
        raise ProtocolError("stream=true is not supported; send stream=false")
    if body.get("top_logprobs_num"):
        raise ProtocolError("top_logprobs_num is not supported (only the sampled tokens' logprobs): send 0")
    ids = body.get("input_ids")
    if not isinstance(ids, list) or not ids:
        raise ProtocolError("input_ids must be a non-empty list of token ids (or a list of such lists)")
    batched = isinstance(ids[0], list)
    prompts = ids if batched else [ids]
    n = len(prompts)
    params = _per_item(body.get("sampling_params"), n, "sampling_params", batched)
    logprob = _per_item(body.get("return_logprob", False), n, "return_logprob", batched)
    start = _per_item(body.get("logprob_start_len"), n, "logprob_start_len", batched)
    rid = body.get("rid")
    rids = rid if batched and isinstance(rid, list) else [rid if not batched else None] * n
    if batched and isinstance(rid, str):
        rids = [f"{rid}_{i}" for i in range(n)]
    out = []
    for i, prompt in enumerate(prompts):
        idx = f"[{i}]" if batched else ""
        if not isinstance(prompt, list) or not prompt or not all(_is_int(t) for t in prompt):
            raise ProtocolError(f"input_ids{idx} must be a non-empty list of integers")
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise ProtocolError(f"input_ids{idx} has token id {bad[0]} outside the vocabulary [0, {vocab_size})")
        if not isinstance(logprob[i], bool):
            raise ProtocolError(f"return_logprob{idx} must be true or false, got {logprob[i]!r}")
        if start[i] is not None and (not _is_int(start[i]) or start[i] not in (-1, len(prompt))):
            raise ProtocolError(f"logprob_start_len{idx} must be -1 (output tokens only; prompt logprobs are not "
                                f"supported), got {start[i]!r}")
        cfg, seed = _sampling(params[i], idx)
        if len(prompt) + cfg.max_new_tokens > context_len:
            raise ProtocolError(f"input_ids{idx} has {len(prompt)} tokens + max_new_tokens {cfg.max_new_tokens} > "
                                f"the context length {context_len} (max_position_embeddings)")
        out.append(GenRequest(list(prompt), cfg, seed))
    return GenerateCall(out, list(logprob), list(rids), batched)


def finish_reason_json(result: GenResult) -> dict[str, Any]:
    if result.finish_reason == "stop":
        return {"type": "stop", "matched": result.matched_stop}
    if result.finish_reason == "length":
        return {"type": "length", "length": len(result.output_ids)}
    return {"type": "abort", "message": "aborted"}


def encode_answer(result: GenResult, *, return_logprob: bool, weight_version: str, rid: str | None) -> dict:
    """One `/generate` answer: ``{"output_ids", "meta_info"}``."""
    meta: dict[str, Any] = {
        "id": rid, "finish_reason": finish_reason_json(result), "prompt_tokens": result.prompt_tokens,
        "completion_tokens": len(result.output_ids), "cached_tokens": 0, "weight_version": weight_version,
    }
    if return_logprob:
        meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(result.logprobs, result.output_ids)]
    return {"output_ids": list(result.output_ids), "meta_info": meta}


def encode_generate(request: GenRequest, *, return_logprob: bool = True) -> dict:
    """The `/generate` body of one request (client side)."""
    s = request.sampling
    params: dict[str, Any] = {"max_new_tokens": s.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p,
                              "top_k": s.top_k if s.top_k > 0 else -1, "stop_token_ids": list(s.stop_token_ids)}
    if request.seed is not None:
        params["sampling_seed"] = int(request.seed)
    return {"input_ids": list(request.input_ids), "sampling_params": params, "return_logprob": return_logprob}


def encode_generate_batch(requests, *, return_logprob: bool = True) -> dict:
    """One batched `/generate` body for several requests (``input_ids`` and ``sampling_params`` as lists)."""
    bodies = [encode_generate(r, return_logprob=return_logprob) for r in requests]
    return {"input_ids": [b["input_ids"] for b in bodies], "sampling_params": [b["sampling_params"] for b in bodies],
            "return_logprob": return_logprob}


def decode_answer(answer: Any) -> GenResult:
    """A `/generate` answer (SGLang's or `archon serve`'s) as a `GenResult`."""
    try:
        meta = answer["meta_info"]
        fr = meta.get("finish_reason") or {}
        kind = fr.get("type", "abort")
        lps = meta.get("output_token_logprobs")
        matched = fr.get("matched") if kind == "stop" else None
        version = meta.get("weight_version")
        return GenResult(
            output_ids=list(answer["output_ids"]),
            logprobs=[float(x[0]) for x in lps] if lps is not None else [],
            finish_reason=kind if kind in ("stop", "length", "abort") else "abort",
            matched_stop=matched if _is_int(matched) else None,
            weight_version=None if version is None else str(version),
            prompt_tokens=meta.get("prompt_tokens"),
        )
    except (KeyError, TypeError, IndexError, ValueError, AttributeError) as e:
        raise ProtocolError(f"malformed /generate answer ({type(e).__name__}: {e}): {str(answer)[:200]}") from None
