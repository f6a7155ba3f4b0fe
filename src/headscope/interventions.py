"""Interventions on heads as context managers that always restore the model.

Every function here returns a context manager. Inside the ``with`` block the model runs with the
change; after it, or after an exception inside it, the hooks are gone and the model gives
bit-identical logits to before. Several compose in one statement::

    with hs.ablate(model, heads, method="mean"), hs.add_vector(model, v, layer=12):
        logits = model(tokens)

What each acts on (``../shared/PAPERS.md`` explains why the three ablations differ):

========================  =====================  ==========================================
function                  hook                   acts on
========================  =====================  ==========================================
``ablate(zero|mean|...)`` ``hook_z``             one query head's output (before ``W_O``)
``ablate(uniform)``       query (pre-RoPE)*      one query head's pattern → uniform over prefix
``scale_output``          ``hook_z``             one query head's output
``scale_values``          ``hook_z`` or ``hook_v``  one query head (``per="query_head"``, exact:
                                                 z = pattern · V is linear in V) or a whole KV
                                                 group (``per="kv_group"``)
``scale_query``           query (pre-RoPE)*      one query head's query
``add_vector``            residual / head hooks  a layer's residual stream or a head's output
``DecodeMask``            as ``ablate``          decode steps only (prefill clean): retrieval
``remove_sink``           ``hook_pattern``       one query head's pattern: no attention on
                                                 position 0 from later queries, each row
                                                 re-normalised over its other keys
``ablate_direction``      residual stream**      a direction removed from the residual stream
                                                 at every layer and position (Arditi et al.)
========================  =====================  ==========================================

(*) ``hook_q``, or ``hook_q_normed`` where the model normalises queries (QK-norm: Gemma 3, Qwen3,
OLMo-2): scaling before the norm would be undone by it. ``engine.architecture`` decides.
(**) every layer's ``hook_resid_pre``, ``hook_attn_out`` and ``hook_mlp_out`` (what attention and
the MLP add, after the post-norms of Gemma 2/3), and the last layer's ``hook_resid_post``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import operator
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, SupportsIndex, Union

import torch
from jaxtyping import Float
from torch import Tensor

from headscope.engine.architecture import head_hook, residual_stream_hooks
from headscope.engine.heads import (
    Head,
    check_heads,
    heads_by_layer,
    hook_name,
    kv_group,
    model_shape,
    residual_hook,
)
from headscope.engine.runner import run_batched
from headscope.engine.tokens import TokenBatch, as_token_batch
from headscope.errors import ArgumentError, InputError
from headscope.identity import RecentCache, model_identity

ABLATION_METHODS = ("zero", "mean", "resample", "uniform")
RESIDUAL_HOOKS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
DEFAULT_UNIFORM_EPSILON = 1e-5

HeadsLike = Union[Iterable[Union[Head, Sequence[int], str]], Head, Sequence[int], str]
HookList = list[tuple[str, Callable]]

# Mean head outputs over the shipped reference text ({layer: [n_heads, d_head]}), per model
# identity (name, weights hash, ...): the last few models only, never a model's old weights.
_DEFAULT_MEANS = RecentCache(size=4)


@contextlib.contextmanager
def hooked(model: Any, hooks: HookList) -> Iterator[Any]:
    """Run the block with forward hooks; they are removed on exit, also after an exception."""
    with model.hooks(fwd_hooks=hooks):
        yield model


def ablate(
    model: Any,
    heads: HeadsLike,
    method: str = "zero",
    reference: Any = None,
    epsilon: float = DEFAULT_UNIFORM_EPSILON,
    batch_size: Optional[int] = None,
    means: Optional[dict[int, Tensor]] = None,
    progress: Optional[bool] = None,
) -> contextlib.AbstractContextManager:
    """Ablate heads for the duration of a ``with`` block.

    Args:
        heads: ``Head`` objects, ``(layer, head)`` pairs or ``"L18H6"`` strings.
        method: ``"zero"`` (output set to 0), ``"mean"`` (output set to its mean over
            ``reference``, every real token but the BOS at position 0), ``"resample"`` (output
            taken from another prompt: row ``i`` of ``reference``, cycled, or, without a
            reference, the next row of the same batch), ``"uniform"`` (pre-RoPE query scaled by
            ``epsilon`` so the pattern becomes uniform over the causal prefix).
        reference: prompts or tokens for ``"mean"`` and ``"resample"``. For ``"mean"`` the
            default is a short English text shipped with headscope.
        means: for ``"mean"``, precomputed ``head_output_means`` (layer → [n_heads, d_head]) to
            use instead of a pass over ``reference`` (several ablations, one pass).
        progress: a bar while the means are computed (the rule of :mod:`headscope.engine.runner`).

    Raises:
        ArgumentError: no heads, or a non-positive or non-finite ``epsilon`` for ``"uniform"``.
    """
    checked = _needed_heads(model, heads, "ablate")
    if method == "zero":
        return scale_output(model, checked, 0.0)
    if method == "uniform":
        return scale_query(model, checked, _check_epsilon(epsilon, "ablate"))
    if method == "mean":
        if means is None:
            means = _mean_outputs(model, checked, reference, batch_size, progress)
        missing = sorted({h.layer for h in checked} - set(means))
        if missing:
            raise InputError(f"The precomputed means lack layers {missing}; compute them with head_output_means.")
        return _replace_outputs(model, checked, means)
    if method == "resample":
        return _resample(model, checked, reference, batch_size)
    raise InputError(f"The 'method' parameter of ablate must be one of {', '.join(ABLATION_METHODS)}; got {method!r}.")


def remove_sink(model: Any, heads: HeadsLike) -> contextlib.AbstractContextManager:
    """Take the attention sink away from heads for the duration of a ``with`` block: each head's
    query at position ``i >= 1`` puts no attention on position 0, and its row is re-normalised over
    the keys ``1..i`` (``A'[i, k] = A[i, k] / (1 - A[i, 0])``); query 0, which can attend only to
    itself, is left as it is. What Xiao et al. 2023 and Gu et al. 2024 ask of a sink: does the head
    need somewhere to park attention that it does not want to spend on a token?

    It acts on ``hook_pattern`` (``[batch, n_heads, query_pos, key_pos]``, one query head each, so
    the other query heads of a KV group are untouched). Rows are counted by absolute position: in a
    decoding step whose queries come after cached keys, every query is re-normalised. A row whose
    attention lay wholly on position 0 (the other keys underflowed to 0) becomes all zeros: the
    head writes nothing there. Batches are right-padded (position 0 is each row's first token).

    Args:
        heads: ``Head`` objects, ``(layer, head)`` pairs or ``"L18H6"`` strings.

    Returns:
        A context manager; the hooks are removed on exit, also after an exception.

    Raises:
        ArgumentError: no heads.
        HeadIndexError: a head outside the model.

    Example::

        with hs.remove_sink(model, scores.top_heads(5)):
            logits = model(tokens)
    """
    hooks: HookList = []
    for layer, indices in heads_by_layer(_needed_heads(model, heads, "remove_sink")).items():
        hooks.append((hook_name(layer, "pattern"), functools.partial(_without_first_key, indices=indices)))
    return hooked(model, hooks)


def _without_first_key(pattern: Float[Tensor, "batch n_heads query_pos key_pos"], hook: Any,
                       indices: list[int]) -> Float[Tensor, "batch n_heads query_pos key_pos"]:
    """``pattern`` with the rows of heads ``indices`` for queries at absolute position >= 1 moved
    off key 0 and re-normalised over the other keys (see :func:`remove_sink`)."""
    n_queries, n_keys = pattern.shape[-2], pattern.shape[-1]
    first = max(0, 1 - (n_keys - n_queries))  # the first query row at absolute position >= 1
    if first >= n_queries:
        return pattern
    out = pattern.clone()
    rows = out[:, indices, first:].float()  # [batch, selected, query_pos, key_pos]
    rows[..., 0] = 0.0
    rows = rows / rows.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    out[:, indices, first:] = rows.to(out.dtype)
    return out


def ablate_direction(model: Any, direction: Any) -> contextlib.AbstractContextManager:
    """Directional ablation (Arditi et al. 2024): inside the block the component along ``r̂`` is
    removed, ``x - (x·r̂) r̂``, from the residual stream at every layer and every position.

    Like Arditi et al.'s hooks on each block's input and on each attention and MLP output, it acts
    on every layer's ``hook_resid_pre``, ``hook_attn_out`` and ``hook_mlp_out`` (what attention and
    the MLP add to the stream: on Gemma 2/3 after their post-norms) and on the last layer's
    ``hook_resid_post`` (the final norm's input), so no layer reads ``r̂`` and none writes it.
    The hooks act on whatever positions a forward holds, so the ablation composes with KV-cached
    decoding: ``generate(model, prompts, intervention=lambda m: hs.ablate_direction(m, d))``.

    Args:
        direction: a ``RefusalDirection`` (its ``direction``) or a ``[d_model]`` tensor; it is
            normalised here.

    Returns:
        A context manager; the hooks are removed on exit, also after an exception.

    Raises:
        ArgumentError: a vector of the wrong shape, with NaN/inf entries, or of length 0.

    Example::

        direction = refusal_direction(capture_last_position(model, harmful), capture_last_position(model, harmless))
        with hs.ablate_direction(model, direction):
            logits = model(tokens)
    """
    vector = getattr(direction, "direction", direction)
    _check_vector(vector, model_shape(model).d_model, "the residual stream", "ablate_direction", argument="direction")
    length = float(vector.detach().double().norm())
    if not length > 0:
        raise ArgumentError("The 'direction' argument of ablate_direction is the zero vector, which has no direction "
                            "to remove; pass a non-zero vector, e.g. refusal_direction(harmful, harmless).")
    unit = (vector.detach().double() / length)

    def project_out(activation: Tensor, hook: Any) -> Tensor:
        work = activation if activation.dtype in (torch.float32, torch.float64) else activation.float()
        here = unit.to(work)  # [d_model]
        return (work - (work @ here)[..., None] * here).to(activation.dtype)

    return hooked(model, [(name, project_out) for name in direction_ablation_hooks(model)])


def direction_ablation_hooks(model: Any) -> list[str]:
    """The hooks :func:`ablate_direction` edits: every layer's ``resid_pre``, ``attn_out`` and
    ``mlp_out`` (where the model has them: an attention-only model has no MLP), then the last
    layer's ``resid_post``."""
    names = residual_stream_hooks(model)
    for layer in range(model_shape(model).n_layers):
        names += [residual_hook(layer, "attn_out"), residual_hook(layer, "mlp_out")]
    return [name for name in names if name in model.hook_dict]


def uniform_attention(model: Any, heads: HeadsLike, epsilon: float = DEFAULT_UNIFORM_EPSILON):
    """The Ships/Sahara and retrieval-head ablation: attention made uniform over the prefix
    (each head's pre-RoPE query times ``epsilon``, a small positive number)."""
    return scale_query(model, _needed_heads(model, heads, "uniform_attention"), _check_epsilon(epsilon, "uniform_attention"))


DECODE_MASK_METHODS = ("uniform", "zero", "mean")


@dataclass(frozen=True)
class DecodeMask:
    """Heads ablated at decode steps only; the prompt's prefill stays clean.

    The retrieval-head paper's masking (Wu et al. 2024): at every generated token the masked
    heads attend uniformly over the whole context (``method="uniform"``, query × ``epsilon``),
    or their output is zeroed (``"zero"``) or set to its mean (``"mean"``). Decoding functions
    (``headscope.engine.decoding``) enter it around decode steps; ``with mask(model):`` applies it
    to every position of an ordinary forward.
    """

    heads: tuple[Head, ...]
    method: str = "uniform"
    epsilon: float = DEFAULT_UNIFORM_EPSILON

    def __call__(self, model: Any) -> contextlib.AbstractContextManager:
        return ablate(model, self.heads, method=self.method, epsilon=self.epsilon)


def mask_at_decode(
    model: Any, heads: HeadsLike, method: str = "uniform", epsilon: float = DEFAULT_UNIFORM_EPSILON
) -> DecodeMask:
    """A checked :class:`DecodeMask` for ``model`` (heads in range, a known method)."""
    if method not in DECODE_MASK_METHODS:
        raise InputError(f"Unknown decode-time mask {method!r}: the 'method' parameter of mask_at_decode must be one "
                         f"of {', '.join(DECODE_MASK_METHODS)}.")
    return DecodeMask(tuple(_needed_heads(model, heads, "mask_at_decode")), method, _check_epsilon(epsilon, "mask_at_decode"))


def ablate_per_row(
    model: Any,
    head_sets: Sequence[Optional[HeadsLike]],
    method: str = "zero",
    epsilon: float = DEFAULT_UNIFORM_EPSILON,
) -> contextlib.AbstractContextManager:
    """Row ``i`` of every batch run inside the block has ``head_sets[i]`` ablated (``None``: clean).

    Several ablations in one batched run: worth it where a run is bound by per-call overhead,
    as in KV-cached decoding. Methods: ``"zero"`` and ``"mean"`` on ``hook_z``, ``"uniform"`` on
    the pre-RoPE ``hook_q`` (query × ``epsilon``). Batches must have ``len(head_sets)`` rows.
    """
    if method not in DECODE_MASK_METHODS:
        raise InputError(f"The 'method' parameter of ablate_per_row must be one of {', '.join(DECODE_MASK_METHODS)}; "
                         f"got {method!r}.")
    if method == "uniform":
        _check_epsilon(epsilon, "ablate_per_row")
    if len(head_sets) == 0:
        raise ArgumentError("The 'head_sets' argument of ablate_per_row is empty; pass one head set (or None for a "
                            "clean row) per row of the batches run inside the block.")
    shape = model_shape(model)
    ablated = torch.zeros(len(head_sets), shape.n_layers, shape.n_heads, dtype=torch.bool)
    for row, heads in enumerate(head_sets):
        for head in check_heads(model, heads) if heads is not None else []:
            ablated[row, head.layer, head.head] = True
    layers = sorted(set(torch.nonzero(ablated.any(dim=0))[:, 0].tolist()))
    means = _mean_outputs(model, [Head(layer, 0) for layer in layers], None, None) if method == "mean" else {}
    kind = "q" if method == "uniform" else "z"
    hooks: HookList = []
    for layer in layers:
        keep = (~ablated[:, layer]).float()  # [rows, heads]
        name, heads_view = head_hook(model, layer, kind)

        def mix(activation: Tensor, hook: Any, keep=keep, layer=layer, heads_view=heads_view) -> Tensor:
            if activation.shape[0] != keep.shape[0]:
                raise InputError(f"ablate_per_row has {keep.shape[0]} head sets but the batch has {activation.shape[0]} rows.")
            out = activation.clone()
            view = heads_view(out)  # [rows, pos, heads, d_head]
            weight = keep.to(activation)[:, None, :, None]  # [rows, 1, heads, 1]
            if method == "uniform":
                view.mul_(weight + (1 - weight) * epsilon)
            elif method == "mean":
                view.copy_(view * weight + (1 - weight) * means[layer].to(activation)[None, None])
            else:
                view.mul_(weight)
            return out

        hooks.append((name, mix))
    return hooked(model, hooks)


def per_row_ablation(
    head_sets: Sequence[Optional[HeadsLike]], method: str = "zero", epsilon: float = DEFAULT_UNIFORM_EPSILON,
) -> Callable[[Any, Sequence[int]], contextlib.AbstractContextManager]:
    """``enter(model, rows)``: :func:`ablate_per_row` with ``head_sets[i]`` for each prompt index
    ``i`` in ``rows`` (the prompts a batched run holds, in its row order): the ``row_intervention``
    of :func:`headscope.engine.generation.generate`, one head set (or None) per prompt."""

    def enter(model: Any, rows: Sequence[int]) -> contextlib.AbstractContextManager:
        missing = [row for row in rows if not 0 <= row < len(head_sets)]
        if missing:
            raise ArgumentError(f"per_row_ablation has {len(head_sets)} head sets, but a run holds prompt {missing[0]}: "
                                "give one head set (or None for a clean row) per prompt.")
        return ablate_per_row(model, [head_sets[row] for row in rows], method, epsilon)

    return enter


def scale_output(model: Any, heads: HeadsLike, factor: float) -> contextlib.AbstractContextManager:
    """Multiply each head's output (its ``hook_z`` slice) by ``factor``; 0 is zero ablation."""
    factor = _check_finite(factor, "factor", "scale_output")
    return _scale_slices(model, _needed_heads(model, heads, "scale_output"), "z", factor)


def scale_query(model: Any, heads: HeadsLike, factor: float) -> contextlib.AbstractContextManager:
    """Multiply each head's pre-RoPE query by ``factor`` (tiny factor → uniform attention)."""
    factor = _check_finite(factor, "factor", "scale_query")
    return _scale_slices(model, _needed_heads(model, heads, "scale_query"), "q", factor)


def scale_values(
    model: Any, heads: HeadsLike, factor: float, per: str = "query_head"
) -> contextlib.AbstractContextManager:
    """Multiply the value vectors a head reads by ``factor`` (Yu et al. 2023's intervention).

    ``per="query_head"`` scales the values as seen by that query head only. Since the head's
    output ``z = pattern · V`` is linear in ``V``, this is done exactly on its ``hook_z`` slice and
    leaves the other query heads of the KV group untouched. ``per="kv_group"`` scales ``hook_v``
    of the KV head, which changes every query head of the group (see ``kv_group``).
    """
    checked = _needed_heads(model, heads, "scale_values")
    factor = _check_finite(factor, "factor", "scale_values")
    if per == "query_head":
        return _scale_slices(model, checked, "z", factor)
    if per == "kv_group":
        shape = model_shape(model)
        kv_heads = sorted({Head(h.layer, h.head // shape.group_size) for h in checked})
        return _scale_slices(model, kv_heads, "v", factor)
    raise InputError(f"The 'per' parameter of scale_values must be 'query_head' or 'kv_group'; got {per!r}.")


def kv_groups_touched(model: Any, heads: HeadsLike) -> list[list[Head]]:
    """The query heads that ``scale_values(..., per="kv_group")`` changes, one list per KV head."""
    shape = model_shape(model)
    groups = sorted({(h.layer, h.head // shape.group_size) for h in _needed_heads(model, heads, "kv_groups_touched")})
    return [kv_group(model, layer, index) for layer, index in groups]


def add_vector(
    model: Any,
    vector: Float[Tensor, " d"],
    layer: int,
    hook: str = "resid_pre",
    positions: Optional[Union[SupportsIndex, Iterable[SupportsIndex]]] = None,
    head: Optional[Union[Head, Sequence[int], str]] = None,
    scale: float = 1.0,
) -> contextlib.AbstractContextManager:
    """Add ``scale * vector`` to an activation at ``positions`` (all positions when None).

    Without ``head``: ``vector`` has ``d_model`` entries and ``hook`` is one of
    ``resid_pre``, ``resid_mid``, ``resid_post``, ``attn_out``, ``mlp_out`` of ``layer``.
    With ``head``: ``vector`` has ``d_head`` entries and is added to that head's output
    (``hook_z``, before ``W_O``) — or ``hook="q"`` to its pre-RoPE query input.
    Negative positions count from each row's end of the padded batch (``-1`` = last column).
    Subtract a direction with ``scale=-1``.

    Raises:
        ArgumentError: a vector of the wrong shape or with NaN/inf entries, a non-finite ``scale``,
            positions that are not integers; and, in the forward pass, a position outside the
            sequence (the hooks are removed as the error leaves the ``with`` block).
    """
    shape = model_shape(model)
    scale = _check_finite(scale, "scale", "add_vector")
    if head is not None:
        (target,) = check_heads(model, [head])
        if target.layer != layer:
            raise ArgumentError(f"The 'head' argument of add_vector, {target}, is not in layer {layer}; pass "
                                f"layer={target.layer} or a head of layer {layer}.")
        kind = "z" if hook == "resid_pre" else hook
        if kind not in ("z", "q"):
            raise InputError(f"The 'hook' parameter of add_vector for a head must be 'z' (its output) or 'q' (its "
                             f"query); got {hook!r}.")
        _check_vector(vector, shape.d_head, f"a head's {kind}", "add_vector")
        name, head_index = hook_name(layer, kind), target.head
    else:
        if hook not in RESIDUAL_HOOKS:
            raise InputError(f"The 'hook' parameter of add_vector must be one of {', '.join(RESIDUAL_HOOKS)}; "
                             f"got {hook!r}.")
        if not 0 <= layer < shape.n_layers:
            raise ArgumentError(f"The 'layer' argument of add_vector, {layer}, is out of range: this model has "
                                f"layers 0..{shape.n_layers - 1}.")
        _check_vector(vector, shape.d_model, "the residual stream", "add_vector")
        name, head_index = f"blocks.{layer}.hook_{hook}", None
    delta = vector.detach() * scale
    index = _check_positions(positions, "add_vector")

    def add(activation: Tensor, hook: Any) -> Tensor:
        activation = activation.clone()
        if index is not None:
            _positions_in_range(index, activation.shape[1], "add_vector")
        rows = slice(None) if index is None else list(index)
        if head_index is None:
            activation[:, rows] += delta.to(activation)
        else:
            activation[:, rows, head_index] += delta.to(activation)
        return activation

    return hooked(model, [(name, add)])


def swap_feature(
    vector: Float[Tensor, "... d"], remove: Float[Tensor, " d"], add: Float[Tensor, " d"], scale: float = 1.0
) -> Float[Tensor, "... d"]:
    """Vector arithmetic on a representation: ``vector - scale * remove + scale * add`` (e.g. a
    number's effective embedding with its mod-10 feature ``f_a`` swapped for ``f_b``)."""
    scale = _check_finite(scale, "scale", "swap_feature")
    return vector - scale * remove.to(vector) + scale * add.to(vector)


def edit(
    model: Any,
    remove: Float[Tensor, " d_model"],
    add: Float[Tensor, " d_model"],
    layer: int,
    positions: Optional[Union[SupportsIndex, Iterable[SupportsIndex]]] = None,
    scale: float = 1.0,
) -> contextlib.AbstractContextManager:
    """Swap feature ``remove`` for ``add`` in the residual stream entering ``layer`` at ``positions``
    (the in-prompt form of :func:`swap_feature`)."""
    d_model = model_shape(model).d_model
    _check_vector(remove, d_model, "the residual stream", "edit", argument="remove")
    _check_vector(add, d_model, "the residual stream", "edit", argument="add")
    return add_vector(model, add.detach().float() - remove.detach().float(), layer, "resid_pre", positions, scale=scale)


def _check_vector(vector: Tensor, size: int, where: str, caller: str, argument: str = "vector") -> None:
    """A 1-D tensor of ``size`` finite entries, or ``ArgumentError`` naming ``argument``."""
    if not isinstance(vector, Tensor) or vector.ndim != 1 or vector.shape[0] != size:
        got = tuple(vector.shape) if isinstance(vector, Tensor) else type(vector).__name__
        raise ArgumentError(f"The {argument!r} argument of {caller} is a vector for {where} and must have shape "
                            f"({size},), got {got}.")
    finite = torch.isfinite(vector.detach())
    if not bool(finite.all()):
        raise ArgumentError(
            f"The {argument!r} argument of {caller} has {int((~finite).sum())} NaN or infinite entries (first at "
            f"index {int((~finite).nonzero()[0, 0])}); they would make every logit NaN. Pass a finite vector, "
            f"e.g. torch.nan_to_num({argument}).")


def _check_finite(value: Any, argument: str, caller: str) -> float:
    """``value`` as a float, or ``ArgumentError`` when it is not a finite number."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ArgumentError(f"The {argument!r} parameter of {caller} must be a finite number; got {value!r}.") from None
    if not math.isfinite(number):
        raise ArgumentError(f"The {argument!r} parameter of {caller} must be a finite number; got {value!r}, which "
                            "would make the logits NaN or infinite. Pass a finite number.")
    return number


def _check_epsilon(epsilon: Any, caller: str) -> float:
    """A finite ``epsilon > 0`` (the query scale that makes attention uniform), else ``ArgumentError``."""
    number = _check_finite(epsilon, "epsilon", caller)
    if number <= 0:
        raise ArgumentError(f"The 'epsilon' parameter of {caller} scales queries to make attention uniform and must "
                            f"be a small positive number; got {epsilon!r}. The default is {DEFAULT_UNIFORM_EPSILON}.")
    return number


def _needed_heads(model: Any, heads: HeadsLike, caller: str) -> list[Head]:
    """``check_heads`` that also refuses an empty list: an intervention on no head does nothing."""
    checked = check_heads(model, heads)
    if not checked:
        raise ArgumentError(f"The 'heads' argument of {caller} is empty, so the intervention would change nothing; "
                            "pass at least one head, e.g. [(0, 1)] or scores.top_heads(5).")
    return checked


def _check_positions(positions: Any, caller: str) -> Optional[list[int]]:
    """None (every position), or a non-empty list of integer positions."""
    if positions is None:
        return None
    values = [positions] if isinstance(positions, int) else positions
    try:
        values = list(values)
    except TypeError:
        values = [values]
    try:
        if not values or any(isinstance(p, bool) for p in values):
            raise TypeError
        return [operator.index(p) for p in values]
    except TypeError:
        raise ArgumentError(f"The 'positions' argument of {caller} must be an integer or a non-empty list of "
                            f"integers (negative counts from the end), or None for every position; got {positions!r}.") from None


def _positions_in_range(positions: list[int], width: int, caller: str) -> None:
    """Raised inside the forward pass, where the sequence length is known."""
    bad = [p for p in positions if not -width <= p < width]
    if bad:
        raise ArgumentError(f"The 'positions' argument of {caller} holds {', '.join(map(str, bad))}, outside this "
                            f"run's {width} positions (valid: {-width}..{width - 1}); pass positions within the "
                            "prompt, e.g. -1 for the last.")


def _scale_slices(model: Any, heads: Sequence[Head], kind: str, factor: float):
    """One hook per layer multiplying the listed head slices of ``hook_{kind}`` by ``factor``."""
    hooks: HookList = []
    for layer, indices in heads_by_layer(heads).items():
        name, heads_view = head_hook(model, layer, kind)

        def scale(activation: Tensor, hook: Any, indices=indices, heads_view=heads_view) -> Tensor:
            activation = activation.clone()
            heads_view(activation)[:, :, indices] *= factor  # [batch, pos, heads, d_head] view
            return activation

        hooks.append((name, scale))
    return hooked(model, hooks)


def _replace_outputs(model: Any, heads: Sequence[Head], means: dict[int, Tensor]):
    """Set each head's ``hook_z`` slice to a fixed ``[d_head]`` vector (mean ablation)."""
    hooks: HookList = []
    for layer, indices in heads_by_layer(heads).items():
        values = means[layer][indices]  # [n_selected, d_head]

        def replace(activation: Tensor, hook: Any, indices=indices, values=values) -> Tensor:
            activation = activation.clone()
            activation[:, :, indices] = values.to(activation)
            return activation

        hooks.append((hook_name(layer, "z"), replace))
    return hooked(model, hooks)


def head_output_means(
    model: Any, layers: Iterable[int], reference: Any, batch_size: Optional[int] = None, progress: Optional[bool] = None
) -> dict[int, Float[Tensor, "n_heads d_head"]]:
    """Mean of ``hook_z`` per head over every real token of ``reference`` except position 0.

    ``progress``: a bar "mean head outputs" (the rule of :mod:`headscope.engine.runner`)."""
    layers = sorted(set(layers))
    batch = as_token_batch(model, reference)
    names = output_mean_hooks(layers)
    totals = run_batched(model, batch, lambda logits, cache, chunk: head_output_sums(cache, chunk, names), names=names,
                         batch_size=batch_size, progress=progress, desc=f"mean head outputs ({len(layers)} layers)",
                         logits="last")
    return means_from_sums(totals, layers)


def output_mean_hooks(layers: Iterable[int]) -> list[str]:
    """The hooks :func:`head_output_sums` reads: ``hook_z`` of each layer, in layer order."""
    return [hook_name(layer, "z") for layer in sorted(set(layers))]


def head_output_sums(cache: dict, chunk: TokenBatch, names: Sequence[str]) -> dict[str, Tensor]:
    """One chunk's part of :func:`head_output_means`: per row, each hook's ``hook_z`` summed over
    the real tokens after position 0 (``[rows, n_heads, d_head]``), and the tokens counted
    (``"count"``). Any run that caches ``names`` can feed it (validation folds it into its clean run)."""
    weight = chunk.attention_mask.clone().float()
    weight[:, 0] = 0.0  # the BOS / first token is an attention sink, not typical
    out = {"count": weight.sum(dim=1)}
    for name in names:  # each layer's z on its own device (a split model): summed there
        z = cache[name].float()
        out[name] = torch.einsum("bp,bphd->bhd", weight.to(z.device), z).to(weight.device)
    return out


def means_from_sums(totals: dict[str, Tensor], layers: Iterable[int]) -> dict[int, Float[Tensor, "n_heads d_head"]]:
    """The per-layer means from :func:`head_output_sums` concatenated over every chunk."""
    count = totals["count"].sum()
    if float(count) < 1:
        raise InputError("The reference for mean ablation has no tokens after the first; give longer prompts.")
    layers = sorted(set(layers))
    return {layer: totals[name].sum(dim=0) / count for layer, name in zip(layers, output_mean_hooks(layers), strict=True)}


def _mean_outputs(model, heads, reference, batch_size, progress: Optional[bool] = None) -> dict[int, Tensor]:
    layers = {head.layer for head in heads}
    if reference is not None:
        return head_output_means(model, layers, reference, batch_size, progress)
    cached = _DEFAULT_MEANS.get_or_set(model_identity(model), dict)
    missing = sorted(layers - cached.keys())
    if missing:
        cached.update(head_output_means(model, missing, default_reference_text(), batch_size, progress))
    return cached


def default_reference_text() -> list[str]:
    """The shipped English paragraphs used as the default mean-ablation reference."""
    text = resources.files("headscope.tasks").joinpath("data/reference_text.txt").read_text("utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _resample(model: Any, heads: Sequence[Head], reference: Any, batch_size: Optional[int]):
    """Each head's output taken from another prompt (see ``ablate``)."""
    grouped = heads_by_layer(heads)
    names = {layer: hook_name(layer, "z") for layer in grouped}
    donors: Optional[dict[int, Tensor]] = None
    if reference is not None:
        batch = as_token_batch(model, reference)

        def keep(logits: Tensor, cache: dict, chunk: TokenBatch) -> dict[str, Tensor]:
            width = batch.tokens.shape[1]
            out = {}
            for layer, indices in grouped.items():
                z = cache[names[layer]][:, :, indices]
                out[names[layer]] = torch.nn.functional.pad(z, (0, 0, 0, 0, 0, width - z.shape[1]))
            return out

        cached = run_batched(model, batch, keep, names=list(names.values()), batch_size=batch_size, logits="last")
        donors = {layer: cached[names[layer]] for layer in grouped}

    hooks: HookList = []
    for layer, indices in grouped.items():

        def swap(activation: Tensor, hook: Any, layer=layer, indices=indices) -> Tensor:
            activation = activation.clone()
            batch_rows, width = activation.shape[0], activation.shape[1]
            if donors is None:
                if batch_rows < 2:
                    raise InputError(
                        "Resample ablation without a reference takes each head's output from the "
                        "next prompt of the batch, so it needs at least 2 prompts; pass reference=..."
                    )
                activation[:, :, indices] = activation[:, :, indices].roll(1, dims=0)
                return activation
            donor = donors[layer]
            if donor.shape[1] < width:
                raise InputError(
                    f"The resample reference has {donor.shape[1]} positions but the run has {width}; "
                    f"give reference prompts at least as long as the inputs."
                )
            rows = torch.arange(batch_rows) % donor.shape[0]
            activation[:, :, indices] = donor[rows, :width].to(activation)
            return activation

        hooks.append((names[layer], swap))
    return hooked(model, hooks)
