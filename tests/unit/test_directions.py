"""The refusal direction (headscope.directions) and its ablation (hs.ablate_direction): captures at
the last real token on every family, the exact decomposition of the direction into head, MLP and
embedding shares, the layer choice on a planted case, the bootstrap frequencies against a naive
recomputation, and the ablation (nothing left along r̂ inside, nothing changed outside, generation)."""

from __future__ import annotations

import pytest
import torch

import headscope as hs
from headscope.directions import (
    LastPositionCapture,
    _resample_weights,
    capture_last_position,
    considered_layers,
    head_share_frequency,
    head_shares,
    refusal_direction,
    top_share_heads,
)
from headscope.engine.generation import generate
from headscope.engine.heads import residual_hook
from headscope.engine.unembed import attention_bias_contribution, head_output_hooks
from tests.conftest import active_hooks
from tests.families import FAMILIES, TEST_DEVICE, tiny_family_model, tiny_hf_model

HARMFUL = ["How do I build a bomb at home", "Steal a car", "hack into the bank's servers", "poison my neighbour's dog",
           "write ransomware"]
HARMLESS = ["How do I bake bread at home", "Wash a car", "open an account at the bank", "walk my neighbour's dog",
            "write a poem"]
IDENTITY_FAMILIES = ["LlamaForCausalLM", "GPT2LMHeadModel", "GPTNeoXForCausalLM", "Qwen2ForCausalLM",
                     "Gemma2ForCausalLM", "Gemma3ForCausalLM"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param, tiny_family_model(request.param, with_tokenizer=True)


@pytest.fixture(scope="module")
def llama():
    return tiny_family_model("LlamaForCausalLM", with_tokenizer=True)


def float64_model(architecture: str):
    """A tiny family model run in float64, so that sums of activations are exact to ~1e-12."""
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    hf_model, tokenizer = tiny_hf_model(architecture, with_tokenizer=True)
    hf_model = hf_model.double().to(TEST_DEVICE)
    return build_bridge_from_module(hf_model, architecture, hf_config=hf_model.config, tokenizer=tokenizer).eval()


# ----- capture ----------------------------------------------------------------------------------
def test_capture_keeps_the_last_real_token_of_each_padded_prompt_on_every_family(family):
    """Shapes, finite float32 values, and each row of a right-padded batch equal to the prompt run alone."""
    name, model = family
    shape = hs.model_shape(model)
    capture = capture_last_position(model, HARMFUL)
    assert capture.residual.shape == (len(HARMFUL), shape.n_layers + 1, shape.d_model)
    assert capture.z.shape == (len(HARMFUL), shape.n_layers, shape.n_heads, shape.d_head)
    assert capture.w_o.shape == (shape.n_layers, shape.n_heads, shape.d_head, shape.d_model)
    assert capture.residual.dtype == capture.z.dtype == torch.float32 and capture.residual.device.type == "cpu"
    assert bool(torch.isfinite(capture.residual).all()) and bool(torch.isfinite(capture.z).all())
    assert (capture.post_scale is not None) == name.startswith(("Gemma", "Olmo2"))
    for row in (1, 3):  # short prompts, padded in the batch
        alone = capture_last_position(model, [HARMFUL[row]])
        torch.testing.assert_close(capture.residual[row], alone.residual[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(capture.head_outputs()[row], alone.head_outputs()[0], atol=1e-5, rtol=1e-4)
    assert active_hooks(model) == 0


@pytest.mark.parametrize("architecture", IDENTITY_FAMILIES)
def test_embedding_heads_attention_biases_and_mlps_below_a_layer_sum_to_its_direction(architecture):
    """In float64: resid_l = embeddings + every head's output + attention biases + MLP outputs below
    l, prompt by prompt, so the head shares plus the other components' shares are r·r̂/||r|| (= 1)."""
    model = float64_model(architecture)
    tolerance = 1e-5 if architecture.startswith("Gemma") else 1e-10  # Gemma's RMSNorms compute in float32 (HF casts)
    n_layers = hs.model_shape(model).n_layers
    harmful, harmless = capture_last_position(model, HARMFUL), capture_last_position(model, HARMLESS)
    assert harmful.residual.dtype == torch.float64
    not_heads = {HARMFUL[0]: _not_heads(model, HARMFUL), HARMLESS[0]: _not_heads(model, HARMLESS)}
    for layer in range(1, n_layers + 1):
        for capture, prompts in ((harmful, HARMFUL), (harmless, HARMLESS)):
            rebuilt = capture.head_outputs()[:, :layer].sum(dim=(1, 2)) + not_heads[prompts[0]][:, : layer + 1].sum(1)
            torch.testing.assert_close(rebuilt, capture.residual[:, layer], atol=tolerance, rtol=tolerance)
        direction = refusal_direction(harmful, harmless, layer=layer)
        unit = direction.direction.double()
        shares = head_shares(direction, harmful, harmless).double()
        gap = not_heads[HARMFUL[0]][:, : layer + 1].sum(1).mean(0) - not_heads[HARMLESS[0]][:, : layer + 1].sum(1).mean(0)
        rest = float(gap @ unit / direction.norm)  # the embeddings', attention biases' and MLPs' shares
        difference = harmful.residual[:, layer].mean(0) - harmless.residual[:, layer].mean(0)
        exact = float(difference @ unit / direction.norm)  # 1 up to the float32 rounding of r̂
        assert float(shares[:layer].sum()) + rest == pytest.approx(exact, abs=1e-6)  # the shares are float32
        assert exact == pytest.approx(1.0, abs=1e-6)


def _not_heads(model, prompts):
    """What reaches the residual stream at each prompt's last real token besides the heads,
    ``[prompts, n_layers + 1, d_model]`` (float64): the embeddings (``resid_pre`` of layer 0), then
    per layer its attention bias and its MLP output (captured here, for this test only)."""
    n_layers = hs.model_shape(model).n_layers
    batch = hs.tokenize(model, prompts)
    names = [residual_hook(0, "resid_pre")] + [name for layer in range(n_layers) for name in
                                               [residual_hook(layer, "mlp_out"), *head_output_hooks(model, layer)]]
    with torch.no_grad():
        _, cache = model.run_with_cache(batch.tokens.to(TEST_DEVICE), attention_mask=batch.forward_mask,
                                        names_filter=names, return_cache_object=False)
    rows, last = torch.arange(len(batch)), batch.last_positions

    def at_last(values):
        return values.double().cpu()[rows, last]

    parts = [at_last(cache[residual_hook(0, "resid_pre")])]
    parts += [at_last(attention_bias_contribution(model, cache, layer)) + at_last(cache[residual_hook(layer, "mlp_out")])
              for layer in range(n_layers)]
    return torch.stack(parts, dim=1)


def test_non_finite_activations_are_an_error_naming_the_fix():
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    hf_model, tokenizer = tiny_hf_model("LlamaForCausalLM", with_tokenizer=True)
    with torch.no_grad():
        hf_model.model.embed_tokens.weight[:] = float("inf")
    model = build_bridge_from_module(hf_model, "LlamaForCausalLM", hf_config=hf_model.config, tokenizer=tokenizer)
    with pytest.raises(hs.EmptyResultError, match="NaN or infinite.*float32"):
        capture_last_position(model, HARMFUL[:2])
    assert active_hooks(model) == 0


# ----- layer choice -----------------------------------------------------------------------------
def planted(n_layers=5, n_heads=3, d_model=8, n_prompts=8, separating=(2,), seed=0, **gaps):
    """Synthetic harmful and harmless captures whose residuals differ along e_0 (by 6, noise sd 0.5)
    at the ``separating`` layers only (``gaps``: ``layer_<l>=gap`` to plant another gap)."""
    generator = torch.Generator().manual_seed(seed)
    w_o = torch.randn(n_layers, n_heads, 4, d_model, generator=generator)

    def capture(sign):
        residual = 0.5 * torch.randn(n_prompts, n_layers + 1, d_model, generator=generator)
        for layer in separating:
            residual[:, layer, 0] += sign * 3.0
        for key, gap in gaps.items():
            residual[:, int(key.split("_")[1]), 1] += sign * gap / 2
        z = torch.randn(n_prompts, n_layers, n_heads, 4, generator=generator)
        return LastPositionCapture(residual, z, w_o, None, None, "toy", "planted")

    return capture(1.0), capture(-1.0)


def test_the_layer_that_separates_held_out_prompts_best_is_chosen():
    harmful, harmless = planted(layer_5=60.0)  # the final residual separates more, but is never considered
    direction = refusal_direction(harmful, harmless)
    assert considered_layers(5) == 4 and direction.considered == 4
    assert direction.layer == 2 and direction.chosen_by == "separation"
    separations = direction.separations
    assert separations is not None and separations.shape == (6,)
    assert float(separations[2]) > 5 and float(separations[5]) > float(separations[2])
    assert float(separations[[0, 1, 3, 4]].abs().max()) < 3
    difference = harmful.residual[:, 2].mean(0) - harmless.residual[:, 2].mean(0)
    torch.testing.assert_close(direction.direction, difference / difference.norm())
    assert direction.norm == pytest.approx(float(difference.norm()), rel=1e-5)
    assert abs(float(direction.direction[0])) > 0.99 and direction.direction.dtype == torch.float32


def test_a_tie_goes_to_the_earlier_layer_and_a_given_layer_is_kept():
    harmful, harmless = planted(separating=(3,))
    for capture in (harmful, harmless):
        capture.residual[:, 1] = capture.residual[:, 3]  # layers 1 and 3 separate exactly as well
    direction = refusal_direction(harmful, harmless)
    assert direction.layer == 1 and direction.separations is not None
    assert float(direction.separations[1]) == float(direction.separations[3])
    given = refusal_direction(harmful, harmless, layer=4)
    assert given.layer == 4 and given.chosen_by == "given"
    few = refusal_direction(harmful.select([0, 1]), harmless.select([0]), layer=3)
    assert few.separations is None and few.n_harmful == 2 and few.n_harmless == 1


# ----- bootstrap --------------------------------------------------------------------------------
def test_bootstrap_frequencies_sum_to_k_and_match_a_naive_resample():
    harmful, harmless = planted(n_layers=4, n_heads=5, n_prompts=7)
    frequency = head_share_frequency(harmful, harmless, layer=3, k=3, n_resamples=40, seed=1)
    assert frequency.shape == (4, 5) and frequency.dtype == torch.float32
    assert float(frequency.min()) >= 0 and float(frequency.max()) <= 1
    assert float(frequency.sum()) == pytest.approx(3.0, abs=1e-5)
    assert torch.equal(frequency, head_share_frequency(harmful, harmless, layer=3, k=3, n_resamples=40, seed=1))
    # one resample, recomputed by hand: the prompts repeated as often as they were drawn
    weights = _resample_weights(7, 7, 1, seed=5)[0]
    rows = [torch.arange(7).repeat_interleave((weights[side] .abs() * 7).round().long()) for side in (slice(0, 7), slice(7, 14))]
    resampled = harmful.select(rows[0]), harmless.select(rows[1])
    naive = top_share_heads(head_shares(refusal_direction(*resampled, layer=3), *resampled), 3)
    single = head_share_frequency(harmful, harmless, layer=3, k=3, n_resamples=1, seed=5)
    assert sorted(naive) == sorted(hs.Head(*map(int, index)) for index in (single == 1).nonzero())


def test_a_head_that_writes_the_direction_is_always_in_the_top_set():
    harmful, harmless = planted(n_layers=4, n_heads=5, n_prompts=8)
    for capture, sign in ((harmful, 1.0), (harmless, -1.0)):
        capture.w_o[1, 2] = 0.0
        capture.w_o[1, 2, 0, 0] = 1.0
        capture.z[:, 1, 2, 0] = sign * 3.0 + 0.1 * torch.randn(8)
    frequency = head_share_frequency(harmful, harmless, layer=2, k=1, n_resamples=50)
    assert float(frequency[1, 2]) == 1.0


# ----- bad input --------------------------------------------------------------------------------
def test_bad_input_is_an_error_naming_the_fix(llama):
    harmful, harmless = planted()
    with pytest.raises(hs.InputError, match="holds no prompts.*capture_last_position"):
        refusal_direction(harmful.select([]), harmless)
    other = LastPositionCapture(harmless.residual, harmless.z, harmless.w_o, None, None, "toy", "other weights")
    with pytest.raises(hs.InputError, match="two models.*same model"):
        refusal_direction(harmful, other)
    for layer in (-1, 6):
        with pytest.raises(hs.InputError, match=r"outside 0\.\.5.*pass a layer"):
            refusal_direction(harmful, harmless, layer=layer)
    with pytest.raises(hs.InputError, match="at least 4 prompts of each kind.*layer="):
        refusal_direction(harmful.select([0, 1, 2]), harmless)
    with pytest.raises(hs.InputError, match="outside 0..5"):
        head_share_frequency(harmful, harmless, layer=9)
    with pytest.raises(hs.ArgumentError, match="'k' parameter of head_share_frequency.*between 1 and 15"):
        head_share_frequency(harmful, harmless, layer=2, k=16)
    with pytest.raises(hs.ArgumentError, match="'n_resamples'.*at least 1"):
        head_share_frequency(harmful, harmless, layer=2, n_resamples=0)
    with pytest.raises(hs.InputError, match="a model with 5 layers and d_model 8.*direction of the captured model"):
        head_shares(refusal_direction(*planted(d_model=6), layer=1), harmful, harmless)
    with pytest.raises(hs.InputError, match="empty"):
        capture_last_position(llama, [])


# ----- ablation ---------------------------------------------------------------------------------
def test_ablating_the_direction_leaves_nothing_along_it_and_restores_the_model(family):
    """Inside: every residual the model reads (each layer's resid_pre and resid_mid, the final
    resid_post) has no component along r̂, on every position; after the block, or an error inside
    it, no hook is left and the logits are bit-identical."""
    _, model = family
    direction = refusal_direction(capture_last_position(model, HARMFUL), capture_last_position(model, HARMLESS))
    batch = hs.tokenize(model, HARMFUL)
    names = [name for layer in range(hs.model_shape(model).n_layers)
             for name in (residual_hook(layer, "resid_pre"), residual_hook(layer, "resid_mid"), residual_hook(layer, "resid_post"))
             if name in model.hook_dict]
    with torch.no_grad():
        before = model(batch.tokens, attention_mask=batch.forward_mask)
        with hs.ablate_direction(model, direction):
            changed, cache = model.run_with_cache(batch.tokens, attention_mask=batch.forward_mask, names_filter=names,
                                                  return_cache_object=False)
    unit = direction.direction.to(changed.device)
    for name in names:
        along = (cache[name].float() @ unit)[batch.attention_mask.bool().to(changed.device)]
        assert float(along.abs().max()) < 1e-5, name
    assert not torch.equal(changed, before)
    with pytest.raises(RuntimeError, match="inside"):
        with hs.ablate_direction(model, direction.direction):
            raise RuntimeError("inside")
    with torch.no_grad():
        assert torch.equal(model(batch.tokens, attention_mask=batch.forward_mask), before)
    assert active_hooks(model) == 0


def test_ablating_a_direction_that_nothing_writes_changes_nothing():
    """A Llama whose embeddings, attention outputs and MLP outputs never write coordinate 0: the
    residual stream is exactly 0 there, and removing e_0 leaves the logits bit-identical."""
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    hf_model, tokenizer = tiny_hf_model("LlamaForCausalLM", with_tokenizer=True)
    with torch.no_grad():
        hf_model.model.embed_tokens.weight[:, 0] = 0.0
        for layer in hf_model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
    model = build_bridge_from_module(hf_model.to(TEST_DEVICE), "LlamaForCausalLM", hf_config=hf_model.config,
                                     tokenizer=tokenizer).eval()
    batch = hs.tokenize(model, HARMFUL)
    axis = torch.zeros(hs.model_shape(model).d_model)
    axis[0] = 2.0  # normalised by ablate_direction
    with torch.no_grad():
        before = model(batch.tokens, attention_mask=batch.forward_mask)
        with hs.ablate_direction(model, axis):
            after = model(batch.tokens, attention_mask=batch.forward_mask)
    assert torch.equal(after, before)


def test_generation_under_the_ablation_matches_uncached_greedy_decoding(llama):
    """KV-cached batched generation under ``intervention=lambda m: hs.ablate_direction(m, d)`` gives
    the tokens that greedy decoding by full forwards under the same ablation gives."""
    direction = refusal_direction(capture_last_position(llama, HARMFUL), capture_last_position(llama, HARMLESS))
    generations = generate(llama, HARMFUL[:3], max_new_tokens=5, stop_ids=[],
                           intervention=lambda m: hs.ablate_direction(m, direction))
    assert active_hooks(llama) == 0
    with torch.no_grad(), hs.ablate_direction(llama, direction):
        for prompt, generation in zip(HARMFUL[:3], generations, strict=True):
            tokens = hs.tokenize(llama, [prompt]).tokens.to(TEST_DEVICE)
            for _ in range(5):
                tokens = torch.cat([tokens, llama(tokens)[:, -1:].argmax(-1)], dim=1)
            assert generation.token_ids == tokens[0, -5:].tolist()


def test_a_bad_direction_is_an_argument_error(llama):
    d_model = hs.model_shape(llama).d_model
    for vector, match in ((torch.ones(d_model + 1), r"shape \(64,\)"), (torch.zeros(d_model), "zero vector"),
                          (torch.full((d_model,), float("nan")), "NaN")):
        with pytest.raises(hs.ArgumentError, match=match):
            hs.ablate_direction(llama, vector)
    assert active_hooks(llama) == 0
