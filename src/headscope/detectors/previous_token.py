"""Previous-token heads — the first half of the induction circuit (Olsson et al. 2022;
Elhage et al. 2021).

Data: the repeated-random-token task of the induction detector, or your own text (``data``,
as for induction: every position after the first is a query).

Score: mean over query positions ``i >= 2`` (after the BOS and the first token, whose only
earlier key is the BOS) of ``A[i, i - 1]``, the attention to the immediately preceding token;
mean over sequences. Range 0..1.

Significance: a head must beat what position alone gives — the share uniform attention over the
causal prefix puts on the previous token, ``mean_i 1 / (i + 1)`` — and the role's floor, a
majority (> 0.5) of its attention on the previous token. Repetition cannot serve as the null
here (every token has a previous token, repeated or not), and the template detectors' old shared
null (attention n tokens back) never measured offset 1: 115 of the bundled model's 270 heads
passed it.

Validation metric: loss on the repeated tokens (previous-token heads feed induction heads via
K-composition, so removing them should hurt in-context copying).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from headscope.detectors.attention_templates import (
    AttentionTemplateDetector,
    previous_template,
    scoring_task,
    template_examples,
    uniform_share,
)
from headscope.detectors.base import Example, register_detector
from headscope.tasks.repeated_tokens import RepeatedTokens


@register_detector
class PreviousTokenDetector(AttentionTemplateDetector):
    name = "previous_token"
    atlas_order = 20
    score_name = "previous_token"
    summary = "attention to the immediately preceding token"
    cost = "score shared with induction (8 s for the three template roles), validation 34 s"
    explanation = {"previous_token": (
        "A previous-token head attends from each token to the one just before it, copying what came before into "
        "the current position; it is the first half of the induction circuit (Elhage et al. 2021; Olsson et al. "
        "2022). headscope scores the mean attention to the preceding token and calls a head significant when that "
        "beats what position alone gives and holds a majority of its attention.")}

    def examples(self, model: Any) -> list[Example]:
        """A plain sentence (every token has a predecessor), then a sequence of its own task."""
        return template_examples(model, self.config, [(
            "a plain sentence", "She packed her bag, locked the door and walked to the station in the rain.")])

    def template(self, task: RepeatedTokens) -> tuple[Tensor, Tensor]:
        width = task.tokens.shape[1]
        queries = torch.arange(width) >= task.offset + 1
        template = torch.zeros(width, width)
        index = torch.nonzero(queries).flatten()
        template[index, index - 1] = 1.0
        return template, queries

    def token_template(self, tokens: Tensor, mask: Tensor, offset: int) -> tuple[Tensor, Tensor]:
        return previous_template(tokens, mask, offset)

    def null(self, model: Any, batch_size: Optional[int] = None,
             progress: Optional[bool] = None) -> tuple[float, str, dict[str, Any]]:
        """Position alone: the previous token's share under uniform attention (no model run)."""
        share = uniform_share(*self.templates_for(scoring_task(model, self.config)))
        rule = ("position alone: above the share uniform attention over the causal prefix puts on the previous "
                "token (mean over queries of 1/(i+1)); repetition is no null here, every token has a predecessor")
        return share, rule, {"uniform_share": share}
