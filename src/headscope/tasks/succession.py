"""Succession tasks for successor heads (Gould et al. 2023): ordered sequences of single tokens.

Each task is an ordered list of items (numbers, number words, ordinals, days, months, their
abbreviations, letters, Roman numerals); a *pair* is an item and its successor (days and months
wrap: Sunday → Monday). A task is made concrete for one tokenizer and one *form* of its items:

* ``"space"``: with a leading space (``" Monday"``), the paper's form;
* ``"bare"``: without it (``"Monday"``), as after a newline or a quote;
* ``"space_title"`` / ``"space_upper"``: leading space and the word capitalised / upper-cased
  (``" One"``, ``" MONDAY"``), the other cases of the number words and names.

An item that is not a single token is dropped, and with it both pairs it belongs to (the pair
into it and the pair out of it); :class:`SuccessionTask` records what was dropped.
SmolLM2's tokenizer writes every number digit by digit and a leading space as its own token
before a digit, so of the numbers only the bare digits 1–9 survive, and no number with a space.

The researcher's own lists (:func:`read_succession_lists`, :func:`user_tasks`) become tasks the
same way: each list in every form, its items filtered to single tokens. Two file formats:

* ``.txt`` (any name not ending ``.jsonl``/``.json``): one ordered list per line, items separated
  by commas, ``Monday, Tuesday, Wednesday, Thursday, Friday``; the list is named ``line<N>`` after
  its line and does not wrap. Blank lines and lines starting with ``#`` are skipped.
* ``.jsonl``: one object per line, ``{"name": "weekdays", "items": ["Monday", "Tuesday", ...],
  "wraps": true}``; ``items`` required (strings), ``name`` (default ``line<N>``, unique) and
  ``wraps`` (default false: the last item has no successor) optional.

Items are written without their leading space (the forms add it) and may not repeat in a list;
every list needs at least ``min_items`` items (the successor detector asks for
``context_items + 1``, 4 by default: the items shown before the one asked for, and that one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from headscope.errors import DataError, InputError
from headscope.tasks.user_data import PathLike, line_error, read_jsonl, read_text

FORMS = ("space", "bare", "space_title", "space_upper")

ITEMS: dict[str, tuple[str, ...]] = {
    "numbers": tuple(str(i) for i in range(1, 201)),
    "number_words": tuple(
        "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen twenty".split()
    ),
    "ordinals": tuple("first second third fourth fifth sixth seventh eighth ninth tenth".split()),
    "days": tuple("Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()),
    "day_abbreviations": tuple("Mon Tue Wed Thu Fri Sat Sun".split()),
    "months": tuple(
        "January February March April May June July August September October November December".split()
    ),
    "month_abbreviations": tuple("Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()),
    "letters": tuple(chr(code) for code in range(ord("A"), ord("Z") + 1)),
    "roman_numerals": tuple("I II III IV V VI VII VIII IX X XI XII XIII XIV XV XVI XVII XVIII XIX XX".split()),
}
WRAPS = frozenset({"days", "day_abbreviations", "months", "month_abbreviations"})


@dataclass
class SuccessionTask:
    """One task in one form for one tokenizer: the items kept, their token ids, the pairs left."""

    name: str
    form: str
    texts: list[str]  # every item in this form, in order (kept or not)
    token_ids: dict[int, int]  # item index -> its single token id, for the items kept
    pairs: list[tuple[int, int]]  # (item index, successor index), both kept
    wraps: bool = False  # the last item's successor is the first (days, months)
    dropped_items: list[str] = field(default_factory=list)
    dropped_pairs: int = 0

    @property
    def kept_items(self) -> list[str]:
        return [self.texts[i] for i in sorted(self.token_ids)]

    @property
    def task_token_ids(self) -> list[int]:
        """The token ids of every kept item, in order: the candidates a success is judged among."""
        return [self.token_ids[i] for i in sorted(self.token_ids)]

    def summary(self) -> str:
        return (f"{self.name} ({self.form}): {len(self.token_ids)}/{len(self.texts)} items single tokens, "
                f"{len(self.pairs)} pairs kept, {self.dropped_pairs} dropped")


def item_text(item: str, form: str) -> str:
    """``item`` written in ``form``."""
    if form == "bare":
        return item
    if form == "space":
        return " " + item
    if form == "space_title":
        return " " + item[:1].upper() + item[1:]
    if form == "space_upper":
        return " " + item.upper()
    raise InputError(f"Unknown item form {form!r}; choose one of {', '.join(FORMS)}.")


def _single_token(tokenizer: Any, text: str) -> int | None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def make_task(
    model_or_tokenizer: Any, name: str, form: str = "space", items: Optional[Sequence[str]] = None,
    wraps: Optional[bool] = None,
) -> SuccessionTask:
    """Task ``name`` in ``form``, keeping only items that are one token for this tokenizer.

    Args:
        name: a shipped task (:data:`ITEMS`), or any name when ``items`` is given.
        items: the ordered items of a list of your own (default: the shipped task's).
        wraps: whether the last item's successor is the first (default: the shipped task's, or False).
    """
    if items is None:
        if name not in ITEMS:
            raise InputError(f"Unknown succession task {name!r}; choose from {', '.join(ITEMS)}.")
        items = ITEMS[name]
        wraps = name in WRAPS if wraps is None else wraps
    wraps = bool(wraps)
    tokenizer = getattr(model_or_tokenizer, "tokenizer", None) or model_or_tokenizer
    texts = [item_text(item, form) for item in items]
    ids = {i: _single_token(tokenizer, text) for i, text in enumerate(texts)}
    kept = {i: token for i, token in ids.items() if token is not None}
    n = len(texts)
    all_pairs = [(i, (i + 1) % n) for i in range(n if wraps else n - 1)]
    pairs = [(a, b) for a, b in all_pairs if a in kept and b in kept]
    return SuccessionTask(
        name=name, form=form, texts=texts, token_ids=kept, pairs=pairs, wraps=wraps,
        dropped_items=[texts[i] for i in range(n) if i not in kept], dropped_pairs=len(all_pairs) - len(pairs),
    )


def succession_tasks(
    model_or_tokenizer: Any, names: Sequence[str] = tuple(ITEMS), forms: Sequence[str] = ("space",)
) -> list[SuccessionTask]:
    """Every named task in every form, with the tasks that keep no pair left out."""
    tasks = [make_task(model_or_tokenizer, name, form) for name in names for form in forms]
    return [task for task in tasks if task.pairs]


# --- the researcher's own lists -----------------------------------------------------------------

TEXT_EXAMPLE = "Monday, Tuesday, Wednesday, Thursday, Friday"
JSONL_EXAMPLE = '{"name": "weekdays", "items": ["Monday", "Tuesday", "Wednesday", "Thursday"], "wraps": false}'
JSONL_KEYS = ("name", "items", "wraps")


@dataclass(frozen=True)
class SuccessionList:
    """One ordered list from the researcher's file: its name, items (without a leading space),
    whether it wraps, and where it came from (file and line, for error messages)."""

    name: str
    items: tuple[str, ...]
    wraps: bool = False
    path: str = ""
    line: int = 0

    @property
    def where(self) -> str:
        return f"{self.path}, line {self.line}"


def read_succession_lists(path: PathLike, min_items: int = 4) -> list[SuccessionList]:
    """The ordered lists in ``path``: JSON lines when it ends ``.jsonl``/``.json``, else one
    comma-separated list per line (formats in the module docstring). Needs no model.

    Raises:
        DataError: naming the file and the line: not JSON, no ``items``, an item that is not a
            non-empty string or that repeats, a name used twice, fewer than ``min_items`` items.
    """
    jsonl = Path(path).suffix.lower() in (".jsonl", ".json")
    rows = _jsonl_lists(path) if jsonl else _text_lists(path)
    example = JSONL_EXAMPLE if jsonl else TEXT_EXAMPLE
    lists, seen = [], {}
    for number, name, items, wraps in rows:
        if name in seen:
            raise line_error(path, number, f"the name {name!r} is also used on line {seen[name]}", example)
        seen[name] = number
        repeated = next((item for i, item in enumerate(items) if item in items[:i]), None)
        if repeated is not None:
            raise line_error(path, number, f"the item {repeated!r} appears twice in one list (an item has one "
                                           "successor)", example)
        if len(items) < min_items:
            raise line_error(path, number, f"a list of {len(items)} item{'s' * (len(items) != 1)}; each list needs at "
                                           f"least {min_items} (the items shown before one, and that one)", example)
        lists.append(SuccessionList(name, tuple(items), wraps, str(path), number))
    return lists


def _text_lists(path: PathLike) -> list[tuple[int, str, list[str], bool]]:
    rows = []
    for number, line in enumerate(read_text(path, "succession lists").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        items = [item.strip() for item in line.split(",")]
        if not all(items):
            raise line_error(path, number, "an empty item (two commas in a row, or a comma at an end)", TEXT_EXAMPLE)
        rows.append((number, f"line{number}", items, False))
    if not rows:
        raise DataError(f"{path} holds no succession lists: it is empty. Each line must be like {TEXT_EXAMPLE}")
    return rows


def _jsonl_lists(path: PathLike) -> list[tuple[int, str, list[str], bool]]:
    rows = []
    for number, row in read_jsonl(path, ("items",), JSONL_EXAMPLE, "succession lists"):
        unknown = sorted(set(row) - set(JSONL_KEYS))
        if unknown:
            raise line_error(path, number, f"unknown key {', '.join(map(repr, unknown))} (the keys are "
                                           f"{', '.join(JSONL_KEYS)})", JSONL_EXAMPLE)
        items = row["items"]
        if not isinstance(items, list) or not all(isinstance(item, str) and item.strip() for item in items):
            raise line_error(path, number, "'items' must be a list of non-empty strings", JSONL_EXAMPLE)
        name = row.get("name", f"line{number}")
        if not isinstance(name, str) or not name.strip():
            raise line_error(path, number, "'name' must be a non-empty string", JSONL_EXAMPLE)
        wraps = row.get("wraps", False)
        if not isinstance(wraps, bool):
            raise line_error(path, number, f"'wraps' must be true or false; got {wraps!r}", JSONL_EXAMPLE)
        rows.append((number, name.strip(), [item.strip() for item in items], wraps))
    return rows


def user_tasks(
    model_or_tokenizer: Any, lists: Sequence[SuccessionList], forms: Sequence[str] = ("space",)
) -> list[SuccessionTask]:
    """Every list in every form, filtered to single tokens as the shipped tasks are; a list-form
    pair that keeps no pair is left out, as :func:`succession_tasks` does.

    Raises:
        DataError: naming the list and its line, when in no form any of its items is a single
            token for this tokenizer, or none of its pairs keeps both items.
    """
    tasks = []
    for user_list in lists:
        made = [make_task(model_or_tokenizer, user_list.name, form, user_list.items, user_list.wraps) for form in forms]
        if not any(task.token_ids for task in made):
            examples = ", ".join(repr(item_text(user_list.items[0], form)) for form in forms)
            raise DataError(
                f"{user_list.where}: no item of the list {user_list.name!r} is a single token for this model's "
                f"tokenizer in any form ({', '.join(forms)}; e.g. {examples}). Successor scores compare single "
                "tokens: use items the tokenizer writes as one token, or other forms (forms=...)."
            )
        if not any(task.pairs for task in made):
            kept = sorted({text.strip() for task in made for text in task.kept_items})
            raise DataError(
                f"{user_list.where}: the list {user_list.name!r} keeps no pair of neighbouring items that are both "
                f"single tokens for this model's tokenizer (single tokens: {', '.join(kept)}). Add items between "
                "them that are single tokens, or drop the list."
            )
        tasks.extend(task for task in made if task.pairs)
    return tasks
