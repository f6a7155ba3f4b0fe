"""First-token heads: heads that park their attention on the first position (the "attention sink"
of Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks").

This file is the worked example of CONTRIBUTING.md ("Adding a detector"): a detector in one file,
exactly as those steps say. tests/unit/test_contributing.py registers it, runs it through
``hs.detect``, ``hs.validate`` and ``hs.atlas`` on a tiny model, and unregisters it.

Data: ``n_sequences`` rows of ``length`` random token ids (after the BOS when the model has one),
drawn with ``seed``; the validation uses other rows (``seed + 1``).

Score: ``mean_b mean_{i >= 1} A[b, i, 0]``, the attention each head's query at position ``i`` puts
on position 0, averaged over the positions after the first and over the rows. Range 0..1.

Significance: above what position alone gives, the share uniform attention over the causal prefix
puts on position 0 (``mean_{i >= 1} 1 / (i + 1)``), and a majority (> 0.5) of the attention there.

Validation metric: next-token loss on held-out random rows (nats per row; ablating sink heads is
expected to raise it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor

from headscope.detectors.base import Detector, DetectorConfig, ValidationTask, register_detector, setting
from headscope.engine.heads import hook_name, model_shape
from headscope.engine.metrics import next_token_losses
from headscope.engine.runner import run_batched
from headscope.engine.tokens import TokenBatch, bos_token_id
from headscope.results import HeadScores
from headscope.significance import Significance

MAJORITY = 0.5


@dataclass
class FirstTokenConfig(DetectorConfig):
    """Settings of the first-token detector (every one a keyword with a default)."""

    n_sequences: int = setting(16, "random-token rows scored", min=1)
    length: int = setting(24, "random tokens per row, after the BOS", min=2)


def random_rows(model: Any, config: FirstTokenConfig, seed: int) -> Int[Tensor, "batch pos"]:
    """``[n_sequences, length (+1 with a BOS)]`` random ids from the upper half of the vocabulary."""
    d_vocab = model_shape(model).d_vocab
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(d_vocab // 2, d_vocab, (config.n_sequences, config.length), generator=generator)
    bos = bos_token_id(model)
    return tokens if bos is None else torch.cat([torch.full((config.n_sequences, 1), bos), tokens], dim=1)


def uniform_first_share(width: int) -> float:
    """What uniform attention over the causal prefix puts on position 0, mean over queries ``i >= 1``."""
    return float((1.0 / (torch.arange(1, width) + 1)).mean())


@register_detector
class FirstTokenDetector(Detector):
    """Scores each head by its mean attention to position 0."""

    name = "first_token"
    Config = FirstTokenConfig
    summary = "attention to the first position (attention sink; Xiao et al. 2023)"
    cost = "score under 1 s on a tiny model"
    atlas_defaults = {"n_sequences": 8}  # the atlas scores a smaller sample; no atlas_order: after the library's own
    explanation = {"first_token": (
        "A first-token head parks its attention on the first position when no other token needs it, an 'attention "
        "sink' (Xiao et al. 2023, 'Efficient Streaming Language Models with Attention Sinks'). The score is the mean "
        "attention to position 0 over random tokens.")}

    def examples(self, model: Any) -> list[tuple[str, list[int]]]:
        """One row of its own random tokens (the first scored row, cut to 16 tokens)."""
        return [("a row of its random tokens", random_rows(model, self.config, self.config.seed)[0, :16].tolist())]

    def score(self, model: Any, batch_size: Optional[int] = None, progress: Optional[bool] = None) -> HeadScores:
        n_layers = model_shape(model).n_layers

        def reduce(logits: Tensor, cache: dict, chunk: TokenBatch) -> Float[Tensor, "batch n_layers n_heads"]:
            return torch.stack([cache[hook_name(layer, "pattern")][:, :, 1:, 0].float().mean(dim=-1)
                                for layer in range(n_layers)], dim=1).cpu()

        tokens = random_rows(model, self.config, self.config.seed)
        names = [hook_name(layer, "pattern") for layer in range(n_layers)]
        per_row = run_batched(model, tokens, reduce, names, batch_size, progress, desc=self.name, logits="last")
        return self.result(model, per_row.mean(dim=0), metadata={"sequence_length": int(tokens.shape[1])})

    def significance(self, model: Any, scores: HeadScores, batch_size: Optional[int] = None,
                     progress: Optional[bool] = None) -> list[Significance]:
        share = uniform_first_share(scores.metadata["sequence_length"])
        return [Significance(
            detector=self.name, role=self.name, statistic=scores.values, threshold=share,
            statistic_name="mean attention to position 0",
            rule="position alone: above the share uniform attention over the causal prefix puts on position 0",
            details={"uniform_share": share}, floor=MAJORITY,
            floor_rule="a majority of the head's attention on position 0",
        )]

    def validation_task(self, model: Any) -> ValidationTask:
        tokens = random_rows(model, self.config, self.config.seed + 1)

        def row_loss(logits: Tensor, chunk: TokenBatch) -> Float[Tensor, " batch"]:
            return next_token_losses(logits, chunk.tokens).mean(dim=-1)

        return ValidationTask(data=tokens, metric=row_loss, metric_name="next-token loss on random rows (nats)",
                              ablation_hurts_when="increases")
