"""Addressing attention heads: ``Head(layer, head)``, hook names, grouped-query attention.

A head is always ``(layer, query head index)``. With grouped-query attention several query heads
share one key/value head: query head ``h`` reads KV head ``h // (n_heads // n_kv_heads)``.
Hooks on ``q``, ``z`` and ``pattern`` act on one query head; hooks on ``k`` and ``v`` act on a
whole KV group, and every function that does so says so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Literal, NamedTuple, Sequence, Union

from headscope.errors import HeadIndexError, UnsupportedModelError

HeadKind = Literal["q", "k", "v", "z", "pattern", "attn_scores", "rot_q", "rot_k", "q_normed", "k_normed"]
PER_QUERY_HEAD_HOOKS = ("q", "z", "pattern", "attn_scores", "rot_q")
PER_KV_HEAD_HOOKS = ("k", "v", "rot_k")
REQUIRED_HOOKS = ("q", "k", "v", "z", "pattern")

_HEAD_TEXT = re.compile(r"^\s*L(\d+)\s*H(\d+)\s*$", re.IGNORECASE)


@dataclass(frozen=True, order=True)
class Head:
    """One attention head: ``layer`` and *query* head index."""

    layer: int
    head: int

    def __str__(self) -> str:
        return f"L{self.layer}H{self.head}"

    def __iter__(self):  # allows ``layer, head = Head(3, 1)``
        yield self.layer
        yield self.head

    @classmethod
    def parse(cls, value: Union["Head", Sequence[int], str]) -> "Head":
        """``Head``, ``(layer, head)`` or ``"L18H6"`` → ``Head``."""
        if isinstance(value, Head):
            return value
        if isinstance(value, str):
            match = _HEAD_TEXT.match(value)
            if not match:
                raise ValueError(f"Cannot read a head from {value!r}; write it as 'L18H6' or (18, 6).")
            return cls(int(match.group(1)), int(match.group(2)))
        try:
            layer, head = value
        except (TypeError, ValueError):
            raise ValueError(
                f"Cannot read a head from {value!r}; give Head(layer, head), (layer, head) or 'L18H6'."
            ) from None
        return cls(int(layer), int(head))


class HeadScore(NamedTuple):
    """One row of ``HeadScores.top``: a plain ``(layer, head, score)`` tuple with names."""

    layer: int
    head: int
    score: float


@dataclass(frozen=True)
class ModelShape:
    """The numbers every head computation needs."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    d_vocab: int
    n_ctx: int

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 without grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    @property
    def n_total_heads(self) -> int:
        return self.n_layers * self.n_heads


def model_shape(model: Any) -> ModelShape:
    cfg = model.cfg
    n_heads = int(cfg.n_heads)
    n_kv = int(getattr(cfg, "n_key_value_heads", None) or n_heads)
    return ModelShape(
        n_layers=int(cfg.n_layers),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        d_head=int(cfg.d_head),
        d_model=int(cfg.d_model),
        d_vocab=int(cfg.d_vocab),
        n_ctx=int(cfg.n_ctx),
    )


def hook_name(layer: int, kind: HeadKind) -> str:
    """TransformerLens hook name of an attention activation, e.g. ``blocks.3.attn.hook_z``.

    ``q``/``k`` are pre-RoPE, ``rot_q``/``rot_k`` post-RoPE, ``q_normed``/``k_normed`` after QK-norm
    (models that have one); ``attn_scores`` is after the causal mask and before softmax;
    ``pattern`` after softmax. Shapes: ``q``/``z`` ``[batch, pos, n_heads, d_head]``; ``k``/``v``
    ``[batch, pos, n_kv_heads, d_head]``; ``pattern`` ``[batch, n_heads, query_pos, key_pos]``.
    """
    return f"blocks.{layer}.attn.hook_{kind}"


ResidualKind = Literal["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"]


def residual_hook(layer: int, kind: ResidualKind) -> str:
    """TransformerLens hook name of a residual-stream activation of block ``layer``
    (``[batch, pos, d_model]``), e.g. ``blocks.3.hook_resid_pre``.

    ``resid_pre`` is what the block reads, ``resid_post`` what it hands on; ``attn_out`` and
    ``mlp_out`` are what attention and the MLP add to the stream (on TransformerLens 4.3 bridges
    after the post-norm where the model has one: Gemma 2/3's ``hook_attn_out`` is
    ``ln1_post.hook_out``). ``resid_mid`` exists only where the MLP reads attention's sum (not in
    GPT-NeoX or Phi, whose attention and MLP read the same ``resid_pre``).
    """
    return f"blocks.{layer}.hook_{kind}"


def kv_head(model: Any, head: Head) -> int:
    """The KV head a query head reads its keys and values from."""
    return kv_head_of(head, model_shape(model).group_size)


def kv_group(model: Any, layer: int, kv_index: int) -> list[Head]:
    """All query heads that share KV head ``kv_index`` of ``layer``."""
    return kv_group_of(layer, kv_index, model_shape(model).group_size)


def kv_head_of(head: Head, group_size: int) -> int:
    """:func:`kv_head` without a model: ``group_size`` query heads share each KV head."""
    return head.head // group_size


def kv_group_of(layer: int, kv_index: int, group_size: int) -> list[Head]:
    """:func:`kv_group` without a model: ``group_size`` query heads share each KV head."""
    return [Head(layer, kv_index * group_size + offset) for offset in range(group_size)]


def check_head(model: Any, head: Union[Head, Sequence[int], str]) -> Head:
    """Parse a head and check that the model has it; the error names the valid range."""
    parsed = Head.parse(head)
    shape = model_shape(model)
    if not 0 <= parsed.layer < shape.n_layers:
        raise HeadIndexError(
            f"Layer {parsed.layer} of head {parsed} is out of range: this model has layers "
            f"0..{shape.n_layers - 1}."
        )
    if not 0 <= parsed.head < shape.n_heads:
        raise HeadIndexError(
            f"Head {parsed.head} of {parsed} is out of range: this model has query heads "
            f"0..{shape.n_heads - 1} in each layer."
        )
    return parsed


def check_heads(
    model: Any, heads: Union[Iterable[Union[Head, Sequence[int], str]], Head, Sequence[int], str]
) -> list[Head]:
    """Parse and check several heads; a single head is accepted too. Order kept, duplicates dropped."""
    if isinstance(heads, (Head, str)) or (
        isinstance(heads, tuple) and len(heads) == 2 and all(isinstance(x, int) for x in heads)
    ):
        heads = [heads]  # type: ignore[list-item]
    checked = [check_head(model, head) for head in heads]
    return list(dict.fromkeys(checked))


def all_heads(model: Any) -> list[Head]:
    shape = model_shape(model)
    return [Head(layer, head) for layer in range(shape.n_layers) for head in range(shape.n_heads)]


def heads_by_layer(heads: Iterable[Head]) -> dict[int, list[int]]:
    """``{layer: [head indices]}`` in layer order, for one hook per layer."""
    grouped: dict[int, list[int]] = {}
    for head in sorted(heads):
        grouped.setdefault(head.layer, []).append(head.head)
    return grouped


def check_head_hooks(model: Any) -> None:
    """Raise when a model lacks the per-head hooks that every detector relies on."""
    hook_dict = getattr(model, "hook_dict", None)
    if hook_dict is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a TransformerLens TransformerBridge; load it with "
            f"headscope.load_model(...)."
        )
    missing = [hook_name(0, kind) for kind in REQUIRED_HOOKS if hook_name(0, kind) not in hook_dict]
    if missing:
        raise UnsupportedModelError(
            f"This model's architecture exposes no per-head attention hooks ({', '.join(missing)} are "
            f"missing), so headscope cannot score or edit its heads. Use a model whose TransformerLens "
            f"adapter has a standard attention block (Llama, GPT-2, Qwen, Gemma, ...)."
        )
