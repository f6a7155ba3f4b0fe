"""Shared machinery for detectors defined by where a head attends on repeated random tokens.

A template ``T[query, key]`` says which keys a head of the role should attend to from each
query position. A head's score on one sequence is the attention it puts on the template's keys,
``sum_k A[q, k] * T[q, k]``, averaged over the template's query positions; the detector's score
is the mean over sequences. This is the "share of attention on the expected keys" measure (0..1),
not TransformerLens ``detect_head``'s "mul" measure, which caps near 0.5 on two repeats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from headscope.detectors.base import Detector, DetectorConfig, ValidationTask
from headscope.engine.heads import hook_name, model_shape
from headscope.engine.metrics import masked_mean, next_token_losses
from headscope.engine.runner import run_batched
from headscope.engine.tokens import TokenBatch, bos_token_id
from headscope.results import HeadScores
from headscope.tasks.repeated_tokens import RepeatedTokens, repeated_random_tokens


@dataclass
class RepeatedTokensConfig(DetectorConfig):
    """Settings of the repeated-random-token task (Olsson et al.: 25 tokens x 4, with BOS)."""

    n_sequences: int = 32
    block_len: int = 25
    n_repeats: int = 4
    token_range: Optional[tuple[int, int]] = None
    n_validation_sequences: int = 32


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
        task = make_task(model, self.config)
        template, queries = self.template(task)
        n_layers = model_shape(model).n_layers
        extra_names, extra_fn = self.extra_scores(model, task)

        def reduce(logits: Tensor, cache: dict, chunk: TokenBatch) -> dict[str, Tensor]:
            out = {self.score_name: template_scores(cache, n_layers, template, queries, chunk)}
            if extra_fn is not None:
                out.update(extra_fn(cache, chunk))
            return out

        names = pattern_hooks(model) + extra_names
        per_example = run_batched(model, task.tokens, reduce, names, batch_size, progress, desc=self.name, logits="last")
        means = {name: values.mean(dim=0) for name, values in per_example.items()}
        return self.result(
            model,
            values=means[self.score_name],
            extras=means,
            metadata={
                "score": self.score_name,
                "measure": "mean over query positions of the attention on the template keys (0..1)",
                "n_sequences": len(task.tokens),
                "sequence_length": int(task.tokens.shape[1]),
                "bos_token_id": int(task.tokens[0, 0]) if task.has_bos else None,
            },
        )

    def validation_task(self, model: Any) -> ValidationTask:
        return repeated_loss_task(model, self.config)
