"""Selection stability: bootstrap resamples of the items, top-k selection frequencies, and the
safety detector's resampled Ships, dataset-level Ships and Sahara (tiny models, no download)."""

from __future__ import annotations

import pytest
import torch

import headscope as hs
from headscope.detectors.safety import dataset_ships_resampled, sahara, subspace_angle
from headscope.errors import InputError
from headscope.scans import readout_scan
from headscope.stability import (
    SelectionStability,
    bootstrap_rows,
    mean_score_stability,
    resample_weights,
    top_k_mask,
)

PROMPTS = [[0, 5, 9, 12], [0, 7, 3, 3, 8, 21, 40, 2], [0, 11, 12, 13, 14, 15], [0, 4, 4, 9, 30],
           [0, 17, 2, 6, 6, 1, 12]]


def test_bootstrap_rows_draw_with_replacement_and_weights_are_the_draw_counts():
    rows = bootstrap_rows(5, 40, seed=3)
    assert rows.shape == (40, 5) and rows.min() >= 0 and rows.max() <= 4
    assert torch.equal(rows, bootstrap_rows(5, 40, seed=3))
    assert any(len(set(r.tolist())) < 5 for r in rows)  # some item drawn twice
    weights = resample_weights(rows, 5)
    assert torch.allclose(weights.sum(dim=1), torch.ones(40, dtype=torch.float64))
    assert weights[0, rows[0, 0]] >= 1 / 5
    with pytest.raises(InputError, match="at least 2 items"):
        bootstrap_rows(1, 10)


def test_top_k_selects_exactly_k_heads_and_never_an_unscored_one():
    scores = torch.randn(7, 3, 4)
    scores[:, 0, 0] = float("nan")
    mask = top_k_mask(scores, 3)
    assert (mask.flatten(1).sum(dim=1) == 3).all() and not mask[:, 0, 0].any()
    assert mask[0].flatten()[scores[0].flatten().nan_to_num(nan=-9).argmax()]
    with pytest.raises(InputError, match="fewer scored heads"):
        top_k_mask(torch.full((2, 2), float("nan")), 1)


def test_a_head_that_wins_on_every_item_is_selected_in_every_resample_and_noise_is_not():
    generator = torch.Generator().manual_seed(0)
    per_item = torch.rand(4, 3, 12, generator=generator)  # [layers, heads, items], noise in [0, 1)
    per_item[2, 1] += 5.0  # wins everywhere
    rows = bootstrap_rows(12, 200, seed=1)
    stability = mean_score_stability(per_item, 2, rows, "score")
    assert stability.of("L2H1") == 1.0
    assert stability.frequency.sum().item() == pytest.approx(2.0)
    assert stability.selected[0] == hs.Head(2, 1) and len(stability.selected) == 2
    runner_up = stability.most_selected(2)[1]
    assert runner_up[1] < 1.0  # the second place is decided by noise: not always the same head
    assert stability.stable_heads(1.0) == [hs.Head(2, 1)]
    weights = resample_weights(rows, 12)[0].float()
    assert torch.allclose(torch.einsum("lhn,n->lh", per_item, weights).flatten().topk(2).indices.sort().values,
                          top_k_mask(torch.einsum("lhn,n->lh", per_item, weights), 2).flatten().nonzero().flatten())


def test_selection_stability_reads_as_a_table_a_dict_and_a_figure(tmp_path):
    frequency = torch.zeros(3, 2)
    frequency[1, 0], frequency[2, 1], frequency[0, 0] = 1.0, 0.7, 0.3
    stability = SelectionStability("ships", frequency, 2, 50, 16, [hs.Head(1, 0), hs.Head(0, 0)])
    assert [row["head"] for row in stability.table()] == ["L1H0", "L2H1"]
    assert stability.table()[1] == {"head": "L2H1", "frequency": 0.7, "selected_on_all_items": False}
    assert stability.to_dict()["stable"] == ["L1H0", "L2H1"]
    assert "L1H0 1.00" in repr(stability)
    figure = stability.plot(path=tmp_path / "stability.png")
    assert (tmp_path / "stability.png").stat().st_size > 0 and figure.axes[0].get_ylim()[1] > 1


def test_dataset_ships_on_each_resample_equals_the_subspace_angle_of_its_rows(tiny_llama):
    scan = readout_scan(tiny_llama, PROMPTS, factor=1e-5)
    rows = bootstrap_rows(len(PROMPTS), 4, seed=0)
    for rank in (1, 2):
        resampled = dataset_ships_resampled(scan, rows, rank)
        for r in range(rows.shape[0]):
            for head in scan.heads:
                expected = subspace_angle(scan.clean[rows[r]], scan.ablated[head.layer, head.head][rows[r]], rank)
                assert resampled[r, head.layer, head.head].item() == pytest.approx(expected, abs=1e-3)


def test_each_resampled_sahara_search_equals_a_search_on_its_own_rows(tiny_llama):
    """The lockstep searches share scans, but each is exactly the search it stands for: Sahara on
    the prompts its resample drew (repeats included)."""
    result = sahara(tiny_llama, PROMPTS, steps=3, epsilon=1e-5, resamples=6, seed=2)
    alone = sahara(tiny_llama, PROMPTS, steps=3, epsilon=1e-5)
    assert result.search_group == alone.group and result.angles == pytest.approx(alone.angles, abs=1e-4)
    rows = bootstrap_rows(len(PROMPTS), 6, seed=2)
    for r, group in enumerate(result.resampled_groups):
        own = sahara(tiny_llama, [PROMPTS[i] for i in rows[r]], steps=3, epsilon=1e-5)
        assert group == own.group
    counts = {head: sum(head in g for g in result.resampled_groups) for head in result.group}
    assert result.frequency == [counts[h] / 6 for h in result.group]
    assert max(result.head_frequency.values()) == result.frequency[0]
    assert len(set(result.group)) == 3 and result.n_resamples == 6
    prefixes = {tuple(g[:step]) for g in result.resampled_groups + [result.search_group] for step in (1, 2)}
    assert result.n_scans <= len(prefixes)  # one scan per group prefix at most, shared between searches


def test_each_resampled_sahara_search_with_candidates_equals_a_search_on_its_own_rows(tiny_llama):
    """With ``candidates``, each resampled search keeps its own best heads of step 1 as candidates:
    still exactly Sahara on the prompts its resample drew."""
    result = sahara(tiny_llama, PROMPTS, steps=3, epsilon=1e-5, candidates=4, resamples=8, seed=1)
    rows = bootstrap_rows(len(PROMPTS), 8, seed=1)
    for r, group in enumerate(result.resampled_groups):
        assert group == sahara(tiny_llama, [PROMPTS[i] for i in rows[r]], steps=3, epsilon=1e-5, candidates=4).group
    assert result.candidates_per_step == [8, 3, 2]


def test_the_safety_detector_reports_every_heads_selection_frequency(tiny_llama):
    detector = hs.get_detector("safety", n_queries=5, n_bootstrap=50, stability_k=2, sahara_steps=2,
                               sahara_candidates=4, sahara_resamples=4)
    scores = detector.score(tiny_llama)
    for name in ("ships", "dataset_ships", "refusal_direction"):
        frequency = scores.extras[f"{name}_frequency"]
        assert frequency.sum().item() == pytest.approx(2.0) and frequency.min() >= 0 and frequency.max() <= 1
        record = scores.metadata["stability"][name]
        assert record["n_resamples"] == 50 and len(record["selected_on_all_items"]) == 2
    assert scores.metadata["stability"]["ships"]["n_items"] == 5
    direction = scores.metadata["refusal_direction"]
    assert direction["n_harmful"] == direction["n_harmless"] == len(direction["harmful_queries"]) > 5
    assert torch.isfinite(scores.extras["refusal_direction"]).all()
    sahara_record = scores.metadata["sahara"]
    assert len(sahara_record["group"]) == 2 and len(sahara_record["frequency"]) == 2
    assert sahara_record["n_resamples"] == 4 and len(sahara_record["resampled_groups"]) == 4
    no_bootstrap = hs.get_detector("safety", n_queries=5, n_bootstrap=0).score(tiny_llama)
    assert "ships_frequency" not in no_bootstrap.extras and "stability" not in no_bootstrap.metadata


def test_held_out_attack_runs_every_condition_on_every_set_and_reads_as_a_table_and_a_figure(tiny_llama, tmp_path):
    from headscope.errors import DataError
    from headscope.studies.safety import CLEAN, DIRECTION, RANDOM, held_out_attack

    sets = {"test": ["w1 w2 w3", "w4 w5"], "elsewhere": ["w6 w7 w8 w9", "w10", "w11 w12"]}
    direction = torch.randn(tiny_llama.cfg.d_model)
    result = held_out_attack(tiny_llama, sets, {"group": [(0, 1), (1, 2)]}, [[(0, 0)], [(1, 3)]],
                             selection=["w99 w98"], direction=direction)
    assert set(result.complied) == {"test", "elsewhere"}
    assert list(result.complied["elsewhere"]) == [CLEAN, "group", RANDOM, DIRECTION]
    assert result.complied["elsewhere"][RANDOM].shape == (2, 3) and result.complied["test"]["group"].shape == (2,)
    rows = result.table()
    assert len(rows) == 8 and {"ci", "effect", "effect_of"} <= set(next(r for r in rows if r["condition"] == "group"))
    assert "refusal direction ablated" in str(result)
    result.plot(path=tmp_path / "held_out.png")
    assert (tmp_path / "held_out.png").stat().st_size > 0
    with pytest.raises(DataError, match="selected on"):
        held_out_attack(tiny_llama, sets, {}, [[(0, 0)], [(1, 3)]], selection=["W4, w5"])


def test_stored_stability_and_direction_come_back_from_saved_scores(tiny_llama, tmp_path):
    from headscope.studies.safety import stored_direction, stored_stability

    scores = hs.get_detector("safety", n_queries=4, n_bootstrap=20).score(tiny_llama)
    scores.save(tmp_path / "safety.json")
    loaded = hs.HeadScores.load(tmp_path / "safety.json")
    stability = stored_stability(loaded, "refusal_direction")
    assert torch.equal(stability.frequency, scores.extras["refusal_direction_frequency"])
    assert stability.selected == scores.top_heads(3, extra="refusal_direction")
    direction = stored_direction(loaded)
    assert direction.layer == scores.metadata["refusal_direction"]["layer"]
    assert direction.direction.norm().item() == pytest.approx(1.0, abs=1e-5)
    direction.plot(path=tmp_path / "direction.png")
    stability.plot(path=tmp_path / "stability.png")


def test_direction_layer_effects_remove_each_layers_direction_and_measure_refusal_and_harmless_drift(tiny_llama, tmp_path):
    from headscope.directions import capture_last_position
    from headscope.studies.safety import direction_layer_effects

    harmful, harmless = (["w1 w2 w3", "w4 w5", "w6 w7 w8", "w9 w10"], ["w11 w12", "w13", "w14 w15 w16", "w17"])
    captures = [capture_last_position(tiny_llama, prompts) for prompts in (harmful, harmless)]
    effects = direction_layer_effects(tiny_llama, *captures, harmful[:2], harmless[:2], layers=[0, 1])
    assert effects.layers == [0, 1] and len(effects.harmless_kl) == 2 and all(kl >= -1e-6 for kl in effects.harmless_kl)
    assert 0 <= min(effects.refusal_probability) and max(effects.refusal_probability) <= 1
    assert set(effects.kept(max_kl=float("inf"))) == {0, 1} and "harmless KL" in str(effects)
    effects.plot(path=tmp_path / "layers.png")


def test_ties_in_frequency_go_to_the_heads_selected_on_all_items():
    frequency = torch.tensor([[0.5, 0.5], [0.5, 0.0]])
    stability = SelectionStability("ships", frequency, 2, 200, 16, [hs.Head(1, 0), hs.Head(0, 1)])
    assert [head for head, _ in stability.most_selected(3)] == [hs.Head(1, 0), hs.Head(0, 1), hs.Head(0, 0)]
