"""Retrieval detector pieces: ROUGE, copy scores, needle spans, resumable scans, decode-time validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import headscope as hs
from headscope.detectors import retrieval
from headscope.detectors.base import ValidationTask
from headscope.detectors.retrieval import copy_scores, exact_match, needle_scan, rouge1_recall
from headscope.engine.decoding import DecodeTrace
from headscope.errors import InputError, SettingError
from headscope.tasks.haystack import (
    N_GENERATED_FACTS,
    HaystackSample,
    Needle,
    fact_needles,
    generated_needles,
    make_haystack,
    needle_grid,
    shipped_needles,
    token_span,
)


def test_rouge1_recall_counts_reference_words_found():
    assert rouge1_recall("a silver thimble and a starfish", "She keeps a silver thimble.") == pytest.approx(3 / 6)
    assert rouge1_recall("lantern-moth 42", "the code is Lantern moth 42!") == 1.0
    assert rouge1_recall("", "anything") == 0.0


def test_exact_match_needs_the_words_in_order_and_together():
    assert exact_match("ride the copper tram", "You should ride the copper tram, really.")
    assert not exact_match("ride the copper tram", "ride the tram, copper")


def sample_with(tokens, span) -> HaystackSample:
    needle = Needle("x is y z.", "what?", "y z")
    return HaystackSample(torch.tensor(tokens), "", needle, span, len(tokens), 0.0, "plain", torch.tensor([0]))


def test_copy_score_counts_steps_whose_top_key_in_the_span_holds_the_emitted_token():
    sample = sample_with([0, 7, 8, 9, 5, 5], (1, 4))  # answer span: tokens 7 8 9
    tokens = torch.tensor([7, 8, 9])
    keys = torch.zeros(3, 1, 3, dtype=torch.int32)
    keys[:, 0, 0] = torch.tensor([1, 2, 3])  # head 0 copies every answer token
    keys[:, 0, 1] = torch.tensor([1, 1, 1])  # head 1 stays on the first: right only once
    keys[:, 0, 2] = torch.tensor([4, 5, 0])  # head 2 looks outside the span
    trace = DecodeTrace(6, tokens, torch.zeros(3), keys, True)
    assert copy_scores(trace, sample)[0].tolist() == pytest.approx([1.0, 1 / 3, 0.0])


def test_token_span_takes_every_token_overlapping_the_answer():
    # "…is to ride the tram." with "ride" merged into " ride" and "tram." one token.
    offsets = [(0, 0), (0, 2), (2, 5), (5, 10), (10, 14), (14, 20)]
    assert token_span(offsets, 6, 19) == (3, 6)  # answer starts inside token 3, ends inside token 5
    with pytest.raises(InputError):
        token_span(offsets, 30, 35)


def test_shipped_needles_are_invented_and_self_consistent():
    needles = shipped_needles()
    assert len(needles) == 24 and len({n.needle for n in needles}) == 24
    assert all(n.answer in n.needle and n.question.endswith("?") for n in needles)
    with pytest.raises(InputError, match="substring"):
        Needle("The key is red.", "What?", "blue")


def test_fact_needles_continue_the_shipped_ones_and_never_repeat():
    shipped = shipped_needles()
    needles = fact_needles(400)
    assert needles[:24] == shipped and len({n.needle for n in needles}) == len({n.question for n in needles}) == 400
    assert fact_needles(30, start=20) == needles[20:50]  # an index always gives the same needle
    assert all(n.answer in n.needle for n in generated_needles(N_GENERATED_FACTS))
    with pytest.raises(InputError, match="Only 2880 generated fact needles"):
        generated_needles(2, start=N_GENERATED_FACTS - 1)


def test_the_default_grid_scores_needles_0_to_8_and_holds_out_9_to_17():
    detector = hs.get_detector("retrieval")
    assert detector.needles() == shipped_needles()[:9]
    assert detector.needles(held_out=True) == shipped_needles()[9:18]


@pytest.mark.parametrize("needles", ["facts", "codes"])
def test_the_full_grid_config_validates_on_needles_it_never_scored(needles):
    """configs/retrieval-full-grid.json has 99 cells: before, scoring cycled through the 24 shipped
    needles and validation (offset 99 mod 24) reused all 24 of them."""
    settings = json.loads((Path(__file__).parents[2] / "configs" / "retrieval-full-grid.json").read_text())["retrieval"]
    detector = hs.get_detector("retrieval", needles=needles, **settings)
    scored, held_out = detector.needles(), detector.needles(held_out=True)
    assert len(scored) == len(held_out) == 99
    assert len({n.needle for n in scored}) == len({n.needle for n in held_out}) == 99
    assert not {n.needle for n in scored} & {n.needle for n in held_out}


def test_a_grid_too_large_for_distinct_needles_is_an_input_error_naming_the_fix():
    detector = hs.get_detector("retrieval", lengths=tuple(range(100, 2100, 20)), depths=tuple(range(0, 101, 10)),
                               needles_per_cell=2)  # 2,200 samples: 4,400 needles for scoring and validation
    with pytest.raises(InputError, match=r"validation would reuse needles.*needles='codes'"):
        detector.needles()
    assert len(hs.get_detector("retrieval", needles="codes", lengths=detector.config.lengths,
                               depths=detector.config.depths, needles_per_cell=2).needles(held_out=True)) == 2200
    with pytest.raises(SettingError, match="needle_offset"):  # the config's range, or needles()
        hs.get_detector("retrieval", needle_offset=-1).needles()


def test_haystack_input_errors_name_the_problem(tiny_llama):
    needle = shipped_needles()[0]
    with pytest.raises(InputError, match="depth"):
        make_haystack(tiny_llama, needle, 100, 120)
    with pytest.raises(InputError, match="no room for filler"):
        make_haystack(tiny_llama, needle, 10, 50)
    with pytest.raises(hs.PromptTooLongError, match="context of 128"):
        make_haystack(tiny_llama, needle, 400, 50)
    with pytest.raises(InputError, match="Unknown haystack format"):
        make_haystack(tiny_llama, needle, 100, 50, format="markdown")
    with pytest.raises(InputError, match="no chat template"):
        make_haystack(tiny_llama, needle, 100, 50, format="chat")


def test_needle_scan_resumes_after_an_interruption(tiny_llama, tmp_path, monkeypatch):
    samples = needle_grid(tiny_llama, [80, 100], [0, 100], format="plain")
    checkpoint = tmp_path / "needles.jsonl"
    calls = []
    real = retrieval.answer_needle

    def interrupted(model, sample, *args):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(sample.length)
        return real(model, sample, *args)

    monkeypatch.setattr(retrieval, "answer_needle", interrupted)
    with pytest.raises(KeyboardInterrupt):
        needle_scan(tiny_llama, samples, max_new_tokens=3, checkpoint=checkpoint, progress=False)
    assert len(checkpoint.read_text().splitlines()) == 2
    with open(checkpoint, "a") as handle:
        handle.write('{"key": "cut off mid-wri')  # a line torn by the interruption is ignored
    monkeypatch.setattr(retrieval, "answer_needle", lambda model, sample, *a: calls.append(sample.length) or real(model, sample, *a))
    outcomes = needle_scan(tiny_llama, samples, max_new_tokens=3, checkpoint=checkpoint, progress=False)
    assert len(calls) == 4 and len(outcomes) == 4  # two before the interruption, two after
    assert [o.length for o in outcomes] == [80, 80, 100, 100]
    longer = needle_scan(tiny_llama, samples, max_new_tokens=5, checkpoint=checkpoint, progress=False)
    assert len(calls) == 8 and len(longer) == 4  # answers decoded for another length are not reused


def test_retrieval_detector_runs_end_to_end_on_a_tiny_model(tiny_llama):
    settings = dict(lengths=(80,), depths=(0, 100), format="plain", max_new_tokens=4, progress=False)
    with pytest.raises(hs.EmptyResultError, match="retrieved none of 2 needles"):
        hs.detect(tiny_llama, "retrieval", **settings)  # a random model retrieves nothing: an error, not NaNs
    scores = hs.detect(tiny_llama, "retrieval", rouge_threshold=-1.0, **settings)  # every sample counts
    assert scores.values.shape == (2, 4) and scores.detector == "retrieval" and scores.values.isfinite().all()
    assert scores.metadata["n_samples"] == 2 and len(scores.metadata["samples"]) == 2
    assert "activation_rate" in scores.extras
    # The config's choices reject these at construction (SettingError); needles() and validation_task, later.
    with pytest.raises(SettingError, match="'poems'"):
        hs.get_detector("retrieval", needles="poems").samples(tiny_llama)
    with pytest.raises(SettingError, match="'bleu'"):
        hs.get_detector("retrieval", validation_metric="bleu").validation_task(tiny_llama)


def test_validate_uses_a_tasks_own_measure_and_default_method(tiny):
    seen = {}

    def measure(model, head_sets, method):
        seen["sets"], seen["method"] = head_sets, method
        clean = torch.tensor([1.0, 2.0, 3.0, 4.0])
        rows = [clean] + [clean - (2.0 if i == 1 else 0.1) for i in range(1, len(head_sets))]
        return torch.stack(rows)

    task = ValidationTask(None, None, "a decoded metric", "decreases", measure=measure, default_method="uniform")
    values = torch.zeros(2, 4)
    values[1, 2] = 1.0
    scores = hs.HeadScores(values, "induction", hs.models.model_name(tiny))  # validate checks the model's name
    result = hs.validate(tiny, scores, k=1, task=task, n_random=3)
    assert seen["method"] == "uniform" and seen["sets"][0] is None and [str(h) for h in seen["sets"][1]] == ["L1H2"]
    assert result.difference == pytest.approx(-1.9) and result.significant
    with pytest.raises(ValueError, match="measures by decoding"):
        hs.validate(tiny, scores, k=1, task=task, metric=lambda logits, chunk: logits[:, -1, 0])


def test_the_auto_format_is_plain_without_a_chat_template_and_chat_with_one(tiny_llama):
    needle = shipped_needles()[0]
    assert make_haystack(tiny_llama, needle, 100, 50, format="auto").format == "plain"
    assert hs.get_detector("retrieval").config.format == "auto"

    class WithTemplate:
        chat_template = "{{ messages[0]['content'] }}"

    from headscope.tasks.haystack import resolve_format
    assert resolve_format(WithTemplate(), "auto") == "chat" and resolve_format(WithTemplate(), "plain") == "plain"
