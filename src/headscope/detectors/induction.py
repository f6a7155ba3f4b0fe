"""Induction heads — Olsson et al. 2022, "In-context Learning and Induction Heads".

Data: ``n_sequences`` sequences ``[BOS] + block * n_repeats`` of ``block_len`` distinct random
tokens (defaults 32 x (25 x 4), as in the paper).

Score (prefix matching, ``values``): for each query position ``i`` in the second and later
repeats, the attention the head pays to the tokens that *followed* earlier occurrences of the
current token, ``sum_{m>=1} A[i, i - m*n + 1]`` (one term for two repeats; BOS never counts),
averaged over those positions and over sequences. Range 0..1.

Copying (``extras["copying"]``): at ``copying_positions`` query positions per sequence, the
head's output if it attended fully to its prefix-matching source ``j = i - n + 1``,
``o = v_j W_O^h``, is sent along the direct path to the logits (final-norm weights, ``W_U``).
The logits are mean-subtracted over the vocabulary and ReLU'd; the share ``s`` of that positive
mass on the source token ``t_j`` (the token an induction head should predict) is rescaled to
``2 s - 1`` in [-1, 1]: 1 = all of the increase goes to the copied token. Averaged over
positions and sequences.

Validation metric: mean next-token loss on the predictable tokens of held-out repeated
sequences (every target after the first token of the second repeat).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from headscope.detectors.attention_templates import (
    AttentionTemplateDetector,
    ExtraScores,
    RepeatedTokensConfig,
    repeat_template,
)
from headscope.detectors.base import register_detector
from headscope.engine.heads import hook_name, model_shape
from headscope.engine.tokens import TokenBatch
from headscope.engine.unembed import direct_logits, direct_unembed
from headscope.tasks.repeated_tokens import RepeatedTokens


@dataclass
class InductionConfig(RepeatedTokensConfig):
    copying: bool = True
    copying_positions: int = 1  # query positions per sequence for the copying score


@register_detector
class InductionDetector(AttentionTemplateDetector):
    name = "induction"
    Config = InductionConfig
    score_name = "prefix_matching"
    summary = "attention from a repeated token to the token after its earlier copies (Olsson et al. 2022)"

    def template(self, task: RepeatedTokens) -> tuple[Tensor, Tensor]:
        return repeat_template(task, shift=1)

    def extra_scores(self, model: Any, task: RepeatedTokens) -> tuple[list[str], ExtraScores | None]:
        if not self.config.copying:
            return [], None
        generator = torch.Generator().manual_seed(self.config.seed + 17)
        later = torch.nonzero(task.in_later_repeats()).flatten()
        queries = later[torch.randperm(len(later), generator=generator)[: self.config.copying_positions]]
        sources = queries - task.block_len + 1
        unembed = direct_unembed(model)
        names = [hook_name(layer, "v") for layer in range(model_shape(model).n_layers)]
        return names, lambda cache, chunk: {"copying": copying_scores(model, cache, chunk, sources, unembed)}


def copying_scores(
    model: Any, cache: dict, chunk: TokenBatch, sources: Tensor, unembed: Tensor
) -> Float[Tensor, "batch n_layers n_heads"]:
    """``2 s - 1`` per example and head, ``s`` = share of the ReLU'd, mean-subtracted direct logits
    of ``v_source W_O^h`` that lands on the source token."""
    shape = model_shape(model)
    sources = sources.to(chunk.tokens.device)
    targets = chunk.tokens[:, sources]  # [batch, P]: the token an induction head copies
    per_layer = []
    for layer in range(shape.n_layers):
        values = cache[hook_name(layer, "v")][:, sources]  # [batch, P, kv_heads, d_head]
        values = values.repeat_interleave(shape.group_size, dim=2)  # [batch, P, heads, d_head]
        w_o = model.blocks[layer].attn.W_O.detach().float()  # [heads, d_head, d_model]
        outputs = torch.einsum("bphd,hdm->bphm", values.float(), w_o)
        logits = direct_logits(model, outputs, unembed)  # [batch, P, heads, vocab]
        gains = torch.relu(logits - logits.mean(dim=-1, keepdim=True))
        index = targets[:, :, None, None].expand(-1, -1, shape.n_heads, 1)
        share = gains.gather(-1, index).squeeze(-1) / gains.sum(dim=-1).clamp_min(1e-12)
        per_layer.append((2 * share - 1).mean(dim=1))  # [batch, heads]
    return torch.stack(per_layer, dim=1)
