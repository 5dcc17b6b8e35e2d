"""Built-in text rewards, ``fn(prompt, response, **fields) -> float``; both read the reference answer from the
``answer`` field.

- ``archon.rewards:math_verify``: 1.0 when the response's final answer (``\\boxed{}`` first, else the last
  LaTeX or plain expression) is mathematically equal to the reference, by the `math-verify` package.
- ``archon.rewards:reasoning_gym``: the reasoning-gym dataset's own ``score_answer`` on the text inside the
  response's last ``<answer>...</answer>`` tags; the dataset is ``metadata['source_dataset']`` (records of
  ``data.source: reasoning_gym`` carry ``metadata`` and ``question``).
"""

from __future__ import annotations

from functools import cache
from typing import Any

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from archon.data.source import quiet_import

with quiet_import():  # imported here, so a reward worker pays for it once when it loads the function
    from reasoning_gym import get_score_answer_fn
    from reasoning_gym.utils import extract_answer

__all__ = ["math_verify", "reasoning_gym"]


def _gold_text(answer: Any) -> str:
    text = str(answer).strip()
    return text if "$" in text or "\\boxed" in text else f"${text}$"


def math_verify(prompt: str, response: str, answer: Any = None, **_: Any) -> float:
    if answer is None:
        raise ValueError("math_verify needs the reference answer in the `answer` field (data.answer_key)")
    gold = parse(_gold_text(answer), extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()])
    if not gold:
        raise ValueError(f"math_verify cannot parse the reference answer {answer!r}")
    pred = parse(response, extraction_config=[LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()])
    return 1.0 if pred and verify(gold, pred) else 0.0


@cache
def _scorer(name: str):
    return get_score_answer_fn(name)


def reasoning_gym(prompt: str, response: str, answer: Any = None, metadata: dict | None = None,
                  question: str = "", **_: Any) -> float:
    if not metadata or "source_dataset" not in metadata:
        raise ValueError("reasoning_gym needs the record's `metadata` field with `source_dataset` "
                         "(records of data.source=reasoning_gym carry it)")
    entry = {"question": question, "answer": answer, "metadata": metadata}
    return float(_scorer(metadata["source_dataset"])(extract_answer(response), entry))
