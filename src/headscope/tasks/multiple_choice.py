"""Multiple-choice questions for select-and-copy heads (Tulchinskii et al. 2024) and correct-letter
heads (Lieberum et al. 2023).

Sets:

* :func:`synthetic_questions`: the answer is stated by the prompt itself ("Anna's ball is red."),
  with ``distractor_facts`` more facts of the same kind about other people or things whose values
  are among the options ("Tom's ball is blue."), so a head has to pick the option that answers
  *this* question, not any option seen before. By default one per wrong option: every option's text
  appears in the context, and a head that only finds repeated tokens cannot tell the answer apart.
  ``distractor_facts=0`` is the easy set, where the answer is the only option stated. Templates:
  objects and colours, people and cities, items and owners, pets, jobs.
* :func:`world_questions`: 120 easy world-knowledge questions shipped with headscope
  (``mcq_world.jsonl``, answer + 5 distractors each).
* :func:`read_questions`: your own JSONL (the detector's ``data``), one ``{"question", "options",
  "answer"}`` per line (``answer`` = the option's index, its letter or its text; optional
  ``"context"``, ``"topic"``); errors name the line.

Prompt formats (:func:`mc_prompt`), the body being the paper's form::

    {context}                       (when the question has one)
    Question: {question}
    Options:
    A. {option}
    B. {option}
    ...

* ``"plain"``: body + ``"Answer:"``; the letters are read as ``" A"``, ``" B"``, ...;
* ``"fewshot"``: ``n_shots`` other questions answered (``"Answer: B"``), then the plain prompt;
* ``"chat"``: the body + ``"Answer with the letter of the correct option."`` as a ChatML user
  turn (no system turn), assistant turn opened; letters read as ``"A"``, ``"B"``, ....

``extra_options`` appends the paper's ``"None of the above"`` / ``"I don't know"`` after the
shuffled options (never correct here: every question's answer is among the options).

Positions come from the tokenizer's offset mapping; nothing is found by counting tokens. Per option
(:func:`option_positions`, :func:`line_end_positions`):

* *letter*: the last token covering the option's letter;
* *option end* (``"option_end"``): the last token covering the last character of the option's text;
* *line end* (``"line_end"``, the key Tulchinskii et al.'s code reads): the last token of the
  option's line, the line being the letter, the text and the newline that ends it. Where the
  tokenizer gives the newline its own token, that token; where it merges the newline with the
  option's last characters (``"red.\n"``), the merged token, the same as the option end; where no
  newline follows the option (a prompt that ends, or goes on, right after the text), the line ends
  with the text, and its end is the option end. A token that also covers characters of the next
  line (a newline merged forward, ``"\nB"``) does not end this line: then the line has no end token
  of its own and :func:`line_end_positions` raises :class:`~headscope.errors.InputError`.

Knowledge check (:func:`knowledge_prompts`): the same question without options, answered in free
form after ``n_shots`` answered examples ("...\\nAnswer: red\\n\\n"); the model knows an item when
its top next token is the first token of ``" " + answer``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

from headscope.engine.tokens import token_span
from headscope.errors import InputError
from headscope.tasks.user_data import line_error, read_jsonl
from headscope.tasks.refusal import chat_prompt

LETTERS = "ABCDEFGH"
FORMATS = ("plain", "fewshot", "chat")
EXTRA_OPTIONS = {"none": "None of the above", "unknown": "I don't know"}
CHAT_INSTRUCTION = "Answer with the letter of the correct option."


@dataclass(frozen=True)
class MCQuestion:
    """One question: its options in display order and the index of the correct one."""

    question: str
    options: tuple[str, ...]
    answer: int
    context: str = ""
    topic: str = ""

    def __post_init__(self) -> None:
        if not 2 <= len(self.options) <= len(LETTERS):
            raise InputError(f"A question needs 2..{len(LETTERS)} options; {self.question!r} has {len(self.options)}.")
        if not 0 <= self.answer < len(self.options):
            raise InputError(f"Answer index {self.answer} is outside the {len(self.options)} options of {self.question!r}.")
        if len(set(self.options)) != len(self.options):
            raise InputError(f"The options of {self.question!r} repeat: {self.options}.")
        for text in (self.question, *self.options):
            if "\n" in text or not text.strip() or text != text.strip():
                raise InputError(f"Question and option texts must be one non-empty line without outer spaces; got {text!r}.")

    @property
    def answer_text(self) -> str:
        return self.options[self.answer]

    def reordered(self, order: Sequence[int]) -> "MCQuestion":
        """The same question with options shown in ``order`` (a permutation of their indices)."""
        if sorted(order) != list(range(len(self.options))):
            raise InputError(f"{list(order)} is not a permutation of the {len(self.options)} options.")
        return replace(self, options=tuple(self.options[i] for i in order), answer=list(order).index(self.answer))


@dataclass(frozen=True)
class Template:
    """A synthetic fact and its question. ``key`` is the slot that tells facts apart
    (``"name"`` or ``"thing"``); distractor facts change it and the value."""

    fact: str
    question: str
    values: tuple[str, ...]
    things: tuple[str, ...] = ("",)
    key: str = "name"


NAMES = ("Anna", "Tom", "Maria", "James", "Lucy", "Omar", "Sofia", "Ben", "Clara", "David", "Emma", "Felix",
         "Grace", "Hugo", "Iris", "Jack", "Kate", "Leo", "Mia", "Noah", "Olga", "Paul", "Rosa", "Sam")
TEMPLATES: dict[str, Template] = {
    "colour": Template("{name}'s {thing} is {value}.", "What colour is {name}'s {thing}?",
                       ("red", "blue", "green", "black", "white", "yellow", "pink", "brown", "purple", "orange"),
                       ("ball", "hat", "car", "bike", "cup", "kite", "scarf", "door", "bag", "chair", "lamp", "coat")),
    "city": Template("{name} lives in {value}.", "Where does {name} live?",
                     ("Paris", "London", "Tokyo", "Rome", "Berlin", "Madrid", "Cairo", "Moscow", "Sydney", "Dublin",
                      "Vienna", "Lisbon")),
    "owner": Template("The {thing} belongs to {value}.", "Who owns the {thing}?", NAMES,
                      ("book", "umbrella", "guitar", "laptop", "watch", "camera", "wallet", "violin", "tent", "drum"),
                      key="thing"),
    "pet": Template("{name} has a pet {value}.", "What pet does {name} have?",
                    ("dog", "cat", "rabbit", "horse", "parrot", "hamster", "goat", "turtle", "snake", "mouse")),
    "job": Template("{name} works as a {value}.", "What is {name}'s job?",
                    ("baker", "doctor", "teacher", "farmer", "pilot", "nurse", "lawyer", "painter", "dentist", "chef")),
}


def _fill(text: str, name: str, thing: str, value: str) -> str:
    return text.format(name=name, thing=thing, value=value)


def synthetic_questions(
    n: int = 400,
    n_options: int = 4,
    templates: Sequence[str] = tuple(TEMPLATES),
    distractor_facts: Optional[int] = None,
    extra_options: Sequence[str] = (),
    seed: int = 0,
) -> list[MCQuestion]:
    """``n`` questions answered by their own context, templates taken in turn. Each has
    ``distractor_facts`` facts about other keys with other values, whose values are options
    (``None``: ``n_options - 1``, every option stated; ``0``: the easy set); the remaining wrong
    options are random values of the template. Option order is a seeded shuffle."""
    unknown = sorted(set(templates) - set(TEMPLATES))
    if unknown:
        raise InputError(f"Unknown template(s) {', '.join(unknown)}; choose from {', '.join(TEMPLATES)}.")
    if not 2 <= n_options <= len(LETTERS) - len(extra_options):
        raise InputError(f"n_options must lie in 2..{len(LETTERS) - len(extra_options)} with {len(extra_options)} extra options.")
    if distractor_facts is None:
        distractor_facts = n_options - 1
    if not 0 <= distractor_facts <= n_options - 1:
        raise InputError(f"distractor_facts must lie in 0..{n_options - 1} (n_options - 1) for {n_options} options; "
                         f"got {distractor_facts}. Give more options, or fewer facts (None: one per wrong option).")
    extras = tuple(_extra_option(name) for name in extra_options)
    rng = random.Random(seed)
    return [_synthetic_question(templates[i % len(templates)], n_options, distractor_facts, extras, rng) for i in range(n)]


def _extra_option(name: str) -> str:
    if name in EXTRA_OPTIONS:
        return EXTRA_OPTIONS[name]
    if name in EXTRA_OPTIONS.values():
        return name
    raise InputError(f"Unknown extra option {name!r}; choose from {', '.join(EXTRA_OPTIONS)}.")


def _synthetic_question(
    template_name: str, n_options: int, distractor_facts: int, extras: tuple[str, ...], rng: random.Random
) -> MCQuestion:
    template = TEMPLATES[template_name]
    keys = NAMES if template.key == "name" else template.things
    picked_keys = rng.sample(keys, distractor_facts + 1)
    values = rng.sample([v for v in template.values if v not in picked_keys], n_options)
    shared = rng.choice(template.things if template.key == "name" else NAMES)
    facts = []
    for key, value in zip(picked_keys, values[: len(picked_keys)], strict=True):
        name, thing = (key, shared) if template.key == "name" else (shared, key)
        facts.append(_fill(template.fact, name, thing, value))
    name, thing = (picked_keys[0], shared) if template.key == "name" else (shared, picked_keys[0])
    question = _fill(template.question, name, thing, "")
    answer_text = values[0]
    rng.shuffle(facts)
    options = list(values)
    rng.shuffle(options)
    return MCQuestion(question, tuple(options) + extras, options.index(answer_text), " ".join(facts), template_name)


def world_questions(n_options: int = 4, extra_options: Sequence[str] = (), seed: int = 0) -> list[MCQuestion]:
    """The shipped world-knowledge set (120 questions): the answer and ``n_options - 1`` of its
    five distractors, in a seeded order."""
    if not 2 <= n_options <= 6:
        raise InputError(f"The world set has 6 answers per question; n_options must lie in 2..6, got {n_options}.")
    extras = tuple(_extra_option(name) for name in extra_options)
    rng = random.Random(seed)
    questions = []
    for line in resources.files("headscope.tasks").joinpath("data/mcq_world.jsonl").read_text().splitlines():
        row = json.loads(line)
        options = [row["answer"]] + rng.sample(row["distractors"], n_options - 1)
        rng.shuffle(options)
        questions.append(MCQuestion(row["question"], tuple(options) + extras, options.index(row["answer"]),
                                    topic=row.get("topic", "world")))
    return questions


QUESTION_EXAMPLE = ('{"question": "What colour is Anna\'s ball?", "options": ["red", "blue", "green", "black"], '
                    '"answer": "red", "context": "Anna\'s ball is red. Tom\'s ball is blue."}')


def read_questions(path: Union[str, Path]) -> list[MCQuestion]:
    """Questions from a JSONL file (the select_copy detector's ``data``), one per line, in the file's
    order: ``{"question": ..., "options": [...], "answer": 0 | "B" | "text"}`` with optional
    ``"context"`` (shown before the question) and ``"topic"`` (:data:`QUESTION_EXAMPLE`). ``answer``
    is the correct option's index (from 0), its letter or its text; 2..8 options, each one line.

    Raises:
        DataError: naming the file and line: not JSON, a key missing, options that are not a list
            of texts or that repeat, an answer that is none of the options, or a question (with its
            context) that repeats an earlier line's (it could be selected on and held out at once).
    """
    questions: list[MCQuestion] = []
    seen: dict[tuple[str, str], int] = {}
    for number, row in read_jsonl(path, ("question", "options", "answer"), QUESTION_EXAMPLE, "questions"):
        options, texts = row["options"], [row["question"], row.get("context", ""), row.get("topic", "user")]
        if not isinstance(options, list) or not all(_is_text(o) for o in options):
            raise line_error(path, number, f"'options' is {options!r}, not a list of texts", QUESTION_EXAMPLE)
        if not all(_is_text(t) for t in texts):
            raise line_error(path, number, "'question', 'context' and 'topic' must be texts", QUESTION_EXAMPLE)
        question, context, topic = (str(t).strip() for t in texts)
        try:
            options = tuple(str(o).strip() for o in options)
            parsed = MCQuestion(question, options, _answer_index(row["answer"], options), context, topic)
        except InputError as error:
            raise line_error(path, number, str(error).rstrip("."), QUESTION_EXAMPLE) from None
        key = (parsed.context, parsed.question)
        if key in seen:
            raise line_error(path, number, f"the question {question!r} (with its context) repeats line {seen[key]}'s: "
                                           "a question must not be both selected on and held out", QUESTION_EXAMPLE)
        seen[key] = number
        questions.append(parsed)
    return questions


def _is_text(value: Any) -> bool:
    """A JSON string or number (read as its text)."""
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def _answer_index(answer: Any, options: tuple[str, ...]) -> int:
    if isinstance(answer, int) and not isinstance(answer, bool):
        return answer
    text = str(answer).strip()
    if text in options:
        return options.index(text)
    if len(text) == 1 and text.upper() in LETTERS[: len(options)]:
        return LETTERS.index(text.upper())
    raise InputError(f"answer {answer!r} is neither an option, an option letter nor an index")


def shuffle_options(questions: Iterable[MCQuestion], seed: int = 0, keep_extras: bool = True) -> list[MCQuestion]:
    """The same questions with their options in a new seeded order (the extra options, when
    ``keep_extras``, stay last as in the paper)."""
    rng = random.Random(seed)
    shuffled = []
    for question in questions:
        fixed = [i for i, o in enumerate(question.options) if keep_extras and o in EXTRA_OPTIONS.values()]
        movable = [i for i in range(len(question.options)) if i not in fixed]
        rng.shuffle(movable)
        shuffled.append(question.reordered(movable + fixed))
    return shuffled


@dataclass(frozen=True)
class MCPrompt:
    """A formatted question: its text, the characters of each option's letter and text, and the
    prefix its letters are read with (``" "`` after ``"Answer:"``, ``""`` in chat)."""

    text: str
    question: MCQuestion
    letter_chars: tuple[int, ...]
    option_spans: tuple[tuple[int, int], ...]
    letter_prefix: str
    format: str
    shots: tuple[MCQuestion, ...] = field(default=(), repr=False)


def _body(question: MCQuestion) -> tuple[str, list[int], list[tuple[int, int]]]:
    """The question block and, relative to it, each letter's character and each option's span."""
    text = (question.context + "\n" if question.context else "") + f"Question: {question.question}\nOptions:\n"
    letters, spans = [], []
    for letter, option in zip(LETTERS[: len(question.options)], question.options, strict=True):
        letters.append(len(text))
        start = len(text) + len(f"{letter}. ")
        spans.append((start, start + len(option)))
        text += f"{letter}. {option}\n"
    return text, letters, spans


def mc_prompt(question: MCQuestion, format: str = "plain", shots: Sequence[MCQuestion] = ()) -> MCPrompt:
    """The question in ``format`` (see the module docstring); ``shots`` are answered examples
    placed before it in the ``"fewshot"`` format."""
    if format not in FORMATS:
        raise InputError(f"Unknown multiple-choice format {format!r}; choose one of {', '.join(FORMATS)}.")
    if format == "fewshot" and not shots:
        raise InputError("The 'fewshot' format needs at least one shot; give n_shots >= 1.")
    body, letters, spans = _body(question)
    if format == "chat":
        text = chat_prompt(body + CHAT_INSTRUCTION)
    else:
        shown = "".join(_body(shot)[0] + f"Answer: {LETTERS[shot.answer]}\n\n" for shot in shots) if format == "fewshot" else ""
        text = shown + body + "Answer:"
    shift = text.rindex(body)  # the question itself comes last (a shot may repeat its text)
    return MCPrompt(
        text=text,
        question=question,
        letter_chars=tuple(shift + c for c in letters),
        option_spans=tuple((shift + a, shift + b) for a, b in spans),
        letter_prefix="" if format == "chat" else " ",
        format=format,
        shots=tuple(shots) if format == "fewshot" else (),
    )


def pick_shots(questions: Sequence[MCQuestion], index: int, n_shots: int, rng: random.Random) -> list[MCQuestion]:
    """``n_shots`` other questions, of the same topic when there are enough."""
    same = [q for i, q in enumerate(questions) if i != index and q.topic == questions[index].topic]
    pool = same if len(same) >= n_shots else [q for i, q in enumerate(questions) if i != index]
    if len(pool) < n_shots:
        raise InputError(f"{n_shots} shots need at least {n_shots + 1} questions; there are {len(questions)}.")
    return rng.sample(pool, n_shots)


def mc_prompts(
    questions: Sequence[MCQuestion], format: str = "plain", n_shots: int = 3, seed: int = 0
) -> list[MCPrompt]:
    """Every question in ``format``; few-shot examples are other questions of the set (seeded)."""
    rng = random.Random(seed)
    return [
        mc_prompt(q, format, pick_shots(questions, i, n_shots, rng) if format == "fewshot" else ())
        for i, q in enumerate(questions)
    ]


def _free_form(question: MCQuestion) -> str:
    return (question.context + "\n" if question.context else "") + f"Question: {question.question}\nAnswer:"


def knowledge_prompts(questions: Sequence[MCQuestion], n_shots: int = 2, seed: int = 0) -> list[str]:
    """The questions without options, answered in free form after ``n_shots`` answered examples
    of the same set (``n_shots=0``: the bare question)."""
    rng = random.Random(seed + 1)
    prompts = []
    for index, question in enumerate(questions):
        shots = pick_shots(questions, index, n_shots, rng) if n_shots else []
        prompts.append("".join(f"{_free_form(s)} {s.answer_text}\n\n" for s in shots) + _free_form(question))
    return prompts


def option_positions(
    offsets: Sequence[tuple[int, int]], prompt: MCPrompt
) -> tuple[list[int], list[int]]:
    """Token positions of each option's letter and of the token ending each option's text (its
    *option end*), from the offsets of the prompt's tokens (``engine.tokens.encode_with_offsets``).
    The end of each option's line: :func:`line_end_positions`."""
    last_token = lambda char: token_span(offsets, char, char + 1)[1] - 1  # noqa: E731  (the last token covering it)
    return ([last_token(char) for char in prompt.letter_chars],
            [last_token(end - 1) for _start, end in prompt.option_spans])


def line_end_positions(offsets: Sequence[tuple[int, int]], prompt: MCPrompt) -> list[int]:
    """Token position of the end of each option's line (the rule in the module docstring), from the
    offsets of the prompt's tokens (``engine.tokens.encode_with_offsets``).

    Raises:
        InputError: when the last token of an option's line also covers the next line's text.
    """
    positions = []
    for letter, char, (_start, end) in zip(LETTERS, prompt.letter_chars, prompt.option_spans):  # as many as options
        line_stop = end + 1 if prompt.text[end : end + 1] == "\n" else end  # the newline belongs to the line
        position = token_span(offsets, char, line_stop)[1] - 1
        token_start, token_stop = offsets[position]
        if token_stop > line_stop:
            raise InputError(
                f"Option {letter}'s line has no token that ends it: the token at position {position} covers "
                f"{prompt.text[token_start:token_stop]!r}, which runs into the next line (characters "
                f"{token_start}..{token_stop}, the line ends at {line_stop}). Score at key_position='option_end', "
                f"or use a tokenizer that ends a line with the newline's own token or the text's last one."
            )
        positions.append(position)
    return positions


def letter_token_ids(tokenizer: Any, n_options: int, prefix: str) -> list[int]:
    """The single token of each letter as the model would write it after the prompt."""
    ids = []
    for letter in LETTERS[:n_options]:
        encoded = tokenizer(prefix + letter, add_special_tokens=False)["input_ids"]
        if len(encoded) != 1:
            raise InputError(f"{prefix + letter!r} is {len(encoded)} tokens for this tokenizer; letters must be one token.")
        ids.append(int(encoded[0]))
    return ids
