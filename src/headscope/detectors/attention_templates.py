"""Shared machinery for detectors defined by where a head attends on repeated random tokens.

A template ``T[query, key]`` says which keys a head of the role should attend to from each
query position. A head's score on one sequence is the attention it puts on the template's keys,
``sum_k A[q, k] * T[q, k]``, averaged over the template's query positions; the detector's score
is the mean over sequences. This is the "share of attention on the expected keys" measure (0..1),
not TransformerLens ``detect_head``'s "mul" measure, which caps near 0.5 on two repeats.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Optional, Sequence, Union

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from headscope.detectors.base import Detector, DetectorConfig, Example, ValidationTask, has_tokenizer, setting
from headscope.engine.heads import Head, hook_name, model_shape
from headscope.engine.metrics import masked_mean, next_token_losses
from headscope.engine.runner import run_batched
from headscope.engine.tokens import TokenBatch, bos_token_id, pad_token_id
from headscope.errors import DataError, InputError, SettingError
from headscope.identity import RecentCache, model_identity, tensor_digest
from headscope.results import HeadScores
from headscope.significance import Significance
from headscope.tasks.natural_text import TextWindows, read_documents, split_windows, text_windows
from headscope.tasks.repeated_tokens import RepeatedTokens, repeated_random_tokens, unrepeated_like, unrepeated_rows
from headscope.tasks.user_data import file_sha256

Task = Union[RepeatedTokens, TextWindows]


@dataclass
class RepeatedTokensConfig(DetectorConfig):
    """Settings of the repeated-random-token task (Olsson et al.: 25 tokens x 4, with BOS), or of
    the researcher's own text (``data``)."""

    n_sequences: int = setting(32, "sequences scored (with data: at most this many text windows)", min=1)
    block_len: int = setting(25, "distinct random tokens per block", min=2)
    n_repeats: int = setting(4, "times each block is repeated", min=2)
    token_range: Optional[tuple[int, int]] = setting(None, "[low, high) token ids drawn (default: 2%-50% of the "
                                                           "vocabulary)")
    n_validation_sequences: int = setting(32, "held-out sequences of the validation loss", min=1)
    data: Optional[str] = setting(None, "your own natural text instead of random tokens: a .txt file (one document) "
                                        "or .jsonl with {\"text\": ...} per line", path=True)
    text_length: int = setting(256, "tokens per window cut from the data text", min=2)


def task_settings(config: RepeatedTokensConfig) -> dict[str, Any]:
    """The settings that make the task (detectors that agree on them can share its runs)."""
    return {f.name: getattr(config, f.name) for f in fields(RepeatedTokensConfig)}


def make_task(model: Any, config: RepeatedTokensConfig, validation: bool = False) -> RepeatedTokens:
    """The scoring task, or a disjoint validation task (another seed), for ``model``."""
    return repeated_random_tokens(
        d_vocab=model_shape(model).d_vocab,
        n_sequences=config.n_validation_sequences if validation else config.n_sequences,
        block_len=config.block_len,
        n_repeats=config.n_repeats,
        bos_token_id=bos_token_id(model),
        token_range=tuple(config.token_range) if config.token_range else None,
        seed=config.seed + (1_000_003 if validation else 0),
    )


def text_task(model: Any, config: RepeatedTokensConfig, validation: bool = False) -> TextWindows:
    """Windows of the ``data`` text for scoring, or the disjoint held-out windows for validation."""
    context = model_shape(model).n_ctx
    if config.text_length + (bos_token_id(model) is not None) > context:
        raise SettingError(f"text_length {config.text_length} (plus the BOS) is longer than the model's context of "
                           f"{context} tokens: set text_length to at most {context - 1}.")
    windows = text_windows(model.tokenizer, read_documents(config.data), config.text_length, bos_token_id(model),
                           pad_token_id(model))
    scored, held_out = split_windows(windows, config.n_sequences, config.n_validation_sequences, config.seed,
                                     config.data)
    return held_out if validation else scored


def scoring_task(model: Any, config: RepeatedTokensConfig, validation: bool = False) -> Task:
    """The user's text windows when ``config.data`` names a file, else repeated random tokens."""
    if config.data:
        if getattr(model, "tokenizer", None) is None:
            raise InputError("Scoring text data needs the model's tokenizer, and this model has none: load it with "
                             "its tokenizer, or leave data unset to use random tokens.")
        return text_task(model, config, validation)
    return make_task(model, config, validation)


def task_batch(task: Task) -> Any:
    """What ``run_batched`` takes for a task: a token tensor or a padded ``TokenBatch``."""
    return task.batch if isinstance(task, TextWindows) else task.tokens


def template_scores(
    patterns: dict[str, Tensor],
    n_layers: int,
    template: Union[Float[Tensor, "q k"], Float[Tensor, "batch q k"]],
    queries: Union[Bool[Tensor, " q"], Bool[Tensor, "batch q"]],
    chunk: TokenBatch,
) -> Float[Tensor, "batch n_layers n_heads"]:
    """Per-example template scores for every head, from cached ``hook_pattern`` of each layer.
    The template and queries are one for every row (``[q, k]``, ``[q]``) or one per row of the
    chunk (``[batch, q, k]``, ``[batch, q]``: text, where repeats fall anywhere)."""
    width = chunk.tokens.shape[1]
    weights = template[..., :width, :width].to(chunk.tokens.device).float()
    weights = weights[:, None] if weights.ndim == 3 else weights  # [batch, 1, q, k] or [q, k]
    rows_queries = queries[..., :width].to(chunk.tokens.device)
    query_mask = (rows_queries if rows_queries.ndim == 2 else rows_queries[None, :]) & chunk.attention_mask.bool()
    per_layer = []
    for layer in range(n_layers):
        pattern = patterns[hook_name(layer, "pattern")].float()  # [batch, head, q, k], on the layer's device
        on_template = (pattern * weights.to(pattern.device)).sum(dim=-1)  # [batch, head, q]
        heads = on_template.shape[1]
        mask = query_mask.to(pattern.device)[:, None, :].expand(-1, heads, -1)
        per_layer.append(masked_mean(on_template.flatten(0, 1), mask.flatten(0, 1)).view(-1, heads).to(weights.device))
    return torch.stack(per_layer, dim=1)


def pattern_hooks(model: Any) -> list[str]:
    return [hook_name(layer, "pattern") for layer in range(model_shape(model).n_layers)]


def repeated_loss_task(model: Any, config: RepeatedTokensConfig) -> ValidationTask:
    """Validation for induction-circuit heads: loss on the predictable (repeated) tokens."""
    if config.data:
        return text_loss_task(model, config)
    task = make_task(model, config, validation=True)
    targets = task.predictable_targets()

    def repeated_targets(chunk: TokenBatch) -> Tensor:
        return targets[None, : chunk.tokens.shape[1] - 1].to(chunk.tokens.device) & chunk.attention_mask[:, 1:].bool()

    return loss_task(task.tokens, repeated_targets, "loss on repeated tokens (nats)",
                     f"targets {tensor_digest(targets)}")


def loss_task(
    data: Any, targets_of: Callable[[TokenBatch], Tensor], metric_name: str, targets_key: str
) -> ValidationTask:
    """A validation task whose metric is each row's mean next-token loss over the targets
    ``targets_of(chunk)`` marks (``[batch, pos - 1]``: ``logits[:, i]`` predicts ``tokens[:, i + 1]``).
    ``targets_key`` names what ``targets_of`` reads besides the chunk: with the metric's name it
    makes the metric's ``cache_key`` (``headscope.identity.metric_identity``), so validations of
    tasks on the same tokens share one clean run."""

    def target_loss(logits: Tensor, chunk: TokenBatch) -> Tensor:
        losses = next_token_losses(logits, chunk.tokens)
        return masked_mean(losses, targets_of(chunk).to(losses.device))

    target_loss.cache_key = f"next-token loss | {metric_name} | {targets_key}"  # type: ignore[attr-defined]
    return ValidationTask(data=data, metric=target_loss, metric_name=metric_name, ablation_hurts_when="increases")


def text_loss_task(model: Any, config: RepeatedTokensConfig) -> ValidationTask:
    """Validation on held-out windows of the user's text: loss on the tokens an induction
    mechanism can predict, the targets ``t[i + 1]`` where the current token ``t[i]`` occurred
    before at ``j`` and was followed there by the same token, ``t[j + 1] == t[i + 1]``."""
    task = text_task(model, config, validation=True)
    if not bool(induction_predictable(task.tokens, task.attention_mask, task.offset).any()):
        raise DataError(f"The held-out windows of {config.data} repeat no token pair (a token followed by the "
                        f"same token as at an earlier occurrence): nothing there tests in-context copying. Give "
                        f"longer or more repetitive text, or a larger text_length.")

    def predictable_targets(chunk: TokenBatch) -> Tensor:
        return induction_predictable(chunk.tokens, chunk.attention_mask, task.offset)

    return loss_task(task.batch, predictable_targets, "loss on induction-predictable tokens of held-out text (nats)",
                     f"induction-predictable from offset {task.offset}")


def earlier_copies(tokens: Tensor, mask: Tensor, offset: int) -> Bool[Tensor, "batch q k"]:
    """``C[b, q, k]``: key ``k < q`` holds the query's token (an earlier occurrence); keys before
    ``offset`` (the BOS) and padding never count."""
    width = tokens.shape[1]
    same = tokens[:, :, None] == tokens[:, None, :]
    earlier = torch.ones(width, width, dtype=torch.bool, device=tokens.device).tril(-1)
    real = mask.bool()
    real_keys = real.clone()
    real_keys[:, :offset] = False
    return same & earlier & real[:, :, None] & real_keys[:, None, :]


def copy_template(tokens: Tensor, mask: Tensor, offset: int,
                  shift: int) -> tuple[Float[Tensor, "batch q k"], Bool[Tensor, "batch q"]]:
    """Per row, from the tokens themselves: ``T[b, q, j + shift] = 1`` for every earlier
    occurrence ``j`` of the query's token, keys before the query only. ``shift=1``: induction
    (the token after each earlier copy); ``shift=0``: duplicate token. On repeated random tokens
    (distinct within a block) this equals :func:`repeat_template`."""
    copies = earlier_copies(tokens, mask, offset)
    template = torch.zeros_like(copies)
    template[:, :, shift:] = copies[:, :, : copies.shape[2] - shift]
    template &= torch.ones_like(copies[0]).tril(-1)[None]  # the key stays before the query
    return template.float(), template.any(dim=-1)


def previous_template(tokens: Tensor, mask: Tensor, offset: int) -> tuple[Float[Tensor, "batch q k"], Bool[Tensor, "batch q"]]:
    """Per row: ``T[b, q, q - 1] = 1`` for real queries ``q >= offset + 1``."""
    batch, width = tokens.shape
    queries = mask.bool() & (torch.arange(width, device=tokens.device) >= offset + 1)[None, :]
    template = torch.zeros(batch, width, width, device=tokens.device)
    index = torch.arange(1, width, device=tokens.device)
    template[:, index, index - 1] = queries[:, 1:].float()
    return template, queries


def induction_predictable(tokens: Tensor, mask: Tensor, offset: int) -> Bool[Tensor, "batch pos_minus_1"]:
    """For next-token losses (``logits[:, i]`` predicts ``tokens[:, i + 1]``): targets ``i + 1``
    whose current token ``t[i]`` occurred earlier at ``j`` followed by ``t[j + 1] == t[i + 1]``."""
    copies = earlier_copies(tokens, mask, offset)[:, :-1, :-1]  # query i, key j, both < width - 1
    same_next = tokens[:, 1:, None] == tokens[:, None, 1:]  # t[i + 1] == t[j + 1]
    return (copies & same_next).any(dim=-1) & mask[:, 1:].bool()


def repeat_template(task: RepeatedTokens, shift: int) -> tuple[Float[Tensor, "q k"], Bool[Tensor, " q"]]:
    """``T[i, i - m*n + shift] = 1`` for ``m >= 1``, queries ``i`` in the later repeats.

    ``shift=1``: the token after each earlier copy (induction); ``shift=0``: the earlier copies
    themselves (duplicate token). Keys never include the BOS.
    """
    width = task.tokens.shape[1]
    queries = task.in_later_repeats()
    template = torch.zeros(width, width)
    for query in torch.nonzero(queries).flatten().tolist():
        copy = query - task.block_len  # an earlier occurrence of the query's token
        while copy >= task.offset:
            template[query, copy + shift] = 1.0
            copy -= task.block_len
    return template, queries


EXAMPLE_BLOCK = 12  # ids of a token example's block (3 repeats and the BOS: 37 tokens, a readable pattern)
EXAMPLE_TEXT_TOKENS = 60  # tokens of a window of the user's text shown as an example


def template_examples(model: Any, config: RepeatedTokensConfig, texts: Sequence[tuple[str, str]]) -> list[Example]:
    """A template detector's examples: ``texts`` (``(title, text)``, when the model has a
    tokenizer), then one of its own task: the first ``EXAMPLE_TEXT_TOKENS`` tokens of the first
    scored window of the user's text (``data``), or the first random-token sequence, its block cut
    to ``EXAMPLE_BLOCK`` ids, repeated up to 3 times."""
    shown = list(texts) if has_tokenizer(model) else []
    task = scoring_task(model, config)
    if isinstance(task, TextWindows):
        row = task.tokens[0][task.attention_mask[0].bool()]
        return shown + [(f"your text: the first {EXAMPLE_TEXT_TOKENS} tokens of a scored window",
                         row[:EXAMPLE_TEXT_TOKENS].tolist())]
    width, repeats = min(task.block_len, EXAMPLE_BLOCK), min(task.n_repeats, 3)
    block = task.tokens[0, task.offset : task.offset + width].tolist()
    return shown + [(f"its task: {width} random tokens repeated {repeats} times",
                     task.tokens[0, : task.offset].tolist() + block * repeats)]


ExtraScores = Callable[[dict, TokenBatch], dict[str, Tensor]]

MAJORITY = 0.5  # effect-size floor of every template role: most of the head's attention on the template keys
MAJORITY_RULE = ("the role's definition (attends primarily to the template keys; Elhage et al. 2021, Olsson et al. "
                 "2022) read as a majority: more than half of the head's attention on them")


class AttentionTemplateDetector(Detector):
    """A detector scored by ``template_scores`` on repeated random tokens.

    Subclasses give ``template(task)``; they may add per-example extra scores with
    ``extra_scores(model, task) -> (hook names, fn(cache, chunk) -> {name: [batch, L, H]})``.
    """

    Config = RepeatedTokensConfig
    score_name = "attention_on_template"

    def template(self, task: RepeatedTokens) -> tuple[Tensor, Tensor]:
        """``(T[q, k], queries[q])`` on repeated random tokens, the same for every row."""
        raise NotImplementedError

    def token_template(self, tokens: Tensor, mask: Tensor, offset: int) -> tuple[Tensor, Tensor]:
        """``(T[batch, q, k], queries[batch, q])`` read from each row's own tokens (the user's
        text, where repeats fall anywhere)."""
        raise NotImplementedError

    def templates_for(self, task: Task) -> tuple[Tensor, Tensor]:
        """The template of ``task``: shared by all rows on random tokens, per row on text."""
        if isinstance(task, TextWindows):
            return self.token_template(task.tokens, task.attention_mask, task.offset)
        return self.template(task)

    def check_data(self) -> None:
        if self.config.data:
            read_documents(self.config.data)

    def extra_scores(self, model: Any, task: RepeatedTokens) -> tuple[list[str], Optional[ExtraScores]]:
        return [], None

    def score(self, model: Any, batch_size: Optional[int] = None, progress: Optional[bool] = None) -> HeadScores:
        return score_together(model, [self], batch_size, progress)[self.name]

    def pass_key(self, model: Any) -> dict[str, Any]:
        """The task settings: template detectors that agree on them share one scoring pass."""
        return task_settings(self.config)

    @classmethod
    def score_together(
        cls, model: Any, detectors: list[Detector], batch_size: Optional[int] = None, progress: Optional[bool] = None
    ) -> dict[str, HeadScores]:
        """One forward pass over the shared task scores every template (the module's :func:`score_together`)."""
        return score_together(model, detectors, batch_size, progress)  # type: ignore[arg-type]

    def significance(
        self, model: Any, scores: HeadScores, batch_size: Optional[int] = None, progress: Optional[bool] = None
    ) -> list[Significance]:
        """Significant = above this role's own null *and* above the role's effect-size floor.

        Null (the threshold): :meth:`null` — by default the largest share of attention any head
        puts on *this* template's keys in random tokens of the same shape that never repeat, where
        no token gives a head a reason to look there (the maximum over all heads makes the rule
        family-wise). The null run is shared by every template detector with the same settings.
        Floor: ``MAJORITY`` — the role's definition (a head that attends *primarily* to the
        template's keys, Elhage et al. 2021, Olsson et al. 2022) read as: more than half of its
        attention goes there, so no other key set can take as much.
        """
        threshold, rule, details = self.null(model, batch_size, progress)
        return [Significance(
            detector=self.name, role=self.name, statistic=scores.values, threshold=threshold,
            statistic_name=f"{scores.metadata.get('score', self.score_name)} (share of attention on the template keys)",
            rule=rule, details={**details, "n_sequences": self.config.n_sequences},
            floor=MAJORITY, floor_rule=MAJORITY_RULE,
        )]

    def null(self, model: Any, batch_size: Optional[int] = None,
             progress: Optional[bool] = None) -> tuple[float, str, dict[str, Any]]:
        """``(threshold, rule, details)``: this template's share measured on random tokens that
        never repeat (:func:`template_null`), maximum over all heads."""
        null = template_null(model, self, batch_size, progress)
        peak = int(torch.argmax(null))
        n_heads = null.shape[1]
        rule = ("null from random-token inputs: above the largest share any head puts on this template's keys "
                "in random tokens that never repeat (max over all heads: family-wise)")
        return float(null.max()), rule, {"null_max": float(null.max()), "null_median": float(null.median()),
                                         "null_max_head": str(Head(peak // n_heads, peak % n_heads))}

    def validation_task(self, model: Any) -> ValidationTask:
        return repeated_loss_task(model, self.config)


def score_together(
    model: Any, detectors: list[AttentionTemplateDetector], batch_size: Optional[int] = None,
    progress: Optional[bool] = None,
) -> dict[str, HeadScores]:
    """Score several template detectors with the same settings in one pass over their shared
    repeated-token task (one forward run caching every layer's pattern)."""
    config = detectors[0].config
    if any(task_settings(d.config) != task_settings(config) for d in detectors):
        raise ValueError("score_together needs detectors with the same task settings (they share one task).")
    task = scoring_task(model, config)
    n_layers = model_shape(model).n_layers
    full = {d.name: d.templates_for(task) for d in detectors}
    templates = chunk_templates(full)
    on_text = isinstance(task, TextWindows)
    extras = {d.name: ([], None) if on_text else d.extra_scores(model, task) for d in detectors}

    def reduce(logits: Tensor, cache: dict, chunk: TokenBatch, rows: slice) -> dict[str, Tensor]:
        out = {}
        for name, (template, queries) in templates(rows).items():
            out[name] = template_scores(cache, n_layers, template, queries, chunk)
            extra_fn = extras[name][1]
            out.update({f"{name}.{key}": value for key, value in (extra_fn(cache, chunk) if extra_fn else {}).items()})
        return out

    names = pattern_hooks(model) + sorted({hook for hooks, _ in extras.values() for hook in hooks})
    desc = "+".join(d.name for d in detectors)
    per_example = run_batched(model, task_batch(task), reduce, names, batch_size, progress, desc=desc, logits="last")
    means = {name: mean_over_rows(values, full[name.split(".")[0]][1], name) for name, values in per_example.items()}
    results = {}
    for detector in detectors:
        own = {detector.score_name: means[detector.name]}
        own.update({key.split(".", 1)[1]: v for key, v in means.items() if key.startswith(detector.name + ".")})
        results[detector.name] = detector.result(
            model,
            values=own[detector.score_name],
            extras=own,
            metadata={
                "score": detector.score_name,
                "measure": "mean over query positions of the attention on the template keys (0..1)",
                "n_sequences": len(task.tokens),
                "sequence_length": int(task.tokens.shape[1]),
                "bos_token_id": int(task.tokens[0, 0]) if task.has_bos else None,
                **(text_metadata(task, config) if on_text else {}),
            },
        )
    return results


def mean_over_rows(values: Float[Tensor, "batch n_layers n_heads"], queries: Tensor,
                   name: str) -> Float[Tensor, "n_layers n_heads"]:
    """The score over sequences: the plain mean of per-row scores when every row has the same
    queries (``queries`` ``[q]``, random tokens), else (text, ``[batch, q]``) the mean weighted by
    each row's number of queries, i.e. over all queries pooled — a window without a repeat adds
    nothing rather than a zero.

    Raises:
        DataError: no window of the text has a query for this template (no token repeats).
    """
    if queries.ndim == 1:
        return values.mean(dim=0)
    counts = queries.sum(dim=-1).to(values.dtype).to(values.device)
    if float(counts.sum()) == 0:
        raise DataError(f"No window of the text data has a position that {name} can score (no token occurs twice "
                        f"in a window): give longer text, or a larger text_length.")
    return (values * counts[:, None, None]).sum(dim=0) / counts.sum()


def text_metadata(task: TextWindows, config: RepeatedTokensConfig) -> dict[str, Any]:
    """What a score on the user's text was computed from."""
    return {"data": str(config.data), "data_text_tokens": task.n_text_tokens, "data_short_windows_left_out": task.n_dropped,
            "data_queries": "positions whose token occurred earlier in the window (previous-token: every position)",
            "copying": "not measured on text data (it reads the repeated-token task's blocks)"}


def chunk_templates(templates: dict[str, tuple[Tensor, Tensor]]) -> Callable[[slice], dict[str, tuple[Tensor, Tensor]]]:
    """``take(rows)``: each template's ``rows`` (the chunk a ``run_batched`` reduce gets). Templates
    shared by every row (``[q, k]``) are handed on as they are."""

    def take(rows: slice) -> dict[str, tuple[Tensor, Tensor]]:
        return {name: (t[rows] if t.ndim == 3 else t, q[rows] if q.ndim == 2 else q) for name, (t, q) in templates.items()}

    return take


# {detector name: null} per (model identity, task settings, data file hash): the last few only.
_NULLS = RecentCache(size=8)


def template_null(
    model: Any, detector: "AttentionTemplateDetector", batch_size: Optional[int] = None,
    progress: Optional[bool] = None,
) -> Float[Tensor, "n_layers n_heads"]:
    """``detector``'s null: its template's mean share of attention per head, measured on
    :func:`unrepeated_like` tokens (same shape, fresh seed, no token repeats). One forward pass
    measures the templates of every registered template detector at once, kept per model
    identity (``headscope.identity``: any change to the weights makes a new key), settings and
    data file, so the template detectors of one atlas share it; the last few keys only."""
    config = detector.config
    data_hash = file_sha256(config.data) if config.data else None
    cached = _NULLS.get_or_set((model_identity(model), repr(task_settings(config)), data_hash), dict)
    if detector.name not in cached:
        task = scoring_task(model, config)
        n_layers = model_shape(model).n_layers
        measured = {d.name: d.templates_for(task) for d in [*_registered_templates(), detector] if d.name not in cached}
        templates = chunk_templates(measured)  # text: each window's own template on its random-token twin

        def reduce(logits: Tensor, cache: dict, chunk: TokenBatch, rows: slice) -> dict[str, Tensor]:
            return {name: template_scores(cache, n_layers, t, q, chunk) for name, (t, q) in templates(rows).items()}

        per_example = run_batched(model, null_tokens(model, task, config), reduce, pattern_hooks(model), batch_size,
                                  progress, desc="template null", logits="last")  # {name: [batch, L, H]}
        cached.update({name: mean_over_rows(values, measured[name][1], name) for name, values in per_example.items()})
    return cached[detector.name]


def null_tokens(model: Any, task: Task, config: RepeatedTokensConfig) -> Any:
    """Random tokens of ``task``'s shape (same BOS, same padding) in which no token repeats."""
    token_range = tuple(config.token_range) if config.token_range else None
    d_vocab, seed = model_shape(model).d_vocab, config.seed + 2_000_003
    if isinstance(task, RepeatedTokens):
        return unrepeated_like(task, d_vocab, token_range, seed=seed).tokens
    width = task.tokens.shape[1] - task.offset
    bos = int(task.tokens[0, 0]) if task.has_bos else None
    tokens = unrepeated_rows(len(task), width, d_vocab, token_range, bos, seed)
    return TokenBatch(tokens, task.attention_mask)


def _registered_templates() -> list["AttentionTemplateDetector"]:
    """An instance of every registered template detector whose null is measured on unrepeated
    tokens (a template depends on the task only)."""
    from headscope.detectors.base import get_detector, list_detectors

    detectors = [get_detector(name) for name in list_detectors()]
    return [d for d in detectors  # those with their own null (previous-token) need no measured one
            if isinstance(d, AttentionTemplateDetector) and type(d).null is AttentionTemplateDetector.null]


def uniform_share(template: Union[Float[Tensor, "q k"], Float[Tensor, "batch q k"]],
                  queries: Union[Bool[Tensor, " q"], Bool[Tensor, "batch q"]]) -> float:
    """The share of attention a template's keys get from uniform attention over the causal prefix
    (query ``i`` spreads ``1 / (i + 1)`` over keys ``0..i``), averaged over the template's queries
    (per row, then over rows, as the scores are): what a head that ignores tokens and position
    would score."""
    per_query = template.sum(dim=-1) / (torch.arange(template.shape[-2]) + 1)  # [q] or [batch, q]
    return float(per_query[queries].mean())  # per window: pooled over every window's queries, as the scores are
