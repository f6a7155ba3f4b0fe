"""The atlas report on a tiny model with a tokenizer: a page per significant head with its
attention patterns on the prompts' tokens, the patterns saved, loaded and resumed with the atlas,
a failure of the patterns step recorded, the detectors' examples and explanations, and the pages
in headless Chromium.

A tiny random model has no head that passes the library's significance rules, so the fixture
calls the two highest-scoring heads of each template role significant (its rule patched): the
pages and patterns follow whatever heads are significant."""

from __future__ import annotations

import dataclasses
import html
import importlib
import json
import re
import shutil

import pytest

import headscope as hs
from headscope.detectors.attention_templates import AttentionTemplateDetector
from headscope.detectors.base import detector_class
from headscope.viz.patterns import NATURAL_SENTENCE, _visible
from tests.browser import open_head_page, open_report
from tests.conftest import tiny_model
from tests.families import tiny_family_model

atlas_module = importlib.import_module("headscope.atlas")  # hs.atlas is the function

TEMPLATES = ["induction", "previous_token", "duplicate_token"]
LIBRARY = [*TEMPLATES, "successor", "retrieval", "memory_context", "select_copy", "safety", "attention_sink",
           "copy_suppression", "name_mover", "function_vector", "truthfulness"]
SMALL = {"n_sequences": 4, "n_validation_sequences": 4, "block_len": 10, "n_repeats": 3}
SECTIONS = ("summary", "role-map", "heatmaps", "validation", "significance", "overlap", "configs")


def top_two_significant(monkeypatch):
    """Each template role's rule, with the two highest-scoring heads called significant."""
    real = AttentionTemplateDetector.significance

    def significance(self, model, scores, *args):
        (sig,) = real(self, model, scores, *args)
        third = float(scores.values.flatten().topk(3).values[-1])
        return [dataclasses.replace(sig, threshold=third, floor=third)]

    monkeypatch.setattr(AttentionTemplateDetector, "significance", significance)


def text_atlas(model, out=None, **kwargs):
    options = dict(k=2, n_random=2, settings={name: dict(SMALL) for name in TEMPLATES}, progress=False)
    return hs.atlas(model, TEMPLATES, out=out, **{**options, **kwargs})


@pytest.fixture(scope="module")
def model():
    """A tiny Llama (4 query heads on 2 KV heads) with a byte-level tokenizer: text runs."""
    return tiny_family_model("LlamaForCausalLM", with_tokenizer=True)


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("atlas")
    with pytest.MonkeyPatch.context() as monkeypatch:
        top_two_significant(monkeypatch)
        result = text_atlas(model, out=out)
    result.save(out)
    return result, out


def view_tokens(page: str) -> list[str]:
    """The text of every token span of the page's pattern views, in order."""
    return [html.unescape(span) for span in re.findall(r"<span class='hs-tok[^']*'[^>]*>(.*?)</span>", page)]


def test_every_significant_head_has_a_page_with_its_patterns_on_the_prompts_tokens(saved, model):
    result, out = saved
    heads = result.significant_anywhere()
    assert len(heads) == 6 and result.failures == {}
    assert sorted(p.name for p in (out / "heads").iterdir()) == sorted(f"{h}.html" for h in heads)
    for head in heads:
        page = (out / "heads" / f"{head}.html").read_text()
        views = [view for group in result.patterns_of(head).values() for view in group]
        (detector,) = [sig.detector for sig in result.roles.values() if head in sig.heads]
        assert len(views) == len(hs.get_detector(detector).examples(model)) + 1  # its examples and the sentence
        assert view_tokens(page) == [_visible(t) or "∅" for view in views for t in view.tokens]
        assert all(view.heads == [head] for view in views)
        natural = result.patterns_of(head)[atlas_module.NATURAL][0]
        assert "".join(natural.tokens[1:]) == NATURAL_SENTENCE and natural.tokens[0] == "<s>"
        for section in ("scores", "validation", "patterns", "neighbours"):
            assert f"<section id='{section}'>" in page
        assert "href='../report.html'" in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
        kv, group = result.kv_group(head)
        assert f"KV head {kv} of layer {head.layer}, shared with" in page and len(group) == 2
        assert head in group and result.n_kv_heads == 2


def test_each_example_view_shows_its_own_prompt(saved, model):
    result, _ = saved
    for name in TEMPLATES:
        examples = hs.get_detector(name, **SMALL).examples(model)
        drawn = result.patterns[name]
        assert [p.title for p in drawn] == [title for title, _ in examples]
        text, ids = examples[0][1], examples[1][1]
        assert isinstance(text, str) and "".join(drawn[0].tokens[1:]) == text
        assert isinstance(ids, list) and drawn[1].tokens == [model.tokenizer.decode([i]) for i in ids]
        assert drawn[0].heads == sorted(result.significant_heads(name))


def test_role_map_heatmaps_and_summary_link_each_head_page(saved):
    result, out = saved
    report = (out / "report.html").read_text()
    role_map = (out / "role_map.svg").read_text()
    for head in result.significant_anywhere():
        assert f"<a href='heads/{head}.html'><rect" in role_map
        assert report.count(f"<a href='heads/{head}.html'><rect") == 1 + len(result.roles)  # role map, heatmaps
    n_links = len(re.findall(r"<a href='heads/L\dH\d\.html'><rect", report))
    assert n_links == (1 + len(result.roles)) * len(result.significant_anywhere())
    assert report.count("<rect") - n_links >= 2 * 8  # the other heads' cells are there, unlinked
    for role in TEMPLATES:
        explanation = hs.get_detector(role).explanation[role]
        assert f"<p class='explain'>{explanation}</p>" in report.replace("&#x27;", "'")
    svg_text = [text for svg in re.findall(r"<svg.*?</svg>", report, flags=re.S)
                for text in re.findall(r">([^<>]+)</text>", svg)]
    assert svg_text and not [text for text in svg_text if re.search(r"\de[-+]\d", text)]  # never 1.85e-10


def test_patterns_round_trip_through_save_and_load(saved):
    result, out = saved
    loaded = hs.Atlas.load(out)
    assert loaded.patterns.keys() == result.patterns.keys() and loaded.n_kv_heads == result.n_kv_heads
    for key, drawn in result.patterns.items():
        for original, again in zip(drawn, loaded.patterns[key], strict=True):
            assert (again.tokens, again.heads, again.title) == (original.tokens, original.heads, original.title)
            assert (again.values - original.values).abs().max() < 6e-4  # saved to 3 decimals
            assert again.notes["prompt"] == original.notes["prompt"]
    assert json.loads((out / "patterns.json").read_text()).keys() == result.patterns.keys()


def test_a_resumed_atlas_reuses_the_patterns_part_and_redraws_for_other_heads(model, saved, tmp_path, monkeypatch):
    result, out = saved
    shutil.copytree(out / "parts", tmp_path / "parts")
    calls = []
    real = atlas_module.attention_patterns
    monkeypatch.setattr(atlas_module, "attention_patterns", lambda *a, **kw: (calls.append(a[1]), real(*a, **kw))[1])
    top_two_significant(monkeypatch)
    again = text_atlas(model, out=tmp_path)
    assert calls == [] and again.timings[atlas_module.PATTERNS_STEP]["resumed"]
    for key, drawn in result.patterns.items():
        assert [(p.tokens, p.heads) for p in again.patterns[key]] == [(p.tokens, p.heads) for p in drawn]

    for part in (tmp_path / "parts").glob("*.significance.json"):
        part.unlink()  # significance recomputed by another rule: other heads, so the patterns are drawn again
    real_significance = AttentionTemplateDetector.significance

    def top_one(self, model, scores, *args):
        (sig,) = real_significance(self, model, scores, *args)
        second = float(scores.values.flatten().topk(2).values[-1])
        return [dataclasses.replace(sig, threshold=second, floor=second)]

    monkeypatch.setattr(AttentionTemplateDetector, "significance", top_one)
    fewer = text_atlas(model, out=tmp_path)
    assert len(calls) == sum(len(drawn) for drawn in result.patterns.values())
    assert fewer.patterns[atlas_module.NATURAL][0].heads == fewer.significant_anywhere()
    assert len(fewer.significant_anywhere()) == 3


def test_a_failure_in_the_patterns_step_is_recorded_and_the_atlas_kept(model, tmp_path, monkeypatch):
    top_two_significant(monkeypatch)

    def broken(*args, **kwargs):
        raise RuntimeError("patterns made to fail")

    monkeypatch.setattr(atlas_module, "attention_patterns", broken)
    result = text_atlas(model, out=tmp_path, validate=False)
    step = atlas_module.PATTERNS_STEP
    assert result.failures == {step: {"stage": "patterns", "error": "RuntimeError", "message": "patterns made to fail"}}
    assert set(result.scores) == set(TEMPLATES) and result.patterns == {}
    assert result.failure_summary() == f"the attention patterns failed ({step} in patterns: RuntimeError: patterns made to fail)"
    failed = json.loads((tmp_path / "parts" / f"{step}.failed.json").read_text())
    assert failed["stage"] == "patterns" and "Traceback" in failed["traceback"]
    result.save(tmp_path)
    head = result.significant_anywhere()[0]
    assert "drawing them failed" in (tmp_path / "heads" / f"{head}.html").read_text()
    assert "the attention patterns failed" in (tmp_path / "report.html").read_text()
    with pytest.raises(RuntimeError, match="patterns made to fail"):
        text_atlas(model, validate=False, on_error="raise")

    monkeypatch.setattr(atlas_module, "attention_patterns", importlib.import_module("headscope.viz.patterns").attention_patterns)
    rerun = text_atlas(model, out=tmp_path, validate=False)
    assert rerun.failures == {} and rerun.patterns and not (tmp_path / "parts" / f"{step}.failed.json").exists()


def test_a_resaved_atlas_removes_the_pages_of_heads_no_longer_significant(saved, tmp_path):
    result, _ = saved
    result.save(tmp_path)
    (tmp_path / "heads" / "L9H9.html").write_text("stale")
    result.save(tmp_path)
    assert sorted(p.name for p in (tmp_path / "heads").iterdir()) == sorted(f"{h}.html" for h in result.significant_anywhere())


@pytest.mark.parametrize("name", LIBRARY)
def test_every_library_detector_explains_its_roles_and_gives_short_examples(name, model):
    detector = hs.get_detector(name)
    roles = {"memory_context": {"context", "memory"},
             "name_mover": {"name_mover", "negative_name_mover", "s_inhibition"}}.get(name, {name})
    assert set(detector.explanation) == roles
    for text in detector.explanation.values():  # a few plain sentences naming the paper, with its year
        assert 200 <= len(text) <= 650 and re.search(r"\b20\d\d\b", text) and "headscope" in text
    examples = detector.examples(model)
    assert 2 <= len(examples) <= 3
    for title, prompt in examples:
        assert title and (isinstance(prompt, str) or all(isinstance(i, int) for i in prompt))
        pieces = prompt if isinstance(prompt, list) else re.findall(r"\w+|[^\w\s]+", prompt)  # ~ BPE tokens
        assert len(pieces) <= 64, (title, len(pieces))


def test_without_a_tokenizer_only_token_examples_remain():
    model = tiny_model(d_vocab=128)
    for name in hs.list_detectors():
        examples = hs.get_detector(name).examples(model)
        assert all(isinstance(prompt, list) for _, prompt in examples), name
    assert len(hs.get_detector("induction").examples(model)) == 1


def test_the_report_and_two_head_pages_open_cleanly_in_chromium(saved, tmp_path):
    """The report and two head pages in Debian's Chromium: no console message, no page error,
    nothing fetched but the page itself; each pattern view holds its prompt's tokens, and
    hovering a token recolours the view. Screenshots are kept in the test's tmp folder."""
    result, out = saved
    seen = open_report(out / "report.html", SECTIONS, screenshot=tmp_path / "report.png")
    assert all(seen["visible"].values()) and seen["console"] == [] and seen["errors"] == []
    assert seen["requests"] == [(out / "report.html").resolve().as_uri()]
    assert seen["figures"]["heatmaps"] == len(result.roles)
    for head in result.significant_anywhere()[:2]:
        path = out / "heads" / f"{head}.html"
        page = open_head_page(path, screenshot=tmp_path / f"{head}.png")
        assert all(page["visible"].values()) and page["console"] == [] and page["errors"] == []
        assert page["requests"] == [path.resolve().as_uri()]
        views = [view for group in result.patterns_of(head).values() for view in group]
        assert [v["tokens"] for v in page["views"]] == [[_visible(t) or "∅" for t in v.tokens] for v in views]
        assert all(v["before"] != v["after"] for v in page["views"])
        assert "../report.html" in page["links"] and (tmp_path / f"{head}.png").stat().st_size > 10_000


def test_an_example_too_long_to_read_is_left_out_with_a_note_not_a_failure(model, tmp_path, monkeypatch):
    """An example over the patterns' token limit is left out (named in the timings), the other
    examples and the natural sentence are drawn, and the atlas records no failure."""
    top_two_significant(monkeypatch)
    monkeypatch.setattr(atlas_module, "PATTERN_TOKENS", len(NATURAL_SENTENCE) + 2)  # byte tokens: the sentence fits
    for name in TEMPLATES:
        cls = detector_class(name)
        monkeypatch.setattr(cls, "examples", lambda self, m, real=cls.examples: [("far too long", "word " * 200),
                                                                                 *real(self, m)])
    result = text_atlas(model, out=tmp_path, validate=False)
    skipped = result.timings[atlas_module.PATTERNS_STEP]["skipped"]
    assert result.failures == {} and len(skipped) == len(TEMPLATES)
    assert all(entry.endswith(": far too long") for entry in skipped)
    assert result.patterns[atlas_module.NATURAL] and all(
        p.title != "far too long" for drawn in result.patterns.values() for p in drawn)


def test_a_patterns_file_of_another_model_or_cut_off_loads_the_atlas_without_patterns(saved, tmp_path):
    """patterns.json illustrates the atlas: one of another model, or a damaged one, is left out
    with a ResultFileWarning naming the file, and the atlas still loads."""
    _, out = saved
    shutil.copy(out / "atlas.json", tmp_path / "atlas.json")
    data = json.loads((out / "patterns.json").read_text())
    for group in data.values():
        for drawn in group:
            drawn["model"] = "another-model"
    (tmp_path / "patterns.json").write_text(json.dumps(data))
    with pytest.warns(hs.ResultFileWarning, match="another-model"):
        assert hs.Atlas.load(tmp_path).patterns == {}
    (tmp_path / "patterns.json").write_text((out / "patterns.json").read_text()[:-200])
    with pytest.warns(hs.ResultFileWarning, match="patterns.json"):
        loaded = hs.Atlas.load(tmp_path)
    assert loaded.patterns == {} and loaded.scores.keys() == saved[0].scores.keys()
