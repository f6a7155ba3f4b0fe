"""Shared machinery for detectors defined by where a head attends on repeated random tokens.

A template ``T[query, key]`` says which keys a head of the role should attend to from each
query position. A head's score on one sequence is the attention it puts on the template's keys,
``sum_k A[q, k] * T[q, k]``, averaged over the template's query positions; the detector's score
is the mean over sequences. This is the "share of attention on the expected keys" measure (0..1),
not TransformerLens ``detect_head``'s "mul" measure, which caps near 0.5 on two repeats.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, fields
from typing import Any, Callable, Optional

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from headscope.detectors.base import Detector, DetectorConfig, ValidationTask
from headscope.engine.heads import Head, hook_name, model_shape
from headscope.engine.metrics import masked_mean, next_token_losses
from headscope.engine.runner import run_batched
from headscope.engine.tokens import TokenBatch, bos_token_id
from headscope.models import weights_fingerprint
from headscope.results import HeadScores
from headscope.significance import Significance
from headscope.tasks.repeated_tokens import RepeatedTokens, repeated_random_tokens, unrepeated_like


@dataclass
class RepeatedTokensConfig(DetectorConfig):
    """Settings of the repeated-random-token task (Olsson et al.: 25 tokens x 4, with BOS)."""

    n_sequences: int = 32
    block_len: int = 25
    n_repeats: int = 4
    token_range: Optional[tuple[int, int]] = None
    n_validation_sequences: int = 32


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


def template_scores(
    patterns: dict[str, Tensor],
    n_layers: int,
    template: Float[Tensor, "q k"],
    queries: Bool[Tensor, " q"],
    chunk: TokenBatch,
) -> Float[Tensor, "batch n_layers n_heads"]:
    """Per-example template scores for every head, from cached ``hook_pattern`` of each layer."""
    width = chunk.tokens.shape[1]
    weights = template[:width, :width].to(chunk.tokens.device)
    query_mask = queries[:width].to(chunk.tokens.device)[None, :] & chunk.attention_mask.bool()
    per_layer = []
    for layer in range(n_layers):
        pattern = patterns[hook_name(layer, "pattern")].float()  # [batch, head, q, k]
        on_template = (pattern * weights).sum(dim=-1)  # [batch, head, q]
        heads = on_template.shape[1]
        mask = query_mask[:, None, :].expand(-1, heads, -1)
        per_layer.append(masked_mean(on_template.flatten(0, 1), mask.flatten(0, 1)).view(-1, heads))
    return torch.stack(per_layer, dim=1)


def pattern_hooks(model: Any) -> list[str]:
    return [hook_name(layer, "pattern") for layer in range(model_shape(model).n_layers)]


def repeated_loss_task(model: Any, config: RepeatedTokensConfig) -> ValidationTask:
    """Validation for induction-circuit heads: loss on the predictable (repeated) tokens."""
    task = make_task(model, config, validation=True)
    targets = task.predictable_targets()

    def repeated_loss(logits: Tensor, chunk: TokenBatch) -> Tensor:
        losses = next_token_losses(logits, chunk.tokens)
        mask = targets[None, : losses.shape[1]].to(losses.device) & chunk.attention_mask[:, 1:].bool()
        return masked_mean(losses, mask)

    return ValidationTask(
        data=task.tokens,
        metric=repeated_loss,
        metric_name="loss on repeated tokens (nats)",
        ablation_hurts_when="increases",
    )


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
        raise NotImplementedError

    def extra_scores(self, model: Any, task: RepeatedTokens) -> tuple[list[str], Optional[ExtraScores]]:
        return [], None

    def score(self, model: Any, batch_size: Optional[int] = None, progress: Optional[bool] = None) -> HeadScores:
        return score_together(model, [self], batch_size, progress)[self.name]

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
    task = make_task(model, config)
    n_layers = model_shape(model).n_layers
    templates = {d.name: d.template(task) for d in detectors}
    extras = {d.name: d.extra_scores(model, task) for d in detectors}

    def reduce(logits: Tensor, cache: dict, chunk: TokenBatch) -> dict[str, Tensor]:
        out = {}
        for name, (template, queries) in templates.items():
            out[name] = template_scores(cache, n_layers, template, queries, chunk)
            extra_fn = extras[name][1]
            out.update({f"{name}.{key}": value for key, value in (extra_fn(cache, chunk) if extra_fn else {}).items()})
        return out

    names = pattern_hooks(model) + sorted({hook for hooks, _ in extras.values() for hook in hooks})
    desc = "+".join(d.name for d in detectors)
    per_example = run_batched(model, task.tokens, reduce, names, batch_size, progress, desc=desc, logits="last")
    means = {name: values.mean(dim=0) for name, values in per_example.items()}
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
            },
        )
    return results


_NULLS: "weakref.WeakKeyDictionary[Any, dict[str, dict[str, Tensor]]]" = weakref.WeakKeyDictionary()


def template_null(
    model: Any, detector: "AttentionTemplateDetector", batch_size: Optional[int] = None,
    progress: Optional[bool] = None,
) -> Float[Tensor, "n_layers n_heads"]:
    """``detector``'s null: its template's mean share of attention per head, measured on
    :func:`unrepeated_like` tokens (same shape, fresh seed, no token repeats). One forward pass
    measures the templates of every registered template detector at once, kept per model,
    settings and weights (any in-place change to a parameter makes a new key), so the template
    detectors of one atlas share it."""
    config = detector.config
    key = repr((task_settings(config), weights_fingerprint(model)))
    cached = _NULLS.setdefault(model, {}).setdefault(key, {})
    if detector.name not in cached:
        task = make_task(model, config)
        token_range = tuple(config.token_range) if config.token_range else None
        null_task = unrepeated_like(task, model_shape(model).d_vocab, token_range, seed=config.seed + 2_000_003)
        n_layers = model_shape(model).n_layers
        measured = {d.name: d.template(task) for d in [*_registered_templates(), detector] if d.name not in cached}

        def reduce(logits: Tensor, cache: dict, chunk: TokenBatch) -> dict[str, Tensor]:
            return {name: template_scores(cache, n_layers, t, q, chunk) for name, (t, q) in measured.items()}

        per_example = run_batched(model, null_task.tokens, reduce, pattern_hooks(model), batch_size, progress,
                                  desc="template null", logits="last")  # {name: [batch, L, H]}
        cached.update({name: values.mean(dim=0) for name, values in per_example.items()})
    return cached[detector.name]


def _registered_templates() -> list["AttentionTemplateDetector"]:
    """An instance of every registered template detector whose null is measured on unrepeated
    tokens (a template depends on the task only)."""
    from headscope.detectors.base import get_detector, list_detectors

    detectors = [get_detector(name) for name in list_detectors()]
    return [d for d in detectors  # those with their own null (previous-token) need no measured one
            if isinstance(d, AttentionTemplateDetector) and type(d).null is AttentionTemplateDetector.null]


def uniform_share(template: Float[Tensor, "q k"], queries: Bool[Tensor, " q"]) -> float:
    """The share of attention a template's keys get from uniform attention over the causal prefix
    (query ``i`` spreads ``1 / (i + 1)`` over keys ``0..i``), averaged over the template's queries:
    what a head that ignores tokens and position would score."""
    positions = torch.nonzero(queries).flatten()
    return float((template[positions].sum(dim=-1) / (positions + 1)).mean())
