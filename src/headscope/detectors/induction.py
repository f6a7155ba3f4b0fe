"""Induction heads — Olsson et al. 2022, "In-context Learning and Induction Heads".

Data: ``n_sequences`` sequences ``[BOS] + block * n_repeats`` of ``block_len`` distinct random
tokens (defaults 32 x (25 x 4), as in the paper). Or your own text (``data``: a ``.txt`` file,
or ``.jsonl`` with ``{"text": ...}`` per line), cut into windows of ``text_length`` tokens (half
scored, half held out for validation); the template is then read from each window's own
repeats: query ``i`` whose token occurred earlier at ``j``, key ``j + 1 < i``.

Score (prefix matching, ``values``): for each query position ``i`` in the second and later
repeats, the attention the head pays to the tokens that *followed* earlier occurrences of the
current token, ``sum_{m>=1} A[i, i - m*n + 1]`` (one term for two repeats; BOS never counts),
averaged over those positions and over sequences. Range 0..1.

Copying (``extras["copying"]``, ``extras["copying_top1"]``): at query positions ``i`` of the
later repeats, the head's output if it attended fully to its prefix-matching source
``j = i - n + 1``, ``o = v_j W_O^h``, is sent along the direct path to the logits (final-norm
weights, then ``W_U``). Over a candidate set of tokens the logits are mean-subtracted and ReLU'd;
the share ``s`` of that positive mass on the source token ``t_j`` (the token an induction head
should predict) is rescaled to ``2 s - 1`` in [-1, 1]. ``copying_top1`` is the fraction of
positions where ``t_j`` has the highest logit among the candidates.
Candidates: ``copying_vocabulary="sequence"`` (default) uses the sequence's own ``n`` distinct
tokens, the choice an in-context copier makes (chance share 1/n, chance top-1 1/n);
``"full"`` uses the whole vocabulary, as the paper's wording reads. Measured on SmolLM2's 49k
vocabulary, the full-vocabulary share is about 1e-4 for every head, strong copiers included, so
it cannot tell heads apart; ``"full"`` also needs a full unembedding per position, so set
``copying_positions`` (e.g. 1 per sequence) with it. ``copying_positions=0`` means every
later-repeat position.

Validation metric: mean next-token loss on the predictable tokens of held-out repeated
sequences (every target after the first token of the second repeat).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from headscope.detectors.attention_templates import (
    AttentionTemplateDetector,
    ExtraScores,
    RepeatedTokensConfig,
    copy_template,
    repeat_template,
    template_examples,
)
from headscope.detectors.base import Example, register_detector, setting
from headscope.engine.heads import hook_name, model_shape
from headscope.engine.tokens import TokenBatch
from headscope.engine.unembed import (center_for_norm, direct_logits, direct_unembed, head_output_weight,
                                      post_attention_weights)
from headscope.tasks.repeated_tokens import RepeatedTokens


@dataclass
class InductionConfig(RepeatedTokensConfig):
    copying: bool = setting(True, "also compute the copying score (direct logits of the attended token)")
    copying_vocabulary: str = setting("sequence", "tokens the copying score ranks among: the block's own ('sequence') "
                                                  "or the whole vocabulary ('full')", choices=("sequence", "full"))
    copying_positions: int = setting(0, "query positions per sequence for the copying score (0: every later-repeat "
                                        "position)", min=0)


@register_detector
class InductionDetector(AttentionTemplateDetector):
    name = "induction"
    atlas_order = 10  # the atlas's order: the induction circuit first, then the roles that build on it
    Config = InductionConfig
    score_name = "prefix_matching"
    summary = "attention from a repeated token to the token after its earlier copies (Olsson et al. 2022)"
    cost = "score 8 s (with previous_token and duplicate_token), random-token null 4 s, validation 51 s"
    explanation = {"induction": (
        "An induction head continues a repeat: at a token seen before, it attends to the token that followed the "
        "earlier occurrence and copies it, so '... A B ... A' predicts 'B' (Olsson et al. 2022, 'In-context Learning "
        "and Induction Heads'). headscope scores the share of attention a head puts on that following token in "
        "random tokens repeated several times, and validates by ablating the top heads and measuring the loss on "
        "the repeated tokens.")}

    def examples(self, model: Any) -> list[Example]:
        """A sentence said twice (an induction head looks from the second copy to the word after the
        first), then a sequence of its own repeated-token task."""
        return template_examples(model, self.config, [(
            "a sentence said twice",
            "The keeper wrote in his log every night. The keeper wrote in his log every night.")])

    def template(self, task: RepeatedTokens) -> tuple[Tensor, Tensor]:
        return repeat_template(task, shift=1)

    def token_template(self, tokens: Tensor, mask: Tensor, offset: int) -> tuple[Tensor, Tensor]:
        return copy_template(tokens, mask, offset, shift=1)

    def extra_scores(self, model: Any, task: RepeatedTokens) -> tuple[list[str], ExtraScores | None]:
        config: InductionConfig = self.config
        if not config.copying:
            return [], None
        if config.copying_vocabulary not in ("sequence", "full"):
            raise ValueError(f"copying_vocabulary must be 'sequence' or 'full', got {config.copying_vocabulary!r}.")
        queries = torch.nonzero(task.in_later_repeats()).flatten()
        if config.copying_positions:
            generator = torch.Generator().manual_seed(config.seed + 17)
            queries = queries[torch.randperm(len(queries), generator=generator)[: config.copying_positions]]
        sources = queries - task.block_len + 1
        candidates = task.tokens[:, task.offset : task.offset + task.block_len] if config.copying_vocabulary == "sequence" else None
        unembed = direct_unembed(model)
        names = [hook_name(layer, "v") for layer in range(model_shape(model).n_layers)]

        def scores(cache: dict, chunk: TokenBatch) -> dict[str, Tensor]:
            block = None if candidates is None else chunk.tokens[:, task.offset : task.offset + task.block_len]
            return copying_scores(model, cache, chunk, sources, unembed, block)

        return names, scores


def copying_scores(
    model: Any,
    cache: dict,
    chunk: TokenBatch,
    sources: Int[Tensor, " P"],
    unembed: Float[Tensor, "d_model vocab"],
    candidates: Optional[Int[Tensor, "batch n"]] = None,
) -> dict[str, Float[Tensor, "batch n_layers n_heads"]]:
    """Per example and head: ``2 s - 1`` (``s`` = share of the ReLU'd, mean-subtracted direct
    logits of ``v_source W_O^h`` that lands on the source token) and the top-1 rate, over
    ``candidates`` (each row's own tokens) or, when None, the whole vocabulary."""
    shape = model_shape(model)
    sources = sources.to(chunk.tokens.device)
    targets = chunk.tokens[:, sources]  # [batch, P]: the token an induction head copies
    if candidates is not None:
        columns = einops.rearrange(unembed[:, candidates.to(unembed.device)], "d_model batch n -> batch d_model n")
        targets = (candidates[:, None, :] == targets[:, :, None]).float().argmax(dim=-1)  # index in row
    shares, top1 = [], []
    post_weights = post_attention_weights(model)  # a post-attention norm's weights; its scale cancels in the share
    for layer in range(shape.n_layers):
        v = cache[hook_name(layer, "v")]  # on the layer's device (a split model): computed there
        values = v[:, sources.to(v.device)].float()  # [batch, P, n_kv_heads, d_head]
        values = einops.repeat(values, "batch P n_kv_heads d_head -> batch P (n_kv_heads group) d_head",
                               group=shape.group_size)  # each query head reads its KV group's value
        outputs = einops.einsum(values, head_output_weight(model, layer).to(v.device),
                                "batch P n_heads d_head, n_heads d_head d_model -> batch P n_heads d_model")
        if post_weights[layer] is not None:
            outputs = outputs * post_weights[layer].to(v.device)
        if candidates is None:
            logits = direct_logits(model, outputs, unembed.to(v.device))  # [batch, P, heads, vocab]
        else:
            logits = einops.einsum(center_for_norm(model, outputs), columns.to(v.device),
                                   "batch P n_heads d_model, batch d_model n -> batch P n_heads n")
        index = einops.repeat(targets.to(v.device), "batch P -> batch P n_heads 1", n_heads=shape.n_heads)
        gains = torch.relu(logits - logits.mean(dim=-1, keepdim=True))
        share = gains.gather(-1, index).squeeze(-1) / gains.sum(dim=-1).clamp_min(1e-12)
        shares.append((2 * share - 1).mean(dim=1).to(chunk.tokens.device))  # [batch, heads]
        top1.append((logits.argmax(dim=-1) == index.squeeze(-1)).float().mean(dim=1).to(chunk.tokens.device))
    return {"copying": torch.stack(shares, dim=1), "copying_top1": torch.stack(top1, dim=1)}
