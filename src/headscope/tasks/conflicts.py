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

Your own facts (:func:`read_conflict_facts`, :func:`user_conflict_items`) come as JSON lines, one
fact a line::

    {"subject": "France", "cloze": "The capital of {s} is", "answer": "Paris", "counterfactual": "Rome"}

``subject``, ``cloze`` (``{s}`` marks the subject) and ``answer`` (the memorised answer, written
without its leading space) are required. Optional: ``counterfactual`` (the answer the context
states; default: another answer of the same relation in the file whose first token differs, drawn
with the seed, as for shipped facts), ``question`` (``"What is the capital of {s}?"``, needed by
the ``"qa"`` format), ``context`` (the sentence stating the counterfactual, ``{s}`` and ``{c}``;
default ``"{cloze} {c}."``) and ``relation`` (a name grouping facts; default the cloze). Each fact
passes the same knowledge filter as the shipped ones: kept only when the model's top next token
after the plain cloze is the answer's first token.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from headscope.engine.devices import input_device
from headscope.engine.tokens import tokenize
from headscope.errors import DataError, EmptyResultError, InputError
from headscope.tasks.user_data import PathLike, line_error, read_jsonl

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
    cloze: Optional[str] = None  # templates of a fact of your own (``{s}``, ``{c}``); None: the relation's
    question: Optional[str] = None
    context: Optional[str] = None

    def restated(self, answer: str) -> str:
        """This item's prompt with ``answer`` stated in the context instead of the counterfactual
        (with the memorised answer: the prompt where context and memory agree)."""
        return conflict_prompt(self.relation, self.format, self.subject, answer, cloze=self.cloze,
                               question=self.question, context=self.context)


def first_token(model: Any, answer: str) -> int:
    """The first token id of ``" " + answer`` (answers always follow a space)."""
    return int(model.tokenizer(" " + answer, add_special_tokens=False)["input_ids"][0])


def top_next_tokens(model: Any, prompts: Sequence[str], batch_size: int = 32) -> list[int]:
    """The model's top-1 next token after each prompt."""
    batch = tokenize(model, list(prompts))
    tops = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            chunk = batch.select(slice(start, start + batch_size))
            logits = model(chunk.tokens.to(_device(model)), attention_mask=chunk.attention_mask.to(_device(model)))
            last = logits[torch.arange(len(chunk)), chunk.last_positions.to(logits.device)]
            tops.extend(last.argmax(dim=-1).tolist())
    return tops


def known_facts(model: Any, relation: str, batch_size: int = 32) -> list[tuple[str, str]]:
    """The facts of ``relation`` whose plain cloze the model answers from memory (top-1 token)."""
    spec = RELATIONS[relation]
    tops = top_next_tokens(model, [spec.cloze.format(s=subject) for subject, _ in spec.facts], batch_size)
    return [(subject, answer) for (subject, answer), token in zip(spec.facts, tops, strict=True)
            if token == first_token(model, answer)]


def conflict_prompt(
    relation: str, format: str, subject: str, context_answer: str, *, cloze: Optional[str] = None,
    question: Optional[str] = None, context: Optional[str] = None,
) -> str:
    """The prompt that states ``context_answer`` and then asks for the answer.

    ``cloze``, ``question`` and ``context`` are the templates of a fact of your own (``{s}`` the
    subject, ``{c}`` the stated answer); without ``cloze``, the shipped relation's are used.
    """
    if cloze is None:
        spec = RELATIONS[relation]
        cloze, question = spec.cloze, spec.question
    asked = cloze.replace("{s}", subject)
    fact = context.replace("{s}", subject).replace("{c}", context_answer) if context else f"{asked} {context_answer}."
    if format == "qa":
        if question is None:
            raise InputError(f"The 'qa' format needs a question for the relation {relation!r}; give one, or use "
                             "another format.")
        return f"{fact}\nQ: {question.replace('{s}', subject)}\nA:"
    if format == "restate":
        return f"{fact} {asked}"
    if format == "according":
        return f"According to the text, {_lower_first(fact)} According to the text, {_lower_first(asked)}"
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


# --- the researcher's own facts ------------------------------------------------------------------

FACT_EXAMPLE = '{"subject": "France", "cloze": "The capital of {s} is", "answer": "Paris", "counterfactual": "Rome"}'
FACT_KEYS = ("subject", "cloze", "answer", "counterfactual", "question", "context", "relation")


@dataclass(frozen=True)
class UserFact:
    """One fact from the researcher's file (format in the module docstring), with its file and line."""

    subject: str
    cloze: str
    answer: str
    counterfactual: Optional[str] = None
    question: Optional[str] = None
    context: Optional[str] = None
    relation: str = ""
    path: str = ""
    line: int = 0

    @property
    def where(self) -> str:
        return f"{self.path}, line {self.line}"


def read_conflict_facts(path: PathLike, formats: Sequence[str] = ("restate",)) -> list[UserFact]:
    """The facts in a JSON-lines file (format in the module docstring). Needs no model.

    Raises:
        DataError: naming the file and line: not JSON, a required key missing, an unknown key, a
            value that is not a non-empty string, a counterfactual equal to the answer, a
            ``context`` without ``{c}``, no ``question`` where ``formats`` has ``"qa"``, the
            same cloze and subject twice.
    """
    facts, seen = [], {}
    for number, row in read_jsonl(path, ("subject", "cloze", "answer"), FACT_EXAMPLE, "conflict facts"):
        unknown = sorted(set(row) - set(FACT_KEYS))
        if unknown:
            raise line_error(path, number, f"unknown key {', '.join(map(repr, unknown))} (the keys are "
                                           f"{', '.join(FACT_KEYS)})", FACT_EXAMPLE)
        bad = next((key for key, value in row.items() if not isinstance(value, str) or not value.strip()), None)
        if bad is not None:
            raise line_error(path, number, f"{bad!r} must be a non-empty string; got {row[bad]!r}", FACT_EXAMPLE)
        fact = {key: value.strip() for key, value in row.items()}
        if fact.get("counterfactual") == fact["answer"]:
            raise line_error(path, number, "the counterfactual is the answer itself; the context must contradict "
                                           "memory", FACT_EXAMPLE)
        if "context" in fact and "{c}" not in fact["context"]:
            raise line_error(path, number, "'context' has no {c}, where the counterfactual answer goes", FACT_EXAMPLE)
        if "qa" in formats and "question" not in fact:
            raise line_error(path, number, "no 'question', which the 'qa' format asks (e.g. \"What is the capital "
                                           "of {s}?\"); add one, or leave 'qa' out of formats", FACT_EXAMPLE)
        key = (fact["cloze"], fact["subject"])
        if key in seen:
            raise line_error(path, number, f"the same cloze and subject as line {seen[key]}", FACT_EXAMPLE)
        seen[key] = number
        facts.append(UserFact(
            subject=fact["subject"], cloze=fact["cloze"], answer=fact["answer"],
            counterfactual=fact.get("counterfactual"), question=fact.get("question"), context=fact.get("context"),
            relation=fact.get("relation", fact["cloze"]), path=str(path), line=number,
        ))
    return facts


def user_conflict_items(
    model: Any, facts: Sequence[UserFact], formats: Sequence[str] = ("restate",), seed: int = 0,
) -> list[ConflictItem]:
    """Conflict items for the facts of your own that ``model`` knows (the knowledge filter of
    :func:`known_facts`), one per fact and format, in file order. A fact without a
    counterfactual takes another answer of its relation (in the file) with a different first
    token, drawn with ``random.Random(seed)``, and is left out when there is none.

    Raises:
        EmptyResultError: the model knows none of the facts.
        DataError: a counterfactual whose first token is the answer's (naming its line).
    """
    if not facts:
        raise DataError("No conflict facts were given.")
    path = facts[0].path
    tops = top_next_tokens(model, [fact.cloze.replace("{s}", fact.subject) for fact in facts])
    known = [fact for fact, token in zip(facts, tops, strict=True) if token == first_token(model, fact.answer)]
    if not known:
        example = facts[0]
        raise EmptyResultError(
            f"The model knows none of the {len(facts)} facts in {path}: for none is its top next token after the "
            f"cloze the answer's first token (e.g. line {example.line}: "
            f"{example.cloze.replace('{s}', example.subject)!r} -> {' ' + example.answer!r}). memory_context sets the "
            "memorised answer against the context, so it needs facts this model completes from memory: give facts it "
            "knows."
        )
    answers: dict[str, set[str]] = {}
    for fact in facts:
        answers.setdefault(fact.relation, set()).add(fact.answer)
    generator = random.Random(seed)
    items = []
    for fact in known:
        memory_token = first_token(model, fact.answer)
        if fact.counterfactual is not None:
            context = fact.counterfactual
            if first_token(model, context) == memory_token:
                raise line_error(fact.path, fact.line, f"the counterfactual {context!r} starts with the same token "
                                                       f"as the answer {fact.answer!r} for this model's tokenizer, so "
                                                       "their logits cannot be told apart; choose another",
                                 FACT_EXAMPLE)
        else:
            options = [a for a in sorted(answers[fact.relation]) if first_token(model, a) != memory_token]
            if not options:
                continue
            context = generator.choice(options)
        for format in formats:
            items.append(ConflictItem(
                relation=fact.relation, format=format, subject=fact.subject, memory_answer=fact.answer,
                context_answer=context, prompt=conflict_prompt(fact.relation, format, fact.subject, context,
                                                               cloze=fact.cloze, question=fact.question,
                                                               context=fact.context),
                memory_token=memory_token, context_token=first_token(model, context),
                cloze=fact.cloze, question=fact.question, context=fact.context,
            ))
    if not items:
        raise EmptyResultError(
            f"The model knows {len(known)} of the facts in {path}, but none has a counterfactual: no line gives one, "
            "and no other answer of the same relation starts with a different token. Add \"counterfactual\" to the "
            "lines."
        )
    return items


def min_subjects_for_split(held_out_share: float) -> int:
    """The fewest subjects :func:`split_by_subject` parts into two non-empty sides (``held_out_share``
    strictly between 0 and 1)."""
    if not 0 < held_out_share < 1:
        split_by_subject([], held_out_share)  # raises its InputError
    n = 2
    while not 1 <= round(n * held_out_share) <= n - 1:
        n += 1
    return n


def _lower_first(text: str) -> str:
    """``"The capital..."`` → ``"the capital..."``; subjects (proper names) keep their case."""
    return "t" + text[1:] if text.startswith("The ") else text


def _device(model: Any) -> torch.device:
    return input_device(model)
