"""Duplicate-token heads — heads that attend to earlier copies of the current token
(Wang et al. 2022, "Interpretability in the Wild"; TransformerLens ``head_detector``).

Data: the repeated-random-token task of the induction detector, or your own text (``data``,
as for induction: the keys are each query token's earlier occurrences in its window).

Score: for each query position ``i`` in the second and later repeats, the attention on earlier
occurrences of the same token, ``sum_{m>=1} A[i, i - m*n]``, averaged over those positions and
sequences. Range 0..1.

Validation metric: loss on the repeated tokens.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from headscope.detectors.attention_templates import (
    AttentionTemplateDetector,
    copy_template,
    repeat_template,
    template_examples,
)
from headscope.detectors.base import Example, register_detector
from headscope.tasks.repeated_tokens import RepeatedTokens


@register_detector
class DuplicateTokenDetector(AttentionTemplateDetector):
    name = "duplicate_token"
    atlas_order = 30
    score_name = "duplicate_token"
    summary = "attention to earlier copies of the current token"
    cost = "score shared with induction (8 s for the three template roles), validation 34 s"
    explanation = {"duplicate_token": (
        "A duplicate-token head attends from a token to earlier copies of the same token, signalling that the "
        "token has been seen before (Wang et al. 2022, 'Interpretability in the Wild'). headscope scores the "
        "share of attention on earlier copies in random tokens repeated several times, and validates by the loss "
        "on the repeated tokens when the top heads are ablated.")}

    def examples(self, model: Any) -> list[Example]:
        """A sentence whose words come back, then a sequence of its own task."""
        return template_examples(model, self.config, [(
            "a sentence whose words come back", "The red car passed the blue car, and the red bus passed the blue bus.")])

    def template(self, task: RepeatedTokens) -> tuple[Tensor, Tensor]:
        return repeat_template(task, shift=0)

    def token_template(self, tokens: Tensor, mask: Tensor, offset: int) -> tuple[Tensor, Tensor]:
        return copy_template(tokens, mask, offset, shift=0)
