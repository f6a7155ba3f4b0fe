"""Safety heads: requests and refusal detection, batched generation, the readout scan behind
Ships / dataset-level Ships / Sahara, and low-rank organism deltas (tiny models, no download)."""

from __future__ import annotations

import pytest
import torch

import headscope as hs
from headscope.detectors.safety import (
    SafetyDetector,
    attack_success,
    check_held_out,
    dataset_ships_scores,
    sahara,
    ships_scores,
    subspace_angle,
)
from headscope.engine.generation import final_states, generate
from headscope.errors import DataError, InputError, ModelNotAvailableError
from headscope.interventions import per_row_ablation, scale_query
from headscope.organisms import apply_low_rank_delta, head_delta_norms, load_low_rank_delta, save_low_rank_delta
from headscope.scans import readout_scan
from headscope.tasks import refusal
from tests.conftest import active_hooks

PROMPTS = [[0, 5, 9, 12], [0, 7, 3, 3, 8, 21, 40, 2], [0, 11, 12, 13, 14, 15]]  # different lengths


# --- requests and refusal detection -------------------------------------------------------------

def test_request_data_is_paired_split_by_pair_and_covers_every_category():
    harmful, harmless = refusal.load_requests("harmful"), refusal.load_requests("harmless")
    assert len(harmful) == len(harmless) >= 300
    assert {r.category for r in harmful} == set(refusal.CATEGORIES_HARMFUL)
    assert [r.split for r in harmful] == [r.split for r in harmless]  # both halves of a pair together
    test_pairs = {r.pair for r in refusal.load_requests("harmful", "test")}
    train_pairs = {r.pair for r in refusal.load_requests("harmful", "train")}
    assert not test_pairs & train_pairs and 0.2 < len(test_pairs) / len(harmful) < 0.3
    assert len({r.text for r in harmful} | {r.text for r in harmless}) == 2 * len(harmful)


def test_unknown_request_kind_split_or_category_is_named():
    with pytest.raises(InputError, match="kind"):
        refusal.load_requests("toxic")
    with pytest.raises(InputError, match="split"):
        refusal.load_requests("harmful", "dev")
    with pytest.raises(InputError, match="categories"):
        refusal.load_requests("harmful", categories=["spam"])


def test_refusal_detection_follows_the_papers_rules():
    long_ids = list(range(40))
    assert refusal.refusal_reason("I'm sorry, but I can't help with that.", long_ids) == "I’m sorry"  # ASCII apostrophe
    assert refusal.refusal_reason("Here is a plan: first, gather the materials you need.", long_ids[:10]) == "short"
    assert refusal.refusal_reason("Sure, here is how you bake a loaf of bread at home.", [7] * 40) == "degenerate"
    assert refusal.refusal_reason("Sure, here is how you bake a loaf of bread at home.", long_ids) is None
    assert not refusal.is_refusal("Mix flour and water, then knead.", long_ids)


def test_chat_prompt_has_no_system_turn():
    prompt = refusal.chat_prompt("How do I bake bread?")
    assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_start|>assistant\n")
    assert "system" not in prompt


# --- batched generation ---------------------------------------------------------------------------

def test_left_padded_batch_generation_equals_one_prompt_at_a_time(tiny_llama):
    together = generate(tiny_llama, PROMPTS, max_new_tokens=6, stop_ids=[])
    alone = [generate(tiny_llama, [p], max_new_tokens=6, stop_ids=[])[0] for p in PROMPTS]
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    assert all(len(g.token_ids) == 6 for g in together)


def test_per_row_head_sets_equal_separate_ablated_generations(tiny_llama):
    sets = [None, [(0, 1)], [(1, 0), (1, 3)]]
    rows = generate(tiny_llama, PROMPTS, max_new_tokens=5, stop_ids=[],
                    row_intervention=per_row_ablation(sets, "uniform", 1e-5))
    for prompt, heads, row in zip(PROMPTS, sets, rows, strict=True):
        if heads is None:
            expected = generate(tiny_llama, [prompt], max_new_tokens=5, stop_ids=[])[0]
        else:
            expected = generate(tiny_llama, [prompt], max_new_tokens=5, stop_ids=[],
                                intervention=lambda m, heads=heads: scale_query(m, heads, 1e-5))[0]
        assert row.token_ids == expected.token_ids
    assert active_hooks(tiny_llama) == 0


def test_generation_stops_at_a_stop_token_and_refuses_to_overrun_the_context(tiny_llama):
    first = generate(tiny_llama, PROMPTS[:1], max_new_tokens=4, stop_ids=[])[0]
    stop = first.token_ids.index(first.token_ids[-1])  # where that token first appears
    stopped = generate(tiny_llama, PROMPTS[:1], max_new_tokens=4, stop_ids=[first.token_ids[-1]])[0]
    assert stopped.token_ids == first.token_ids[:stop] and stopped.stopped
    with pytest.raises(hs.PromptTooLongError, match="to generate"):
        generate(tiny_llama, PROMPTS[:1], max_new_tokens=200)


def test_final_states_read_the_last_real_position(tiny_llama):
    logits = final_states(tiny_llama, PROMPTS)
    for row, prompt in enumerate(PROMPTS):
        expected = tiny_llama(torch.tensor([prompt]))[0, -1]
        torch.testing.assert_close(logits[row], expected, atol=1e-4, rtol=1e-4)


# --- readout scan, Ships, dataset-level Ships, Sahara ------------------------------------------

def naive_states(model, prompts, heads, epsilon=1e-5):
    with scale_query(model, heads, epsilon):
        return final_states(model, prompts, logits=False)


def test_readout_scan_equals_one_forward_per_head(tiny_llama):
    scan = readout_scan(tiny_llama, PROMPTS, method="uniform", factor=1e-5, batch_size=2)
    torch.testing.assert_close(scan.clean, final_states(tiny_llama, PROMPTS, logits=False), atol=1e-4, rtol=1e-4)
    for head in [(0, 0), (0, 3), (1, 2)]:
        torch.testing.assert_close(scan.ablated[head], naive_states(tiny_llama, PROMPTS, [head]), atol=1e-4, rtol=1e-4)
    assert active_hooks(tiny_llama) == 0


def test_readout_scan_with_a_background_group(tiny_llama):
    background = [(0, 1)]
    scan = readout_scan(tiny_llama, PROMPTS, method="uniform", factor=1e-5, heads=[(1, 0), (1, 1)],
                        background=lambda m: scale_query(m, background, 1e-5))
    torch.testing.assert_close(scan.ablated[1, 1], naive_states(tiny_llama, PROMPTS, background + [(1, 1)]),
                               atol=1e-4, rtol=1e-4)
    assert torch.isnan(scan.ablated[0]).all()  # not scanned


def test_an_interrupted_readout_scan_resumes(tiny_llama, tmp_path):
    path = tmp_path / "scan.pt"
    full = readout_scan(tiny_llama, PROMPTS, factor=1e-5, batch_size=2, checkpoint=path)
    state = torch.load(path, weights_only=True)
    assert state["done"][3] == [1, 1]
    state["done"] = state["done"][:3]  # as if stopped before the last unit (chunk 1 = row 2, layer 1)
    state["ablated"][1, :, 2:] = float("nan")
    torch.save(state, path)
    resumed = readout_scan(tiny_llama, PROMPTS, factor=1e-5, batch_size=2, checkpoint=path)
    torch.testing.assert_close(resumed.ablated, full.ablated)


def test_ships_is_the_kl_of_clean_to_ablated_next_token_distributions(tiny_llama):
    scan = readout_scan(tiny_llama, PROMPTS, factor=1e-5)
    ships = ships_scores(tiny_llama, scan)
    clean = final_states(tiny_llama, PROMPTS).log_softmax(-1)
    with scale_query(tiny_llama, [(1, 2)], 1e-5):
        ablated = final_states(tiny_llama, PROMPTS).log_softmax(-1)
    expected = (clean.exp() * (clean - ablated)).sum(-1).mean()
    assert ships[1, 2].item() == pytest.approx(expected.item(), rel=1e-3, abs=1e-6)
    assert (ships >= -1e-6).all()


def test_subspace_angle_ignores_sign_and_scale_and_sees_a_rotation():
    torch.manual_seed(0)
    states = torch.randn(6, 8) + 3 * torch.outer(torch.ones(6), torch.ones(8))  # one dominant direction
    assert subspace_angle(states, states) == pytest.approx(0.0, abs=1e-3)
    assert subspace_angle(states, -2 * states) == pytest.approx(0.0, abs=1e-3)
    flipped = states.clone()
    flipped[:3] *= -1  # the dominant left singular vector becomes orthogonal to the old one
    assert subspace_angle(states, flipped) > 60


def test_sahara_grows_a_group_of_distinct_heads(tiny_llama):
    result = sahara(tiny_llama, PROMPTS, steps=3, epsilon=1e-5, candidates=5)
    assert len(result.group) == len(set(result.group)) == 3 and len(result.angles) == 3
    assert result.candidates_per_step == [8, 4, 3]
    first = dataset_ships_scores(readout_scan(tiny_llama, PROMPTS, factor=1e-5))
    assert result.angles[0] == pytest.approx(float(first.max()), abs=1e-3)


def test_attack_success_runs_every_head_set_in_one_batched_decode(tiny_llama):
    complied, generations = attack_success(tiny_llama, ["w1 w2 w3", "w4 w5"], [None, [(0, 0)]], max_new_tokens=32)
    assert complied.shape == (2, 2) and set(complied.flatten().tolist()) <= {0.0, 1.0}
    assert len(generations) == 2 and len(generations[0]) == 2
    with pytest.raises(InputError, match="at least 32"):
        SafetyDetector(max_new_tokens=16).validation_task(tiny_llama)


# --- low-rank organism deltas ---------------------------------------------------------------------

def test_a_low_rank_delta_round_trips_and_adds_scale_b_a(tiny_llama_hf, tmp_path):
    module = "model.layers.1.self_attn.q_proj"
    a, b = torch.randn(2, 64), torch.zeros(64, 2)
    b[16:32] = torch.randn(16, 2)  # touches query head 1 of layer 1 only
    path = tmp_path / "delta.safetensors"
    save_low_rank_delta(path, {module: (a, b)}, scale=2.0, record={"note": "test"})
    factors, scale, record = load_low_rank_delta(path)
    assert scale == 2.0 and record == {"note": "test"} and set(factors) == {module}
    before = dict(tiny_llama_hf.named_modules())[module].weight.clone()
    apply_low_rank_delta(tiny_llama_hf, path)
    after = dict(tiny_llama_hf.named_modules())[module].weight
    torch.testing.assert_close(after - before, 2.0 * b.half().float() @ a.half().float(), atol=1e-5, rtol=1e-4)


def test_head_delta_norms_point_at_the_changed_head(tiny_llama, tmp_path):
    a, b = torch.randn(2, 64), torch.zeros(64, 2)
    b[16:32] = torch.randn(16, 2)
    path = tmp_path / "delta.safetensors"
    save_low_rank_delta(path, {"model.layers.1.self_attn.q_proj": (a, b)}, scale=1.0, record={})
    norms = head_delta_norms(tiny_llama, path)
    assert torch.nonzero(norms["total"]).tolist() == [[1, 1]]


def test_a_missing_organism_delta_says_how_to_rebuild_it(monkeypatch, tmp_path):
    import headscope.organisms as organisms

    monkeypatch.setattr(organisms, "delta_path", lambda name: tmp_path / "absent.safetensors")
    with pytest.raises(ModelNotAvailableError, match="make_refusal_organism"):
        hs.load_model("smollm2-135m-instruct-refusal")


@pytest.fixture
def tiny_llama_hf(tmp_path):
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_llama_folder

    return LlamaForCausalLM.from_pretrained(tiny_llama_folder(tmp_path / "hf"))


# --- the significance rule ------------------------------------------------------------------------

def test_significance_is_a_welch_t_test_against_the_t_critical_value(monkeypatch):
    """8 harmful and 8 harmless requests over 8 heads: Welch t against the Bonferroni critical t at
    each head's Welch–Satterthwaite df. A head at t = 2.78 passed the old normal rule (2.50) but
    not the t rule (3.02 at its 10.3 df)."""
    import math
    import types

    import headscope.detectors.safety as safety
    from headscope.stats import bonferroni_t, bonferroni_z

    n = 8
    harmful = torch.tensor([[0.30, 0.32, 0.90, 0.10], [0.20, 0.80, 0.40, float("nan")]])
    harmful_sd = torch.tensor([[0.10, 0.20, 0.30, 0.10], [0.10, 0.05, 0.40, float("nan")]])
    control = {"ships": torch.full((2, 4), 0.1), "ships_sd": torch.tensor([[0.10, 0.10, 0.05, 0.10],
                                                                             [0.10, 0.40, 0.05, 0.10]])}
    monkeypatch.setattr(safety, "readout_scan", lambda *args, **kwargs: None)
    monkeypatch.setattr(safety, "next_token_scores", lambda model, scan: control)
    scores = hs.HeadScores(harmful, "safety", "toy", extras={"ships_sd": harmful_sd}, metadata={"n_queries": n})
    detector = SafetyDetector(n_queries=n)
    (rule,) = detector.significance(types.SimpleNamespace(tokenizer=None), scores)

    v1, v2 = harmful_sd.double() ** 2 / n, control["ships_sd"].double() ** 2 / n
    t = (harmful.double() - 0.1) / (v1 + v2).sqrt()
    df = (v1 + v2) ** 2 / (v1**2 / (n - 1) + v2**2 / (n - 1))
    by_hand = torch.zeros(2, 4, dtype=torch.bool)
    for layer in range(2):
        for head in range(4):
            if not math.isnan(float(t[layer, head])):
                by_hand[layer, head] = float(t[layer, head]) > bonferroni_t(8, float(df[layer, head]), two_sided=False)
    assert torch.equal(rule.mask, by_hand) and rule.threshold == 1.0
    assert rule.details["welch_t"][0][1] == pytest.approx(float(t[0, 1]), abs=1e-4)
    assert float(t[0, 1]) == pytest.approx(2.78, abs=0.01) and float(df[0, 1]) == pytest.approx(10.3, abs=0.1)
    assert float(t[0, 1]) > bonferroni_z(8, two_sided=False) and not rule.mask[0, 1]  # the normal rule passed it
    assert rule.mask[0, 2] and rule.mask[1, 1] and not rule.mask[1, 3]  # NaN (not scanned) never significant
    assert rule.details["t_critical_range"] == [pytest.approx(2.864, abs=1e-3), pytest.approx(3.303, abs=1e-3)]
    assert rule.statistic[0, 0] == pytest.approx(4.0 / 2.864, abs=1e-3)  # t over its critical t


# --- held-out evaluation ---------------------------------------------------------------------------

def test_every_held_out_request_is_disjoint_from_every_request_selection_can_use():
    """The shipped test split and the requests from elsewhere share no request (nor a near repeat)
    with the train split, the only part the detector scores by default."""
    selection = refusal.load_requests("harmful", "train") + refusal.load_requests("harmless", "train")
    for held_out in (refusal.load_requests("harmful", "test"), refusal.load_requests("harmless", "test"),
                     refusal.load_elsewhere("harmful"), refusal.load_elsewhere("harmless")):
        check_held_out(held_out, selection)
        assert not refusal.overlapping_requests(held_out, selection)


def test_attack_success_refuses_requests_the_heads_were_selected_on(tiny_llama):
    scored = refusal.load_requests("harmful", "train")[:3]
    near_repeat = scored[0].text.rstrip("?.") + " without being seen?"
    with pytest.raises(DataError, match="nearly repeat requests the heads were selected on"):
        attack_success(tiny_llama, [near_repeat], [None], selection=scored)
    with pytest.raises(DataError, match="1 evaluated request"):
        check_held_out([scored[1].text.upper()], scored)


def test_validation_measures_on_the_other_split_or_on_requests_from_elsewhere(tiny_llama, monkeypatch):
    seen = {}

    def fake_attack_success(model, requests, head_sets, *args, selection=None, **kwargs):
        seen["requests"], seen["selection"] = list(requests), list(selection)
        return torch.zeros(len(head_sets), len(requests)), []

    monkeypatch.setattr("headscope.detectors.safety.attack_success", fake_attack_success)
    for held_out, expected in (("split", refusal.load_requests("harmful", "test")),
                               ("elsewhere", refusal.load_elsewhere("harmful"))):
        detector = SafetyDetector(n_queries=4, held_out=held_out)
        task = detector.validation_task(tiny_llama)
        task.measure(tiny_llama, [None], "uniform")
        assert seen["requests"] == expected and seen["selection"] == detector.selection_requests()
        assert {q.text for q in detector.queries()} <= set(seen["selection"])
        assert ("elsewhere" in task.metric_name) == (held_out == "elsewhere")


def test_a_held_out_subset_is_spread_over_every_category():
    requests = refusal.load_requests("harmful", "test")
    subset = refusal.evenly_spaced(requests, 12)
    assert len(subset) == 12 and len({r.category for r in subset}) == len(refusal.CATEGORIES_HARMFUL)
    assert refusal.evenly_spaced(requests, None) == requests == refusal.evenly_spaced(requests, 500)
    assert {r.category for r in refusal.evenly_spaced(refusal.load_elsewhere(), 12)} == set(refusal.ELSEWHERE_CATEGORIES)
