"""True/false statement pairs for the truthfulness detector (Li et al. 2023, "Inference-Time
Intervention").

Each pair is a true statement and a false one that share their start and differ in the final
word(s): ``"The capital of France is Paris."`` / ``"The capital of France is Rome."``. The shipped
set (``data/truth_pairs.jsonl``, written for headscope: geography, languages, arithmetic,
geometry, animals, science, calendar, common sense, people) has 229 pairs; every false ending is
a plausible answer of the same kind, and most endings are true in one pair and false in another,
so a probe cannot tell true from false by the word alone.

Your own pairs come as JSON lines, one pair a line::

    {"true": "Water boils at 100 degrees Celsius.", "false": "Water boils at 10 degrees Celsius."}

with an optional ``"category"``. The two statements must differ, and no statement may appear twice
in the file (a repeated statement could land on both sides of the split).

:func:`split_pairs` parts the pairs, never a pair's two statements, into probe-train,
probe-validation and held-out parts with a seeded shuffle: probes are fitted on the first, heads
scored on the second, and the causal validation runs on the third only.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from importlib import resources
from typing import Optional

from headscope.errors import DataError
from headscope.tasks.user_data import PathLike, line_error, read_jsonl

SHIPPED_FILE = "data/truth_pairs.jsonl"
EXAMPLE_LINE = '{"true": "The capital of France is Paris.", "false": "The capital of France is Rome."}'
MIN_PAIRS_PER_PART = 2  # the smallest probe-train, probe-validation and held-out part a split may give


@dataclass(frozen=True)
class StatementPair:
    """A true statement and a false one (``line``: where the pair is in its file, from 1)."""

    true: str
    false: str
    category: str = ""
    line: int = 0


@dataclass(frozen=True)
class PairSplit:
    """The three disjoint parts of a set of pairs (each pair whole in one part)."""

    train: tuple[StatementPair, ...]
    validation: tuple[StatementPair, ...]
    held_out: tuple[StatementPair, ...]


def shipped_pairs() -> list[StatementPair]:
    """The 229 pairs shipped with headscope."""
    path = resources.files("headscope.tasks").joinpath(SHIPPED_FILE)
    with resources.as_file(path) as file:
        return read_statement_pairs(file)


def read_statement_pairs(path: PathLike) -> list[StatementPair]:
    """The pairs of a JSON-lines file (see the module docstring).

    Raises:
        DataError: naming the file and line of a line that is not an object with two different,
            non-empty ``"true"`` and ``"false"`` strings, or of a statement already given.
    """
    pairs, seen = [], {}
    for number, row in read_jsonl(path, ("true", "false"), EXAMPLE_LINE, "statement pair"):
        pair = _pair_of_row(path, number, row)
        for statement in (pair.true, pair.false):
            if statement in seen:
                raise line_error(path, number, f"the statement {statement!r} is already on line {seen[statement]} "
                                 "(a repeated statement could be both fitted and held out; keep it once)", EXAMPLE_LINE)
            seen[statement] = number
        pairs.append(pair)
    return pairs


def _pair_of_row(path: PathLike, number: int, row: dict) -> StatementPair:
    """One checked pair from a parsed line."""
    for key in ("true", "false"):
        if not isinstance(row[key], str) or not row[key].strip():
            raise line_error(path, number, f"{key!r} must be a non-empty string, got {row[key]!r}", EXAMPLE_LINE)
    if row["true"].strip() == row["false"].strip():
        raise line_error(path, number, "the true and the false statement are the same", EXAMPLE_LINE)
    category = row.get("category", "")
    if not isinstance(category, str):
        raise line_error(path, number, f"'category' must be a string, got {category!r}", EXAMPLE_LINE)
    return StatementPair(row["true"].strip(), row["false"].strip(), category, number)


def part_sizes(n_pairs: int, validation_share: float, held_out_share: float) -> tuple[int, int, int]:
    """``(train, validation, held_out)`` pair counts of :func:`split_pairs` for ``n_pairs`` pairs:
    the validation and held-out parts take ``round(n_pairs * share)`` pairs, the rest is train."""
    validation = round(n_pairs * validation_share)
    held_out = round(n_pairs * held_out_share)
    return n_pairs - validation - held_out, validation, held_out


def check_split(n_pairs: int, validation_share: float, held_out_share: float, where: str) -> None:
    """Raise a :class:`DataError` (starting with ``where``) when a part of the split would hold
    fewer than :data:`MIN_PAIRS_PER_PART` pairs."""
    sizes = part_sizes(n_pairs, validation_share, held_out_share)
    if min(sizes) >= MIN_PAIRS_PER_PART:
        return
    train, validation, held_out = sizes
    raise DataError(
        f"{where}: {n_pairs} statement pair{'s' * (n_pairs != 1)} split into {train} to fit the probes, {validation} "
        f"to score the heads and {held_out} held out for validation (validation_share={validation_share}, "
        f"held_out_share={held_out_share}); each part needs at least {MIN_PAIRS_PER_PART}. Add pairs or change the "
        "shares."
    )


def split_pairs(pairs: list[StatementPair], validation_share: float, held_out_share: float, seed: int,
                where: Optional[str] = None) -> PairSplit:
    """Shuffle the pairs with ``random.Random(seed)`` and cut them into probe-train,
    probe-validation and held-out parts of :func:`part_sizes` (a pair's two statements always
    together). ``where`` names the data in the error for a split too small."""
    check_split(len(pairs), validation_share, held_out_share, where or "the statement pairs")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    train, validation, _ = part_sizes(len(pairs), validation_share, held_out_share)
    shuffled = [pairs[i] for i in order]
    return PairSplit(tuple(shuffled[:train]), tuple(shuffled[train:train + validation]),
                     tuple(shuffled[train + validation:]))


def statements(pairs: tuple[StatementPair, ...] | list[StatementPair]) -> tuple[list[str], list[int]]:
    """The statements of ``pairs`` interleaved (true, false, true, false, ...) and their labels
    (1 true, 0 false): row ``2 i`` is pair ``i``'s true statement, row ``2 i + 1`` its false one."""
    texts = [text for pair in pairs for text in (pair.true, pair.false)]
    return texts, [1, 0] * len(pairs)
