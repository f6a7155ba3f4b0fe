"""Needle-in-a-haystack samples for retrieval heads (Wu et al. 2024).

A *needle* is one sentence stating an invented fact (``needles.jsonl``: 24 about fictional
people and places, so no model can answer from memory; :func:`fact_needles` continues them with
:func:`generated_needles`, each about its own invented person) or a random code
(:func:`code_needles`). It is
inserted at a sentence break of a filler text shipped with headscope (``haystack_filler.txt``,
nine calm essays written for this package, repeated when a context needs more), at a depth
given in percent of the filler (0 = first, 100 = last), and a question follows.

Your own data (the retrieval detector's ``data`` and ``haystack`` settings):

* needles (:func:`read_needles`): JSON lines, one needle each,
  ``{"needle": "The secret ingredient of the soup is saffron.", "question": "What is the secret
  ingredient of the soup?", "answer": "saffron"}``; the answer must occur in the needle as written,
  and no needle or question may repeat (each sample has its own needle);
* filler (:func:`read_haystack`): any UTF-8 text. Line breaks and runs of spaces become one
  space; sentences end at ``.``, ``!`` or ``?`` followed by a space, and the needle goes between
  two of them. The text is read from its start and never repeated: a text too short for a
  length is a :class:`~headscope.errors.DataError` naming the length and the tokens it needs.

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
from headscope.errors import DataError, InputError, PromptTooLongError
from headscope.tasks.user_data import PathLike, line_error, read_jsonl, read_text

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


@dataclass(frozen=True)
class HaystackText:
    """Your own filler as sentences in order, and the file it was read from (for messages). Unlike
    the shipped essays, it is never repeated: a prompt takes sentences from its start."""

    sentences: tuple[str, ...]
    path: Optional[str] = None


def split_sentences(text: str) -> tuple[str, ...]:
    """``text`` with line breaks and runs of spaces made one space, cut after every ``.``, ``!``
    or ``?`` that a space follows."""
    body = " ".join(text.split())
    return tuple(s for s in re.split(r"(?<=[.!?])\s+", body) if s)


def read_haystack(path: PathLike) -> HaystackText:
    """A UTF-8 text file of your own as filler (:func:`split_sentences`).

    Raises:
        DataError: no such file, not UTF-8, or no text in it.
    """
    sentences = split_sentences(read_text(path, "haystack"))
    if not sentences:
        raise DataError(f"The haystack file {path} holds no text: give a UTF-8 text file of plain prose.")
    return HaystackText(sentences, str(path))


NEEDLE_EXAMPLE = ('{"needle": "The secret ingredient of the soup is saffron.", '
                  '"question": "What is the secret ingredient of the soup?", "answer": "saffron"}')


def read_needles(path: PathLike) -> list[Needle]:
    """Needles of your own from a JSON-lines file, one ``{"needle", "question", "answer"}`` object
    per line (:data:`NEEDLE_EXAMPLE`), in the file's order; outer spaces are stripped.

    Raises:
        DataError: naming the file and line: not JSON, a key missing, a value that is not a
            non-empty string, an answer that does not occur in its needle, or a needle or question
            that repeats an earlier line's (scoring and validation would share it, and the
            checkpoint keys samples by question).
    """
    needles: list[Needle] = []
    seen: dict[str, dict[str, int]] = {"needle": {}, "question": {}}
    for number, row in read_jsonl(path, ("needle", "question", "answer"), NEEDLE_EXAMPLE, "needles"):
        for key in ("needle", "question", "answer"):
            if not isinstance(row[key], str) or not row[key].strip():
                raise line_error(path, number, f"{key!r} is {row[key]!r}, not a non-empty string", NEEDLE_EXAMPLE)
        needle, question, answer = (row[key].strip() for key in ("needle", "question", "answer"))
        if answer not in needle:
            raise line_error(path, number, f"the answer {answer!r} does not occur in the needle {needle!r} (it must "
                                           "be a part of it, spelled the same)", NEEDLE_EXAMPLE)
        for key, text in (("needle", needle), ("question", question)):
            if text in seen[key]:
                raise line_error(path, number, f"the {key} repeats line {seen[key][text]}'s: every sample needs "
                                               f"its own needle and question", NEEDLE_EXAMPLE)
            seen[key][text] = number
        needles.append(Needle(needle, question, answer))
    return needles


def shipped_needles() -> list[Needle]:
    """The 24 invented-fact needles shipped with headscope."""
    lines = resources.files("headscope.tasks").joinpath("data/needles.jsonl").read_text().splitlines()
    return [Needle(**json.loads(line)) for line in lines if line.strip()]


# Invented-fact needles beyond the shipped ones: a unique invented person per index (mixed radix
# over the name parts, so no two generated needles share a name, a sentence or a question), and
# the details drawn from word lists with a per-index seed.
_FIRST_NAMES = (
    "Albin", "Brisa", "Caspar", "Delphine", "Edric", "Fenna", "Gideon", "Hesper", "Ilario", "Jessamy",
    "Kasimir", "Linnea", "Magnus", "Nerys", "Osric", "Perpetua", "Quentin", "Rosalind", "Severin", "Tamsin",
)
_SURNAME_HEADS = ("Ash", "Bram", "Cold", "Drum", "Elder", "Fern", "Gale", "Hollow", "Ivy", "Marrow", "Quill", "Thorn")
_SURNAME_TAILS = ("bury", "cote", "field", "gard", "holt", "ley", "mere", "ridge", "stow", "wick", "worth", "vane")
_TRADES = (
    "baker", "beekeeper", "bookbinder", "candlemaker", "clockmaker", "ferryman", "gardener", "locksmith",
    "potter", "shepherd", "weaver", "harbour pilot",
)
_COLOURS = ("crimson", "golden", "jade", "lilac", "plum", "russet", "saffron", "scarlet", "slate", "teal")  # take "a"
_ANIMALS = ("badger", "crane", "ferret", "heron", "lynx", "magpie", "otter", "pelican", "tortoise", "wren")
_OBJECTS = (
    "brass bell", "chess knight", "clay whistle", "cracked compass", "feather quill", "glass marble",
    "pewter spoon", "silk ribbon", "tin soldier", "wooden flute", "paper lantern", "copper kettle",
)
_PLACES = (
    "the old mill", "the chapel gate", "the fish market", "the north bridge", "the village well", "the toll house",
)
_FACT_TEMPLATES = (
    ("{who} keeps {a}, {b}, and {c} in a {colour} box.",
     "What does {who} keep in a {colour} box?", "{a}, {b}, and {c}"),
    ("Every spring {who} paints a {colour} {animal} holding a {object} on the door of {place}.",
     "What does {who} paint on the door of {place} every spring?", "a {colour} {animal} holding a {object}"),
    ("{who} hides the spare key under a {object} beside {place}.",
     "Where does {who} hide the spare key?", "under a {object} beside {place}"),
    ("The secret recipe of {who} calls for {a}, {b}, and a {colour} {animal} feather.",
     "What does the secret recipe of {who} call for?", "{a}, {b}, and a {colour} {animal} feather"),
)
N_GENERATED_FACTS = len(_FIRST_NAMES) * len(_SURNAME_HEADS) * len(_SURNAME_TAILS)


def generated_needles(n: int, start: int = 0) -> list[Needle]:
    """Invented-fact needles ``start .. start + n - 1`` of a fixed sequence of
    :data:`N_GENERATED_FACTS` (2,880), each about its own invented person ("the potter Fenna
    Thornwick"), so no two share a sentence or a question. The same index always gives the same
    needle.

    Raises:
        InputError: the range runs past the :data:`N_GENERATED_FACTS` needles there are.
    """
    if start < 0 or n < 0:
        raise InputError(f"generated_needles needs start >= 0 and n >= 0; got start={start}, n={n}.")
    if start + n > N_GENERATED_FACTS:
        raise InputError(
            f"Only {N_GENERATED_FACTS} generated fact needles exist; needles {start}..{start + n - 1} were asked for. "
            "Use code needles (needles='codes'), which have no such limit, or a smaller grid."
        )
    needles = []
    for index in range(start, start + n):
        rest, first = divmod(index, len(_FIRST_NAMES))
        tail, head = divmod(rest, len(_SURNAME_HEADS))
        rng = random.Random(7919 + index)
        who = (f"the {_TRADES[index % len(_TRADES)]} {_FIRST_NAMES[first]} "
               f"{_SURNAME_HEADS[head]}{_SURNAME_TAILS[tail]}")
        a, b, c = rng.sample(_OBJECTS, 3)
        fill = dict(who=who, a=f"a {a}", b=f"a {b}", c=f"a {c}", colour=rng.choice(_COLOURS),
                    animal=rng.choice(_ANIMALS), object=rng.choice(_OBJECTS), place=rng.choice(_PLACES))
        needle, question, answer = (part.format(**fill) for part in _FACT_TEMPLATES[index % len(_FACT_TEMPLATES)])
        needles.append(Needle(needle[0].upper() + needle[1:], question, answer))
    return needles


def fact_needles(n: int, start: int = 0) -> list[Needle]:
    """Invented-fact needles ``start .. start + n - 1``: the 24 shipped ones first, then
    :func:`generated_needles`; distinct for every index, so needles taken from disjoint ranges
    never repeat one another."""
    if start < 0 or n < 0:
        raise InputError(f"fact_needles needs start >= 0 and n >= 0; got start={start}, n={n}.")
    shipped = shipped_needles()
    taken = shipped[start : start + n]
    first_generated = max(start - len(shipped), 0)
    return taken + generated_needles(n - len(taken), first_generated)


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
    """``n`` distinct needles whose answer is a random code such as ``"otter-garnet-4817"``
    (a code drawn twice is drawn again); ``code_needles(m, seed)`` starts with
    ``code_needles(n, seed)`` for ``m > n``."""
    rng = random.Random(seed)
    needles, codes = [], set()
    for i in range(n):
        owner = _CODE_OWNERS[i % len(_CODE_OWNERS)]
        code = ""
        while not code or code in codes:
            code = f"{rng.choice(_CODE_WORDS)}-{rng.choice(_CODE_WORDS)}-{rng.randrange(1000, 10000)}"
        codes.add(code)
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


SENTENCE_BLOCK = 64  # sentences of a user's filler tokenized at a time (a long text is read only as far as needed)


def _text_filler(tokenizer: Any, n_tokens: int, text: HaystackText) -> tuple[list[str], Optional[int]]:
    """The sentences from the start of ``text`` that make about ``n_tokens`` tokens, by the rule of
    :func:`_filler_for` but never repeated, and ``None``; when the whole text has fewer than
    ``n_tokens`` tokens, all of it and its token count (the caller raises)."""
    chosen: list[str] = []
    total = 0
    for first in range(0, len(text.sentences), SENTENCE_BLOCK):
        block = text.sentences[first : first + SENTENCE_BLOCK]
        for sentence, length in zip(block, _sentence_lengths(tokenizer, block), strict=True):
            if total + length > n_tokens and chosen:
                return chosen, None
            chosen.append(sentence)
            total += length
    return chosen, (None if total >= n_tokens else total)


def make_haystack(
    model_or_tokenizer: Any,
    needle: Needle,
    length: int,
    depth: float,
    format: str = "plain",
    insert_needle: bool = True,
    filler: Optional[HaystackText] = None,
) -> HaystackSample:
    """A prompt of about ``length`` tokens with ``needle`` at ``depth`` percent of the filler.

    ``insert_needle=False`` builds the same prompt without the needle (the control showing the
    model cannot answer from memory); its ``answer_span`` is then empty, ``(0, 0)``. ``filler``:
    your own text (:func:`read_haystack`) instead of the shipped essays.

    Raises:
        DataError: ``filler`` has fewer tokens than ``length`` needs (never repeated or padded).
    """
    if not 0 <= depth <= 100:
        raise InputError(f"depth is a percentage of the haystack and must lie in 0..100, got {depth}.")
    tokenizer = _tokenizer(model_or_tokenizer)
    format = resolve_format(tokenizer, format)
    overhead = len(_encode(tokenizer, _wrap(tokenizer, needle.needle, needle.question, format), format)[0])
    if length <= overhead:
        raise InputError(f"length={length} leaves no room for filler: needle, question and template take {overhead} tokens.")
    if filler is None:
        sentences = _filler_for(tokenizer, length - overhead)
    else:
        sentences, total = _text_filler(tokenizer, length - overhead, filler)
        if total is not None:
            where = f"The haystack file {filler.path}" if filler.path else "The haystack text"
            raise DataError(
                f"{where} has {total} tokens of text (this model's tokenizer), but length={length} needs "
                f"{length - overhead} tokens of filler ({overhead} go to needle, question and template): give a text of "
                f"at least {length - overhead} tokens, or lengths of at most {total + overhead}. A haystack is never "
                "repeated or padded."
            )
    cut = round(len(sentences) * depth / 100)
    before, after = " ".join(sentences[:cut]), " ".join(sentences[cut:])
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
    filler: Optional[HaystackText] = None,
) -> list[HaystackSample]:
    """Samples over the grid lengths × depths; cells take the needles in turn (cycled).
    ``filler``: your own text (:func:`read_haystack`) instead of the shipped essays."""
    pool = list(needles) if needles is not None else shipped_needles()
    if not pool:
        raise InputError("needle_grid needs at least one needle.")
    turn = itertools.cycle(pool)
    return [
        make_haystack(model_or_tokenizer, next(turn), length, depth, format, filler=filler)
        for length in lengths
        for depth in depths
        for _ in range(needles_per_cell)
    ]
