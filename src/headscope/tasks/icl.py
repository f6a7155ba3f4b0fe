"""In-context-learning tasks for function-vector heads (Todd et al. 2024, "Function Vectors in
Large Language Models"): word pairs shown as demonstrations, then a query whose answer the model
must infer from them.

Shipped data (``tasks/data/icl_<task>.txt``, one ``input<TAB>output`` pair a line, written for
headscope after the paper's tasks of the same names):

* ``antonym`` (hot → cold), ``country_capital`` (France → Paris), ``country_language``
  (France → French), ``present_past`` (go → went), ``capitalize`` (apple → Apple), 60 pairs each;
* ``letter_upper`` (a → A), the 26 letters: single characters, so that even a byte-level
  tokenizer can run it.

No word is both an input and an output of one task, and no input repeats.

The answer rule: a pair is kept for a tokenizer when its answer with a leading space (``" cold"``,
how it follows ``": "``) is ONE token; that token is what the detector scores. Pairs with longer
answers are dropped (:class:`ICLTask` records how many).

Prompt format (``icl_text``): ``"x1: y1\\nx2: y2\\n...\\nxq:"``, ``n_shots`` demonstrations then
the query; headscope's tokenizer convention adds the BOS. A *shuffled* prompt has the same
demonstrations and query with the labels permuted among the demonstrations by a random cyclic
permutation (Sattolo), so every label moves to another input: the prompt shows the format and the
label set but not the task.

Pairs are split by query word (:func:`split_pairs`): a seeded shuffle, the first
``round(n * held_out_share)`` held out. A prompt's query and its demonstrations all come from one
half, so held-out prompts contain no scored pair at all.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any, Sequence

from headscope.engine.tokens import spaced_word_token
from headscope.errors import InputError

TASKS = ("antonym", "country_capital", "country_language", "present_past", "capitalize", "letter_upper")

Pair = tuple[str, str]


def load_pairs(name: str) -> list[Pair]:
    """The shipped ``(input, output)`` pairs of task ``name``."""
    if name not in TASKS:
        raise InputError(f"Unknown in-context task {name!r}; choose one of {', '.join(TASKS)}.")
    text = resources.files("headscope.tasks").joinpath(f"data/icl_{name}.txt").read_text("utf-8")
    return [tuple(line.split("\t")) for line in text.splitlines() if line.strip()]  # type: ignore[misc]


@dataclass
class ICLTask:
    """One task for one tokenizer: the pairs kept (single-token answers) and their answer ids."""

    name: str
    pairs: list[Pair]
    answer_ids: dict[str, int]  # answer -> the id of " answer"
    dropped: list[Pair] = field(default_factory=list)


def answer_token(tokenizer: Any, answer: str) -> int | None:
    """The id of ``answer`` after a space (``"hot: cold"``) when it is one token, else None
    (:func:`~headscope.engine.tokens.spaced_word_token`: right for SentencePiece tokenizers too)."""
    return spaced_word_token(tokenizer, answer)


def icl_task(model: Any, name: str, pairs: Sequence[Pair] | None = None) -> ICLTask:
    """Task ``name`` (its shipped pairs, or ``pairs``) kept where the answer is one token."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise InputError("The in-context tasks are text: this model has no tokenizer.")
    kept, dropped, ids = [], [], {}
    for query, answer in (load_pairs(name) if pairs is None else pairs):
        token = answer_token(tokenizer, answer)
        if token is None:
            dropped.append((query, answer))
            continue
        kept.append((query, answer))
        ids[answer] = token
    return ICLTask(name, kept, ids, dropped)


def split_pairs(pairs: Sequence[Pair], held_out_share: float, seed: int | str) -> tuple[list[Pair], list[Pair]]:
    """``(scored, held_out)``: the pairs shuffled with ``random.Random(seed)``, the first
    ``round(len * held_out_share)`` held out (disjoint by query word: no query repeats)."""
    order = list(pairs)
    random.Random(seed).shuffle(order)
    n_held = round(len(order) * held_out_share)
    return order[n_held:], order[:n_held]


@dataclass(frozen=True)
class ICLPrompt:
    """One prompt: its demonstrations as shown, the query, and the answer the task asks for."""

    task: str
    demos: tuple[Pair, ...]
    query: str
    answer: str
    answer_id: int
    shuffled: bool = False

    @property
    def text(self) -> str:
        return icl_text(self.demos, self.query)


def icl_text(demos: Sequence[Pair], query: str) -> str:
    """``"x1: y1\\n...\\nxq:"``."""
    return "".join(f"{x}: {y}\n" for x, y in demos) + f"{query}:"


def build_prompts(task: ICLTask, pairs: Sequence[Pair], n_prompts: int, n_shots: int,
                  seed: int | str) -> list[ICLPrompt]:
    """``n_prompts`` clean prompts: queries taken in a seeded order from ``pairs`` (cycling when
    there are fewer pairs than prompts), each with ``n_shots`` demonstrations drawn from the other
    pairs of ``pairs``."""
    if len(pairs) < n_shots + 1:
        raise InputError(f"The {task.name} task has {len(pairs)} pairs on this side of the split; {n_shots} "
                         f"demonstrations and a query need {n_shots + 1}. Lower n_shots or use another task.")
    rng = random.Random(seed)
    order = list(pairs)
    rng.shuffle(order)
    prompts = []
    for index in range(n_prompts):
        query, answer = order[index % len(order)]
        others = [pair for pair in pairs if pair[0] != query]
        demos = tuple(rng.sample(others, n_shots))
        prompts.append(ICLPrompt(task.name, demos, query, answer, task.answer_ids[answer]))
    return prompts


def shuffled(prompt: ICLPrompt, seed: int | str) -> ICLPrompt:
    """The prompt with its labels moved by a random cyclic permutation (every label to another
    input; Sattolo's algorithm, seeded)."""
    if len(prompt.demos) < 2:
        raise InputError("Shuffling labels needs at least 2 demonstrations (n_shots >= 2).")
    rng = random.Random(seed)
    labels = [y for _, y in prompt.demos]
    for i in range(len(labels) - 1, 0, -1):
        j = rng.randrange(i)
        labels[i], labels[j] = labels[j], labels[i]
    demos = tuple((x, y) for (x, _), y in zip(prompt.demos, labels, strict=True))
    return replace(prompt, demos=demos, shuffled=True)
