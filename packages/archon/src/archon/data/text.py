"""Text datasets tokenized with a chat template: SFT examples (prompt/response pairs or conversations, loss on
assistant tokens only) and RL prompts (with the record's other fields for the reward)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

from torch.distributed.checkpoint.stateful import Stateful

from archon.chat import ChatFormat
from archon.data.config import TextDataConfig
from archon.data.source import load_records, reasoning_gym_records
from archon.data.stream import EpochStream
from archon.engine.batch import PackedBatch

log = logging.getLogger("archon")

__all__ = ["PromptData", "SFTData", "TextPrompts", "build_chat", "check_vocab", "open_records"]

Prompt = tuple[list[int], dict[str, Any]]


def open_records(cfg: TextDataConfig, path: str, seed: int) -> Sequence[dict[str, Any]]:
    if cfg.source == "reasoning_gym":
        return reasoning_gym_records(cfg.dataset, cfg.dataset_size, seed, **cfg.dataset_kwargs)
    return load_records(path, cfg.split)


def build_chat(cfg: TextDataConfig, model_path: str) -> ChatFormat:
    from archon.tokenizer import load_tokenizer

    tok = load_tokenizer(cfg.tokenizer, model_path, cfg.chat_template)
    return ChatFormat(tok, system_prompt=cfg.system_prompt, use_template=cfg.chat_template != "none",
                      template_kwargs=cfg.chat_template_kwargs)


def check_vocab(tokenizer, vocab_size: int) -> None:
    if len(tokenizer) > vocab_size:
        raise ValueError(f"the tokenizer ({getattr(tokenizer, 'archon_path', '')}) has {len(tokenizer)} tokens but the "
                         f"model's vocab_size is {vocab_size}: use a model whose embedding covers the tokenizer")


def _field(rec: dict[str, Any], key: str, i: int, what: str) -> Any:
    if key not in rec:
        raise ValueError(f"record {i} has no field {key!r} ({what}); its fields are {sorted(rec)}")
    return rec[key]


def _drop_long(items: list, lengths: list[int], limit: int, key: str) -> list:
    if not limit:
        return items
    kept = [x for x, n in zip(items, lengths) if n <= limit]
    if len(kept) < len(items):
        log.warning("data: dropped %d of %d records longer than %s=%d tokens", len(items) - len(kept), len(items),
                    key, limit)
    if not kept:
        raise ValueError(f"every record is longer than {key}={limit} tokens")
    return kept


class SFTData(Stateful):
    """Tokenized SFT examples in a resumable stream of global batches; each rank gets its slice."""

    def __init__(self, cfg: TextDataConfig, chat: ChatFormat, records: Sequence[dict[str, Any]], batch_size: int,
                 seed: int, *, rank: int = 0, world: int = 1) -> None:
        if batch_size % world:
            raise ValueError(f"data.batch_size {batch_size} must be divisible by the {world} data-parallel ranks")
        examples = []
        rg = cfg.source == "reasoning_gym"  # question -> answer pairs
        prompt_key, response_key = ("question", "answer") if rg else (cfg.prompt_key, cfg.response_key)
        for i in range(len(records)):
            rec = records[i]
            if cfg.messages_key:
                examples.append(chat.encode_conversation(_field(rec, cfg.messages_key, i, "data.messages_key")))
            else:
                examples.append(chat.encode_pair(_field(rec, prompt_key, i, "data.prompt_key"),
                                                 str(_field(rec, response_key, i, "data.response_key"))))
        self.examples = _drop_long(examples, [len(e[0]) for e in examples], cfg.max_len, "data.max_len")
        self.stream = EpochStream(len(self.examples), batch_size, seed=seed, shuffle=cfg.shuffle)
        self.rank, self.world = rank, world

    def __iter__(self) -> Iterator[PackedBatch]:
        while True:
            mine = [self.examples[j] for j in self.stream.next_indices()][self.rank::self.world]
            yield PackedBatch.from_sequences([e[0] for e in mine], [e[1] for e in mine])

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)


class PromptData(Stateful):
    """RL prompts: (prompt ids, reward fields) per record; ``next_step()`` draws the step's prompts. The reward
    fields are the record's fields except the prompt / messages, with data.answer_key passed as ``answer``, plus
    ``prompt_text`` (the prompt as the model sees it)."""

    def __init__(self, cfg: TextDataConfig, chat: ChatFormat, records: Sequence[dict[str, Any]], num_prompts: int,
                 seed: int) -> None:
        prompts: list[Prompt] = []
        key = cfg.messages_key or ("question" if cfg.source == "reasoning_gym" else cfg.prompt_key)
        for i in range(len(records)):
            rec = dict(records[i])
            prompt = _field(rec, key, i, "data.messages_key" if cfg.messages_key else "data.prompt_key")
            fields = {k: v for k, v in rec.items() if k not in (key, cfg.answer_key)}
            if cfg.answer_key in rec:
                fields["answer"] = rec[cfg.answer_key]
            if cfg.source == "reasoning_gym":
                fields["question"] = prompt
            fields["prompt_text"] = chat.prompt_text(prompt)
            prompts.append((chat.encode_prompt(prompt), fields))
        self.prompts = _drop_long(prompts, [len(p[0]) for p in prompts], cfg.max_prompt_len, "data.max_prompt_len")
        self.stream = EpochStream(len(self.prompts), num_prompts, seed=seed, shuffle=cfg.shuffle)

    def next_step(self) -> list[Prompt]:
        return [self.prompts[j] for j in self.stream.next_indices()]

    def __iter__(self) -> Iterator[list[Prompt]]:
        while True:
            yield self.next_step()

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)


class TextPrompts:
    """What `archon rl` needs for text prompts: the tokenizer and chat template, the resumable prompt stream, and
    the stop / pad ids the sampler uses (from the tokenizer and generation_config)."""

    def __init__(self, cfg, model_path: str, vocab_size: int, num_prompts: int) -> None:
        """``cfg``: `archon rl`'s data section (text fields plus ``path`` and ``seed``)."""
        from archon.tokenizer import pad_token_id, stop_token_ids

        self.chat = build_chat(cfg, model_path)
        check_vocab(self.chat.tok, vocab_size)
        self.stop_ids = stop_token_ids(self.chat.tok, model_path)
        self.pad_id = pad_token_id(self.chat.tok)
        self.data = PromptData(cfg, self.chat, open_records(cfg, cfg.path, cfg.seed), num_prompts, cfg.seed)

    def decode(self, response_ids: list[int]) -> str:
        return self.chat.tok.decode(response_ids, skip_special_tokens=True)
