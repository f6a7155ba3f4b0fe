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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from headscope.errors import InputError

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


def make_task(model_or_tokenizer: Any, name: str, form: str = "space") -> SuccessionTask:
    """Task ``name`` in ``form``, keeping only items that are one token for this tokenizer."""
    if name not in ITEMS:
        raise InputError(f"Unknown succession task {name!r}; choose from {', '.join(ITEMS)}.")
    tokenizer = getattr(model_or_tokenizer, "tokenizer", None) or model_or_tokenizer
    texts = [item_text(item, form) for item in ITEMS[name]]
    ids = {i: _single_token(tokenizer, text) for i, text in enumerate(texts)}
    kept = {i: token for i, token in ids.items() if token is not None}
    n = len(texts)
    all_pairs = [(i, (i + 1) % n) for i in range(n if name in WRAPS else n - 1)]
    pairs = [(a, b) for a, b in all_pairs if a in kept and b in kept]
    return SuccessionTask(
        name=name, form=form, texts=texts, token_ids=kept, pairs=pairs, wraps=name in WRAPS,
        dropped_items=[texts[i] for i in range(n) if i not in kept], dropped_pairs=len(all_pairs) - len(pairs),
    )


def succession_tasks(
    model_or_tokenizer: Any, names: Sequence[str] = tuple(ITEMS), forms: Sequence[str] = ("space",)
) -> list[SuccessionTask]:
    """Every named task in every form, with the tasks that keep no pair left out."""
    tasks = [make_task(model_or_tokenizer, name, form) for name in names for form in forms]
    return [task for task in tasks if task.pairs]
