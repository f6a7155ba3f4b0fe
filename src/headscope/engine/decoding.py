"""Greedy decoding with a KV cache that records, per decode step, each head's top-1 attended key.

Retrieval-head scoring needs, at every generated token, which context position each head looks
at most. Keeping the attention patterns would cost ``layers × heads × steps × context`` floats;
this module keeps only the argmax, ``[steps, layers, heads]`` integers, so the memory of a run
is the model, its KV cache and one transient attention block, whatever the context length.

A decode starts from a :class:`Prefix`: the KV cache of every prompt token but the last,
computed in chunks of ``chunk_size`` tokens (so the transient attention scores are at most
``heads × chunk_size × context``). Like the retrieval-head paper's code, the first decode step
feeds the prompt's last token; its query row therefore produces, and is scored for, the first
generated token. A prefix is reusable: every decode or teacher-forced pass rewinds the cache to
the prompt afterwards, so one prefill serves the clean run and every masked run of a sample.

Interventions given as ``intervention`` (any context-manager factory, e.g. a
:class:`~headscope.interventions.DecodeMask`) are active during decode steps only; the prefill
is always clean, which is exactly the retrieval paper's "mask at decoding" ablation.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterable, Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor

from headscope.engine.heads import hook_name, model_shape
from headscope.engine.kv_cache import cache_kwarg_alias, check_filled, is_verified, verify_once
from headscope.engine.runner import model_device
from headscope.engine.stops import StopTracker
from headscope.engine.tokens import TokenBatch, check_batch
from headscope.errors import InputError, PromptTooLongError

DEFAULT_PREFILL_CHUNK = 512
Intervention = Callable[[Any], ContextManager]


@dataclass
class DecodeTrace:
    """What one greedy decode produced.

    ``top_keys[t, layer, head]`` is the context position the head attended most when its query
    produced generated token ``t`` (``None`` when not recorded). ``logprobs[t]`` is the model's
    log-probability of token ``t``.
    """

    prompt_length: int
    tokens: Int[Tensor, " steps"]
    logprobs: Float[Tensor, " steps"]
    top_keys: Optional[Int[Tensor, "steps n_layers n_heads"]]
    stopped: bool

    def text(self, tokenizer: Any) -> str:
        return tokenizer.decode(self.tokens.tolist(), skip_special_tokens=True)


class Prefix:
    """The KV cache of ``prompt[:-1]``, filled chunk by chunk, rewound after each use.

    Args:
        prompt: 1-D token ids (with the BOS if the model wants one).
        chunk_size: prompt tokens per prefill forward; bounds the transient attention memory.
    """

    def __init__(self, model: Any, prompt: Int[Tensor, " pos"], chunk_size: int = DEFAULT_PREFILL_CHUNK) -> None:
        from transformers import DynamicCache

        prompt = torch.as_tensor(prompt, dtype=torch.long).flatten()
        if prompt.numel() < 2:
            raise InputError("A prompt for decoding needs at least two tokens (a BOS and one more).")
        check_batch(model, TokenBatch(prompt[None], torch.ones(1, prompt.numel(), dtype=torch.long)))
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size}.")
        self.model = model
        self.prompt = prompt
        self.chunk_size = chunk_size
        self.cache = DynamicCache()
        self.rows = 1
        body = prompt[:-1].to(model_device(model))
        with torch.no_grad(), cache_kwarg_alias(model):
            for start in range(0, body.numel(), chunk_size):
                model(
                    body[None, start : start + chunk_size],
                    return_type="logits_and_cache",
                    past_key_values=self.cache,
                    logits_to_keep=1,
                )
        check_filled(self.cache, body.numel(), f"a {prompt.numel()}-token prompt")
        self._verify_reads()

    def _verify_reads(self) -> None:
        """The first prefix of a model: its cached last-token step must equal a plain forward. A
        prompt longer than one prefill chunk is checked on a prefix of one chunk instead (a plain
        forward over a long prompt is what the chunked prefill exists to avoid)."""
        if is_verified(self.model, "prefix"):
            return
        short = max(self.chunk_size, 2)
        if self.prompt.numel() > short:
            Prefix(self.model, self.prompt[:short], chunk_size=self.chunk_size)  # verifies itself
            return
        prompt = self.prompt.to(model_device(self.model))[None]
        verify_once(self.model, "prefix", self._cached_last_step, lambda: self.model(prompt)[:, -1])

    def _cached_last_step(self) -> Float[Tensor, "1 d_vocab"]:
        with cache_kwarg_alias(self.model):
            logits, _ = self.model(self.last_tokens(1), return_type="logits_and_cache", past_key_values=self.cache)
        self.rewind()
        return logits[:, -1]

    @property
    def length(self) -> int:
        """Number of cached positions (prompt length minus one)."""
        return self.prompt.numel() - 1

    def last_tokens(self, rows: int) -> Int[Tensor, "rows 1"]:
        return self.prompt[-1:].expand(rows, 1).to(model_device(self.model))

    def expand(self, rows: int) -> None:
        """Repeat the cache to ``rows`` batch rows (undone by :meth:`rewind`)."""
        if rows != self.rows:
            self.cache.batch_repeat_interleave(rows // self.rows)
            self.rows = rows

    def rewind(self) -> None:
        """Back to one row and the prompt's positions."""
        extra = self.cache.get_seq_length() - self.length
        if extra > 0:
            self.cache.crop(-extra)  # a negative count removes positions in every transformers version
        if self.rows != 1:
            self.cache.batch_select_indices(torch.tensor([0]))  # on CPU: indexes each layer's device
            self.rows = 1


def _no_intervention(model: Any) -> ContextManager:
    return contextlib.nullcontext()


@contextlib.contextmanager
def _top_key_recorder(model: Any, enabled: bool):
    """Hooks on every layer's pattern keeping, per row and head, the argmax key of the last query."""
    if not enabled:
        yield None
        return
    n_layers = model_shape(model).n_layers
    step_rows: list[Optional[Tensor]] = [None] * n_layers

    def keep_argmax(pattern: Tensor, hook: Any, layer: int) -> None:
        step_rows[layer] = pattern[:, :, -1].argmax(dim=-1)  # [rows, heads]

    hooks = [(hook_name(layer, "pattern"), _bind_layer(keep_argmax, layer)) for layer in range(n_layers)]
    with model.hooks(fwd_hooks=hooks):
        yield step_rows


def _bind_layer(fn: Callable, layer: int) -> Callable:
    return lambda activation, hook: fn(activation, hook, layer)


def _check_room(model: Any, prefix: Prefix, new_tokens: int) -> None:
    n_ctx = model_shape(model).n_ctx
    if prefix.prompt.numel() + new_tokens > n_ctx:
        raise PromptTooLongError(
            f"A prompt of {prefix.prompt.numel()} tokens plus {new_tokens} new tokens exceeds the model's "
            f"context of {n_ctx}; shorten the prompt or lower max_new_tokens."
        )


def greedy_decode(
    model: Any,
    prefix: Prefix,
    max_new_tokens: int = 50,
    stop_ids: Iterable[int] = (),
    intervention: Optional[Intervention] = None,
    record_top_keys: bool = True,
) -> DecodeTrace:
    """Greedy continuation of ``prefix.prompt``, one KV-cached step per new token.

    Stops after ``max_new_tokens`` or at a token in ``stop_ids`` (not included in the output).
    ``intervention(model)`` is entered around the decode steps only. The prefix is rewound
    afterwards, so it can serve the next decode.
    """
    return greedy_decode_rows(model, prefix, 1, max_new_tokens, stop_ids, intervention, record_top_keys)[0]


def greedy_decode_rows(
    model: Any,
    prefix: Prefix,
    rows: int,
    max_new_tokens: int = 50,
    stop_ids: Iterable[int] = (),
    intervention: Optional[Intervention] = None,
    record_top_keys: bool = False,
) -> list[DecodeTrace]:
    """``rows`` greedy decodes of the same prompt as one batch, e.g. under an intervention that
    acts per row (:func:`~headscope.interventions.ablate_per_row`); one trace per row."""
    _check_room(model, prefix, max_new_tokens)
    stops = StopTracker(rows, max_new_tokens, stop_ids)
    enter = intervention or _no_intervention
    current = prefix.last_tokens(rows)
    steps_tokens, steps_logprobs, steps_keys = [], [], []
    prefix.expand(rows)
    try:
        with torch.no_grad(), cache_kwarg_alias(model), enter(model), \
                _top_key_recorder(model, record_top_keys) as recorded:
            for step in range(max_new_tokens):
                logits, _ = model(current, return_type="logits_and_cache", past_key_values=prefix.cache)
                logprobs = torch.log_softmax(logits[:, -1].float(), dim=-1)
                tokens = logprobs.argmax(dim=-1)
                if stops.update(step, tokens):
                    break
                steps_tokens.append(tokens.cpu())
                steps_logprobs.append(logprobs.gather(1, tokens[:, None])[:, 0].cpu())
                if recorded is not None:
                    keys = torch.stack([layer_keys.cpu() for layer_keys in recorded], dim=1)  # layers' devices
                    steps_keys.append(keys.to(torch.int32))  # [rows, layers, heads]
                current = tokens[:, None].to(model_device(model))  # logits come from the last layer's device
    finally:
        prefix.rewind()
    shape = model_shape(model)
    return [
        _row_trace(prefix, row, int(stops.lengths[row]), bool(stops.finished[row]), steps_tokens, steps_logprobs,
                   steps_keys if record_top_keys else None, shape)
        for row in range(rows)
    ]


def _row_trace(prefix, row, length, stopped, steps_tokens, steps_logprobs, steps_keys, shape) -> DecodeTrace:
    keys = None
    if steps_keys is not None:
        keys = torch.stack([k[row] for k in steps_keys[:length]]) if length else torch.zeros(
            0, shape.n_layers, shape.n_heads, dtype=torch.int32)
    return DecodeTrace(
        prompt_length=prefix.prompt.numel(),
        tokens=torch.tensor([int(t[row]) for t in steps_tokens[:length]], dtype=torch.long),
        logprobs=torch.tensor([float(lp[row]) for lp in steps_logprobs[:length]]),
        top_keys=keys,
        stopped=stopped,
    )


def continuation_logprobs(
    model: Any,
    prefix: Prefix,
    continuation: Int[Tensor, " n"],
    intervention: Optional[Intervention] = None,
    rows: int = 1,
) -> Float[Tensor, "rows n"]:
    """Teacher-forced log-probabilities of ``continuation`` after the prompt, in one forward.

    The forward feeds the prompt's last token and ``continuation[:-1]``: these are the decode
    positions, so ``intervention`` acts on them and not on the prefill. ``rows`` copies run as
    one batch (for an intervention that acts per row).
    """
    continuation = torch.as_tensor(continuation, dtype=torch.long).flatten()
    if continuation.numel() == 0:
        raise InputError("The continuation to score is empty.")
    _check_room(model, prefix, continuation.numel())
    device = model_device(model)
    inputs = torch.cat([prefix.last_tokens(rows), continuation[:-1].to(device).expand(rows, -1)], dim=1)
    enter = intervention or _no_intervention
    prefix.expand(rows)
    try:
        with torch.no_grad(), cache_kwarg_alias(model), enter(model):
            logits, _ = model(inputs, return_type="logits_and_cache", past_key_values=prefix.cache)
    finally:
        prefix.rewind()
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    targets = continuation.to(logprobs.device).expand(rows, -1)
    return logprobs.gather(2, targets[:, :, None])[:, :, 0].cpu()
