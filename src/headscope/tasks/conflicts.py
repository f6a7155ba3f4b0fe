"""Knowledge conflicts: facts a model knows, contradicted by its context.

For the memory/context-head work of issue 4 (Yu, Merullo, Pavlick 2023; Jin et al. 2024). Each
relation lists ``(subject, answer)`` facts and a cloze that asks for the answer. An item keeps a
fact only if the model answers the plain cloze from memory (its top next token is the answer's
first token); the counterfactual context answer is another answer of the same relation with a
different first token. Answers are compared by their first token, always with a leading space.

Formats (``{s}`` subject, ``{c}`` counterfactual, ``{cloze}`` the relation's cloze):

* ``"qa"``: the papers' form, ``"{fact with c}.\\nQ: {question}\\nA:"``;
* ``"restate"``: ``"{fact with c}. {cloze}"``;
* ``"according"``: ``"According to the text, {fact with c}. According to the text, {cloze}"``.

:func:`split_by_subject` parts items into scored and held-out sets that share no subject.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from headscope.engine.tokens import tokenize
from headscope.errors import InputError

FORMATS = ("qa", "restate", "according")


@dataclass(frozen=True)
class Relation:
    """A relation: facts, the cloze that asks for the answer, and the matching question."""

    name: str
    cloze: str  # "The capital of {s} is"
    question: str  # "What is the capital of {s}?"
    facts: tuple[tuple[str, str], ...]


RELATIONS: dict[str, Relation] = {
    relation.name: relation
    for relation in (
        Relation(
            "capital", "The capital of {s} is", "What is the capital of {s}?",
            (("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Spain", "Madrid"),
             ("Russia", "Moscow"), ("China", "Beijing"), ("Egypt", "Cairo"), ("England", "London"),
             ("Greece", "Athens"), ("Austria", "Vienna"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"),
             ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"),
             ("Poland", "Warsaw"), ("Hungary", "Budapest"), ("Belgium", "Brussels"), ("the Netherlands", "Amsterdam"),
             ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Kenya", "Nairobi"), ("Thailand", "Bangkok"),
             ("South Korea", "Seoul"), ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Turkey", "Ankara"),
             ("Argentina", "Buenos"), ("Peru", "Lima"), ("Cuba", "Havana"), ("Mexico", "Mexico"),
             ("India", "New"), ("Vietnam", "Hanoi"), ("Indonesia", "Jakarta"), ("the Philippines", "Manila"),
             ("Chile", "Santiago"), ("Colombia", "Bogot"), ("Ukraine", "Kyiv"), ("Scotland", "Edinburgh"),
             ("Wales", "Cardiff"), ("Czechia", "Prague"), ("Romania", "Bucharest"), ("Serbia", "Belgrade")),
        ),
        Relation(
            "currency", "The currency of {s} is the", "What is the currency of {s}?",
            (("Japan", "yen"), ("the United States", "dollar"), ("the United Kingdom", "pound"), ("India", "rupee"),
             ("Germany", "euro"), ("France", "euro"), ("Russia", "ruble"), ("China", "yuan"), ("Mexico", "peso"),
             ("Switzerland", "franc"), ("South Korea", "won"), ("Brazil", "real"), ("Poland", "zloty"),
             ("Sweden", "krona"), ("Turkey", "lira"), ("South Africa", "rand"), ("Israel", "shekel"),
             ("Thailand", "baht"), ("Vietnam", "dong"), ("Canada", "dollar"), ("Australia", "dollar"),
             ("Italy", "euro"), ("Spain", "euro"), ("Argentina", "peso"), ("Hungary", "forint")),
        ),
        Relation(
            "language", "The official language of {s} is", "What is the official language of {s}?",
            (("France", "French"), ("Germany", "German"), ("Spain", "Spanish"), ("Italy", "Italian"),
             ("Japan", "Japanese"), ("China", "Chinese"), ("Russia", "Russian"), ("Portugal", "Portuguese"),
             ("Brazil", "Portuguese"), ("Mexico", "Spanish"), ("Greece", "Greek"), ("Turkey", "Turkish"),
             ("Poland", "Polish"), ("the Netherlands", "Dutch"), ("Sweden", "Swedish"), ("Norway", "Norwegian"),
             ("Finland", "Finnish"), ("Denmark", "Danish"), ("Hungary", "Hungarian"), ("Korea", "Korean"),
             ("Vietnam", "Vietnamese"), ("Thailand", "Thai"), ("Iran", "Persian"), ("Israel", "Hebrew"),
             ("Egypt", "Arabic"), ("Argentina", "Spanish"), ("Austria", "German"), ("Ukraine", "Ukrainian")),
        ),
        Relation(
            "continent", "{s} is a country in", "On which continent is {s}?",
            (("France", "Europe"), ("Germany", "Europe"), ("Italy", "Europe"), ("Spain", "Europe"),
             ("Poland", "Europe"), ("Japan", "Asia"), ("China", "Asia"), ("India", "Asia"), ("Thailand", "Asia"),
             ("Vietnam", "Asia"), ("Kenya", "Africa"), ("Nigeria", "Africa"), ("Egypt", "Africa"),
             ("Ghana", "Africa"), ("Ethiopia", "Africa"), ("Brazil", "South"), ("Argentina", "South"),
             ("Peru", "South"), ("Chile", "South"), ("Canada", "North"), ("Mexico", "North"),
             ("Australia", "Australia"), ("Sweden", "Europe"), ("Morocco", "Africa"), ("Indonesia", "Asia")),
        ),
        Relation(
            "author", "The novel {s} was written by", "Who wrote the novel {s}?",
            (("Hamlet", "William"), ("Pride and Prejudice", "Jane"), ("Nineteen Eighty-Four", "George"),
             ("The Hobbit", "J"), ("War and Peace", "Leo"), ("Oliver Twist", "Charles"), ("Moby-Dick", "Herman"),
             ("The Old Man and the Sea", "Ernest"), ("Don Quixote", "Miguel"), ("Les Misérables", "Victor"),
             ("Crime and Punishment", "Fyodor"), ("Frankenstein", "Mary"), ("Dracula", "Bram"),
             ("The Great Gatsby", "F"), ("Ulysses", "James"), ("Adventures of Huckleberry Finn", "Mark"),
             ("Jane Eyre", "Charlotte"), ("Wuthering Heights", "Emily"), ("The Odyssey", "Homer"),
             ("Harry Potter and the Philosopher's Stone", "J"), ("Animal Farm", "George"), ("Emma", "Jane")),
        ),
    )
}


@dataclass(frozen=True)
class ConflictItem:
    """One conflict prompt: what memory says, what the context says, and their first tokens."""

    relation: str
    format: str
    subject: str
    memory_answer: str
    context_answer: str
    prompt: str
    memory_token: int
    context_token: int


def first_token(model: Any, answer: str) -> int:
    """The first token id of ``" " + answer`` (answers always follow a space)."""
    return int(model.tokenizer(" " + answer, add_special_tokens=False)["input_ids"][0])


def known_facts(model: Any, relation: str, batch_size: int = 32) -> list[tuple[str, str]]:
    """The facts of ``relation`` whose plain cloze the model answers from memory (top-1 token)."""
    spec = RELATIONS[relation]
    prompts = [spec.cloze.format(s=subject) for subject, _ in spec.facts]
    batch = tokenize(model, prompts)
    known = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            chunk = batch.select(slice(start, start + batch_size))
            logits = model(chunk.tokens.to(_device(model)), attention_mask=chunk.attention_mask.to(_device(model)))
            last = logits[torch.arange(len(chunk)), chunk.last_positions.to(logits.device)]
            for offset, token in enumerate(last.argmax(dim=-1).tolist()):
                subject, answer = spec.facts[start + offset]
                if token == first_token(model, answer):
                    known.append((subject, answer))
    return known


def conflict_prompt(relation: str, format: str, subject: str, context_answer: str) -> str:
    """The prompt that states ``context_answer`` and then asks for the answer."""
    spec = RELATIONS[relation]
    cloze = spec.cloze.format(s=subject)
    fact = f"{cloze} {context_answer}."
    if format == "qa":
        return f"{fact}\nQ: {spec.question.format(s=subject)}\nA:"
    if format == "restate":
        return f"{fact} {cloze}"
    if format == "according":
        return f"According to the text, {_lower_first(fact)} According to the text, {_lower_first(cloze)}"
    raise ValueError(f"Unknown conflict format {format!r}; choose one of {', '.join(FORMATS)}.")


def conflict_items(
    model: Any,
    relations: Sequence[str] = tuple(RELATIONS),
    formats: Sequence[str] = ("restate",),
    seed: int = 0,
    facts: Optional[dict[str, list[tuple[str, str]]]] = None,
) -> list[ConflictItem]:
    """Conflict items for the facts the model knows (``facts`` overrides the memory check)."""
    generator = random.Random(seed)
    items = []
    for relation in relations:
        known = facts[relation] if facts is not None else known_facts(model, relation)
        answers = sorted({answer for _, answer in RELATIONS[relation].facts})
        for subject, memory in known:
            memory_token = first_token(model, memory)
            options = [a for a in answers if first_token(model, a) != memory_token]
            if not options:  # every other answer starts like this one: no clean conflict
                continue
            context = generator.choice(options)
            for format in formats:
                items.append(ConflictItem(
                    relation=relation, format=format, subject=subject, memory_answer=memory, context_answer=context,
                    prompt=conflict_prompt(relation, format, subject, context),
                    memory_token=memory_token, context_token=first_token(model, context),
                ))
    return items


def split_by_subject(
    items: Sequence[ConflictItem], held_out_share: float = 0.5, seed: int = 0
) -> tuple[list[ConflictItem], list[ConflictItem]]:
    """``(scored, held_out)``: the items in two parts that share no subject.

    Every item of a subject lands on one side, whatever its relation or format ("France" asked for
    its capital and its language, in every format, is all scored or all held out), so a held-out
    prompt never names a subject seen in scoring. The split is deterministic: the items' distinct
    subjects are sorted, shuffled with ``random.Random(seed)``, and the first
    ``round(n_subjects * held_out_share)`` are held out. Items keep their order within each part.

    Raises:
        InputError: ``held_out_share`` is not strictly between 0 and 1.
    """
    if not 0 < held_out_share < 1:
        raise InputError(
            f"held_out_share is the share of subjects kept out of scoring and must lie strictly between 0 and 1; "
            f"got {held_out_share!r}. Use 0.5 (the default) to score and validate on halves."
        )
    subjects = sorted({item.subject for item in items})
    random.Random(seed).shuffle(subjects)
    held_out = set(subjects[: round(len(subjects) * held_out_share)])
    return [i for i in items if i.subject not in held_out], [i for i in items if i.subject in held_out]


def _lower_first(text: str) -> str:
    """``"The capital..."`` → ``"the capital..."``; subjects (proper names) keep their case."""
    return "t" + text[1:] if text.startswith("The ") else text


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device
