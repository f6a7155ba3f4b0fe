"""CONTRIBUTING.md's "Adding a detector" works as written: tests/unit/example_detector.py, one file
made by those steps, plugs into ``hs.detect``, ``hs.validate`` and ``hs.atlas`` (beside a library
detector) on a tiny model, and is unregistered afterwards."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import pytest
import torch

import headscope as hs
from headscope.atlas import all_detectors
from headscope.engine.heads import hook_name
from tests.conftest import active_hooks, tiny_model

ROOT = Path(__file__).resolve().parents[2]
SMALL = {"n_sequences": 4, "n_validation_sequences": 4, "block_len": 10, "n_repeats": 3}


@pytest.fixture(scope="module")
def example():
    """The example module, its detector registered (its ``@register_detector`` did it on the first
    import) for this module's tests only."""
    module = importlib.import_module("tests.unit.example_detector")
    hs.register_detector(module.FirstTokenDetector)  # again, should an earlier test have unregistered it
    yield module
    hs.unregister_detector(module.FirstTokenDetector.name)
    assert module.FirstTokenDetector.name not in hs.list_detectors()


@pytest.fixture(scope="module")
def model():
    return tiny_model(n_layers=2, n_heads=4, d_vocab=128, n_ctx=64)


def test_contributing_names_every_step_the_example_takes(example):
    steps = (ROOT / "CONTRIBUTING.md").read_text()
    for word in ("DetectorConfig", "setting(", "score", "significance", "validation_task", "@register_detector",
                 "Data:", "Score:", "Significance:", "Validation metric:", "atlas_order", "atlas_defaults",
                 "pass_key", "score_together", "explanation", "examples(", "tests/unit/example_detector.py"):
        assert word in steps, word
    for section in ("Data:", "Score:", "Significance:", "Validation metric:"):  # the docstring rule
        assert section in example.__doc__, section
    assert "Xiao et al. 2023" in example.__doc__  # the paper


def test_detect_gives_the_mean_attention_to_position_zero(example, model):
    scores = hs.detect(model, "first_token", n_sequences=4, progress=False)
    tokens = example.random_rows(model, example.FirstTokenConfig(n_sequences=4), seed=0)
    _, cache = model.run_with_cache(tokens)
    expected = torch.stack([cache[hook_name(layer, "pattern")][:, :, 1:, 0].mean(dim=(0, 2)) for layer in range(2)])
    torch.testing.assert_close(scores.values, expected, rtol=1e-5, atol=1e-6)
    assert scores.detector == "first_token" and scores.config == {"seed": 0, "n_sequences": 4, "length": 24}
    assert active_hooks(model) == 0


def test_validate_ablates_its_top_heads_against_random_sets(example, model):
    scores = hs.detect(model, "first_token", n_sequences=4, progress=False)
    check = hs.validate(model, scores, k=1, n_random=2, progress=False)
    assert check.top_heads == [str(head) for head in scores.top_heads(1)]
    assert check.metric_name == "next-token loss on random rows (nats)" and check.ablation_hurts_when == "increases"
    assert math.isfinite(check.difference) and check.ci_low <= check.ci_high and check.n_examples == 4


def test_the_atlas_runs_it_beside_a_library_detector_with_its_atlas_defaults(example, model):
    atlas = hs.atlas(model, ["first_token", "previous_token"], k=1, n_random=2, settings={"previous_token": SMALL},
                     progress=False)
    assert atlas.failures == {} and list(atlas.scores) == ["first_token", "previous_token"]
    assert atlas.settings.settings["first_token"] == example.FirstTokenDetector.atlas_defaults
    alone = hs.detect(model, "first_token", progress=False, **example.FirstTokenDetector.atlas_defaults)
    torch.testing.assert_close(atlas.scores["first_token"].values, alone.values)
    (sig,) = atlas.significance["first_token"]
    width = example.random_rows(model, example.FirstTokenConfig(**example.FirstTokenDetector.atlas_defaults), 0).shape[1]
    assert sig.threshold == pytest.approx(example.uniform_first_share(width)) and sig.floor == example.MAJORITY
    assert "scored_with" not in atlas.timings["first_token"]  # no pass_key: scored alone
    assert atlas.validations["first_token"] is not None and "first_token" in atlas.roles
    ordered = all_detectors()  # no atlas_order: after every library detector that has one
    assert ordered.index("first_token") > max(ordered.index(name) for name in ordered
                                              if hs.get_detector(name).atlas_order is not None)
