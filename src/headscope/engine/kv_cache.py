"""The Hugging Face KV cache under TransformerLens bridges: one fix for a version skew, and guards.

**The skew.** From transformers 5.24 the decoder layers hand the KV cache to their attention
module as ``cache=``; TransformerLens 4.3's attention bridges that compute attention themselves
(rotary models: Llama, Qwen, Gemma, Mistral, ...) read only ``past_key_values`` / ``layer_past``.
The prefill then writes nothing into the cache and every decode step attends to itself alone,
with no error anywhere. :func:`cache_kwarg_alias` hands those bridges the cache under the name they
read, for the duration of a ``with`` block, whatever the transformers version (a no-op where the
layers still pass ``past_key_values``). Bridges that delegate attention to the Hugging Face module
(GPT-2 and friends) get the cache through to Hugging Face unchanged and need nothing.

**The guards.** Every prefill is checked (:func:`check_filled`): the cache must hold as many
positions as the prompt has tokens. The first cached decode of each model and version set is also
compared with a plain forward (:func:`verify_cached_step`): a cache that is written but not read
shows up as different next-token logits. Either failure raises :class:`CacheMismatchError` naming
the installed transformers and TransformerLens versions, never a plausible-looking decode.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from typing import Any, Callable, Iterator

import torch
from jaxtyping import Float
from torch import Tensor

from headscope.errors import CacheMismatchError
from headscope.versions import installed_version

# How far a cached step's logits may sit from a plain forward's, as a share of the plain logits'
# spread (standard deviation over the vocabulary). Float32 runs agree to ~1e-6 of it; a cache that
# is not read moves the logits by about their whole spread.
STEP_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-3, torch.float16: 5e-2, torch.bfloat16: 5e-2}

_verified: "weakref.WeakKeyDictionary[Any, set[str]]" = weakref.WeakKeyDictionary()


def library_versions() -> str:
    """``"transformers X, transformer-lens Y, torch Z"`` as installed."""
    return ", ".join(f"{name} {installed_version(name) or 'not installed'}"
                     for name in ("transformers", "transformer-lens", "torch"))


def _attention_bridges(model: Any) -> list[torch.nn.Module]:
    """The bridge's attention components that compute attention themselves (and so read the
    cache themselves through ``_update_kv_cache``)."""
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    return [
        module
        for module in model.modules()
        if isinstance(module, AttentionBridge) and type(module).forward is not AttentionBridge.forward
    ]


def _alias_cache(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    if kwargs.get("cache") is not None and kwargs.get("past_key_values") is None:
        kwargs = {**kwargs, "past_key_values": kwargs["cache"]}
    return args, kwargs


@contextlib.contextmanager
def cache_kwarg_alias(model: Any) -> Iterator[None]:
    """Within the block, attention bridges that read ``past_key_values`` also get a cache that
    transformers passes as ``cache=`` (transformers >= 5.24). The hooks are removed on exit, also
    after an exception."""
    handles = [
        module.register_forward_pre_hook(_alias_cache, with_kwargs=True) for module in _attention_bridges(model)
    ]
    try:
        with warnings.catch_warnings():
            # TransformerLens passes the cache as past_key_values, which transformers >= 5.24 renames.
            warnings.filterwarnings("ignore", message="`past_key_values` is deprecated", category=FutureWarning)
            yield
    finally:
        for handle in handles:
            handle.remove()


def check_filled(cache: Any, expected_length: int, what: str = "the prompt") -> None:
    """Raise :class:`CacheMismatchError` unless ``cache`` holds ``expected_length`` positions."""
    held = int(cache.get_seq_length())
    if held != expected_length:
        raise CacheMismatchError(
            f"After the prefill of {what} the KV cache holds {held} positions, expected {expected_length}: "
            f"this combination of libraries does not fill the cache ({library_versions()}). Install the "
            "versions in headscope's lock (bash scripts/install.sh) or report the combination."
        )


def step_mismatch(
    cached: Float[Tensor, "batch d_vocab"], plain: Float[Tensor, "batch d_vocab"]
) -> float:
    """The largest difference between cached and plain logits, as a share of the plain logits'
    spread over the vocabulary (0 for identical logits)."""
    cached, plain = cached.float(), plain.float()
    spread = plain.std(dim=-1, keepdim=True).clamp_min(1e-6)
    return float(((cached - plain).abs() / spread).max())


def check_step(
    cached: Float[Tensor, "batch d_vocab"], plain: Float[Tensor, "batch d_vocab"], dtype: torch.dtype
) -> None:
    """Raise :class:`CacheMismatchError` when a cached step's logits differ from a plain forward's."""
    mismatch = step_mismatch(cached, plain)
    tolerance = STEP_TOLERANCE.get(dtype, 5e-2)
    if not mismatch <= tolerance:  # also catches NaN
        raise CacheMismatchError(
            f"A KV-cached decode step gives logits {mismatch:.3g} (in units of the logits' spread; "
            f"allowed {tolerance:g}) away from a plain forward over the same tokens: the cache is "
            f"written but not read correctly with {library_versions()}. Install the versions in "
            "headscope's lock (bash scripts/install.sh) or report the combination."
        )


def verify_once(model: Any, path: str, cached: Callable[[], Tensor], plain: Callable[[], Tensor]) -> None:
    """The first time a model runs a cached decode along ``path`` ("prefix", "padded"), compare the
    last-position logits of ``cached()`` (a step that reads the cache) with ``plain()`` (the same
    tokens without a cache); later calls return at once. Whether a cache is read correctly depends
    on the libraries and the code path, not on the prompt, so one check per model and path guards
    every later decode (each prefill's length is checked every time by :func:`check_filled`)."""
    if is_verified(model, path):
        return
    with torch.no_grad():
        check_step(cached(), plain(), next(model.parameters()).dtype)
    _verified.setdefault(model, set()).add(path)


def is_verified(model: Any, path: str) -> bool:
    """Whether :func:`verify_once` already checked ``model`` along ``path``."""
    return path in _verified.get(model, set())
