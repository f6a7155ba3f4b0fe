"""Running a model from a layer onwards, from a cached residual stream.

Ablating a head of layer ``l`` leaves layers ``< l`` untouched, so a scan caches the clean
residual stream entering every layer once and runs only blocks ``l, l+1, ...`` per head.
TransformerLens 4's ``forward(..., start_at_layer=l)`` swaps the residual in at block ``l`` but
still executes blocks ``0..l-1``; ``forward_from_layer`` makes those blocks return their input
unchanged for the duration of the call, so their cost is gone. ``check_forward_from_layer``
compares the result with a full run once per model, so an architecture whose blocks return
something else is refused instead of giving wrong numbers.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Iterator, Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor

from headscope.engine.devices import input_device
from headscope.errors import UnsupportedModelError

_CHECKED: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()
_ARITY: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()


def resid_pre_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_pre"


def _block_output_arity(model: Any) -> int:
    """0 when a block returns a tensor (Hugging Face >= 5), else the length of the tuple it returns."""
    if model in _ARITY:
        return _ARITY[model]
    seen: list[int] = []
    handle = model.blocks[0].register_forward_hook(
        lambda module, args, output: seen.append(len(output) if isinstance(output, tuple) else 0)
    )
    try:
        with torch.no_grad():
            model(torch.zeros((1, 2), dtype=torch.long, device=input_device(model)))
    finally:
        handle.remove()
    _ARITY[model] = seen[0]
    return seen[0]


def _pass_through(arity: int):
    """A block forward that returns its incoming hidden states in the block's own output form."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        return hidden if arity == 0 else (hidden,) + (None,) * (arity - 1)

    return forward


@contextlib.contextmanager
def blocks_skipped_below(model: Any, layer: int) -> Iterator[None]:
    """Blocks ``0..layer-1`` return their input (their hooks do not fire) inside the block."""
    skipped = list(model.blocks[:layer])
    forward = _pass_through(_block_output_arity(model)) if skipped else None
    for block in skipped:
        block.__dict__["forward"] = forward  # an instance attribute wins over the class method
    try:
        yield
    finally:
        for block in skipped:
            block.__dict__.pop("forward", None)


def forward_from_layer(
    model: Any,
    residual: Float[Tensor, "batch pos d_model"],
    layer: int,
    attention_mask: Optional[Int[Tensor, "batch pos"]] = None,
) -> Float[Tensor, "batch logit_pos vocab"]:
    """Logits of the model run from block ``layer`` on, given the residual entering it (at every
    position, ``logit_pos == pos``, unless a hook on the unembedding's input selects some)."""
    if layer == 0:
        residual = residual.clone()
    with blocks_skipped_below(model, layer):
        return model(residual, start_at_layer=layer, attention_mask=attention_mask)


def check_forward_from_layer(model: Any, tokens: Int[Tensor, "batch pos"], mask: Optional[Tensor]) -> None:
    """Once per model: a run from the middle layer must reproduce the full run's logits."""
    if _CHECKED.get(model):
        return
    layer = max(1, len(model.blocks) // 2)
    with torch.no_grad():
        full, cache = model.run_with_cache(
            tokens, attention_mask=mask, names_filter=[resid_pre_name(layer)], return_cache_object=False
        )
        try:
            partial = forward_from_layer(model, cache[resid_pre_name(layer)], layer, mask)
        except Exception as exc:
            raise UnsupportedModelError(
                f"This model cannot be run from layer {layer} ({type(exc).__name__}: {exc}); use the "
                f"naive scan (hs.ablation_scan(..., skip_layers=False))."
            ) from exc
    if not torch.allclose(full, partial, rtol=1e-4, atol=1e-4):
        raise UnsupportedModelError(
            f"Running this model from layer {layer} does not reproduce its full forward pass (max "
            f"difference {float((full - partial).abs().max()):.3g}), so layer-skipping scans would be "
            f"wrong for it. Use the naive scan (hs.ablation_scan(..., skip_layers=False))."
        )
    _CHECKED[model] = True
