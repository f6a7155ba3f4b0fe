"""Attention-sink heads — Xiao et al. 2023, "Efficient Streaming Language Models with Attention
Sinks"; Gu et al. 2024, "When Attention Sink Emerges in Language Models: An Empirical View";
related: the dormant heads of Guo et al. 2024, "Active-Dormant Attention Heads".

Data: natural text, cut into windows of ``text_length`` tokens (each after the model's BOS when it
has one): the English prose shipped with headscope (``headscope.tasks.plain_text``:
``reference_text.txt`` and ``haystack_filler.txt``, ~12k tokens with SmolLM2's tokenizer), or your
own text (``data``, a ``.txt`` or ``.jsonl`` file, as in ``headscope.tasks.natural_text``). The
windows are shuffled with ``seed``; the first half is scored (at most ``n_sequences``), the second
half held out for validation (at most ``n_validation_sequences``), so no window is both.

Score (``values``): the share of attention each head puts on position 0, the mean over the query
positions ``i >= 1`` of a window (query 0 can attend only to itself, so it counts nowhere), then
over the scored windows::

    sink_h = mean_windows mean_{i >= 1} A_h[i, 0]

Gu et al.'s code (``sail-sg/Attention-Sink``, ``eval_sink_open_source.py``) averages over all
queries of a 64-token probe, query 0 included; ours is that number without query 0's certain 1.
Range 0..1. Extras:

* ``no_bos``: the same share on the same windows without their BOS, position 0 then being the
  first text token (Xiao et al.: the first token is a sink whatever it is); only for models with a
  BOS (without one, ``values`` is already that).
* ``sink_rate``: the share of scored windows on which the head's own share exceeds Gu et al.'s
  epsilon 0.3 (their per-sample indicator).
* ``output_norm_ratio``: the head's mean output norm over the counted queries (``||z W_O^h||``,
  through the post-attention norm where the model has one) over the mean of that norm across the
  heads of its layer. A sink head that writes little (Gu et al.: the sink acts as a key bias with
  small values; Guo et al.'s dormant heads) has a ratio below 1.

Significance: the statistic must beat what position alone gives, the share uniform attention
over the causal prefix puts on position 0 (``mean_{i >= 1} 1 / (i + 1)``, per window, then over
the scored windows: about 0.06 for 64-token windows), and exceed the effect-size floor 0.3, the
epsilon above which Gu et al. 2024 count a head's attention on the first token as a sink.

Validation metric: the mean next-token loss of each held-out window over the tokens predicted by
queries ``i >= 1`` (the predictions that removing the sink can change), in nats;
``ablation_hurts_when="increases"``. The default intervention is ``method="sink"``:
``headscope.interventions.remove_sink`` on the heads — their attention on position 0 from queries
``i >= 1`` zeroed and each row re-normalised over the other keys. Other methods (``"mean"``,
``"zero"``, ...) ablate the heads' outputs with ``hs.ablate`` on the same windows.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any, Optional

import torch
from jaxtyping import Float, Int
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
from headscope.engine.heads import hook_name, model_shape
from headscope.engine.metrics import masked_mean, next_token_losses
from headscope.engine.runner import run_batched
from headscope.engine.tokens import TokenBatch
from headscope.engine.unembed import head_contributions, head_output_hooks
from headscope.errors import InputError
from headscope.interventions import ablate, remove_sink
from headscope.results import HeadScores
from headscope.significance import Significance
from headscope.tasks.natural_text import TextWindows, read_documents
from headscope.tasks.plain_text import prose_windows, shipped_documents, without_bos

SINK_EPSILON = 0.3  # Gu et al. 2024: a head's mean attention on the first token above this is a sink
SINK_METHOD = "sink"  # validation's default: remove_sink, not an output ablation
GU_SOURCE = ("Gu et al. 2024, 'When Attention Sink Emerges in Language Models', epsilon = 0.3 in their code "
             "(sail-sg/Attention-Sink, eval_sink_open_source.py)")


@dataclass
class AttentionSinkConfig(DetectorConfig):
    """Settings of the attention-sink detector: windows of natural text."""

    text_length: int = setting(64, "text tokens per window, after the BOS (Gu et al. probe with 64 tokens)", min=2)
    n_sequences: int = setting(64, "scored windows, at most (half of all windows are scored)", min=1)
    n_validation_sequences: int = setting(32, "held-out windows of the validation loss, at most", min=1)
    data: Optional[str] = setting(None, "your own natural text instead of the shipped prose: a .txt file (one "
                                        "document) or .jsonl with {\"text\": ...} per line", path=True)


def sink_windows(model: Any, config: AttentionSinkConfig, validation: bool = False) -> TextWindows:
    """The scored windows of the text, or (``validation``) the held-out ones.

    Raises:
        InputError: the model has no tokenizer.
        SettingError: ``text_length`` (with the BOS) longer than the model's context.
        DataError: a bad ``data`` file, or text too short for two windows.
    """
    scored, held_out = prose_windows(model, "attention_sink", config.text_length, config.n_sequences,
                                     config.n_validation_sequences, config.seed, config.data)
    return held_out if validation else scored


def counted_queries(mask: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos"]:
    """1 where a real query sits at position ``i >= 1`` (the queries every score here counts)."""
    counted = mask.float().clone()
    counted[:, 0] = 0.0
    return counted


def first_key_shares(cache: dict, n_layers: int, mask: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch n_layers n_heads"]:
    """Per window, each head's mean attention on position 0 over the counted queries, from the
    cached ``hook_pattern`` (``[batch, n_heads, query_pos, key_pos]``) of every layer."""
    counted = counted_queries(mask)
    per_layer = []
    for layer in range(n_layers):
        on_first = cache[hook_name(layer, "pattern")][:, :, :, 0].float()  # [batch, n_heads, query_pos]
        per_layer.append(((on_first * counted[:, None].to(on_first.device)).sum(-1)
                          / counted.sum(-1, keepdim=True).to(on_first.device)).to(counted.device))
    return torch.stack(per_layer, dim=1)


def output_norms(model: Any, cache: dict, mask: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch n_layers n_heads"]:
    """Per window, each head's mean output norm ``||z W_O^h||`` (through the post-attention norm
    where there is one) over the counted queries."""
    counted = counted_queries(mask)
    per_layer = []
    for layer in range(model_shape(model).n_layers):
        norms = head_contributions(model, cache, layer).norm(dim=-1)  # [batch, pos, n_heads]
        weight = counted.to(norms.device)[:, :, None]
        per_layer.append(((norms * weight).sum(dim=1) / weight.sum(dim=1)).to(counted.device))
    return torch.stack(per_layer, dim=1)


def uniform_first_share(mask: Int[Tensor, "batch pos"]) -> float:
    """What uniform attention over the causal prefix puts on position 0 (``1 / (i + 1)`` at query
    ``i``), mean over the counted queries of each window, then over windows: position alone."""
    counted = counted_queries(mask)
    share = 1.0 / (torch.arange(mask.shape[1], dtype=torch.float32) + 1.0)
    return float(((counted * share).sum(-1) / counted.sum(-1)).mean())


def later_query_losses(logits: Float[Tensor, "batch pos d_vocab"], chunk: TokenBatch) -> Float[Tensor, " batch"]:
    """Each window's mean next-token loss over the predictions of queries ``i >= 1`` (nats)."""
    losses = next_token_losses(logits, chunk.tokens)  # [batch, pos - 1]: position i predicts token i + 1
    targets = counted_queries(chunk.attention_mask[:, 1:])  # column i: token i + 1 is real, and i >= 1
    return masked_mean(losses, targets.bool().to(losses.device))


def intervention(model: Any, heads: Optional[list], method: str, data: TokenBatch) -> contextlib.AbstractContextManager:
    """Nothing (``heads`` None), :func:`remove_sink` (``method="sink"``) or ``hs.ablate``."""
    if heads is None:
        return contextlib.nullcontext()
    if method == SINK_METHOD:
        return remove_sink(model, heads)
    return ablate(model, heads, method=method, reference=data)


def window_losses(model: Any, data: TokenBatch, head_sets: list, method: str,
                  batch_size: Optional[int] = None) -> Float[Tensor, "sets batch"]:
    """:func:`later_query_losses` of every window with each head set intervened on (``None``: clean)."""
    rows = []
    for index, heads in enumerate(head_sets):
        with intervention(model, heads, method, data):
            rows.append(run_batched(model, data, lambda logits, cache, chunk: later_query_losses(logits, chunk),
                                    batch_size=batch_size, progress=False,
                                    desc=f"attention_sink validation {index}").float().cpu())
    return torch.stack(rows)


@register_detector
class AttentionSinkDetector(Detector):
    name = "attention_sink"
    atlas_order = 15
    Config = AttentionSinkConfig
    summary = "share of attention on the first token over natural text (Xiao et al. 2023; Gu et al. 2024)"
    cost = "score 8 s, significance 0 s, validation 14 s (the atlas's 32 scored and 16 held-out windows)"
    # Sinks are stable across windows: the atlas scores half the windows and validates on 16.
    atlas_defaults = {"n_sequences": 32, "n_validation_sequences": 16}
    explanation = {"attention_sink": (
        "An attention-sink head parks most of its attention on the first token whatever that token is, a place to "
        "put attention it does not want to spend on the text (Xiao et al. 2023; Gu et al. 2024). headscope scores "
        "the mean attention on position 0 over windows of natural text, calls a head a sink above Gu et al.'s 0.3, "
        "and validates by removing the sink (rows re-normalised without position 0) on held-out windows.")}

    def examples(self, model: Any) -> list[Example]:
        """The first two sentences of the text (shipped or ``data``), each cut to 40 words; none
        without a tokenizer."""
        if not has_tokenizer(model):
            return []
        documents = read_documents(self.config.data) if self.config.data else list(shipped_documents())
        sentences = [s for document in documents for s in re.split(r"(?<=[.!?])\s+", " ".join(document.split())) if s]
        return [(f"natural text, sentence {index + 1}", " ".join(sentence.split()[:40]))
                for index, sentence in enumerate(sentences[:2])]

    def check_data(self) -> None:
        if self.config.data:
            read_documents(self.config.data)

    def score(self, model: Any, batch_size: Optional[int] = None, progress: Optional[bool] = None) -> HeadScores:
        windows = sink_windows(model, self.config)
        n_layers = model_shape(model).n_layers
        names = [name for layer in range(n_layers) for name in [hook_name(layer, "pattern"), *head_output_hooks(model, layer)]]

        def reduce(logits: Tensor, cache: dict, chunk: TokenBatch) -> dict[str, Tensor]:
            return {"share": first_key_shares(cache, n_layers, chunk.attention_mask).cpu(),
                    "norm": output_norms(model, cache, chunk.attention_mask).cpu()}

        per_window = run_batched(model, windows.batch, reduce, names, batch_size, progress, desc=self.name,
                                 logits="last")
        values = per_window["share"].mean(dim=0)
        norms = per_window["norm"].mean(dim=0)
        extras = {"sink_rate": (per_window["share"] > SINK_EPSILON).float().mean(dim=0),
                  "output_norm_ratio": norms / norms.mean(dim=-1, keepdim=True)}
        metadata = self._metadata(windows)
        if windows.has_bos:
            bare = without_bos(windows)
            extras["no_bos"] = self._shares(model, bare, batch_size, progress).mean(dim=0)
            metadata["uniform_share_no_bos"] = uniform_first_share(bare.attention_mask)
        return self.result(model, values, extras, metadata)

    def _shares(self, model: Any, windows: TextWindows, batch_size: Optional[int],
                progress: Optional[bool]) -> Float[Tensor, "batch n_layers n_heads"]:
        n_layers = model_shape(model).n_layers

        def reduce(logits: Tensor, cache: dict, chunk: TokenBatch) -> Tensor:
            return first_key_shares(cache, n_layers, chunk.attention_mask).cpu()

        return run_batched(model, windows.batch, reduce, [hook_name(layer, "pattern") for layer in range(n_layers)],
                           batch_size, progress, desc=f"{self.name} (no BOS)", logits="last")

    def _metadata(self, windows: TextWindows) -> dict[str, Any]:
        return {
            "score": "mean attention on position 0 over queries i >= 1, then over windows (0..1)",
            "queries": "every real position i >= 1 of a window (query 0 attends only to itself)",
            "n_windows": len(windows),
            "window_tokens": int(windows.tokens.shape[1]),
            "n_text_tokens": windows.n_text_tokens,
            "has_bos": windows.has_bos,
            "bos_token_id": int(windows.tokens[0, 0]) if windows.has_bos else None,
            "data": str(self.config.data) if self.config.data else "shipped: " + ", ".join(
                ["reference_text.txt", "haystack_filler.txt"]),
            "uniform_share": uniform_first_share(windows.attention_mask),
            "sink_epsilon": SINK_EPSILON,
            "output_norm_ratio": "mean ||z W_O^h|| over counted queries / its mean over the heads of the layer",
        }

    def significance(self, model: Any, scores: HeadScores, batch_size: Optional[int] = None,
                     progress: Optional[bool] = None) -> list[Significance]:
        """Above position alone (uniform attention's share on position 0) and above Gu et al.'s 0.3.
        A background role: most heads of a trained model are sinks, so the atlas's role map gives
        it only to heads with no other role."""
        if "uniform_share" not in scores.metadata:
            raise InputError("These attention_sink scores lack metadata['uniform_share'] (saved by an older headscope); "
                             "rescore them.")
        share = float(scores.metadata["uniform_share"])
        details = {"uniform_share": share, "n_windows": scores.metadata.get("n_windows"),
                   "n_above_floor": int((scores.values > SINK_EPSILON).sum())}
        return [Significance(
            self.name, self.name, scores.values, share, "mean attention on position 0 (queries i >= 1)",
            "position alone: above the share uniform attention over the causal prefix puts on position 0 "
            "(mean over queries i >= 1 of 1/(i+1), per window, then over windows)", details,
            floor=SINK_EPSILON, floor_rule=f"a sink head by {GU_SOURCE}", background=True)]

    def validation_task(self, model: Any) -> ValidationTask:
        windows = sink_windows(model, self.config, validation=True)
        data = windows.batch

        def measure(model: Any, head_sets: list, method: str) -> Tensor:
            return window_losses(model, data, head_sets, method)

        return ValidationTask(data, None, "next-token loss of held-out text windows, queries i >= 1 (nats)",
                              ablation_hurts_when="increases", measure=measure, default_method=SINK_METHOD)
