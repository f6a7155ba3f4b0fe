"""Copy-suppression heads — McDougall, Conmy, Rushing, McGrath, Nanda 2023, "Copy Suppression:
Comprehensively Understanding an Attention Head" (arXiv 2310.04625; GPT-2 small L10H7).

A copy-suppression head attends from a position where the model predicts token ``t`` back to an
earlier copy of ``t`` (QK circuit) and writes ``-W_U[:, t]`` there (OV circuit): it lowers the
logits of tokens that appeared earlier in the context when the model is about to repeat them.

Data: a candidate token set ``T`` (``headscope.tasks.context_text``): ``n_tokens`` ids drawn by
``seed`` from the tokenizer's word tokens (a leading space and two or more letters, e.g.
``" pier"``; ``tokens="all"``: every non-special id). The paper ranks over the full vocabulary;
a full ranking costs, for every head, an ``n_vocab x n_vocab`` logit matrix (SmolLM2: 49,152^2
entries per head; measured: one layer's 9 heads for 1,024 source tokens take 15 s of CPU in
factored form, so the OV circuit alone over the whole vocabulary is ~6 CPU-hours, ~3 h on 2
cores, and the QK circuit as much again), so a seeded sample estimates the same shares. Natural text: the shipped ``reference_text.txt`` and
``haystack_filler.txt`` in windows of ``text_length`` tokens, split by ``seed`` into a scoring
half (the contextual score) and a held-out half (validation).

Scores, for head ``h`` of layer ``l`` and tokens ``s, t`` of ``T``:

* ``values``, the OV self-suppression share (the paper's OV circuit)::

      e(s)        = effective embedding of s (``embedding``, as the successor detector:
                    "mlp0_residual" E[s] + MLP0(norm(E[s])), "mlp0", or "raw")
      OV[s, t]    = ln1_l(e(s)) W_V^{kv(h)} W_O^h · diag(w_final) W_U[:, t]   (``unembed_norm``)
      values[h]   = share of s in T whose own logit OV[s, s] is among the ``bottom_k`` lowest of
                    its row OV[s, :] (ties counted against it: fewer than bottom_k of the other
                    logits at or below it)

  Chance is ``bottom_k / |T|`` (1% by default). For L10H7 the paper finds the token itself among
  the most suppressed of the whole vocabulary for most tokens (about 85% in the bottom 10, as
  recalled; not checked against the paper's text here).
* ``extras["qk"]``, the QK self-match share (the paper's QK circuit): the query of the
  predicted token is its unembedding direction, the key of a source token its effective
  embedding; pre-RoPE, after any QK-norm, with the projections' biases
  (``headscope.engine.circuits``)::

      q(t) = ln1_l(diag(w_final) W_U[:, t]) W_Q^h + b_Q,   k(s) = ln1_l(e(s)) W_K^{kv(h)} + b_K
      qk[h] = share of t in T whose own key k(t) is among the ``top_k`` highest q(t) · k(s), s in T
* ``extras["copying"]``, the opposite sign for contrast: share of s whose own OV logit is among
  the ``top_k`` highest of its row (an induction or copying head scores here, not on ``values``).
* ``extras["ov_signed_rank"]``: mean over s of ``(n_above - n_below) / (|T| - 1)`` for the own
  OV logit, in [-1, 1]: +1 when every token suppresses itself most, -1 when it promotes itself
  most, 0 on average for a head unrelated to the token.
* ``extras["context"]`` (with a tokenizer), measured on the scoring windows: the head's mean direct logit
  attribution (its output through the final norm, the run's own scale) to *earlier tokens*,
  centred over the vocabulary: the earlier-token logit below, computed from the head's output
  alone. Negative: the head lowers tokens already seen.

Significance: the same OV share with the pairing of tokens permuted (the logit of a random
partner ``sigma(s)`` among the bottom ``bottom_k`` of row ``s``; 200 permutations), maximised over
all heads (family-wise 5%; as ``stats.permutation_null_maxima`` for the successor score, which
covers argmax predictions only, so the bottom-k version is computed here); and an effect-size
floor on ``min(values, qk) > 0.5``: both circuits must do it for a majority of tokens (the
paper's head does for most tokens in both), since a head whose OV circuit suppresses tokens but whose QK
circuit never looks at their earlier copies cannot suppress copies.

Validation metric (the *earlier-token logit*): on each held-out window, for each position ``p``
whose next token is real, the set ``C_p`` of distinct text tokens at positions ``<= p`` other
than the true next token; the centred logit of ``v`` is ``logit[p, v] - mean_u logit[p, u]``; a
window's value is the mean over positions with non-empty ``C_p`` of the mean centred logit over
``C_p``. Mean-ablating copy-suppression heads should raise it (``ablation_hurts_when =
"increases"``) more than ablating random heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

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
from headscope.detectors.successor import EMBEDDINGS, effective_embeddings, task_unembed
from headscope.engine.architecture import final_norm_weight
from headscope.engine.circuits import head_keys, head_queries, ov_logits
from headscope.engine.heads import model_shape
from headscope.engine.runner import run_batched
from headscope.engine.tokens import TokenBatch
from headscope.engine.unembed import FINAL_SCALE, center_for_norm, head_contributions, head_output_hooks, unembedding
from headscope.errors import InputError
from headscope.results import HeadScores
from headscope.significance import Significance
from headscope.stats import DEFAULT_ALPHA
from headscope.tasks.context_text import TOKEN_POOLS, candidate_tokens
from headscope.tasks.plain_text import prose_windows
from headscope.tasks.natural_text import TextWindows

N_PERMUTATIONS = 200  # random token pairings of the significance rule's null
EFFECT_FLOOR = 0.5  # min(OV share, QK share): a majority of tokens, in both circuits


@dataclass
class CopySuppressionConfig(DetectorConfig):
    tokens: str = setting("words", "candidate token pool: word tokens (' pier') or every non-special id",
                          choices=TOKEN_POOLS)
    n_tokens: int = setting(1000, "candidate tokens drawn from the pool by seed (all when the pool is smaller)",
                            min=2)
    bottom_k: int = setting(10, "OV: own logit among this many lowest of the candidates' logits", min=1)
    top_k: int = setting(10, "QK: own key among this many highest; copying: own logit among this many highest",
                         min=1)
    embedding: str = setting("mlp0_residual", "effective embedding: residual after block 0 without attention, "
                             "MLP0 alone, or raw", choices=EMBEDDINGS)
    head_input_norm: bool = setting(True, "pass the embedding and unembedding through the head's layer's norm")
    unembed_norm: bool = setting(True, "weight the unembedding by the final norm's weights")
    text_length: int = setting(64, "tokens per window of the shipped natural text", min=8)
    n_sequences: int = setting(16, "scoring windows (the contextual score)", min=1)
    n_validation_sequences: int = setting(16, "held-out windows for validation", min=1)


@register_detector
class CopySuppressionDetector(Detector):
    name = "copy_suppression"
    atlas_order = 65
    Config = CopySuppressionConfig
    summary = "own token suppressed through OV and matched through QK (McDougall et al. 2023)"
    cost = "score 7 s, significance 7 s, validation 14 s"
    explanation = {"copy_suppression": (
        "A copy-suppression head looks back from a position where the model is about to predict a token to an "
        "earlier copy of that token, and lowers that token's logit (McDougall et al. 2023, 'Copy Suppression', "
        "GPT-2 small L10H7). headscope scores its weights: the share of candidate tokens whose own logit the head's "
        "OV circuit puts among the lowest, and whose unembedding the QK circuit matches to their own earlier "
        "copy, and validates on held-out natural text: ablating the top heads should raise the logits of tokens "
        "already in the context.")}

    def candidates(self, model: Any) -> list[int]:
        """The candidate token ids (sorted), at least more than ``bottom_k`` and ``top_k``."""
        ids = candidate_tokens(model, self.config.tokens, self.config.n_tokens, self.config.seed)
        needed = max(self.config.bottom_k, self.config.top_k) + 1
        if len(ids) < needed:
            raise InputError(
                f"The copy_suppression detector found {len(ids)} candidate token(s) in the {self.config.tokens!r} "
                f"pool of this model; bottom_k={self.config.bottom_k} and top_k={self.config.top_k} need at least "
                f"{needed}. Set tokens='all', or smaller bottom_k and top_k.")
        return ids

    def windows(self, model: Any, split: str) -> TextWindows:
        """The scoring (``"score"``) or held-out (``"held_out"``) windows of the shipped text."""
        scored, held_out = prose_windows(model, self.name, self.config.text_length, self.config.n_sequences,
                                         self.config.n_validation_sequences, self.config.seed)
        return scored if split == "score" else held_out

    def examples(self, model: Any) -> list[Example]:
        """The first 40 text tokens of two scoring windows (none without a tokenizer)."""
        if not has_tokenizer(model):
            return []
        windows = self.windows(model, "score")
        texts = [model.tokenizer.decode(windows.tokens[row, windows.offset: windows.offset + 40].tolist())
                 for row in range(min(2, len(windows)))]
        return [(f"shipped text, window {row + 1}: earlier words the model may repeat", text)
                for row, text in enumerate(texts)]

    def score(self, model: Any, batch_size: Optional[int] = None, progress: Optional[bool] = None) -> HeadScores:
        ids = self.candidates(model)
        circuits = circuit_scores(model, ids, self.config)
        extras = {key: value for key, value in circuits.items() if key != "ov"}
        metadata = {"n_tokens": len(ids), "token_pool": self.config.tokens,
                    "chance_ov": self.config.bottom_k / len(ids), "chance_qk": self.config.top_k / len(ids)}
        if has_tokenizer(model):  # the contextual score reads text; the weight-based ones need none
            windows = self.windows(model, "score")
            extras["context"] = context_attributions(model, windows, batch_size, progress)
            metadata["n_windows"] = len(windows)
        else:
            metadata["context"] = "not measured: the model has no tokenizer to read the shipped text"
        return self.result(model, circuits["ov"], extras, metadata)

    def significance(
        self, model: Any, scores: HeadScores, batch_size: Optional[int] = None, progress: Optional[bool] = None
    ) -> list[Significance]:
        """Permutation null (random token pairings, family-wise over heads) on the OV share, and the
        floor ``min(OV share, QK share) > 0.5``."""
        ids = self.candidates(model)
        maxima = pairing_null_maxima(model, ids, self.config, N_PERMUTATIONS)
        threshold = float(torch.quantile(maxima["ov"], 1 - DEFAULT_ALPHA))
        if "qk" not in scores.extras:
            raise InputError("These copy_suppression scores have no QK self-match share (extras['qk']); rescore them.")
        qk = scores.extras["qk"]
        details = {"chance_ov": scores.metadata.get("chance_ov"), "chance_qk": scores.metadata.get("chance_qk"),
                   "n_permutations": N_PERMUTATIONS, "alpha": DEFAULT_ALPHA,
                   "null_max_median_ov": float(maxima["ov"].median()),
                   "qk_null_threshold": float(torch.quantile(maxima["qk"], 1 - DEFAULT_ALPHA)),
                   "paper": "GPT-2 small L10H7: most tokens in both circuits (~85% OV bottom-10, ~96% QK top-10 as "
                            "recalled, not checked against the paper here)"}
        return [Significance(
            self.name, self.name, scores.values, threshold,
            f"OV self-suppression share (own logit in the bottom {self.config.bottom_k} of {len(ids)} tokens)",
            f"permutation null: above the {100 * (1 - DEFAULT_ALPHA):.0f}th percentile of the best head's share for "
            f"random token pairings ({N_PERMUTATIONS} permutations; family-wise)",
            details, effect=torch.minimum(scores.values, qk), floor=EFFECT_FLOOR,
            effect_name="min(OV self-suppression share, QK self-match share)",
            floor_rule=(f"the role's definition: both circuits for a majority of tokens, min(OV, QK) > {EFFECT_FLOOR} "
                        "(McDougall et al.'s L10H7 does both for most tokens)"))]

    def validation_task(self, model: Any) -> ValidationTask:
        windows = self.windows(model, "held_out")
        return ValidationTask(
            data=windows.batch,
            metric=EarlierTokenLogit(windows.offset),
            metric_name="mean centred logit of earlier tokens that are not the next token (held-out shipped text)",
            ablation_hurts_when="increases",
            default_method="mean",
        )


# ----- weight-based circuits ------------------------------------------------------------------------------------
def own_ranks(matrix: Float[Tensor, "heads n n"]) -> tuple[Int[Tensor, "heads n"], Int[Tensor, "heads n"]]:
    """For each row ``s``: how many *other* entries lie at or below, and at or above, the diagonal
    one (ties count against the token)."""
    own = matrix.diagonal(dim1=-2, dim2=-1)[..., None]
    return torch.count_nonzero(matrix <= own, dim=-1) - 1, torch.count_nonzero(matrix >= own, dim=-1) - 1


def layer_circuits(
    model: Any, layer: int, embedded: Float[Tensor, "n d_model"], unembed: Float[Tensor, "d_model n"],
    config: CopySuppressionConfig,
) -> tuple[Float[Tensor, "n_heads n n"], Float[Tensor, "n_heads n n"]]:
    """The layer's OV logits ``[head, source s, predicted t]`` and QK scores ``[head, predicted t,
    source s]`` over the candidate tokens."""
    ov = ov_logits(model, layer, embedded, unembed, config.head_input_norm)
    queries = head_queries(model, layer, unembed.T, config.head_input_norm)  # [n_heads, n, d_head]
    keys = head_keys(model, layer, embedded, config.head_input_norm)  # [n_kv_heads, n, d_head]
    kv_of_head = torch.arange(queries.shape[0], device=keys.device) // model_shape(model).group_size
    qk = einops.einsum(queries.to(keys.device), keys[kv_of_head], "heads t d_head, heads s d_head -> heads t s")
    return ov, qk


def circuit_scores(model: Any, ids: list[int], config: CopySuppressionConfig) -> dict[str, Tensor]:
    """``[n_layers, n_heads]`` shares: ``ov`` (own logit in the bottom ``bottom_k``), ``qk`` (own
    key in the top ``top_k``), ``copying`` (own logit in the top ``top_k``), ``ov_signed_rank``."""
    embedded = effective_embeddings(model, ids, config.embedding)
    unembed = task_unembed(model, ids, config.unembed_norm)
    n = len(ids)
    rows: dict[str, list[Tensor]] = {"ov": [], "qk": [], "copying": [], "ov_signed_rank": []}
    for layer in range(model_shape(model).n_layers):
        ov, qk = layer_circuits(model, layer, embedded, unembed, config)
        below, above = own_ranks(ov)
        rows["ov"].append((below < config.bottom_k).float().mean(dim=-1))
        rows["copying"].append((above < config.top_k).float().mean(dim=-1))
        rows["ov_signed_rank"].append(((above - below).float() / (n - 1)).mean(dim=-1))
        rows["qk"].append((own_ranks(qk)[1] < config.top_k).float().mean(dim=-1))
    return {key: torch.stack([value.cpu() for value in values]) for key, values in rows.items()}  # layers' devices


def pairing_null_maxima(
    model: Any, ids: list[int], config: CopySuppressionConfig, n_permutations: int
) -> dict[str, Float[Tensor, " permutations"]]:
    """Per random pairing ``sigma`` of the candidate tokens (seeded): the best share over all heads
    of tokens ``s`` whose partner's OV logit ``OV[s, sigma(s)]`` is among the ``bottom_k`` lowest of
    row ``s`` (``"ov"``), and whose partner's key is among the ``top_k`` highest for query ``s``
    (``"qk"``), ties counted against the partner as in :func:`own_ranks`: fewer than ``k`` other
    entries at or below ``x`` exactly when ``x`` is below the row's ``(k+1)``-th lowest, so one
    selection per row serves every permutation."""
    embedded = effective_embeddings(model, ids, config.embedding)
    unembed = task_unembed(model, ids, config.unembed_norm)
    n = len(ids)
    generator = torch.Generator().manual_seed(config.seed)
    partners = torch.stack([torch.randperm(n, generator=generator) for _ in range(n_permutations)])  # [perm, n]
    rows = torch.arange(n)
    best = {"ov": torch.full((n_permutations,), -1.0), "qk": torch.full((n_permutations,), -1.0)}
    for layer in range(model_shape(model).n_layers):
        ov, qk = layer_circuits(model, layer, embedded, unembed, config)
        next_low = ov.kthvalue(config.bottom_k + 1, dim=-1).values  # [heads, n]; n > k (candidates)
        next_high = -((-qk).kthvalue(config.top_k + 1, dim=-1).values)
        ov_hits = (ov[:, rows, partners] < next_low[:, None, :]).float().mean(dim=-1)  # [heads, perm]
        qk_hits = (qk[:, rows, partners] > next_high[:, None, :]).float().mean(dim=-1)
        best["ov"] = torch.maximum(best["ov"], ov_hits.max(dim=0).values.cpu())
        best["qk"] = torch.maximum(best["qk"], qk_hits.max(dim=0).values.cpu())
    return best


# ----- natural text ----------------------------------------------------------------------------------------------
def earlier_token_mask(tokens: Int[Tensor, "batch pos"], attention_mask: Int[Tensor, "batch pos"],
                       offset: int) -> Bool[Tensor, "batch pos pos"]:
    """``mask[b, p, j]``: position ``j`` holds a token of ``C_p`` for position ``p`` — a text
    position (``offset <= j <= p``) holding the first occurrence in the window of its token, not
    the true next token ``tokens[b, p + 1]``, where ``p + 1`` is a real position."""
    batch, width = tokens.shape
    same = tokens[:, :, None] == tokens[:, None, :]  # [batch, j, i]
    earlier = torch.ones(width, width, dtype=torch.bool, device=tokens.device).tril(diagonal=-1)  # i < j
    first = ~(same & earlier).any(dim=-1)  # [batch, j]: no earlier copy of tokens[j]
    positions = torch.arange(width, device=tokens.device)
    causal = (positions[None, :] <= positions[:, None]) & (positions[None, :] >= offset)  # [p, j]
    following = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], -1)], dim=1)  # [batch, p]
    has_next = torch.cat([attention_mask[:, 1:], torch.zeros_like(attention_mask[:, :1])], dim=1).bool()
    not_next = tokens[:, None, :] != following[:, :, None]  # [batch, p, j]
    return causal[None] & first[:, None, :] & not_next & has_next[:, :, None]


def masked_window_means(values: Float[Tensor, "*lead pos pos"], mask: Bool[Tensor, "batch pos pos"]) -> Tensor:
    """Mean over positions with a non-empty ``C_p`` of the mean of ``values[..., p, j]`` over
    ``C_p``; 0 for a window without any such position. ``values`` may carry a head axis after
    the batch: ``[batch, heads, pos, pos]``."""
    while mask.dim() < values.dim():
        mask = mask[:, None]
    counts = mask.sum(dim=-1)
    per_position = (values * mask).sum(dim=-1) / counts.clamp(min=1)
    used = counts > 0
    return (per_position * used).sum(dim=-1) / used.sum(dim=-1).clamp(min=1)


class EarlierTokenLogit:
    """``metric(logits, chunk)``: per window, the mean centred logit of earlier tokens that are not
    the next token (the module docstring's validation metric). ``offset``: the windows' first text
    position (1 after a BOS)."""

    def __init__(self, offset: int) -> None:
        self.offset = offset
        self.cache_key = f"earlier-token centred logit | offset {offset}"

    def __call__(self, logits: Float[Tensor, "..."], chunk: TokenBatch) -> Float[Tensor, " batch"]:
        """One value per window of ``chunk``; ``logits`` must be ``[batch, pos, vocab]``."""
        if logits.dim() != 3:
            raise InputError(f"The earlier-token logit reads logits at every position [batch, pos, vocab]; got shape "
                             f"{tuple(logits.shape)}.")
        tokens = chunk.tokens.to(logits.device)
        centred = logits.float() - logits.float().mean(dim=-1, keepdim=True)
        index = tokens[:, None, :].expand(-1, tokens.shape[1], -1)  # [batch, p, j] -> token at j
        gathered = centred.gather(-1, index)  # [batch, p, j]: centred logit at p of the token at j
        return masked_window_means(gathered, earlier_token_mask(tokens, chunk.attention_mask.to(logits.device),
                                                                self.offset))


def context_attributions(
    model: Any, windows: TextWindows, batch_size: Optional[int] = None, progress: Optional[bool] = None
) -> Float[Tensor, "n_layers n_heads"]:
    """Each head's direct contribution to the earlier-token logit, averaged over ``windows``: its
    output (``head_contributions``, centred for a LayerNorm) divided by the final norm's scale,
    read through ``diag(w_final) (W_U[:, v] - mean_u W_U[:, u])``."""
    shape = model_shape(model)
    unembed = unembedding(model)
    weight = final_norm_weight(model).float().to(unembed.device)
    centred_unembed = weight[:, None] * (unembed - unembed.mean(dim=1, keepdim=True))
    names = [name for layer in range(shape.n_layers) for name in head_output_hooks(model, layer)] + [FINAL_SCALE]

    def reduce(logits: Tensor, cache: dict, chunk: TokenBatch) -> Tensor:
        mask = earlier_token_mask(chunk.tokens, chunk.attention_mask, windows.offset)
        readout = centred_unembed.T[chunk.tokens.to(centred_unembed.device)]  # [batch, j, d_model]
        scale = cache[FINAL_SCALE].float()  # [batch, pos, 1]
        per_layer = []
        for layer in range(shape.n_layers):
            contributions = head_contributions(model, cache, layer)  # on the layer's device
            outputs = center_for_norm(model, contributions) / scale.to(contributions.device)[:, :, None]
            values = einops.einsum(outputs, readout.to(outputs.device),
                                   "batch p heads d_model, batch j d_model -> batch heads p j")
            per_layer.append(masked_window_means(values, mask.to(values.device)).cpu())
        return torch.stack(per_layer, dim=1)  # [batch, n_layers, n_heads]

    per_window = run_batched(model, windows.batch, reduce, names, batch_size, progress, desc="copy_suppression",
                             logits="last")
    return per_window.mean(dim=0)
