"""Config fields shared by `archon train`'s `data` and `archon rl`'s `data` sections for text data."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

from archon.config.fields import doc

__all__ = ["SOURCES", "TextDataConfig"]

SOURCES = ("synthetic", "file", "reasoning_gym")


@dataclass
class TextDataConfig:
    source: str = doc("synthetic", "synthetic (data.task: built-in digit tasks or pre-tokenized jsonl) | file (text "
                      "records from data.path: JSONL, Parquet or a `datasets` directory) | reasoning_gym "
                      "(procedural prompts and answers from data.dataset)")
    tokenizer: str = doc("", "text sources: tokenizer directory, 'builtin:qwen3' (the Qwen vocabulary, built into "
                         "~/.cache/archon on first use), or empty = the tokenizer files beside actor.path")
    chat_template: str = doc("", "'' = the tokenizer's own | chatml | chatml_system | chatml_think | a Jinja file "
                             "| none (raw text: prompt, then response + eos)")
    chat_template_kwargs: dict[str, Any] = doc(factory=dict, help="extra variables for the chat template, e.g. "
                                               "{enable_thinking: false}")
    system_prompt: str = doc("", "system message put before each prompt that has none")
    prompt_key: str = doc("prompt", "file: the record field holding the prompt text")
    response_key: str = doc("response", "file, archon train: the record field holding the response text")
    messages_key: str = doc("", "file: the record field holding a message list [{role, content}, ...] (instead "
                            "of prompt_key/response_key; rl: the prompt messages, train: the whole conversation)")
    answer_key: str = doc("answer", "rl: the record field passed to the reward as `answer` (other fields pass "
                          "under their own names)")
    split: str = doc("train", "file: the split of a `datasets` directory or of load_dataset")
    max_prompt_len: int = doc(0, "rl: drop prompts longer than this many tokens, with a counted warning (0 = off)")
    max_len: int = doc(0, "train: drop examples longer than this many tokens, with a counted warning (0 = off)")
    shuffle: bool = doc(True, "text sources: reshuffle the records every epoch (seeded by data.seed and the epoch)")
    dataset: str = doc("", "reasoning_gym: the dataset name, e.g. basic_arithmetic, countdown")
    dataset_size: int = doc(1000, "reasoning_gym: records per epoch (generated from data.seed)")
    dataset_kwargs: dict[str, Any] = doc(factory=dict, help="reasoning_gym: the dataset's config fields")

    def validate_text(self, path: str, command: str) -> None:
        """Raise ValueError naming the bad data.* key; ``command`` is 'train' or 'rl' (keys the other one reads
        are rejected when set, so no setting is silently ignored)."""
        if self.source not in SOURCES:
            raise ValueError(f"data.source {self.source!r} is not one of {SOURCES}")
        if self.source == "file" and not path:
            raise ValueError("data.source=file needs data.path (a .jsonl / .json / .parquet file or a datasets "
                             "directory)")
        if self.source == "file" and not os.path.exists(path):
            raise ValueError(f"data.path {path!r} does not exist")
        if self.source == "reasoning_gym" and not self.dataset:
            raise ValueError("data.source=reasoning_gym needs data.dataset (e.g. basic_arithmetic)")
        if self.dataset_size < 1 or self.max_prompt_len < 0 or self.max_len < 0:
            raise ValueError("data.dataset_size must be >= 1, data.max_prompt_len and data.max_len >= 0")
        unused = set(_UNUSED[self.source]) | set(_UNUSED[command])
        if self.source != "synthetic" and self.messages_key:
            unused |= {"prompt_key", "response_key"}
        for f in fields(TextDataConfig):
            if f.name in unused and getattr(self, f.name) != getattr(_DEFAULTS, f.name):
                raise ValueError(f"data.{f.name} is not used with data.source={self.source} in archon {command}: "
                                 "remove it" + (" or set data.source" if self.source == "synthetic" else ""))


_TEXT = ("tokenizer", "chat_template", "chat_template_kwargs", "system_prompt", "prompt_key", "response_key",
         "messages_key", "answer_key", "split", "max_prompt_len", "max_len", "shuffle", "dataset", "dataset_size",
         "dataset_kwargs")
_UNUSED = {"synthetic": _TEXT, "file": ("dataset", "dataset_size", "dataset_kwargs"),
           "reasoning_gym": ("prompt_key", "response_key", "messages_key", "split"),
           "train": ("answer_key", "max_prompt_len"), "rl": ("response_key", "max_len")}
_DEFAULTS = TextDataConfig()
