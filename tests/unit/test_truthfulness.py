"""Truthfulness detector: the statement pairs and their split, the probes (hand-computed cases),
the mass-mean shift, the held-out preference metric, bad input and hooks."""

from __future__ import annotations

import json
import math

import pytest
import torch

import headscope as hs
from headscope.detectors import truthfulness
from headscope.detectors.truthfulness import (
    accuracy,
    fit_probes,
    mass_mean_accuracy,
    pair_accuracy,
    probe_logits,
    shifted,
    true_preference,
    truth_shifts,
)
from headscope.engine.heads import hook_name
from headscope.engine.tokens import tokenize
from headscope.stats import binomial_critical_accuracy
from headscope.tasks.statements import (
    StatementPair,
    read_statement_pairs,
    shipped_pairs,
    split_pairs,
    statements,
)
from tests.conftest import active_hooks
from tests.families import tiny_family_model


@pytest.fixture(scope="module")
def model():
    """A tiny Llama (grouped-query attention) with a byte-level tokenizer."""
    return tiny_family_model("LlamaForCausalLM", with_tokenizer=True)


def write_pairs(path, n: int, start: int = 0) -> str:
    """``n`` made-up pairs, one a line."""
    path.write_text("".join(json.dumps({"true": f"Box {i} is red.", "false": f"Box {i} is blue."}) + "\n"
                            for i in range(start, start + n)))
    return str(path)


# --- data and split --------------------------------------------------------------------------------

def test_the_shipped_pairs_are_unique_true_false_pairs_that_share_their_start():
    pairs = shipped_pairs()
    assert 150 <= len(pairs) <= 250
    texts = [text for pair in pairs for text in (pair.true, pair.false)]
    assert len(set(texts)) == len(texts)
    for pair in pairs:
        assert pair.true != pair.false and pair.category
        assert pair.true.split()[0] == pair.false.split()[0] and pair.true.endswith(".")
    assert len({pair.category for pair in pairs}) >= 6


def test_the_split_keeps_each_pair_whole_and_the_parts_disjoint():
    pairs = shipped_pairs()
    split = split_pairs(pairs, 0.25, 0.25, seed=0)
    parts = [split.train, split.validation, split.held_out]
    assert [len(p) for p in parts] == [len(pairs) - 2 * round(len(pairs) / 4), round(len(pairs) / 4),
                                       round(len(pairs) / 4)]
    statements_of = [{text for pair in part for text in (pair.true, pair.false)} for part in parts]
    assert sum(len(s) for s in statements_of) == 2 * len(pairs)  # every statement once, each pair in one part
    for first in range(3):
        for second in range(first + 1, 3):
            assert not statements_of[first] & statements_of[second]
    assert split_pairs(pairs, 0.25, 0.25, seed=0) == split
    assert split_pairs(pairs, 0.25, 0.25, seed=1).held_out != split.held_out
    texts, labels = statements(split.train[:2])
    assert texts == [split.train[0].true, split.train[0].false, split.train[1].true, split.train[1].false]
    assert labels == [1, 0, 1, 0]


def test_your_own_pairs_replace_the_shipped_ones(tmp_path):
    path = write_pairs(tmp_path / "pairs.jsonl", 12)
    detector = hs.get_detector("truthfulness", data=path)
    detector.check_data()
    split = detector.split()
    assert len(split.train) + len(split.validation) + len(split.held_out) == 12
    assert all(pair.true.startswith("Box") for pair in split.train)
    assert read_statement_pairs(path)[3] == StatementPair("Box 3 is red.", "Box 3 is blue.", "", 4)


@pytest.mark.parametrize("line, problem", [
    ("not json", "line 2: not JSON"),
    ('{"true": "A is A."}', "line 2: no 'false'"),
    ('{"true": "A is A.", "false": "A is A."}', "line 2: the true and the false statement are the same"),
    ('{"true": "Box 0 is red.", "false": "Box 0 is green."}', "line 2: the statement 'Box 0 is red.' is already on line 1"),
    ('{"true": "", "false": "B."}', "line 2: 'true' must be a non-empty string"),
    ('{"true": "A.", "false": "B.", "category": 3}', "line 2: 'category' must be a string"),
])
def test_a_bad_line_of_your_pairs_is_one_error_naming_file_and_line(tmp_path, line, problem):
    path = tmp_path / "pairs.jsonl"
    write_pairs(path, 1)
    path.write_text(path.read_text() + line + "\n")
    with pytest.raises(hs.DataError, match=problem) as error:
        hs.get_detector("truthfulness", data=str(path)).check_data()
    assert str(path) in str(error.value)


def test_too_few_pairs_for_the_three_parts_say_so_before_any_model_runs(tmp_path):
    path = write_pairs(tmp_path / "pairs.jsonl", 5)
    with pytest.raises(hs.DataError, match="5 statement pairs split into .* each part needs at least 2"):
        hs.get_detector("truthfulness", data=path).check_data()
    with pytest.raises(hs.SettingError, match="'alpha' setting"):
        hs.get_detector("truthfulness", alpha=-1.0)


# --- probes: hand-computed cases -------------------------------------------------------------------

def planted_activations(n_pairs: int, n_heads: int = 2, d_head: int = 3, seed: int = 0) -> torch.Tensor:
    """``[heads, 2 n_pairs, d_head]`` interleaved (true, false): head 0 separates the classes
    perfectly (first coordinate +1 for true, -1 for false, plus noise elsewhere); every other head
    gives a pair's two statements the same activation, so nothing can tell them apart."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(n_heads, n_pairs, 1, d_head, generator=generator, dtype=torch.float64).expand(-1, -1, 2, -1).clone()
    z[0, :, :, 0] = torch.tensor([1.0, -1.0], dtype=torch.float64)
    return z.reshape(n_heads, 2 * n_pairs, d_head)


def test_a_separating_head_scores_one_and_a_blind_head_scores_chance():
    labels = torch.tensor([1.0, 0.0] * 20, dtype=torch.float64)
    train, validation = planted_activations(20, seed=0), planted_activations(20, seed=1)
    probe = fit_probes(train, labels, regularization=1.0)
    logits = probe_logits(probe, validation)
    # Head 0: every statement on its side, every pair ordered. Head 1: a pair's two statements get the
    # same logit, so exactly one of them is right (0.5) and no pair is strictly ordered (0).
    assert accuracy(logits, labels).tolist() == [1.0, 0.5]
    assert pair_accuracy(logits).tolist() == [1.0, 0.0]
    assert mass_mean_accuracy(train, labels, validation, labels).tolist() == [1.0, 0.5]


def test_the_probe_is_the_regularised_logistic_regression_optimum():
    """One feature, +1 for true and -1 for false (standardised already): by symmetry b = 0 and the
    gradient of ``sum logloss + lambda/2 w^2`` vanishes where ``2 m (sigmoid(w) - 1) + lambda w = 0``
    (m pairs); solved here by bisection."""
    m, lam = 6, 2.0
    z = torch.tensor([1.0, -1.0] * m, dtype=torch.float64)[None, :, None]
    probe = fit_probes(z, torch.tensor([1.0, 0.0] * m), regularization=lam)
    low, high = 0.0, 50.0
    for _ in range(200):
        middle = (low + high) / 2
        if 2 * m * (1 / (1 + math.exp(-middle)) - 1) + lam * middle < 0:
            low = middle
        else:
            high = middle
    assert float(probe.weight[0, 0]) == pytest.approx(low, abs=1e-8)
    assert float(probe.bias[0]) == pytest.approx(0.0, abs=1e-8)
    assert probe.std.flatten().tolist() == [1.0] and probe.mean.flatten().tolist() == [0.0]


def test_the_probe_gradient_vanishes_on_random_data():
    """Stationarity of the objective, each term summed by an explicit loop."""
    generator = torch.Generator().manual_seed(3)
    z = torch.randn(3, 16, 4, generator=generator, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5, 3.0])
    labels = (torch.rand(16, generator=generator) < 0.5).double()
    probe = fit_probes(z, labels, regularization=0.5)
    for head in range(3):
        x = (z[head] - probe.mean[head]) / probe.std[head]
        gradient_w, gradient_b = 0.5 * probe.weight[head].clone(), 0.0
        for i in range(16):
            p = 1 / (1 + math.exp(-(float(x[i] @ probe.weight[head]) + float(probe.bias[head]))))
            gradient_w += (p - float(labels[i])) * x[i]
            gradient_b += p - float(labels[i])
        assert gradient_w.abs().max() < 1e-8 and abs(gradient_b) < 1e-8


def test_the_score_is_the_validation_accuracy_of_planted_activations(model, monkeypatch):
    """The detector's pipeline on activations planted per head: head L0H0 separates, the others
    are blind; values, pair and mass-mean accuracies as computed by hand above, and the rule's
    numbers from the binomial test."""
    def planted(model, texts, *args, **kwargs):
        return torch.cat([planted_activations(len(texts) // 2, n_heads=1, d_head=4, seed=len(texts)),
                          planted_activations(len(texts) // 2, n_heads=8, d_head=4, seed=1)[1:]])

    monkeypatch.setattr(truthfulness, "last_token_z", planted)
    detector = hs.get_detector("truthfulness", n_shuffles=2)
    scores = detector.score(model, progress=False)
    expected = torch.full((2, 4), 0.5)
    expected[0, 0] = 1.0
    assert torch.equal(scores.values, expected)
    assert torch.equal(scores.extras["mass_mean_accuracy"], expected)
    assert torch.equal(scores.extras["pair_accuracy"], (expected == 1.0).float())
    (significance,) = detector.significance(model, scores)
    n_pairs = scores.metadata["n_validation_pairs"]
    assert n_pairs == 57 and scores.metadata["chance"] == 0.5
    assert significance.threshold == binomial_critical_accuracy(n_pairs, 0.5, 8)
    assert significance.floor == float(scores.extras["shuffled_accuracy"].max())
    assert significance.above_null.sum() == 1 and bool(significance.above_null[0, 0])


# --- the intervention and the validation metric -----------------------------------------------------

def test_the_shift_adds_alpha_sigma_theta_to_the_heads_output_at_every_position(model):
    pairs = shipped_pairs()[:6]
    shifts = truth_shifts(model, tuple(pairs), alpha=3.0)
    texts, labels = statements(pairs)
    # sigma * theta by hand: the unit mass-mean direction and the spread of the projections on it
    z = truthfulness.last_token_z(model, texts)[5]  # head L1H1 (layer-major)
    true = torch.tensor(labels).bool()
    theta = z[true].mean(dim=0) - z[~true].mean(dim=0)
    theta = theta / theta.norm()
    sigma = (z @ theta).std(unbiased=False)
    torch.testing.assert_close(shifts[1, 1], (3.0 * sigma * theta).float())

    tokens = tokenize(model, texts[:2]).tokens
    names = [hook_name(layer, "z") for layer in range(2)]
    _, clean = model.run_with_cache(tokens, names_filter=names)
    with shifted(model, shifts, [hs.Head(1, 1)]):
        _, moved = model.run_with_cache(tokens, names_filter=names)
    difference = moved[names[1]] - clean[names[1]]  # [batch, pos, n_heads, d_head]
    torch.testing.assert_close(difference[:, :, 1], shifts[1, 1].expand_as(difference[:, :, 1]), rtol=0, atol=1e-5)
    assert difference[:, :, [0, 2, 3]].abs().max() == 0 and torch.equal(moved[names[0]], clean[names[0]])
    assert active_hooks(model) == 0


def test_the_preference_is_the_whole_statements_log_probability_difference(model):
    pairs = tuple(shipped_pairs()[:4])
    texts, _ = statements(pairs)
    batch = tokenize(model, texts)
    with torch.no_grad():
        log_probs = torch.log_softmax(model(batch.tokens, attention_mask=batch.attention_mask).double(), dim=-1)
    whole = []
    for row in range(len(texts)):
        n = int(batch.lengths[row])
        whole.append(sum(float(log_probs[row, i - 1, batch.tokens[row, i]]) for i in range(1, n)))
    expected = torch.tensor([whole[2 * i] - whole[2 * i + 1] for i in range(len(pairs))])
    got = true_preference(model, pairs, torch.zeros(2, 4, model.cfg.d_head), None)
    torch.testing.assert_close(got, expected.float(), rtol=1e-4, atol=1e-4)


def test_validation_runs_on_held_out_pairs_and_shifts_only(model):
    detector = hs.get_detector("truthfulness", n_shuffles=1)
    scores = detector.score(model, progress=False)
    task = detector.validation_task(model)
    assert task.ablation_hurts_when == "increases" and task.default_method == "shift"
    assert list(task.data) == list(detector.split().held_out)
    values = task.measure(model, [None, [hs.Head(0, 1)]], "shift")
    assert values.shape == (2, len(task.data)) and bool(torch.isfinite(values).all())
    with pytest.raises(hs.InputError, match="'method' parameter must be 'shift'; got 'zero'"):
        hs.validate(model, scores, k=2, n_random=2, method="zero")
    result = hs.validate(model, scores, k=2, n_random=2)
    assert result.method == "shift" and result.n_examples == len(task.data)
    assert active_hooks(model) == 0


def test_no_hook_outlives_an_error_inside_a_shift(model):
    with pytest.raises(RuntimeError, match="inside"):
        with shifted(model, torch.ones(2, 4, model.cfg.d_head), [hs.Head(0, 0), hs.Head(1, 3)]):
            assert active_hooks(model) == 2
            raise RuntimeError("inside")
    assert active_hooks(model) == 0


def test_scores_are_deterministic_and_examples_are_statements(model):
    first = hs.detect(model, "truthfulness", n_shuffles=1, progress=False)
    second = hs.detect(model, "truthfulness", n_shuffles=1, progress=False)
    assert torch.equal(first.values, second.values) and torch.equal(first.extras["shuffled_accuracy"],
                                                                    second.extras["shuffled_accuracy"])
    examples = hs.get_detector("truthfulness").examples(model)
    assert len(examples) == 3 and examples[0][1] == hs.get_detector("truthfulness").split().train[0].true
    assert hs.get_detector("truthfulness").examples(tiny_family_model("LlamaForCausalLM")) == []


def test_significance_refuses_scores_without_its_extras(model):
    scores = hs.detect(model, "truthfulness", n_shuffles=1, progress=False)
    scores.extras.pop("shuffled_accuracy")
    with pytest.raises(hs.InputError, match="rescore them"):
        hs.get_detector("truthfulness").significance(model, scores)


def test_heads_with_non_finite_outputs_are_one_clear_error(model, monkeypatch):
    def broken(model, texts, *args, **kwargs):
        z = torch.zeros(8, len(texts), 4, dtype=torch.float64)
        z[3, 0, 0] = math.nan
        return z

    monkeypatch.setattr(truthfulness, "last_token_z", broken)
    with pytest.raises(hs.EmptyResultError, match="1 of 8 heads give NaN or infinite outputs"):
        hs.detect(model, "truthfulness", progress=False)
