"""Batched greedy generation for many different prompts (left padding + KV cache), and the
last-position logits or final hidden states of prompts.

Prompts of different lengths are padded on the *left* for generation, so that every row's next
token is the last column; position ids count real tokens only (a padded row gets the same
positions, hence the same rotary phases, as an unpadded run: tested to 1e-4). Interventions are
active for the whole generation (prefill and every step), as in Zhou et al.'s generations with
heads masked; a ``row_intervention`` acts differently on each row, e.g. ablates a different head
set per row (:func:`headscope.interventions.per_row_ablation`: several conditions in one batched
run, which is what makes decoding cheap on a CPU).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Optional, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from headscope.engine.kv_cache import cache_kwarg_alias, check_filled, verify_once
from headscope.engine.runner import Halving, auto_batch_size, model_device, run_batched
from headscope.engine.stops import StopTracker
from headscope.engine.tokens import TokenBatch, as_token_batch, check_batch

Intervention = Callable[[Any], ContextManager]
RowIntervention = Callable[[Any, list[int]], ContextManager]  # (model, prompt indices of the batch's rows)


@dataclass
class Generation:
    """One greedy continuation: the generated ids (without the stop token) and their text."""

    token_ids: list[int]
    text: str
    stopped: bool  # ended with a stop token before max_new_tokens


def left_padded(batch: TokenBatch, pad_id: int) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """A right-padded batch moved to the left: (tokens, attention_mask)."""
    lengths = batch.lengths.tolist()
    width = max(lengths)
    tokens = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        tokens[row, width - length :] = batch.tokens[row, :length]
        mask[row, width - length :] = 1
    return tokens, mask


def _positions(mask: Tensor) -> Tensor:
    return (mask.cumsum(dim=1) - 1).clamp(min=0)


def generate(
    model: Any,
    prompts: Any,
    max_new_tokens: int = 32,
    stop_ids: Optional[Sequence[int]] = None,
    intervention: Optional[Intervention] = None,
    row_intervention: Optional[RowIntervention] = None,
    batch_size: Optional[int] = None,
) -> list[Generation]:
    """Greedy continuations of ``prompts`` (strings, id lists or a ``TokenBatch``).

    Args:
        stop_ids: tokens that end a row (default: the tokenizer's EOS); not included in the output.
        intervention: a context-manager factory (``lambda m: hs.ablate(m, heads)``) active
            throughout.
        row_intervention: ``row_intervention(model, rows)``, entered around each batched run
            (inside ``intervention`` when both are given), with ``rows`` the indices of the prompts in the run's rows
            (in that order; prompts of similar length run together). E.g.
            ``per_row_ablation(head_sets, "uniform")``: prompt ``i`` runs with ``head_sets[i]`` ablated.
        batch_size: prompts per batched run (default from the memory budget).
    """
    batch = as_token_batch(model, prompts)
    check_batch(model, batch, extra_tokens=max_new_tokens)
    stops = _stop_ids(model, stop_ids)
    size = batch_size or auto_batch_size(model, int(batch.lengths.max()) + max_new_tokens)
    order = torch.argsort(batch.lengths, stable=True).tolist()  # similar lengths together: less padding
    results: list[Optional[Generation]] = [None] * len(batch)

    def run(span: slice) -> tuple[list[int], list[Generation]]:
        rows = order[span]
        with contextlib.ExitStack() as active:
            if intervention is not None:
                active.enter_context(intervention(model))
            if row_intervention is not None:
                active.enter_context(row_intervention(model, rows))
            return rows, _generate_chunk(model, batch.select(rows), max_new_tokens, stops)

    for rows, outputs in Halving("generation").map(len(order), size, run):
        for row, output in zip(rows, outputs, strict=True):
            results[row] = output
    return results  # type: ignore[return-value]


def _stop_ids(model: Any, stop_ids: Optional[Sequence[int]]) -> Sequence[int]:
    """``stop_ids``, or the tokenizer's EOS when None."""
    if stop_ids is None:
        eos = getattr(model.tokenizer, "eos_token_id", None)
        return [] if eos is None else [eos]
    return stop_ids


def _generate_chunk(model: Any, chunk: TokenBatch, max_new_tokens: int, stop_ids: Sequence[int]) -> list[Generation]:
    from transformers import DynamicCache

    device = model_device(model)
    tokens, mask = (t.to(device) for t in left_padded(chunk, pad_id=int(chunk.tokens[0, 0])))
    cache = DynamicCache()
    generated, stops = [], StopTracker(len(chunk), max_new_tokens, stop_ids)
    current, positions = tokens, _positions(mask)
    with torch.no_grad(), cache_kwarg_alias(model):
        for step in range(max_new_tokens):
            step_kwargs = dict(attention_mask=mask, position_ids=positions, logits_to_keep=1)
            logits, _ = model(current, return_type="logits_and_cache", past_key_values=cache, **step_kwargs)
            if step == 0:
                check_filled(cache, tokens.shape[1], f"{len(chunk)} left-padded prompts")
            elif step == 1:
                _verify_padded_step(model, torch.cat([tokens, current], dim=1), mask, logits[:, -1])
            next_tokens = logits[:, -1].argmax(dim=-1)
            generated.append(next_tokens.cpu())
            if stops.update(step, next_tokens):
                break
            current = next_tokens[:, None].to(device)  # logits come from the last layer's device
            mask = torch.cat([mask, mask.new_ones(len(chunk), 1)], dim=1)
            positions = positions[:, -1:] + 1
    steps = torch.stack(generated, dim=1)
    outputs = []
    for row in range(len(chunk)):
        ids = steps[row, : int(stops.lengths[row])].tolist()
        outputs.append(Generation(ids, model.tokenizer.decode(ids), bool(stops.finished[row])))
    return outputs


def _verify_padded_step(
    model: Any, tokens: Int[Tensor, "batch pos"], mask: Int[Tensor, "batch pos"], cached: Float[Tensor, "batch d_vocab"]
) -> None:
    """The first cached step of a left-padded batch must equal a plain forward over the same tokens
    (once per model; :func:`headscope.engine.kv_cache.verify_once`)."""

    def plain() -> Tensor:
        return model(tokens, attention_mask=mask, position_ids=_positions(mask))[:, -1]

    verify_once(model, "padded", lambda: cached, plain)


def final_states(
    model: Any, prompts: Any, batch_size: Optional[int] = None, logits: bool = True, progress: Optional[bool] = None
) -> Float[Tensor, "batch dim"]:
    """Last-position logits (``logits=True``) or final normalised hidden states (the input of the
    unembedding, what Hugging Face calls ``hidden_states[-1]``) of each prompt. The unembedding is
    computed at the last real position of each row only."""
    return run_batched(model, prompts, lambda values, cache, chunk: values.cpu(), batch_size=batch_size,
                       progress=progress, desc="final states", logits="last" if logits else "last_states")
