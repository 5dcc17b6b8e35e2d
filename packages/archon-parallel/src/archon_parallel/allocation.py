"""Allocation-mode grammar: ``archon:d2p2t2c2``, ``sglang:d4+archon:d4p2t2``, hybrid MoE folding.

Grammar (whitespace between tokens is ignored)::

    allocation := part ( '+' part )?                 one archon part, at most one inference part
    part       := BACKEND ':' spec
    spec       := dims | '(' hybrid ')'              hybrid only for the archon part
    hybrid     := section '|' section                 'attn' and 'ffn', once each, any order
    section    := ( 'attn' | 'ffn' ) ':' dims
    dims       := ( LETTER INT )+                     each letter at most once, sizes >= 1

Training letters: ``r`` dp_replicate (HSDP), ``d`` dp_shard, ``p`` pp, ``t`` tp, ``c`` cp, ``e`` ep.
In the plain form ``e`` folds onto the d x c ranks (it must divide d*c). In the hybrid form the ``attn``
section takes ``r d p t c`` and the ``ffn`` section takes ``d p t e`` (expert data parallel, pp, expert
tensor parallel, expert parallel) over the same ranks. See docs/allocation.md.

The parser is a tokenizer plus a hand-written recursive-descent parser; every error is a ValueError
naming the 1-based column and what was expected there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = [
    "AllocationMode",
    "InferenceAllocation",
    "TrainAllocation",
    "parse_allocation",
    "TRAIN_BACKENDS",
    "INFERENCE_BACKENDS",
]

TRAIN_BACKENDS = ("archon",)
INFERENCE_BACKENDS = ("sglang", "vllm")
_PLAIN_LETTERS = "rdptce"
_ATTN_LETTERS = "rdptc"
_FFN_LETTERS = "dpte"
_INFER_LETTERS = "dpte"
_PUNCT = ":+()|"


@dataclass(frozen=True)
class _Token:
    kind: str  # "word", "int", one of _PUNCT, or "end"
    text: str
    col: int  # 1-based column of the first character


@dataclass(frozen=True)
class TrainAllocation:
    """The archon part. ``attn`` holds the plain dims (or the hybrid attn section); ``ffn`` is set only
    for the hybrid form. Missing letters mean size 1."""

    attn: dict[str, int]
    ffn: dict[str, int] | None = None

    @property
    def hybrid(self) -> bool:
        return self.ffn is not None

    @property
    def world_size(self) -> int:
        """Number of ranks: the product of the attn sizes (``e`` of the plain form folds onto them)."""
        return math.prod(v for k, v in self.attn.items() if k != "e")

    def size(self, letter: str, section: str = "attn") -> int:
        dims = self.attn if section == "attn" else (self.ffn or {})
        return dims.get(letter, 1)


@dataclass(frozen=True)
class InferenceAllocation:
    """An inference-engine part kept as data (``sglang:d4t2`` -> backend 'sglang', dims {d: 4, t: 2})."""

    backend: str
    dims: dict[str, int]

    @property
    def world_size(self) -> int:
        return math.prod(self.dims.values())


@dataclass(frozen=True)
class AllocationMode:
    """A parsed allocation string: the training part and the optional inference part."""

    train: TrainAllocation
    inference: InferenceAllocation | None = None
    text: str = field(default="", compare=False)


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = self._tokenize(text)
        self.pos = 0

    # -- errors ---------------------------------------------------------------------------------
    def error(self, col: int, message: str) -> ValueError:
        caret = " " * (col - 1) + "^"
        return ValueError(f"invalid allocation mode at column {col}: {message}\n  {self.text}\n  {caret}")

    # -- tokenizer ------------------------------------------------------------------------------
    def _tokenize(self, text: str) -> list[_Token]:
        tokens: list[_Token] = []
        i = 0
        while i < len(text):
            ch = text[i]
            if ch.isspace():
                i += 1
            elif ch in _PUNCT:
                tokens.append(_Token(ch, ch, i + 1))
                i += 1
            elif ch.isascii() and ch.isalpha():
                j = i
                while j < len(text) and text[j].isascii() and text[j].isalpha():
                    j += 1
                tokens.append(_Token("word", text[i:j].lower(), i + 1))
                i = j
            elif ch.isascii() and ch.isdigit():
                j = i
                while j < len(text) and text[j].isascii() and text[j].isdigit():
                    j += 1
                tokens.append(_Token("int", text[i:j], i + 1))
                i = j
            else:
                raise self.error(i + 1, f"unexpected character {ch!r}; expected a letter, a number or one "
                                        f"of {' '.join(_PUNCT)}")
        tokens.append(_Token("end", "", len(text) + 1))
        return tokens

    # -- helpers --------------------------------------------------------------------------------
    @property
    def tok(self) -> _Token:
        return self.tokens[self.pos]

    def describe(self, tok: _Token) -> str:
        return "end of string" if tok.kind == "end" else repr(tok.text)

    def expect(self, kind: str, what: str) -> _Token:
        tok = self.tok
        if tok.kind != kind:
            raise self.error(tok.col, f"expected {what}, found {self.describe(tok)}")
        self.pos += 1
        return tok

    # -- grammar --------------------------------------------------------------------------------
    def parse(self) -> AllocationMode:
        train: TrainAllocation | None = None
        infer: InferenceAllocation | None = None
        while True:
            start = self.tok
            backend = self.expect("word", f"a backend name ({', '.join(TRAIN_BACKENDS + INFERENCE_BACKENDS)})")
            self.expect(":", f"':' after {backend.text!r}")
            if backend.text in TRAIN_BACKENDS:
                if train is not None:
                    raise self.error(start.col, "the archon part appears twice; give it once")
                train = self._train_spec()
            elif backend.text in INFERENCE_BACKENDS:
                if infer is not None:
                    raise self.error(start.col, "more than one inference part; give at most one")
                infer = InferenceAllocation(backend.text, self._dims(_INFER_LETTERS, f"{backend.text} part"))
            else:
                known = ", ".join(TRAIN_BACKENDS + INFERENCE_BACKENDS)
                raise self.error(backend.col, f"unknown backend {backend.text!r}; expected one of {known}")
            if self.tok.kind == "+":
                self.pos += 1
                continue
            if self.tok.kind != "end":
                raise self.error(self.tok.col, f"expected '+' or end of string, found {self.describe(self.tok)}")
            break
        if train is None:
            raise self.error(len(self.text) + 1, "no archon part; add one, e.g. '+archon:d4'")
        return AllocationMode(train=train, inference=infer, text=self.text)

    def _train_spec(self) -> TrainAllocation:
        if self.tok.kind == "(":
            return self._hybrid()
        start = self.tok
        dims = self._dims(_PLAIN_LETTERS, "archon part")
        ep = dims.get("e", 1)
        inner = dims.get("d", 1) * dims.get("c", 1)
        if inner % ep != 0:
            raise self.error(start.col, f"ep {ep} must divide d*c = {inner} (EP borrows ranks from the "
                                        f"dp_shard and cp dims, never from r, t or p); change e or d, or use "
                                        f"the hybrid (attn:...|ffn:...) form to fold experts onto tp ranks")
        return TrainAllocation(attn=dims)

    def _hybrid(self) -> TrainAllocation:
        self.expect("(", "'('")
        sections: dict[str, dict[str, int]] = {}
        cols: dict[str, int] = {}
        while True:
            name = self.expect("word", "'attn' or 'ffn'")
            if name.text not in ("attn", "ffn"):
                raise self.error(name.col, f"unknown section {name.text!r}; expected 'attn' or 'ffn'")
            if name.text in sections:
                raise self.error(name.col, f"section {name.text!r} appears twice")
            self.expect(":", f"':' after {name.text!r}")
            letters = _ATTN_LETTERS if name.text == "attn" else _FFN_LETTERS
            cols[name.text] = name.col
            sections[name.text] = self._dims(letters, f"{name.text} section")
            if self.tok.kind == "|":
                self.pos += 1
                continue
            close = self.expect(")", "'|' or ')'")
            break
        for needed in ("attn", "ffn"):
            if needed not in sections:
                raise self.error(close.col, f"hybrid form needs both 'attn' and 'ffn' sections; '{needed}' "
                                            f"is missing")
        attn, ffn = sections["attn"], sections["ffn"]
        attn_world, ffn_world = math.prod(attn.values()), math.prod(ffn.values())
        if attn_world != ffn_world:
            raise self.error(cols["ffn"], f"ffn world size {ffn_world} differs from attn world size "
                                          f"{attn_world}; the two sections must use the same ranks")
        if attn.get("p", 1) != ffn.get("p", 1):
            raise self.error(cols["ffn"], f"ffn pp {ffn.get('p', 1)} differs from attn pp {attn.get('p', 1)}; "
                                          f"pipeline stages are shared, use the same p")
        stage = attn.get("d", 1) * attn.get("c", 1) * attn.get("t", 1)
        if stage % (ffn.get("e", 1) * ffn.get("t", 1)) != 0:
            raise self.error(cols["ffn"], f"ffn e*t = {ffn.get('e', 1) * ffn.get('t', 1)} must divide attn "
                                          f"d*c*t = {stage} (expert groups never span r replicas)")
        return TrainAllocation(attn=attn, ffn=ffn)

    def _dims(self, letters: str, where: str) -> dict[str, int]:
        allowed = ", ".join(letters)
        dims: dict[str, int] = {}
        if self.tok.kind != "word":
            raise self.error(self.tok.col, f"expected a dimension letter ({allowed}) in the {where}, found "
                                           f"{self.describe(self.tok)}")
        while self.tok.kind == "word":
            tok = self.tok
            if len(tok.text) != 1 or tok.text not in letters:
                raise self.error(tok.col, f"unknown dimension {tok.text!r} in the {where}; expected one of "
                                          f"{allowed}, each followed by its size (e.g. d2)")
            if tok.text in dims:
                raise self.error(tok.col, f"dimension {tok.text!r} given twice in the {where}")
            self.pos += 1
            size = self.expect("int", f"a size after {tok.text!r}")
            value = int(size.text)
            if value < 1:
                raise self.error(size.col, f"size of {tok.text!r} must be >= 1, got {value}")
            dims[tok.text] = value
        return dims


def parse_allocation(text: str) -> AllocationMode:
    """Parse an allocation string such as ``"sglang:d4+archon:d2p2t2"``; raise ValueError with the column.

    >>> parse_allocation("archon:d2t2").train.world_size
    4
    """
    if not isinstance(text, str):
        raise TypeError(f"allocation mode must be a str, got {type(text).__name__}")
    return _Parser(text).parse()
