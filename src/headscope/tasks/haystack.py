"""Needle-in-a-haystack samples for retrieval heads (Wu et al. 2024).

A *needle* is one sentence stating an invented fact (``needles.jsonl``: fictional people and
places, so no model can answer from memory) or a random code (:func:`code_needles`). It is
inserted at a sentence break of a filler text shipped with headscope (``haystack_filler.txt``,
nine calm essays written for this package, repeated when a context needs more), at a depth
given in percent of the filler (0 = first, 100 = last), and a question follows.

Formats:

* ``"plain"``, the paper's base-model prompt:
  ``"{haystack}\\n\\nBased on the content of the text, Question: {question}\\nAnswer:"``;
* ``"chat"``: the same text as one user turn through the tokenizer's chat template, with the
  assistant turn opened (the paper's form for chat models);
* ``"auto"``: ``"chat"`` where the tokenizer has a chat template, else ``"plain"`` (base models).

``length`` is the prompt's total length in tokens; the filler is cut at sentence breaks so the
prompt lands within one sentence of it (``HaystackSample.n_tokens`` is exact). The answer's
token span is found from the tokenizer's offset mapping: every token that overlaps the answer's
characters belongs to it, so a merge at its border (``"dusk."`` → ``"dusk"`` + ``"."`` or a
leading space joined to a word) never loses or shifts the span.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any, Optional, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from headscope.engine.heads import model_shape
from headscope.engine.tokens import encode_with_offsets, token_span  # noqa: F401  (token_span re-exported)
from headscope.errors import InputError, PromptTooLongError

FORMATS = ("plain", "chat", "auto")
QUESTION_TEMPLATE = "Based on the content of the text, Question: {question}\nAnswer:"


@dataclass(frozen=True)
class Needle:
    """A sentence to hide, the question that asks for it, and the answer span (a substring)."""

    needle: str
    question: str
    answer: str

    def __post_init__(self) -> None:
        if self.answer not in self.needle:
            raise InputError(f"The answer {self.answer!r} must be a substring of the needle {self.needle!r}.")


@dataclass
class HaystackSample:
    """One prompt: tokens, where the answer lies in them, and the grid cell it belongs to."""

    tokens: Int[Tensor, " pos"]
    text: str
    needle: Needle
    answer_span: tuple[int, int]  # token positions [start, end) of the answer inside the needle
    length: int  # the requested length in tokens
    depth: float  # percent of the filler before the needle
    format: str
    answer_tokens: Int[Tensor, " n"]  # the answer as the model would continue the prompt

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.numel())


@lru_cache(maxsize=1)
def filler_sentences() -> tuple[str, ...]:
    """The shipped filler as sentences (titles dropped), in order."""
    text = resources.files("headscope.tasks").joinpath("data/haystack_filler.txt").read_text()
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    body = " ".join(p.replace("\n", " ") for p in paragraphs if p.rstrip().endswith("."))
    return tuple(s.strip() for s in re.split(r"(?<=\.)\s+", body) if s.strip())


def shipped_needles() -> list[Needle]:
    """The 24 invented-fact needles shipped with headscope."""
    lines = resources.files("headscope.tasks").joinpath("data/needles.jsonl").read_text().splitlines()
    return [Needle(**json.loads(line)) for line in lines if line.strip()]


_CODE_WORDS = (
    "amber", "basil", "cobalt", "delta", "ember", "falcon", "garnet", "harbor", "indigo", "juniper",
    "kestrel", "lantern", "maple", "nutmeg", "otter", "pepper", "quartz", "raven", "saffron", "thistle",
)
_CODE_OWNERS = (
    "the blue door of the Alder Street archive", "the locker of the night porter at Fenwick Station",
    "the vault beneath the Corvin bakery", "the gate of the Selby orchard", "the trunk in the attic of Moll Ashby",
    "the radio room of the ship Perpetua", "the cabinet of the museum of lost maps", "the shed of the Ivel rowing club",
)


def code_needles(n: int, seed: int = 0) -> list[Needle]:
    """``n`` needles whose answer is a random code such as ``"otter-garnet-4817"``."""
    rng = random.Random(seed)
    needles = []
    for i in range(n):
        owner = _CODE_OWNERS[i % len(_CODE_OWNERS)]
        code = f"{rng.choice(_CODE_WORDS)}-{rng.choice(_CODE_WORDS)}-{rng.randrange(1000, 10000)}"
        needles.append(Needle(f"The access code for {owner} is {code}.", f"What is the access code for {owner}?", code))
    return needles


def _tokenizer(model_or_tokenizer: Any) -> Any:
    return getattr(model_or_tokenizer, "tokenizer", None) or model_or_tokenizer


def _context_limit(model_or_tokenizer: Any) -> Optional[int]:
    if hasattr(model_or_tokenizer, "cfg"):
        return model_shape(model_or_tokenizer).n_ctx
    return None


def resolve_format(tokenizer: Any, format: str) -> str:
    """``"auto"`` → ``"chat"`` with a chat template, else ``"plain"``; other formats unchanged."""
    if format == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    return format


def _wrap(tokenizer: Any, haystack: str, question: str, format: str) -> str:
    user = f"{haystack}\n\n{QUESTION_TEMPLATE.format(question=question)}"
    if format == "plain":
        return user
    if format == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise InputError("This tokenizer has no chat template; use format='plain'.")
        messages = [{"role": "user", "content": user}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise InputError(f"Unknown haystack format {format!r}; choose one of {', '.join(FORMATS)}.")


def _encode(tokenizer: Any, text: str, format: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets; the plain format gets the tokenizer's BOS in front."""
    return encode_with_offsets(tokenizer, text, prepend_bos=format == "plain")


def _sentence_lengths(tokenizer: Any, sentences: Sequence[str]) -> list[int]:
    return [len(ids) for ids in tokenizer([" " + s for s in sentences], add_special_tokens=False)["input_ids"]]


def _filler_for(tokenizer: Any, n_tokens: int) -> list[str]:
    """Filler sentences, cycled, until about ``n_tokens`` tokens (never fewer than one sentence)."""
    sentences = filler_sentences()
    lengths = _sentence_lengths(tokenizer, sentences)
    chosen, total = [], 0
    for sentence, length in itertools.cycle(zip(sentences, lengths, strict=True)):
        if total + length > n_tokens and chosen:
            break
        chosen.append(sentence)
        total += length
    return chosen


def make_haystack(
    model_or_tokenizer: Any,
    needle: Needle,
    length: int,
    depth: float,
    format: str = "plain",
    insert_needle: bool = True,
) -> HaystackSample:
    """A prompt of about ``length`` tokens with ``needle`` at ``depth`` percent of the filler.

    ``insert_needle=False`` builds the same prompt without the needle (the control showing the
    model cannot answer from memory); its ``answer_span`` is then empty, ``(0, 0)``.
    """
    if not 0 <= depth <= 100:
        raise InputError(f"depth is a percentage of the haystack and must lie in 0..100, got {depth}.")
    tokenizer = _tokenizer(model_or_tokenizer)
    format = resolve_format(tokenizer, format)
    overhead = len(_encode(tokenizer, _wrap(tokenizer, needle.needle, needle.question, format), format)[0])
    if length <= overhead:
        raise InputError(f"length={length} leaves no room for filler: needle, question and template take {overhead} tokens.")
    filler = _filler_for(tokenizer, length - overhead)
    cut = round(len(filler) * depth / 100)
    before, after = " ".join(filler[:cut]), " ".join(filler[cut:])
    haystack = " ".join(part for part in (before, needle.needle if insert_needle else "", after) if part)
    text = _wrap(tokenizer, haystack, needle.question, format)
    ids, offsets = _encode(tokenizer, text, format)
    limit = _context_limit(model_or_tokenizer)
    if limit is not None and len(ids) > limit:
        raise PromptTooLongError(
            f"The haystack has {len(ids)} tokens, more than the model's context of {limit}; ask for a shorter length."
        )
    span = (0, 0)
    if insert_needle:
        answer_at = text.index(needle.needle) + needle.needle.index(needle.answer)
        span = token_span(offsets, answer_at, answer_at + len(needle.answer))
    lead = "" if format == "chat" else " "
    answer_ids = tokenizer(lead + needle.answer, add_special_tokens=False)["input_ids"]
    return HaystackSample(
        tokens=torch.tensor(ids, dtype=torch.long),
        text=text,
        needle=needle,
        answer_span=span,
        length=int(length),
        depth=float(depth),
        format=format,
        answer_tokens=torch.tensor(answer_ids, dtype=torch.long),
    )


def needle_grid(
    model_or_tokenizer: Any,
    lengths: Sequence[int],
    depths: Sequence[float],
    needles: Optional[Sequence[Needle]] = None,
    needles_per_cell: int = 1,
    format: str = "plain",
) -> list[HaystackSample]:
    """Samples over the grid lengths × depths; cells take the needles in turn (cycled)."""
    pool = list(needles) if needles is not None else shipped_needles()
    if not pool:
        raise InputError("needle_grid needs at least one needle.")
    turn = itertools.cycle(pool)
    return [
        make_haystack(model_or_tokenizer, next(turn), length, depth, format)
        for length in lengths
        for depth in depths
        for _ in range(needles_per_cell)
    ]
