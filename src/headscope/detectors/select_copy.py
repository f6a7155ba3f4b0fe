"""Select-and-copy heads — Tulchinskii et al. 2024, "Listening to the Wise Few: Select-and-Copy
Attention Heads for Multiple-Choice QA" (arXiv 2410.02343); correct-letter heads — Lieberum et
al. 2023, "Does Circuit Analysis Interpretability Scale?".

Data: multiple-choice questions (``headscope.tasks.multiple_choice``; your own with ``data``, a
JSONL file of ``{"question", "options", "answer"}`` lines, optional ``"context"``, read by
``multiple_choice.read_questions``; a path in ``questions`` is still read, but not with ``data``;
by default the synthetic set whose answer the prompt states among as many facts about other people
or things as there are wrong options, so that every option's text appears in the context and
repetition alone cannot pick the answer; ``distractor_facts=0`` is the easy set, where only the
answer does), optionally only those the model answers correctly in free form (the knowledge
check), split into a dev part (the first ``n_dev``: head selection) and a held-out part (the rest).

Per question ``q``, head ``h`` and option ``o`` (``t`` = the last prompt token, ``p_o`` = the
option's position, located from the tokenizer's offsets as ``multiple_choice`` states the rules:
the last token of the option's line, ``"line_end"`` (the newline after its text, the key the
authors' code reads); the token ending its text, ``"option_end"``; or its letter, ``"letter"``):

    QK-score       s_qk(h, o)  = q_h(t) . k_g(h)(p_o)      pre-RoPE query and key; with grouped-query
                                                          attention the key of the head's KV group g(h)
    attention      s_att(h, o) = A_h[t, p_o]               post-softmax weight
    prediction     argmax_o s(h, o)
    head accuracy  mean over questions of [prediction == correct option]

``values`` = dev accuracy of the score named by ``score`` ("qk" | "attention") at ``position``
("end": the key at ``key_position``, "line_end" by default or "option_end"; or "letter");
``extras`` hold the dev and held-out accuracy of all six (two scores at three positions), named
``"{score}_{position}"`` and ``"{score}_{position}_test"`` (e.g. ``"qk_line_end_test"``), and
``"correct_letter"``:

    correct-letter DLA(h) = mean over dev questions of (z_h(t) W_O^h / rms_final(t)) . diag(w_norm)
                            . (W_U[correct letter] - mean_wrong W_U[wrong letter])

The baseline is the model's own answer: the highest letter logit among the options' letters.
``metadata`` holds its dev and held-out accuracy, the knowledge-check rate, and the best head of
each of the six chosen on dev with its held-out accuracy (``"best_qk_line_end"``,
``"best_qk_option_end"``, ...: both key positions, whichever ``values`` reads).
``headscope.studies.select_copy`` holds the studies on a readout: ``compare`` (CIs and a paired
permutation test against the letters) and ``split_stability`` (reselection on random dev splits).

Validation metric: the correct letter's logit minus the mean of the wrong letters' logits at the
last position (what correct-letter heads write; ablating them should lower it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import einops
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from headscope.detectors.base import (
    Detector,
    DetectorConfig,
    Example,
    ValidationTask,
    has_tokenizer,
    register_detector,
    setting,
)
from headscope.engine.architecture import head_hook
from headscope.engine.generation import final_states
from headscope.engine.heads import Head, hook_name, model_shape
from headscope.engine.metrics import final_logits
from headscope.engine.runner import model_device, run_batched
from headscope.engine.tokens import TokenBatch, encode_with_offsets, pad_rows, row_tokens, tokenize
from headscope.engine.unembed import (
    FINAL_SCALE,
    final_norm_weight,
    final_position_attributions,
    head_output_hooks,
    head_output_weights,
    unembedding,
)
from headscope.errors import DataError, InputError, SettingError
from headscope.identity import RecentCache, model_identity, stored_result
from headscope.results import HeadScores
from headscope.significance import Significance
from headscope.stats import DEFAULT_ALPHA, binomial_critical_accuracy
from headscope.tasks import multiple_choice as mc

SCORES = ("qk", "attention")
KEY_POSITIONS = ("line_end", "option_end")  # where an option's key is read; the paper's first
POSITIONS = (*KEY_POSITIONS, "letter")
METHODS = tuple(f"{score}_{position}" for score in SCORES for position in POSITIONS)
END_ALIAS = "end"  # "qk_end", "attention_end": the paper's key position, "line_end"
# Which questions a model answers in free form, per (model identity, settings, questions): the last few.
_KNOWN = RecentCache(size=4)


QUESTION_SETS = ("synthetic", "world")  # the shipped sets; your own: the ``data`` setting


@dataclass
class SelectCopyConfig(DetectorConfig):
    questions: str = setting("synthetic", "shipped set: synthetic (answer stated in the prompt) or world (120 world-"
                                          "knowledge questions); a JSONL path is still read (prefer data)")
    n_questions: int = setting(1300, "synthetic set size", min=1)  # The bundled model answers 0.26 of the default
    # set in free form (chance among the 4 stated values; 0.98 of the easy set): ~335 known, 120 dev, >= 200 held out
    templates: tuple[str, ...] = setting(tuple(mc.TEMPLATES), "synthetic templates used in turn",
                                         choices=tuple(mc.TEMPLATES))
    n_options: int = setting(4, "options per shipped question (before extra options)", min=2, max=len(mc.LETTERS))
    distractor_facts: Optional[int] = setting(None, "synthetic facts about others whose values are options (None: one "
                                                    "per wrong option; 0: the easy set, only the answer stated)", min=0)
    extra_options: tuple[str, ...] = setting((), "options appended to shipped questions (never correct)",
                                             choices=(*mc.EXTRA_OPTIONS, *mc.EXTRA_OPTIONS.values()))
    format: str = setting("plain", "prompt format", choices=mc.FORMATS)
    n_shots: int = setting(3, "answered examples in the fewshot format", min=0)
    knowledge_shots: int = setting(2, "answered examples before the free-form knowledge check", min=0)
    only_known: bool = setting(True, "score only questions the model answers in free form")
    n_dev: int = setting(120, "questions used to select heads; the rest are held out", min=1)
    score: str = setting("qk", "which score is values: QK-score or attention weight", choices=SCORES)
    position: str = setting("end", "read at the option's end token (key_position) or its letter",
                            choices=(END_ALIAS, "letter"))
    key_position: str = setting("line_end", "the end token: its line's (the paper's) or its text's",
                                choices=KEY_POSITIONS)
    data: Optional[str] = setting(None, 'your questions, a JSONL file of {"question", "options", "answer"} lines '
                                        '(optional "context"), instead of a shipped set', path=True)


@dataclass
class OptionReadout:
    """Per question: every head's QK-score and attention to each option's line end, text end and
    letter (keys of ``qk`` and ``attention``: :data:`POSITIONS`), the letter logits, and every
    head's correct-letter attribution. Options beyond a question's count are masked out
    (``option_mask``)."""

    qk: dict[str, Float[Tensor, "n_questions n_layers n_heads n_options"]]
    attention: dict[str, Float[Tensor, "n_questions n_layers n_heads n_options"]]
    letter_logits: Float[Tensor, "n_questions n_options"]
    correct_letter: Float[Tensor, "n_questions n_layers n_heads"]
    answers: Int[Tensor, " n_questions"]
    option_mask: Bool[Tensor, "n_questions n_options"]

    def __len__(self) -> int:
        return int(self.answers.numel())

    def head_correct(self, method: str = "qk_line_end") -> Float[Tensor, "n_questions n_layers n_heads"]:
        """1 where the head's highest-scoring option is the correct one (``method``: one of
        :data:`METHODS`; ``"qk_end"``/``"attention_end"`` read the paper's key, the line end)."""
        score, position = _split_method(method)
        values = getattr(self, score)[position].masked_fill(~self.option_mask[:, None, None, :], -math.inf)
        return (values.argmax(dim=-1) == self.answers[:, None, None]).float()

    def letter_correct(self) -> Float[Tensor, " n_questions"]:
        """1 where the correct option's letter has the highest logit among the options' letters."""
        logits = self.letter_logits.masked_fill(~self.option_mask, -math.inf)
        return (logits.argmax(dim=-1) == self.answers).float()

    def letter_choices(self) -> Int[Tensor, " n_questions"]:
        return self.letter_logits.masked_fill(~self.option_mask, -math.inf).argmax(dim=-1)


def _split_method(method: str) -> tuple[str, str]:
    """``"qk_line_end"`` -> ``("qk", "line_end")``; the ``"end"`` alias reads the paper's key."""
    score, _, position = method.partition("_")
    if position == END_ALIAS:
        position = KEY_POSITIONS[0]
    if f"{score}_{position}" not in METHODS:
        raise InputError(f"Unknown select-and-copy score {method!r}; choose one of {', '.join(METHODS)} "
                         f"(or {SCORES[0]}_{END_ALIAS}, {SCORES[1]}_{END_ALIAS}: at the line end).")
    return score, position


def _check_config(config: "SelectCopyConfig") -> None:
    for name, allowed in (("score", SCORES), ("position", (END_ALIAS, "letter")), ("key_position", KEY_POSITIONS)):
        value = getattr(config, name)
        if value not in allowed:
            raise InputError(f"The {name!r} parameter of select_copy must be one of "
                             f"{', '.join(repr(a) for a in allowed)}; got {value!r}.")


def config_method(config: "SelectCopyConfig") -> str:
    """The score ``values`` reads, e.g. ``"qk_line_end"`` (``position="end"`` at ``key_position``)."""
    _check_config(config)
    return f"{config.score}_{config.key_position if config.position == END_ALIAS else config.position}"


@dataclass
class EncodedPrompts:
    """Prompts as a token batch with each option's letter, text-end and line-end positions (padded
    options: 0)."""

    batch: TokenBatch
    letters: Int[Tensor, "n n_options"]
    option_ends: Int[Tensor, "n n_options"]
    line_ends: Int[Tensor, "n n_options"]
    letter_ids: Int[Tensor, "n n_options"]
    answers: Int[Tensor, " n"]
    option_mask: Bool[Tensor, "n n_options"]


def encode_prompts(model: Any, prompts: Sequence[mc.MCPrompt]) -> EncodedPrompts:
    """Tokenize with offsets and locate every option's letter, text-end and line-end token
    (``multiple_choice.option_positions``, ``line_end_positions``; InputError where a line has no
    end token of its own)."""
    width = max(len(p.question.options) for p in prompts)
    letter_sets = {(n, prefix): mc.letter_token_ids(model.tokenizer, n, prefix)
                   for n, prefix in {(len(p.question.options), p.letter_prefix) for p in prompts}}
    rows, letters, option_ends, line_ends, letter_ids = [], [], [], [], []
    for prompt in prompts:
        ids, offsets = encode_with_offsets(model, prompt.text)
        letter_at, end_at = mc.option_positions(offsets, prompt)
        pad = [0] * (width - len(letter_at))
        rows.append(ids)
        letters.append(letter_at + pad)
        option_ends.append(end_at + pad)
        line_ends.append(mc.line_end_positions(offsets, prompt) + pad)
        letter_ids.append(letter_sets[len(letter_at), prompt.letter_prefix] + pad)
    counts = torch.tensor([len(p.question.options) for p in prompts])
    return EncodedPrompts(
        batch=pad_rows(model, rows),
        letters=torch.tensor(letters), option_ends=torch.tensor(option_ends), line_ends=torch.tensor(line_ends),
        letter_ids=torch.tensor(letter_ids),
        answers=torch.tensor([p.question.answer for p in prompts]),
        option_mask=torch.arange(width)[None, :] < counts[:, None],
    )


def option_readout(
    model: Any, prompts: Sequence[mc.MCPrompt], batch_size: Optional[int] = None, progress: Optional[bool] = None
) -> OptionReadout:
    """One forward pass per prompt, caching each layer's ``q``, ``k``, ``pattern`` and ``z``; the
    unembedding runs at each row's last position only."""
    if not prompts:
        raise InputError("No questions to score; give at least one prompt.")
    encoded = encode_prompts(model, prompts)
    shape = model_shape(model)
    query_keys = [(head_hook(model, layer, "q"), head_hook(model, layer, "k")) for layer in range(shape.n_layers)]
    names = [name for layer, (q, k) in enumerate(query_keys)
             for name in (q[0], k[0], hook_name(layer, "pattern"), *head_output_hooks(model, layer))] + [FINAL_SCALE]
    unembed = unembedding(model)
    letter_rows = unembed.T[encoded.letter_ids.to(unembed.device)]  # [n, options, d_model]
    w_norm, w_o = final_norm_weight(model).float(), head_output_weights(model)

    def reduce(last_logits: Tensor, cache: dict, chunk: TokenBatch, rows: slice) -> dict[str, Tensor]:
        index = torch.arange(rows.start, rows.stop)  # the chunk's prompts
        device = last_logits.device
        in_chunk, last = torch.arange(len(chunk), device=device), chunk.last_positions
        out: dict[str, Tensor] = {}
        at_positions = {"line_end": encoded.line_ends, "option_end": encoded.option_ends, "letter": encoded.letters}
        for position, at in ((position, at_positions[position][index].to(device)) for position in POSITIONS):
            out[f"qk_{position}"] = _stack_layers([_qk_scores(cache, query_keys[layer], in_chunk, last, at, shape.group_size)
                                                   for layer in range(shape.n_layers)])
            out[f"attention_{position}"] = _stack_layers([_attention(cache, layer, in_chunk, last, at)
                                                          for layer in range(shape.n_layers)])
        out["letter_logits"] = last_logits.float().gather(1, encoded.letter_ids[index].to(device)).cpu()
        final_scale = cache[FINAL_SCALE]
        scale = final_scale[in_chunk.to(final_scale.device), last.to(final_scale.device), 0].float().to(device)
        rows_here = index.to(letter_rows.device)
        correct_minus_wrong = _correct_minus_wrong(letter_rows[rows_here], encoded.answers[index].to(letter_rows.device),
                                                   encoded.option_mask[index].to(letter_rows.device))
        directions = w_norm.to(device) * correct_minus_wrong.to(device)
        out["correct_letter"] = final_position_attributions(model, cache, last, directions, scale, w_o).cpu()
        return out

    parts = run_batched(model, encoded.batch, reduce, names, batch_size, progress, desc="select_copy", logits="last")
    return OptionReadout(
        qk={p: parts[f"qk_{p}"] for p in POSITIONS}, attention={p: parts[f"attention_{p}"] for p in POSITIONS},
        letter_logits=parts["letter_logits"], correct_letter=parts["correct_letter"],
        answers=encoded.answers, option_mask=encoded.option_mask,
    )


def _stack_layers(per_layer: list[Tensor]) -> Float[Tensor, "batch n_layers n_heads n_options"]:
    return torch.stack([scores.float().cpu() for scores in per_layer], dim=1)


def _attention(
    cache: dict, layer: int, rows: Tensor, last: Tensor, at: Int[Tensor, "batch n_options"]
) -> Float[Tensor, "batch n_heads n_options"]:
    """Post-softmax attention from the last token to each option's position."""
    pattern = cache[hook_name(layer, "pattern")]  # on the layer's device
    from_last = pattern[rows.to(pattern.device), :, last.to(pattern.device)]  # [batch, heads, key_pos]
    index = einops.repeat(at.to(pattern.device), "batch n_options -> batch n_heads n_options",
                          n_heads=from_last.shape[1])
    return from_last.gather(2, index)


def _qk_scores(
    cache: dict, hooks: tuple, rows: Tensor, last: Tensor, at: Int[Tensor, "batch n_options"], group_size: int
) -> Float[Tensor, "batch n_heads n_options"]:
    """Pre-RoPE query at the last token · pre-RoPE key (of the head's KV group) at each option, both
    after any QK-norm (``hooks``: the layer's query and key ``head_hook``)."""
    (query_name, query_view), (key_name, key_view) = hooks
    device = cache[query_name].device  # the layer's
    rows, last, at = rows.to(device), last.to(device), at.to(device)
    query = query_view(cache[query_name])[rows, last].float()  # [batch, n_heads, d_head]
    keys = key_view(cache[key_name])[rows[:, None], at].float().to(device)  # [batch, n_options, n_kv_heads, d_head]
    keys = einops.repeat(keys, "batch n_options n_kv_heads d_head -> batch n_options (n_kv_heads group) d_head",
                         group=group_size)  # each query head meets its KV group's key
    return einops.einsum(query, keys, "batch n_heads d_head, batch n_options n_heads d_head -> batch n_heads n_options")


def _correct_minus_wrong(
    letter_rows: Float[Tensor, "batch n_options d_model"], answers: Int[Tensor, " batch"], mask: Bool[Tensor, "batch n_options"]
) -> Float[Tensor, "batch d_model"]:
    """``W_U[correct letter] - mean of W_U[wrong letters]`` per row."""
    correct = torch.nn.functional.one_hot(answers, letter_rows.shape[1]).bool()
    wrong = mask & ~correct
    wrong_mean = (letter_rows * wrong[..., None]).sum(dim=1) / wrong.sum(dim=1, keepdim=True)
    return letter_rows[torch.arange(len(answers)), answers] - wrong_mean


def questions_file(config: SelectCopyConfig) -> Optional[str]:
    """The JSONL file of your questions: ``data``, or (kept for older configs) a path given as
    ``questions``; ``None`` for a shipped set.

    Raises:
        SettingError: both ``data`` and a ``questions`` other than the default are given.
    """
    if config.data is not None:
        if config.questions != QUESTION_SETS[0]:
            raise SettingError(
                f"select_copy got both data={config.data!r} and questions={config.questions!r}; give your questions "
                f"as data and leave questions at its default {QUESTION_SETS[0]!r}, or drop data to use the "
                f"{config.questions!r} set."
            )
        return config.data
    return None if config.questions in QUESTION_SETS else config.questions


def load_questions(config: SelectCopyConfig) -> list[mc.MCQuestion]:
    """The configured set (``distractor_facts=None``: one distractor fact per wrong option), or
    your file (:func:`questions_file`, read by ``multiple_choice.read_questions``)."""
    path = questions_file(config)
    if path is not None:
        return mc.read_questions(path)
    if config.questions == "synthetic":
        return mc.synthetic_questions(config.n_questions, config.n_options, config.templates, config.distractor_facts,
                                      config.extra_options, config.seed)
    return mc.world_questions(config.n_options, config.extra_options, config.seed)


def knows_answer(
    model: Any, questions: Sequence[mc.MCQuestion], n_shots: int = 2, seed: int = 0, batch_size: Optional[int] = None
) -> Bool[Tensor, " n_questions"]:
    """True where the model's top next token after the free-form question (``n_shots`` answered
    examples first) is the first token of ``" " + answer``. Kept on disk by the model's identity,
    the prompts and the answers (``headscope.identity.stored_result``): one forward per question
    is the longest step of the atlas on a CPU."""
    tokenizer = model.tokenizer
    targets = torch.tensor([tokenizer(" " + q.answer_text, add_special_tokens=False)["input_ids"][0] for q in questions])
    prompts = mc.knowledge_prompts(questions, n_shots, seed)
    inputs = {"prompts": prompts, "targets": targets.tolist(), "device": model_device(model).type}  # a near-tie's
    # argmax may differ between devices (TF32 on a GPU)
    return stored_result(model, "select_copy.known", inputs,
                         lambda: final_states(model, tokenize(model, prompts), batch_size).argmax(dim=-1) == targets)


MAJORITY_ACCURACY = 0.5  # effect-size floor: the head's top option is the correct one on most held-out questions
MAJORITY_RULE = ("the role's definition (a head that selects the correct option and copies it; Tulchinskii et al. "
                 "2024) read as a majority: correct on more than half of the held-out questions")


@register_detector
class SelectCopyDetector(Detector):
    name = "select_copy"
    atlas_order = 70
    Config = SelectCopyConfig
    summary = "accuracy of each head's QK-score / attention to the correct option (Tulchinskii et al. 2024)"
    cost = "score 369 s (free-form knowledge check of 1300 questions, then the ~335 known), validation 133 s"
    explanation = {"select_copy": (
        "A select-and-copy head answers a multiple-choice question by attention: from the last prompt token its "
        "query matches the key of the correct option's line, and it copies that option's letter (Tulchinskii et "
        "al. 2024, 'Listening to the Wise Few'). headscope scores the accuracy of each head's query-key score over "
        "the options on questions the model knows, tests it on held-out questions against guessing, and validates "
        "by the correct letter's logit margin with the top heads ablated.")}

    def examples(self, model: Any) -> list[Example]:
        """The first two questions of its set, in its format (few-shot shown without its shots,
        to stay short); none without a tokenizer."""
        if not has_tokenizer(model):
            return []
        shown = "chat" if self.config.format == "chat" else "plain"
        return [(f"answer {mc.LETTERS[q.answer]} ({q.answer_text})", mc.mc_prompt(q, shown).text)
                for q in load_questions(self.config)[:2]]

    def check_data(self) -> None:
        """Read your questions file (``data``, or a path in ``questions``) without a model: every
        line parses, and it holds more than ``n_dev`` questions (the first ``n_dev`` select heads,
        the rest are held out; ``only_known`` may drop more once the model answers them)."""
        path = questions_file(self.config)
        if path is None:
            return
        n_questions, n_dev = len(mc.read_questions(path)), self.config.n_dev
        if n_questions <= n_dev:
            raise DataError(
                f"{path} holds {n_questions} questions, but the first n_dev={n_dev} select the heads and the rest are "
                f"held out to test them: it needs at least {n_dev + 1} (a held-out part of 100 or more gives the test "
                "power). Add questions or give a smaller n_dev."
            )

    def data_paths(self) -> list[str]:
        """Your questions file, if any (:func:`questions_file`)."""
        path = questions_file(self.config)
        return [str(path)] if path else []

    def prompts(self, model: Any, batch_size: Optional[int] = None) -> tuple[list[mc.MCPrompt], dict[str, Any]]:
        """The prompts to score (known questions only, when ``only_known``) and the knowledge check
        (run only when ``only_known``).
        The check runs once per model identity (weights included), settings and questions, for
        the last few of them (``score`` and ``validation_task`` share it)."""
        config: SelectCopyConfig = self.config
        self.check_data()
        questions = load_questions(config)
        check: dict[str, Any] = {"n_questions": len(questions), "known_rate": None,  # None: not checked
                                 "questions_source": "data" if questions_file(config) else config.questions}
        if config.only_known:  # the check costs one forward per question; skipped when nothing is filtered
            known = self._known(model, questions, batch_size)
            check["known_rate"] = float(known.float().mean())
            questions = [q for q, k in zip(questions, known.tolist(), strict=True) if k]
        if len(questions) <= config.n_dev:
            raise InputError(
                f"Only {len(questions)} questions are left to score, not more than n_dev={config.n_dev}; "
                f"ask for more questions or a smaller n_dev."
            )
        return mc.mc_prompts(questions, config.format, config.n_shots, config.seed), check

    def _known(self, model: Any, questions: list[mc.MCQuestion], batch_size: Optional[int]) -> Tensor:
        config: SelectCopyConfig = self.config
        key = (model_identity(model), repr(config), repr(questions))
        return _KNOWN.get_or_set(key, lambda: knows_answer(model, questions, config.knowledge_shots, config.seed,
                                                           batch_size))

    def score(self, model: Any, batch_size: Optional[int] = None, progress: Optional[bool] = None,
              prompts: Optional[Sequence[mc.MCPrompt]] = None) -> HeadScores:
        config: SelectCopyConfig = self.config
        config_method(config)
        check: dict[str, Any] = {}
        if prompts is None:
            prompts, check = self.prompts(model, batch_size)
        readout = option_readout(model, prompts, batch_size, progress)
        return self.scores_from(model, readout, check)

    def scores_from(self, model: Any, readout: OptionReadout, check: Optional[dict[str, Any]] = None) -> HeadScores:
        """``HeadScores`` from a computed readout: first ``n_dev`` questions = dev, the rest held out.
        ``values`` reads the configured score; extras and metadata hold every score at both key
        positions (and the letter)."""
        config: SelectCopyConfig = self.config
        method = config_method(config)
        dev, test = slice(0, config.n_dev), slice(config.n_dev, len(readout))
        extras: dict[str, Tensor] = {"correct_letter": readout.correct_letter[dev].mean(dim=0)}
        metadata: dict[str, Any] = dict(check or {}, n_dev=config.n_dev, n_test=len(readout) - config.n_dev,
                                        method=method)
        letters = readout.letter_correct()
        metadata["letter_accuracy_dev"], metadata["letter_accuracy_test"] = float(letters[dev].mean()), float(letters[test].mean())
        for name in METHODS:
            correct = readout.head_correct(name)
            extras[name], extras[f"{name}_test"] = correct[dev].mean(dim=0), correct[test].mean(dim=0)
            best = _best_head(extras[name])
            metadata[f"best_{name}"] = {"head": str(best), "dev": float(extras[name][best.layer, best.head]),
                                        "test": float(extras[f"{name}_test"][best.layer, best.head])}
        return self.result(model, extras[method], extras, metadata)

    def significance(
        self, model: Any, scores: HeadScores, batch_size: Optional[int] = None, progress: Optional[bool] = None
    ) -> list[Significance]:
        """Held-out accuracy of the chosen score (``values`` is the dev accuracy the heads are chosen
        by; the test uses only the held-out questions): an exact one-sided binomial test against
        guessing (1 / options shown) at family-wise 5% over all heads (Bonferroni), and above the
        floor ``MAJORITY_ACCURACY``: a head that selects the correct option picks it on most
        questions, not merely more often than a guess. The letters' own held-out accuracy is in
        the details, for comparison."""
        config: SelectCopyConfig = self.config
        method = config_method(config)
        where = {"line_end": "the end of each option's line", "option_end": "each option's last text token",
                 "letter": "each option's letter"}[_split_method(method)[1]]
        n_test = int(scores.metadata["n_test"])
        chance = 1 / (config.n_options + len(config.extra_options))
        critical = binomial_critical_accuracy(n_test, chance, scores.values.numel())
        details = {"n_test": n_test, "chance": chance, "critical_accuracy": critical, "alpha": DEFAULT_ALPHA,
                   "letter_accuracy_test": scores.metadata.get("letter_accuracy_test")}
        return [Significance(self.name, self.name, scores.extras[f"{method}_test"], critical,
                             f"held-out accuracy of the {config.score} score at {where}",
                             f"exact binomial test vs guessing (1/{round(1 / chance)}) on {n_test} held-out questions, "
                             f"Bonferroni over all heads (family-wise {DEFAULT_ALPHA})", details,
                             floor=MAJORITY_ACCURACY, floor_rule=MAJORITY_RULE)]

    def validation_task(self, model: Any) -> ValidationTask:
        prompts, _check = self.prompts(model)
        held_out = prompts[self.config.n_dev:]
        return ValidationTask(
            data=encode_prompts(model, held_out).batch,
            metric=CorrectLetterMargin(model, held_out),
            metric_name="correct letter's logit - mean of the wrong letters' logits at the last position",
            ablation_hurts_when="decreases",
            last_position=True,
        )


def _best_head(accuracy: Float[Tensor, "n_layers n_heads"]) -> Head:
    index = int(accuracy.flatten().argmax())
    return Head(*divmod(index, accuracy.shape[1]))


class CorrectLetterMargin:
    """``metric(logits, chunk)``: the correct letter's logit minus the mean wrong letter's, at each
    row's last position; rows are matched to questions by their tokens."""

    def __init__(self, model: Any, prompts: Sequence[mc.MCPrompt]) -> None:
        encoded = encode_prompts(model, prompts)
        self.letters = {
            row_tokens(encoded.batch, row): (encoded.letter_ids[row], encoded.answers[row], encoded.option_mask[row])
            for row in range(len(prompts))
        }

    def __call__(self, logits: Tensor, chunk: TokenBatch) -> Tensor:
        final = final_logits(logits, chunk).float()
        margins = []
        for row in range(len(chunk)):
            ids, answer, mask = self.letters[row_tokens(chunk, row)]
            letter_logits = final[row, ids.to(final.device)]
            wrong = mask.clone()
            wrong[answer] = False
            margins.append(letter_logits[answer] - letter_logits[wrong.to(final.device)].mean())
        return torch.stack(margins)


