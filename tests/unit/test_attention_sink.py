"""The attention-sink detector and remove_sink on tiny models: the score against a hand computation
from hook_pattern, the re-normalised pattern against one made by hand, errors and hooks."""

from __future__ import annotations

import json
import re

import pytest
import torch

import headscope as hs
from headscope.detectors.attention_sink import AttentionSinkDetector, sink_windows
from headscope.engine.heads import hook_name
from headscope.interventions import _without_first_key, default_reference_text
from headscope.tasks.plain_text import shipped_documents, without_bos
from tests.conftest import active_hooks, tiny_model
from tests.families import tiny_family_model

SMALL = dict(text_length=12, n_sequences=5, n_validation_sequences=4)
TOKENS = torch.tensor([[3, 9, 4, 17, 8, 21, 5, 30], [7, 2, 19, 11, 25, 6, 13, 40]])


@pytest.fixture(scope="module")
def model():
    """A tiny Llama (4 query heads on 2 KV heads) with a byte-level tokenizer (BOS ``<s>``)."""
    return tiny_family_model("LlamaForCausalLM", with_tokenizer=True)


def real_rows(windows):
    """Each window's real tokens, padding cut off, as a ``[1, length]`` tensor."""
    return [tokens[mask.bool()][None] for tokens, mask in zip(windows.tokens, windows.attention_mask)]


def hand_shares(model, windows):
    """``mean_windows mean_{i >= 1} A[i, 0]`` by explicit loops, one unpadded window per forward."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    total = torch.zeros(n_layers, n_heads)
    rows = real_rows(windows)
    for tokens in rows:
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens)
        for layer in range(n_layers):
            pattern = cache[hook_name(layer, "pattern")][0].float()  # [n_heads, query_pos, key_pos]
            for head in range(n_heads):
                on_first = [float(pattern[head, i, 0]) for i in range(1, tokens.shape[1])]
                total[layer, head] += sum(on_first) / len(on_first)
    return total / len(rows)


def test_score_is_the_mean_attention_on_position_0_over_queries_after_the_first(model):
    scores = hs.detect(model, "attention_sink", progress=False, **SMALL)
    windows = sink_windows(model, AttentionSinkDetector(**SMALL).config)
    assert windows.has_bos and len(windows) == 5 and scores.metadata["n_windows"] == 5
    torch.testing.assert_close(scores.values, hand_shares(model, windows), atol=1e-5, rtol=0)
    torch.testing.assert_close(scores.extras["no_bos"], hand_shares(model, without_bos(windows)), atol=1e-5, rtol=0)
    lengths = windows.attention_mask.sum(dim=1).tolist()  # position alone: 1/(i+1) at query i >= 1
    uniform = sum(sum(1 / (i + 1) for i in range(1, n)) / (n - 1) for n in lengths) / len(lengths)
    assert scores.metadata["uniform_share"] == pytest.approx(uniform, abs=1e-6)
    assert ((scores.extras["sink_rate"] >= 0) & (scores.extras["sink_rate"] <= 1)).all()
    assert active_hooks(model) == 0


def test_output_norm_ratio_is_each_heads_output_norm_over_its_layers_mean(model):
    scores = hs.detect(model, "attention_sink", progress=False, **SMALL)
    windows = sink_windows(model, AttentionSinkDetector(**SMALL).config)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    norms = torch.zeros(n_layers, n_heads)
    rows = real_rows(windows)
    for tokens in rows:
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens)
        for layer in range(n_layers):
            z = cache[hook_name(layer, "z")][0].float()  # [pos, n_heads, d_head]; a Llama: no post-norm
            w_o = model.blocks[layer].attn.W_O.detach().float()
            for head in range(n_heads):
                written = [float((z[i, head] @ w_o[head]).norm()) for i in range(1, tokens.shape[1])]
                norms[layer, head] += sum(written) / len(written) / len(rows)
    expected = norms / norms.mean(dim=1, keepdim=True)
    torch.testing.assert_close(scores.extras["output_norm_ratio"], expected, atol=1e-4, rtol=1e-4)


def test_significance_is_above_position_alone_and_above_gu_et_als_epsilon(model):
    detector = AttentionSinkDetector(**SMALL)
    scores = detector.score(model, progress=False)
    values = torch.tensor([[0.05, 0.2, 0.31, 0.9], [0.29, 0.5, 0.04, 0.3]])
    planted = hs.HeadScores(values, scores.detector, scores.model, scores.config, metadata=scores.metadata)
    (significance,) = detector.significance(model, planted)
    assert significance.threshold == pytest.approx(scores.metadata["uniform_share"])
    assert significance.floor == 0.3 and "Gu et al. 2024" in significance.floor_rule
    assert [str(h) for h in significance.heads] == ["L0H3", "L1H1", "L0H2"]


def test_validation_measures_held_out_windows_with_the_sink_removed(model):
    detector = AttentionSinkDetector(**SMALL)
    task = detector.validation_task(model)
    assert task.default_method == "sink" and task.ablation_hurts_when == "increases" and len(task.data) == 4
    losses = task.measure(model, [None, [hs.Head(0, 1)], [hs.Head(1, 0)]], "sink")
    assert losses.shape == (3, 4) and not torch.equal(losses[0], losses[1])
    first = real_rows(sink_windows(model, detector.config, validation=True))[0]
    with torch.no_grad():
        log_probs = torch.log_softmax(model(first)[0].float(), dim=-1)
    by_hand = -sum(float(log_probs[i, first[0, i + 1]]) for i in range(1, first.shape[1] - 1)) / (first.shape[1] - 2)
    assert float(losses[0, 0]) == pytest.approx(by_hand, abs=1e-4)  # predictions of queries i >= 1 only
    mean = task.measure(model, [None, [hs.Head(0, 1)]], "mean")
    torch.testing.assert_close(mean[0], losses[0])
    result = hs.validate(model, detector.score(model, progress=False), k=1, n_random=2, progress=False)
    assert result.method == "sink" and result.n_examples == 4 and active_hooks(model) == 0


def renormalised_by_hand(pattern):
    """Rows ``i >= 1`` of a ``[query_pos, key_pos]`` pattern without key 0, divided by what is left."""
    out = pattern.clone()
    for i in range(1, pattern.shape[0]):
        left = sum(float(pattern[i, k]) for k in range(1, i + 1))
        for k in range(pattern.shape[1]):
            out[i, k] = 0.0 if k == 0 else float(pattern[i, k]) / left
    return out


def test_remove_sink_renormalises_the_chosen_heads_rows_without_position_0(tiny):
    names = [hook_name(layer, "pattern") for layer in range(2)]
    with torch.no_grad():
        clean_logits, clean = tiny.run_with_cache(TOKENS, names_filter=names)
        with hs.remove_sink(tiny, ["L0H1", "L0H3"]):
            changed_logits, changed = tiny.run_with_cache(TOKENS, names_filter=names)
            assert active_hooks(tiny) > 0
    for head in (1, 3):
        for row in range(2):
            expected = renormalised_by_hand(clean[names[0]][row, head])
            torch.testing.assert_close(changed[names[0]][row, head], expected, atol=1e-6, rtol=0)
    rows = changed[names[0]][:, [1, 3]]
    torch.testing.assert_close(rows.sum(dim=-1), torch.ones_like(rows.sum(dim=-1)))
    assert torch.equal(rows[:, :, 0], clean[names[0]][:, [1, 3], 0])  # query 0 untouched
    assert torch.equal(changed[names[0]][:, [0, 2]], clean[names[0]][:, [0, 2]])  # other heads untouched
    assert not torch.allclose(changed_logits, clean_logits) and active_hooks(tiny) == 0
    with torch.no_grad():
        assert torch.equal(tiny(TOKENS), clean_logits)


def test_remove_sink_counts_queries_by_position_when_keys_were_cached():
    """A decoding step (one query after four cached keys): its row is at position 4, so it is
    re-normalised; a prefill's query 0 is not."""
    step = torch.tensor([0.5, 0.2, 0.1, 0.1, 0.1]).reshape(1, 1, 1, 5)
    out = _without_first_key(step, None, indices=[0])
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.0, 0.4, 0.2, 0.2, 0.2]))
    first = torch.tensor([[1.0, 0.0], [0.6, 0.4]]).reshape(1, 1, 2, 2)
    torch.testing.assert_close(_without_first_key(first, None, indices=[0])[0, 0], torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


def test_remove_sink_removes_its_hooks_after_an_exception_and_refuses_bad_heads(tiny):
    with torch.no_grad():
        before = tiny(TOKENS)
    with pytest.raises(RuntimeError, match="boom"):
        with hs.remove_sink(tiny, [(1, 2)]):
            raise RuntimeError("boom")
    with torch.no_grad():
        assert active_hooks(tiny) == 0 and torch.equal(tiny(TOKENS), before)
    with pytest.raises(hs.ArgumentError, match="'heads' argument of remove_sink is empty"):
        hs.remove_sink(tiny, [])
    with pytest.raises(hs.HeadIndexError):
        hs.remove_sink(tiny, ["L5H0"])
    assert active_hooks(tiny) == 0


def test_bad_input_gives_one_clear_error(model, tmp_path):
    with pytest.raises(hs.InputError, match="needs the model's tokenizer"):
        hs.detect(tiny_model(), "attention_sink", progress=False)
    with pytest.raises(hs.SettingError, match="longer than the model's context"):
        hs.detect(model, "attention_sink", progress=False, text_length=5000)
    with pytest.raises(hs.SettingError):
        hs.get_detector("attention_sink", text_length=1)
    with pytest.raises(hs.DataError, match="at least two"):
        short = tmp_path / "short.txt"
        short.write_text("tiny")
        hs.detect(model, "attention_sink", progress=False, data=str(short))
    assert active_hooks(model) == 0


def test_own_text_is_scored_and_held_out_in_windows(model, tmp_path):
    path = tmp_path / "own.jsonl"
    lines = default_reference_text()[:6]  # prose: no two windows of 20 characters alike
    path.write_text("\n".join(json.dumps({"text": line}) for line in lines))
    detector = AttentionSinkDetector(text_length=20, data=str(path))
    detector.check_data()
    scores = detector.score(model, progress=False)
    scored = {tuple(t[0].tolist()) for t in real_rows(sink_windows(model, detector.config))}
    held_out = {tuple(t[0].tolist()) for t in real_rows(sink_windows(model, detector.config, validation=True))}
    assert scored and held_out and not scored & held_out and scores.metadata["data"] == str(path)
    assert detector.examples(model)[0][1].startswith(" ".join(lines[0].split()[:5]))


def test_explanation_and_examples_fit_the_report(model):
    detector = hs.get_detector("attention_sink")
    (text,) = detector.explanation.values()
    assert set(detector.explanation) == {"attention_sink"} and 200 <= len(text) <= 650
    assert re.search(r"\b20\d\d\b", text) and "headscope" in text
    examples = detector.examples(model)
    assert len(examples) == 2 and all(len(prompt.split()) <= 40 for _, prompt in examples)
    assert examples[0][1].split()[:3] == shipped_documents()[0].split()[:3]
    assert detector.examples(tiny_model()) == []
