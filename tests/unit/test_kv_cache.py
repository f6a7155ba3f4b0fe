"""The KV cache under TransformerLens bridges: filled and read in every family, guarded when not."""

from __future__ import annotations

import contextlib

import pytest
import torch

from headscope.engine.decoding import Prefix, greedy_decode
from headscope.engine.generation import generate
from headscope.engine.kv_cache import _alias_cache, cache_kwarg_alias, step_mismatch
from headscope.errors import CacheMismatchError
from tests.conftest import active_hooks, tiny_llama_folder
from tests.families import FAMILIES, tiny_family_model

PROMPT = torch.tensor([0, 5, 9, 12, 5, 9, 30, 41, 7, 5, 9, 12, 50, 3])


def alias_hooks(model) -> int:
    return sum(hook is _alias_cache for module in model.modules() for hook in module._forward_pre_hooks.values())


def rerun_decode(model, prompt, steps):
    """Greedy decoding by re-running the whole sequence each step (no cache)."""
    sequence = prompt.clone()
    for _ in range(steps):
        with torch.no_grad():
            token = model(sequence[None])[0, -1].argmax()
        sequence = torch.cat([sequence, token[None]])
    return sequence[prompt.numel():].tolist()


@pytest.mark.parametrize("architecture", FAMILIES)
def test_cached_decoding_equals_rerunning_the_prefix_in_every_family(architecture):
    model = tiny_family_model(architecture)
    prefix = Prefix(model, PROMPT, chunk_size=4)  # a prefill in four chunks reads its own cache too
    assert prefix.cache.get_seq_length() == PROMPT.numel() - 1
    assert greedy_decode(model, prefix, max_new_tokens=6).tokens.tolist() == rerun_decode(model, PROMPT, 6)
    assert alias_hooks(model) == 0  # removed after each use


def _drop_cache(module, args, kwargs):
    return args, {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "layer_past")}


def _fresh_cache_at_decode_steps(module, args, kwargs):
    """Hand single-token steps an empty cache: the prefill is written, the decode reads nothing."""
    from transformers import DynamicCache

    hidden = kwargs.get("hidden_states", args[0] if args else None)
    if hidden is not None and hidden.shape[1] == 1:
        cache = DynamicCache()
        kwargs = {**kwargs, **{k: cache for k in ("cache", "past_key_values") if kwargs.get(k) is not None}}
    return args, kwargs


@contextlib.contextmanager
def attention_pre_hook(model, hook):
    """``hook`` on every attention module, registered after (so run after) headscope's alias."""
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    modules = [m for m in model.modules() if isinstance(m, AttentionBridge)]
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True, prepend=False) for m in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@pytest.fixture
def fresh_llama(tmp_path):
    import headscope as hs

    return hs.load_model(tiny_llama_folder(tmp_path / "llama"), device="cpu")


def test_a_cache_that_was_not_filled_is_an_error_naming_the_versions(fresh_llama):
    from importlib.metadata import version

    with attention_pre_hook(fresh_llama, _drop_cache):
        with pytest.raises(CacheMismatchError, match="holds 0 positions, expected 13") as error:
            Prefix(fresh_llama, PROMPT)
        with pytest.raises(CacheMismatchError, match="holds 0 positions"):
            generate(fresh_llama, [PROMPT.tolist(), PROMPT[:9].tolist()], max_new_tokens=3)
    message = str(error.value)
    assert f"transformers {version('transformers')}" in message
    assert f"transformer-lens {version('transformer-lens')}" in message


def test_a_cache_that_is_not_read_is_an_error(fresh_llama):
    with attention_pre_hook(fresh_llama, _fresh_cache_at_decode_steps):
        with pytest.raises(CacheMismatchError, match="written but not read correctly with transformers"):
            Prefix(fresh_llama, PROMPT)
        with pytest.raises(CacheMismatchError, match="written but not read"):
            generate(fresh_llama, [PROMPT.tolist(), PROMPT[:9].tolist()], max_new_tokens=3)
    assert active_hooks(fresh_llama) == 0


def test_the_read_check_runs_once_per_model_and_path(fresh_llama):
    Prefix(fresh_llama, PROMPT)  # verified here
    with attention_pre_hook(fresh_llama, _fresh_cache_at_decode_steps):
        Prefix(fresh_llama, PROMPT)  # not checked again: a broken read now goes unseen by design
    with attention_pre_hook(fresh_llama, _drop_cache), pytest.raises(CacheMismatchError):
        Prefix(fresh_llama, PROMPT)  # the length check still runs on every prefill


def test_step_mismatch_is_zero_for_equal_logits_and_large_for_different_ones():
    logits = torch.randn(2, 50)
    assert step_mismatch(logits, logits) == 0.0
    assert step_mismatch(torch.randn(2, 50), logits) > 0.5
    assert step_mismatch(torch.full((2, 50), float("nan")), logits) != step_mismatch(logits, logits)


def test_the_alias_hands_the_cache_to_bridges_that_compute_attention_themselves(fresh_llama):
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad(), cache_kwarg_alias(fresh_llama):
        fresh_llama(PROMPT[None], return_type="logits_and_cache", past_key_values=cache)
    assert cache.get_seq_length() == PROMPT.numel()
    assert alias_hooks(fresh_llama) == 0


def test_a_prompt_longer_than_a_chunk_is_verified_on_one_chunk(fresh_llama, monkeypatch):
    from headscope.engine import kv_cache

    verified_lengths = []
    real_step = Prefix._cached_last_step

    def recording(self):
        verified_lengths.append(self.prompt.numel())
        return real_step(self)

    monkeypatch.setattr(Prefix, "_cached_last_step", recording)
    long_prompt = torch.arange(40) % 60
    prefix = Prefix(fresh_llama, long_prompt, chunk_size=8)
    assert verified_lengths == [8] and kv_cache.is_verified(fresh_llama, "prefix")  # one chunk, not 40 tokens
    assert prefix.cache.get_seq_length() == 39
    assert greedy_decode(fresh_llama, prefix, 3).tokens.tolist() == rerun_decode(fresh_llama, long_prompt, 3)
    Prefix(fresh_llama, long_prompt, chunk_size=8)
    assert verified_lengths == [8]  # once per model
