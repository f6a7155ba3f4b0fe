"""Interventions change the model inside the block and restore it bit for bit afterwards."""

import pytest
import torch

import headscope as hs
from headscope.engine import hook_name
from headscope.interventions import kv_groups_touched
from tests.conftest import active_hooks

TOKENS = torch.tensor([[3, 9, 4, 17, 8, 21, 5, 30], [7, 2, 19, 11, 25, 6, 13, 40]])


def logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens)


def cached(model, name, tokens=TOKENS):
    with torch.no_grad():
        return model.run_with_cache(tokens, names_filter=[name])[1][name]


INTERVENTIONS = {
    "zero": lambda m: hs.ablate(m, [(0, 1), (1, 2)], method="zero"),
    "mean": lambda m: hs.ablate(m, [(0, 1)], method="mean", reference=torch.randint(0, 64, (3, 8))),
    "resample": lambda m: hs.ablate(m, [(1, 0)], method="resample"),
    "resample_ref": lambda m: hs.ablate(m, [(1, 0)], method="resample", reference=torch.randint(0, 64, (3, 8))),
    "uniform": lambda m: hs.ablate(m, [(0, 2)], method="uniform"),
    "scale_output": lambda m: hs.scale_output(m, [(0, 0)], 3.0),
    "scale_values": lambda m: hs.scale_values(m, [(0, 0)], -2.0),
    "scale_values_kv": lambda m: hs.scale_values(m, [(0, 0)], 2.0, per="kv_group"),
    "scale_query": lambda m: hs.scale_query(m, [(1, 3)], 4.0),
    "remove_sink": lambda m: hs.remove_sink(m, [(0, 1), (1, 2)]),
    "add_vector": lambda m: hs.add_vector(m, torch.ones(64), layer=1, positions=[-1]),
    "add_head_vector": lambda m: hs.add_vector(m, torch.ones(16), layer=0, head=(0, 3)),
}


@pytest.mark.parametrize("name", sorted(INTERVENTIONS))
def test_intervention_changes_logits_and_restores_them_exactly(tiny, name):
    before = logits(tiny)
    with INTERVENTIONS[name](tiny):
        during = logits(tiny)
        assert active_hooks(tiny) > 0
    assert not torch.allclose(during, before)
    assert active_hooks(tiny) == 0
    assert torch.equal(logits(tiny), before)


@pytest.mark.parametrize("name", sorted(INTERVENTIONS))
def test_intervention_restores_the_model_when_the_body_raises(tiny, name):
    before = logits(tiny)
    with pytest.raises(RuntimeError, match="boom"):
        with INTERVENTIONS[name](tiny):
            logits(tiny)
            raise RuntimeError("boom")
    assert active_hooks(tiny) == 0
    assert torch.equal(logits(tiny), before)


def test_interventions_compose_in_one_with_statement(tiny):
    before = logits(tiny)
    with hs.ablate(tiny, [(0, 1)]):
        only_ablation = logits(tiny)
    with hs.ablate(tiny, [(0, 1)]), hs.add_vector(tiny, torch.ones(64), layer=1):
        both = logits(tiny)
        assert active_hooks(tiny) == 2
    assert not torch.allclose(both, only_ablation)
    assert active_hooks(tiny) == 0 and torch.equal(logits(tiny), before)


def test_zero_ablation_zeroes_only_the_chosen_head(tiny):
    with hs.ablate(tiny, [(0, 1)], method="zero"):
        z = cached(tiny, hook_name(0, "z"))
    assert torch.all(z[:, :, 1] == 0)
    assert torch.all(z[:, :, 0].abs().sum() > 0)


def test_mean_ablation_sets_the_head_to_its_reference_mean(tiny):
    reference = torch.randint(0, 64, (4, 8))
    z_reference = cached(tiny, hook_name(0, "z"), reference)
    expected = z_reference[:, 1:, 2].reshape(-1, 16).mean(0)  # every token but position 0
    with hs.ablate(tiny, [(0, 2)], method="mean", reference=reference):
        z = cached(tiny, hook_name(0, "z"))
    torch.testing.assert_close(z[:, :, 2], expected.expand(2, 8, 16), rtol=1e-5, atol=1e-5)


def test_resample_without_reference_takes_the_next_prompts_output(tiny):
    clean = cached(tiny, hook_name(1, "z"))
    with hs.ablate(tiny, [(1, 0)], method="resample"):
        z = cached(tiny, hook_name(1, "z"))
    torch.testing.assert_close(z[:, :, 0], clean[:, :, 0].roll(1, dims=0))
    with pytest.raises(hs.InputError, match="at least 2 prompts"):
        with hs.ablate(tiny, [(1, 0)], method="resample"):
            logits(tiny, TOKENS[:1])
    assert active_hooks(tiny) == 0


def test_uniform_attention_makes_the_pattern_uniform_over_the_prefix(tiny):
    with hs.uniform_attention(tiny, [(0, 2)], epsilon=1e-6):
        pattern = cached(tiny, hook_name(0, "pattern"))
    expected = torch.tril(torch.ones(8, 8)) / torch.arange(1, 9)[:, None]
    torch.testing.assert_close(pattern[0, 2], expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(pattern[0, 1], expected, atol=1e-2)


def test_value_scaling_per_query_head_equals_output_scaling(tiny_gqa):
    with hs.scale_values(tiny_gqa, [(0, 1)], -3.0):
        by_values = logits(tiny_gqa)
    with hs.scale_output(tiny_gqa, [(0, 1)], -3.0):
        by_output = logits(tiny_gqa)
    torch.testing.assert_close(by_values, by_output)


def test_value_scaling_per_kv_group_touches_the_whole_group(tiny_gqa):
    assert kv_groups_touched(tiny_gqa, [(0, 1)]) == [[hs.Head(0, 0), hs.Head(0, 1)]]
    clean = cached(tiny_gqa, hook_name(0, "z"))
    with hs.scale_values(tiny_gqa, [(0, 1)], 2.0, per="kv_group"):
        z = cached(tiny_gqa, hook_name(0, "z"))
    torch.testing.assert_close(z[:, :, :2], 2 * clean[:, :, :2])
    torch.testing.assert_close(z[:, :, 2:], clean[:, :, 2:])


def test_bad_intervention_arguments_fail_clearly(tiny):
    with pytest.raises(ValueError, match="zero, mean, resample, uniform"):
        hs.ablate(tiny, [(0, 0)], method="mangle")
    with pytest.raises(ValueError, match=r"shape \(64,\)"):
        hs.add_vector(tiny, torch.ones(10), layer=0)
    with pytest.raises(ValueError, match="resid_pre"):
        hs.add_vector(tiny, torch.ones(64), layer=0, hook="nowhere")
    with pytest.raises(ValueError, match="query_head"):
        hs.scale_values(tiny, [(0, 0)], 2.0, per="layer")
    assert active_hooks(tiny) == 0


def test_default_mean_reference_needs_a_tokenizer(tiny):
    with pytest.raises(hs.InputError, match="no tokenizer"):
        hs.ablate(tiny, [(0, 0)], method="mean")
