"""Chat formatting: prompts and conversations to token ids with the tokenizer's chat template.

A prompt is a message list or a plain string (turned into one user message, after an optional system
prompt). A conversation for SFT is encoded whole; its loss mask is 1 exactly on the assistant turns'
tokens, found by rendering each prefix (the conversation up to an assistant turn, with the generation
prompt) and checking that it is a prefix of the whole, so every template that renders history stably
works, and one that does not is reported instead of silently mis-masked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["ChatFormat", "to_messages"]

Message = dict[str, Any]


def to_messages(prompt: str | Sequence[Message], system_prompt: str = "") -> list[Message]:
    """A plain prompt becomes [system?, user]; a message list gets the system prompt only if it has none."""
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if system_prompt and not (msgs and msgs[0].get("role") == "system"):
        msgs.insert(0, {"role": "system", "content": system_prompt})
    return msgs


class ChatFormat:
    """Encodes prompts / conversations with ``tokenizer``'s chat template, or as raw text when it has none
    (``use_template=False``: prompt text, then response text + eos)."""

    def __init__(self, tokenizer, *, system_prompt: str = "", use_template: bool = True,
                 template_kwargs: dict[str, Any] | None = None) -> None:
        if use_template and not tokenizer.chat_template:
            raise ValueError("the tokenizer has no chat template: set data.chat_template (chatml | chatml_system | "
                             "chatml_think | a Jinja file) or data.chat_template=none for raw text")
        self.tok = tokenizer
        self.system_prompt = system_prompt
        self.use_template = use_template
        self.kwargs = dict(template_kwargs or {})

    def _ids(self, messages: list[Message], generation_prompt: bool) -> list[int]:
        out = self.tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt,
                                           return_dict=False, **self.kwargs)
        return list(out)

    def prompt_text(self, prompt: str | Sequence[Message]) -> str:
        """The prompt as the model sees it (template applied), e.g. for a text reward."""
        if not self.use_template:
            return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
        return self.tok.apply_chat_template(to_messages(prompt, self.system_prompt), tokenize=False,
                                            add_generation_prompt=True, **self.kwargs)

    def encode_prompt(self, prompt: str | Sequence[Message]) -> list[int]:
        """Token ids of a generation prompt (template with the assistant header appended)."""
        if not self.use_template:
            return self.tok.encode(self.prompt_text(prompt), add_special_tokens=False)
        return self._ids(to_messages(prompt, self.system_prompt), True)

    def encode_pair(self, prompt: str | Sequence[Message], response: str) -> tuple[list[int], list[int]]:
        """(ids, loss mask) of a prompt and its response; the mask covers the response."""
        if not self.use_template:
            p = self.encode_prompt(prompt)
            r = self.tok.encode(response, add_special_tokens=False) + [self.tok.eos_token_id]
            return p + r, [0] * len(p) + [1] * len(r)
        return self.encode_conversation(to_messages(prompt, self.system_prompt)
                                        + [{"role": "assistant", "content": response}])

    def encode_conversation(self, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
        """(ids, loss mask) of a whole conversation; the mask is 1 on every assistant turn's tokens."""
        if not self.use_template:
            raise ValueError("data.messages_key needs a chat template (data.chat_template is 'none')")
        msgs = to_messages(list(messages), self.system_prompt)
        if not any(m.get("role") == "assistant" for m in msgs):
            raise ValueError("the conversation has no assistant message to train on")
        ids = self._ids(msgs, False)
        mask = [0] * len(ids)
        for i, m in enumerate(msgs):
            if m.get("role") != "assistant":
                continue
            start = self._ids(msgs[:i], True) if i else []
            upto = self._ids(msgs[:i + 1], False)
            if upto[:len(start)] != start or ids[:len(upto)] != upto:
                raise ValueError(f"the chat template renders message {i} differently once later turns follow, so its "
                                 "tokens cannot be located for the loss mask; use a template that renders history "
                                 "stably (e.g. data.chat_template=chatml)")
            mask[len(start):len(upto)] = [1] * (len(upto) - len(start))
        return ids, mask
