"""The architecture matrix: every family TransformerLens 4.3 bridges that transformers builds
offline, each as a tiny random model, held to the same exact checks (engine.architecture)."""

from __future__ import annotations

import pytest
import torch

import headscope as hs
from headscope.engine.architecture import architecture
from headscope.engine.heads import hook_name
from headscope.engine.unembed import attention_bias_contribution, head_contributions, logits_from_residual
from tests.conftest import active_hooks
from tests.families import FAMILIES, tiny_family_model

TOKENS = torch.tensor([[3, 5, 7, 9, 11, 13, 2, 4, 8, 10, 3, 5], [6, 1, 2, 9, 9, 40, 41, 5, 7, 30, 31, 12]])
HEADS = ["L0H1", "L1H2"]

# What each family is expected to be (so a silent change in detection fails a test).
EXPECTED = {
    "GPT2LMHeadModel": dict(final_norm="layernorm", positions="standard"),
    "GPTNeoXForCausalLM": dict(final_norm="layernorm", parallel_attn_mlp=True),
    "Gemma2ForCausalLM": dict(norm_offset=1.0, post_attention_norm=True, post_mlp_norm=True, embedding_scale=8.0,
                              logit_softcap=30.0),
    "Gemma3ForCausalLM": dict(norm_offset=1.0, post_attention_norm=True, post_mlp_norm=True, qk_norm=True,
                              query_layout="head_pos", embedding_scale=8.0),
    "Qwen3ForCausalLM": dict(qk_norm=True, query_layout="head_pos"),
    "Olmo2ForCausalLM": dict(qk_norm=True, query_layout="flat", post_attention_norm=True, post_mlp_norm=True),
    "PhiForCausalLM": dict(final_norm="layernorm", parallel_attn_mlp=True),
}
DEFAULTS = dict(final_norm="rmsnorm", norm_offset=0.0, post_attention_norm=False, post_mlp_norm=False, qk_norm=False,
                query_layout="pos_head", embedding_scale=1.0, logit_softcap=None, parallel_attn_mlp=False)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param, tiny_family_model(request.param)


def logits(model):
    with torch.no_grad():
        return model(TOKENS)


def test_the_adapter_reads_each_familys_quirks(family):
    name, model = family
    arch = architecture(model)
    expected = {**DEFAULTS, **EXPECTED.get(name, {})}
    got = {key: getattr(arch, key) for key in expected}
    assert got == pytest.approx(expected), name
    assert arch.family == name


@pytest.mark.parametrize("method", ["zero", "mean", "resample", "uniform"])
def test_interventions_restore_bit_identical_logits(family, method):
    _, model = family
    before, reference = logits(model), TOKENS.flip(0)  # resampling from the other row changes something
    with hs.ablate(model, HEADS, method=method, reference=reference):
        changed = logits(model)
    assert not torch.equal(changed, before)
    with pytest.raises(RuntimeError, match="inside"):
        with hs.ablate(model, HEADS, method=method, reference=reference):
            raise RuntimeError("inside")
    assert torch.equal(logits(model), before) and active_hooks(model) == 0


def test_remove_sink_leaves_no_attention_on_position_0_and_restores_the_model(family):
    """``hs.remove_sink`` on every family: the edited heads' queries after position 0 put nothing on
    it (rows still sum to 1), the logits change, and the model is restored exactly after the block."""
    _, model = family
    before = logits(model)
    names = [hook_name(layer, "pattern") for layer in range(2)]
    with hs.remove_sink(model, HEADS):
        changed, cache = model.run_with_cache(TOKENS, names_filter=names)
    assert not torch.equal(changed, before)
    for head in map(hs.Head.parse, HEADS):
        pattern = cache[hook_name(head.layer, "pattern")][:, head.head]
        assert float(pattern[:, 1:, 0].abs().max()) == 0.0
        torch.testing.assert_close(pattern.sum(-1), torch.ones_like(pattern.sum(-1)))
    assert torch.equal(logits(model), before) and active_hooks(model) == 0


def uniform_deviation(pattern):
    """Largest distance of each query row from uniform attention over its causal prefix."""
    size = pattern.shape[-1]
    causal = torch.tril(torch.ones(size, size))
    return float((pattern - causal / causal.sum(-1, keepdim=True)).abs().max())


def test_uniform_ablation_makes_attention_uniform(family):
    name, model = family
    patterns = [hook_name(layer, "pattern") for layer in range(2)]
    _, clean = model.run_with_cache(TOKENS, names_filter=patterns)
    with hs.ablate(model, HEADS, method="uniform"):
        _, ablated = model.run_with_cache(TOKENS, names_filter=patterns)
    for head in map(hs.Head.parse, HEADS):
        assert uniform_deviation(clean[patterns[head.layer]][:, head.head]) > 0.05, name  # there was something to flatten
        assert uniform_deviation(ablated[patterns[head.layer]][:, head.head]) <= 1e-4, name
    untouched = ablated[patterns[0]][:, 0]
    assert torch.allclose(untouched, clean[patterns[0]][:, 0])


def test_exact_scan_equals_the_naive_loop(family):
    _, model = family

    def metric(values, chunk):
        return values[:, -1, 5] - values[:, -1, 7]

    for method in ("zero", "uniform"):
        fast = hs.ablation_scan(model, TOKENS, metric, method=method, progress=False)
        naive = hs.naive_ablation_scan(model, TOKENS, metric, method=method, progress=False)
        assert torch.allclose(fast.values, naive.values, atol=1e-5), method


def test_zero_ablation_equals_zeroing_the_heads_slice_of_the_output_projection_input(family):
    name, model = family
    layer, head = 1, 2
    o_proj = model.blocks[layer].attn.o.original_component
    d_head = model.cfg.d_head

    def zero_slice(module, args):
        x = args[0].clone()
        x[..., head * d_head:(head + 1) * d_head] = 0
        return (x,)

    handle = o_proj.register_forward_pre_hook(zero_slice)
    try:
        by_hand = logits(model)
    finally:
        handle.remove()
    with hs.ablate(model, [f"L{layer}H{head}"], method="zero"):
        ablated = logits(model)
    assert torch.allclose(ablated, by_hand, atol=1e-5), name


def test_head_contributions_rebuild_attention_and_the_final_logits(family):
    name, model = family
    real, cache = model.run_with_cache(TOKENS)
    residual = cache["hook_embed"].float()
    if "hook_pos_embed" in cache:
        residual = residual + cache["hook_pos_embed"].float()
    for layer in range(2):
        attention = head_contributions(model, cache, layer).sum(dim=2) + attention_bias_contribution(model, cache, layer)
        actual = cache[f"blocks.{layer}.hook_attn_out"].float()
        assert torch.allclose(attention, actual, atol=1e-5 * actual.abs().max()), (name, layer)
        residual = residual + attention + cache[f"blocks.{layer}.hook_mlp_out"].float()
    rebuilt = logits_from_residual(model, residual, cache["ln_final.hook_scale"])
    assert (rebuilt - real).abs().max() <= 1e-4 * real.abs().max(), name


SMALL_TEMPLATES = dict(n_sequences=4, block_len=8, n_repeats=3, n_validation_sequences=4)
# Small settings; a random model knows no fact and retrieves no needle, so the settings that make
# those detectors score anyway are used here (their defaults' clear errors are tested below).
RUNNABLE = {
    "induction": SMALL_TEMPLATES, "previous_token": SMALL_TEMPLATES, "duplicate_token": SMALL_TEMPLATES,
    "successor": {}, "safety": dict(n_queries=4, max_new_tokens=4),
    "retrieval": dict(lengths=(300,), depths=(0, 100), max_new_tokens=4, format="plain", rouge_threshold=-1.0),
    "select_copy": dict(n_questions=40, n_dev=10, only_known=False),
    "copy_suppression": dict(tokens="all", n_tokens=40, text_length=24, n_sequences=2, n_validation_sequences=2),
    "name_mover": dict(names=tuple("ABCDEFGH"), n_prompts=8, n_validation=4),  # " A".." Z": single byte tokens
    "function_vector": dict(tasks=("letter_upper",), only_correct=False, n_prompts=2, n_mean_prompts=2,
                            n_validation_prompts=2),
    "truthfulness": dict(n_shuffles=1),
    "attention_sink": dict(text_length=16, n_sequences=4, n_validation_sequences=4),
}


@pytest.fixture(scope="module", params=FAMILIES)
def family_with_text(request):
    return request.param, tiny_family_model(request.param, with_tokenizer=True)


def test_every_detector_scores_every_family(family_with_text):
    from headscope.tasks.conflicts import RELATIONS, conflict_items

    name, model = family_with_text
    assert set(RUNNABLE) | {"memory_context"} == set(hs.list_detectors())
    for detector, settings in RUNNABLE.items():
        scores = hs.detect(model, detector, progress=False, **settings)
        assert scores.values.shape == (2, 4) and scores.values.isfinite().any(), (name, detector)
    facts = {"capital": list(RELATIONS["capital"].facts[:4])}  # as if the model knew them
    items = conflict_items(model, ("capital",), facts=facts)
    scores = hs.get_detector("memory_context").score(model, items=items, progress=False)
    assert scores.values.shape == (2, 4) and scores.values.isfinite().all(), name
    assert active_hooks(model) == 0


def test_detectors_that_cannot_score_a_random_model_say_why():
    model = tiny_family_model("Gemma3ForCausalLM", with_tokenizer=True)
    with pytest.raises(hs.EmptyResultError, match="memory_context detector found no conflict items"):
        hs.detect(model, "memory_context", progress=False)
    with pytest.raises(hs.EmptyResultError, match="retrieved none of 2 needles"):
        hs.detect(model, "retrieval", progress=False, **{**RUNNABLE["retrieval"], "rouge_threshold": 0.5})
    with pytest.raises(hs.InputError, match="Only 0 questions are left"):
        hs.detect(model, "select_copy", progress=False, n_questions=40, n_dev=10)


def test_attention_patterns_are_each_familys_own_attention(family_with_text):
    """hs.attention_patterns reads every family's query-head patterns: causal rows that sum to 1
    and equal the model's hook_pattern, with the prompt's tokens (the byte tokenizer's characters)."""
    name, model = family_with_text
    patterns = hs.attention_patterns(model, "abcab", heads=["L0H0", "L1H3"])
    _, cache = model.run_with_cache(hs.tokenize(model, "abcab").tokens)
    torch.testing.assert_close(patterns["L1H3"], cache["blocks.1.attn.hook_pattern"][0, 3].float())
    torch.testing.assert_close(patterns.values.sum(-1), torch.ones(2, len(patterns.tokens)))
    assert patterns.values.triu(diagonal=1).abs().max() == 0, name
    assert "".join(patterns.tokens[1:]) == "abcab" and active_hooks(model) == 0
