"""Detectors: registry, templates, and scores on heads whose pattern a hook forces."""

from dataclasses import dataclass

import pytest
import torch

import headscope as hs
from headscope.detectors.attention_templates import repeat_template
from headscope.engine import hook_name
from headscope.tasks import repeated_random_tokens

SMALL = dict(n_sequences=6, block_len=8, n_repeats=3, n_validation_sequences=4)


def test_unknown_detector_lists_the_known_ones(tiny):
    with pytest.raises(hs.UnknownDetectorError, match="Did you mean 'induction'.*Known detectors: .*duplicate_token, induction"):
        hs.detect(tiny, "inducton")


def test_unknown_setting_names_the_valid_ones(tiny):
    with pytest.raises(TypeError, match="block_len"):
        hs.detect(tiny, "induction", blocklen=3)


def test_repeated_tokens_are_distinct_within_a_block_and_repeat():
    task = repeated_random_tokens(d_vocab=64, n_sequences=3, block_len=8, n_repeats=3, bos_token_id=0, seed=1)
    assert task.tokens.shape == (3, 1 + 24) and torch.all(task.tokens[:, 0] == 0)
    block = task.tokens[:, 1:9]
    assert all(len(set(row.tolist())) == 8 for row in block)
    assert torch.equal(task.tokens[:, 9:17], block) and torch.equal(task.tokens[:, 17:], block)
    again = repeated_random_tokens(d_vocab=64, n_sequences=3, block_len=8, n_repeats=3, bos_token_id=0, seed=1)
    assert torch.equal(task.tokens, again.tokens)


def test_induction_template_points_after_every_earlier_copy():
    task = repeated_random_tokens(d_vocab=64, n_sequences=1, block_len=4, n_repeats=3, bos_token_id=0)
    template, queries = repeat_template(task, shift=1)
    assert queries.tolist() == [False] * 5 + [True] * 8
    assert torch.nonzero(template[6]).flatten().tolist() == [3]  # token at 6 = token at 2, followed by 3
    assert torch.nonzero(template[12]).flatten().tolist() == [5, 9]
    assert torch.nonzero(template[5]).flatten().tolist() == [2]  # never the BOS
    duplicate, _ = repeat_template(task, shift=0)
    assert torch.nonzero(duplicate[12]).flatten().tolist() == [4, 8]


def forced_pattern(layer_head, make_pattern):
    """A hook that replaces one head's attention pattern with a constructed one."""
    layer, head = layer_head

    def hook(pattern, hook):
        pattern = pattern.clone()
        pattern[:, head] = make_pattern(pattern.shape[-1]).to(pattern)
        return pattern

    return hook_name(layer, "pattern"), hook


def previous_token_pattern(width):
    pattern = torch.zeros(width, width)
    pattern[0, 0] = 1
    pattern[torch.arange(1, width), torch.arange(0, width - 1)] = 1
    return pattern


def induction_pattern(block_len):
    def make(width):
        pattern = torch.zeros(width, width)
        for query in range(width):
            key = query - block_len + 1
            pattern[query, key if key >= 1 else 0] = 1
        return pattern

    return make


@pytest.mark.parametrize(
    "detector, head, make",
    [
        ("previous_token", (1, 2), previous_token_pattern),
        ("induction", (1, 3), induction_pattern(SMALL["block_len"])),
    ],
)
def test_a_head_forced_into_the_role_scores_one_and_ranks_first(tiny, detector, head, make):
    with tiny.hooks(fwd_hooks=[forced_pattern(head, make)]):
        result = hs.detect(tiny, detector, **SMALL)
    assert result.values.shape == (2, 4)
    assert result[head] == pytest.approx(1.0, abs=1e-5)
    assert result.top_heads(1) == [hs.Head(*head)]
    assert float(result.values.flatten().sort().values[-2]) < 0.9


def test_copying_score_is_in_range_and_deterministic(tiny):
    first = hs.detect(tiny, "induction", **SMALL)
    second = hs.detect(tiny, "induction", **SMALL)
    assert torch.equal(first.values, second.values)
    copying = first.extras["copying"]
    assert copying.shape == (2, 4) and torch.all(copying >= -1) and torch.all(copying <= 1)
    assert first.metadata["n_sequences"] == 6 and first.config["block_len"] == 8


def test_a_user_detector_plugs_in_through_the_registry(tiny):
    @dataclass
    class LayerConfig(hs.DetectorConfig):
        weight: float = 1.0

    class LayerIndex(hs.Detector):
        """Scores each head by its layer index, times a weight."""

        name = "layer_index"
        Config = LayerConfig

        def score(self, model, batch_size=None, progress=None):
            shape = hs.model_shape(model)
            values = torch.arange(shape.n_layers, dtype=torch.float32)[:, None].repeat(1, shape.n_heads)
            return self.result(model, values * self.config.weight)

        def validation_task(self, model):
            raise NotImplementedError

    hs.register_detector(LayerIndex)
    try:
        assert "layer_index" in hs.list_detectors()
        result = hs.detect(tiny, "layer_index", weight=2.0)
        assert result.top(1)[0].score == 2.0 and result.config == {"seed": 0, "weight": 2.0}
        assert set(hs.scan(tiny, ["layer_index", hs.get_detector("previous_token", **SMALL)])) == {"layer_index", "previous_token"}
    finally:
        hs.unregister_detector("layer_index")


def test_scan_saves_each_result_and_resumes_without_recomputing(tiny, tmp_path, monkeypatch):
    detector = hs.get_detector("previous_token", **SMALL)
    first = hs.scan(tiny, [detector], out=tmp_path)["previous_token"]
    assert (tmp_path / "previous_token.json").is_file()
    calls = []
    monkeypatch.setattr(type(detector), "score", lambda *a, **k: calls.append(1))
    again = hs.scan(tiny, [detector], out=tmp_path)["previous_token"]
    assert calls == [] and torch.equal(again.values, first.values)


def test_model_without_head_hooks_is_refused():
    with pytest.raises(hs.UnsupportedModelError, match="not a TransformerLens TransformerBridge"):
        hs.detect(torch.nn.Linear(2, 2), "induction")


def test_copying_over_the_sequence_tokens_equals_the_full_vocabulary_when_they_coincide():
    """With a block holding every vocabulary id once, the sequence candidates are the whole
    vocabulary in another order, so both copying modes must agree exactly."""
    from tests.conftest import tiny_model

    model = tiny_model(d_vocab=32, n_ctx=80)
    settings = dict(n_sequences=3, block_len=32, n_repeats=2, token_range=(0, 32), copying_positions=5)
    by_sequence = hs.detect(model, "induction", copying_vocabulary="sequence", **settings)
    by_vocabulary = hs.detect(model, "induction", copying_vocabulary="full", **settings)
    for name in ("copying", "copying_top1"):
        torch.testing.assert_close(by_sequence.extras[name], by_vocabulary.extras[name], rtol=1e-4, atol=1e-5)
    assert torch.all((by_sequence.extras["copying_top1"] >= 0) & (by_sequence.extras["copying_top1"] <= 1))
