"""The atlas on the bundled model: its significant heads agree with what each detector's own
tests find, and its report opens cleanly in a real browser.

The full atlas (every detector, validated) takes minutes on a CPU and is the README's first
command; here the atlas runs the four cheapest detectors without validation (~25 s), which is
enough to check the significance rules against the detectors' own reproduction tests, and the
report's head pages with their attention patterns.
"""

import pytest

import headscope as hs
from headscope.viz.patterns import NATURAL_SENTENCE, _visible
from tests.browser import open_head_page, open_report

pytestmark = pytest.mark.repro

DETECTORS = ["induction", "previous_token", "duplicate_token", "memory_context"]
SECTIONS = ("summary", "role-map", "heatmaps", "validation", "significance", "overlap", "configs")


@pytest.fixture(scope="module")
def atlas(smollm, tmp_path_factory):
    out = tmp_path_factory.mktemp("atlas")
    result = hs.atlas(smollm, DETECTORS, validate=False, out=out, progress=False)
    result.save(out)
    return result, out


def test_top_induction_heads_are_significant_against_the_unrepeated_token_null(atlas):
    """The heads the induction tests single out (top-5 prefix-matching heads scoring > 0.5) lie
    above the null — the most attention any head puts on a fixed offset in random tokens that
    never repeat — while the median head lies far below it. (On the bundled model the null is
    low, ~0.04, so every head with a little prefix matching counts: ~50 of 270; the role map's
    strength tells the strong ones from the weak.)"""
    result, _ = atlas
    sig = result.roles["induction"]
    scores = result.scores["induction"]
    singled_out = [hs.Head(r.layer, r.head) for r in scores.top(5) if r.score > 0.5]
    print(f"null max {sig.threshold:.3f} ({sig.details['null_max_head']}), median null {sig.details['null_median']:.4f};"
          f" {len(sig.heads)} significant: {[str(h) for h in sig.heads]}")
    assert len(singled_out) >= 3 and set(singled_out) <= set(sig.heads)
    assert float(scores.values.median()) < 0.5 * sig.threshold
    assert len(sig.heads) < 0.5 * scores.values.numel()


def test_memory_and_context_heads_of_the_detector_are_the_atlas_significant_ones(atlas):
    """The memory_context test's memory head and context head (most negative / positive
    attribution) are significant for their roles by the z-test, and no head holds both roles."""
    result, _ = atlas
    scores = result.scores["memory_context"]
    memory, context = (hs.Head.parse(scores.metadata[key][0]) for key in ("memory_heads", "context_heads"))
    print("context:", [str(h) for h in result.significant_heads("context")][:10],
          "memory:", [str(h) for h in result.significant_heads("memory")][:10])
    assert memory in result.significant_heads("memory") and context in result.significant_heads("context")
    assert not set(result.significant_heads("memory")) & set(result.significant_heads("context"))


def test_role_map_and_overlaps_cover_every_role(atlas):
    """Each role is on the role map unless another role is stronger on all of its heads, and the
    overlap table has one row per pair of roles."""
    result, _ = atlas
    names, index, _ = result.role_map()
    assert names == ["induction", "previous_token", "duplicate_token", "context", "memory"]
    assert len(result.overlap_table()) == len(names) * (len(names) - 1) // 2
    on_map = {names[i] for i in index.flatten().tolist() if i >= 0}
    assert {"induction", "previous_token", "context", "memory"} <= on_map


def test_report_loads_in_headless_chromium_with_every_section_and_no_console_errors(atlas, tmp_path):
    """The saved report in Debian's Chromium: every section is visible, the role map and one
    heatmap per role are drawn, no console message or page error, nothing fetched but the file.
    The screenshot is kept in the test's tmp folder for a person to look at."""
    result, out = atlas
    seen = open_report(out / "report.html", SECTIONS, screenshot=tmp_path / "report.png")
    print({key: seen[key] for key in ("visible", "figures", "tables", "console", "errors")}, "height", seen["height"])
    assert all(seen["visible"][section] for section in SECTIONS), seen["visible"]
    assert seen["figures"]["role-map"] == 1 and seen["figures"]["heatmaps"] == len(result.roles)
    assert seen["figures"]["overlap"] == 1 and seen["tables"]["significance"] == 1
    assert seen["console"] == [] and seen["errors"] == []
    assert seen["requests"] == [(out / "report.html").resolve().as_uri()]
    assert (tmp_path / "report.png").stat().st_size > 10_000
    report = (out / "report.html").read_text()
    for head in result.significant_anywhere():
        assert f"<a href='heads/{head}.html'><rect" in report and (out / "heads" / f"{head}.html").is_file()


def test_two_head_pages_open_cleanly_with_patterns_on_the_prompts_tokens(atlas, tmp_path):
    """The pages of the strongest induction head and the strongest context head: every section
    visible, no console message or page error, nothing fetched; a pattern view per example of the
    head's detector and one of the natural sentence, each holding its prompt's tokens, and
    hovering a token recolours it. Screenshots kept in the test's tmp folder."""
    result, out = atlas
    assert result.failures == {}
    for head in (result.significant_heads("induction")[0], result.significant_heads("context")[0]):
        path = out / "heads" / f"{head}.html"
        page = open_head_page(path, screenshot=tmp_path / f"{head}.png")
        print(head, {key: page[key] for key in ("visible", "console", "errors", "requests")},
              [view["tokens"][:12] for view in page["views"]])
        assert all(page["visible"].values()) and page["console"] == [] and page["errors"] == []
        assert page["requests"] == [path.resolve().as_uri()]
        groups = result.patterns_of(head)
        views = [view for group in groups.values() for view in group]
        assert len(views) >= 3 and "".join(groups["natural_sentence"][0].tokens).endswith(NATURAL_SENTENCE)
        assert [v["tokens"] for v in page["views"]] == [[_visible(t) or "∅" for t in v.tokens] for v in views]
        assert all(v["before"] != v["after"] for v in page["views"])
        assert (tmp_path / f"{head}.png").stat().st_size > 10_000
