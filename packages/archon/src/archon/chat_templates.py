"""Archon's own ChatML chat templates (Jinja, the format `tokenizer.apply_chat_template` runs).

Every assistant turn (its content, ``<|im_end|>`` and the newline after it) sits inside
``{% generation %}`` tags, so `apply_chat_template(..., return_assistant_tokens_mask=True)` marks the
same tokens the SFT loss mask covers. Each template renders a conversation prefix as a prefix of the
whole conversation (no earlier turn is re-rendered), which `archon.chat.encode_conversation` needs.

- ``chatml``: the plain format (no default system prompt).
- ``chatml_system``: ChatML with a default system prompt when the conversation brings none.
- ``chatml_think``: ChatML with thinking tags: an assistant turn's ``reasoning_content`` is rendered as
  ``<think>...</think>``; ``enable_thinking=False`` puts an empty think block before every answer (and the
  generation prompt) instead, without the reasoning.
"""

from __future__ import annotations

__all__ = ["CHAT_TEMPLATES", "DEFAULT_SYSTEM_PROMPT"]

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

_TURNS = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>\\n' -}}{%- endgeneration -%}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

CHATML = _TURNS

CHATML_SYSTEM = (
    "{%- if not messages or messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' -}}"
    "{%- endif -%}" + _TURNS
)

CHATML_THINK = (
    "{%- set think_off = enable_thinking is defined and not enable_thinking -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if think_off -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>\\n' -}}{%- endgeneration -%}"
    "{%- elif message.get('reasoning_content') -%}"
    "{%- generation -%}"
    "{{- '<think>\\n' + message['reasoning_content'] + '\\n</think>\\n\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endgeneration -%}"
    "{%- else -%}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>\\n' -}}{%- endgeneration -%}"
    "{%- endif -%}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}{%- if think_off -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)

CHAT_TEMPLATES: dict[str, str] = {"chatml": CHATML, "chatml_system": CHATML_SYSTEM, "chatml_think": CHATML_THINK}
