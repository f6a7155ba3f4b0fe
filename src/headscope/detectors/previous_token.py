"""Previous-token heads — the first half of the induction circuit (Olsson et al. 2022;
Elhage et al. 2021).

Data: the repeated-random-token task of the induction detector.

Score: mean over query positions ``i >= 2`` (after the BOS and the first token, whose only
earlier key is the BOS) of ``A[i, i - 1]``, the attention to the immediately preceding token;
mean over sequences. Range 0..1.

Validation metric: loss on the repeated tokens (previous-token heads feed induction heads via
K-composition, so removing them should hurt in-context copying).
"""

from __future__ import annotations

import torch
from torch import Tensor

from headscope.detectors.attention_templates import AttentionTemplateDetector
from headscope.detectors.base import register_detector
from headscope.tasks.repeated_tokens import RepeatedTokens


@register_detector
class PreviousTokenDetector(AttentionTemplateDetector):
    name = "previous_token"
    score_name = "previous_token"
    summary = "attention to the immediately preceding token"

    def template(self, task: RepeatedTokens) -> tuple[Tensor, Tensor]:
        width = task.tokens.shape[1]
        queries = torch.arange(width) >= task.offset + 1
        template = torch.zeros(width, width)
        index = torch.nonzero(queries).flatten()
        template[index, index - 1] = 1.0
        return template, queries
