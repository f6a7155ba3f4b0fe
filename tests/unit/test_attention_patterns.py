"""hs.attention_patterns and its views, on a tiny random Llama with a word-level tokenizer."""

import xml.etree.ElementTree as ElementTree

import pytest
import torch

import headscope as hs
from headscope.engine.heads import hook_name
from tests.conftest import active_hooks, tiny_text_llama_folder

PROMPT = "w5 w6 w7 w8 w5 w6 w7"


@pytest.fixture(scope="module")
def tiny_text_llama(tmp_path_factory):
    """A tiny random Llama whose byte-level tokenizer runs any text."""
    return hs.load_model(tiny_text_llama_folder(tmp_path_factory.mktemp("text-llama")), device="cpu")


def test_patterns_are_the_models_own_attention_rows_on_the_prompts_tokens(tiny_llama):
    """Each head's pattern is the model's hook_pattern for that query head: rows sum to 1 over
    the keys up to the query, zero after it; the tokens are the prompt's, BOS first."""
    patterns = hs.attention_patterns(tiny_llama, PROMPT, heads=["L1H3", (0, 1)])
    _, cache = tiny_llama.run_with_cache(torch.tensor([[0, 7, 8, 9, 10, 7, 8, 9]]))
    assert patterns.tokens == ["<s>", "w5", "w6", "w7", "w8", "w5", "w6", "w7"]
    assert patterns.heads == [hs.Head(1, 3), hs.Head(0, 1)]
    torch.testing.assert_close(patterns["L1H3"], cache[hook_name(1, "pattern")][0, 3].float())
    torch.testing.assert_close(patterns[hs.Head(0, 1)], cache[hook_name(0, "pattern")][0, 1].float())
    torch.testing.assert_close(patterns.values.sum(-1), torch.ones(2, 8))
    assert patterns.values.triu(diagonal=1).abs().max() == 0
    assert active_hooks(tiny_llama) == 0


def test_every_query_head_by_default_and_token_ids_taken_as_given(tiny_llama):
    """No heads given: all 2 × 4 query heads (4 query heads share 2 KV heads); token ids run as they are."""
    patterns = hs.attention_patterns(tiny_llama, [7, 8, 9])
    assert len(patterns.heads) == 8 and patterns.values.shape == (8, 3, 3)
    assert patterns.tokens == ["w5", "w6", "w7"]


def test_top_keys_name_the_most_attended_tokens(tiny_llama):
    patterns = hs.attention_patterns(tiny_llama, PROMPT, heads=["L1H0"])
    row = patterns["L1H0"][-1]
    top = patterns.top_keys("L1H0", k=2)
    assert [t[0] for t in top] == row.topk(2).indices.tolist()
    assert top[0][1] == patterns.tokens[top[0][0]] and top[0][2] == pytest.approx(float(row.max()))


def test_round_trip_through_a_dict_keeps_each_weight_to_the_rounding(tiny_llama):
    patterns = hs.attention_patterns(tiny_llama, PROMPT, heads=["L0H0", "L1H2"], title="repeats")
    again = hs.AttentionPatterns.from_dict(patterns.to_dict(decimals=4))
    assert (again.tokens, again.heads, again.title, again.model) == (patterns.tokens, patterns.heads, "repeats",
                                                                   patterns.model)
    assert (again.values - patterns.values).abs().max() <= 5e-5


def test_html_view_is_self_contained_with_every_token_and_a_button_per_head(tiny_llama):
    """The view holds every token and the data inline, fetches nothing, and two views on one
    page get different ids (each script finds its own)."""
    patterns = hs.attention_patterns(tiny_llama, PROMPT, heads=["L0H0", "L1H2"])
    first, second = patterns.to_html(), patterns._repr_html_()
    for token in set(patterns.tokens):
        assert f">{token}</span>" in first.replace("&lt;", "<").replace("&gt;", ">")
    assert first.count("<button") == 2 and "<script>" in first and "application/json" in first
    assert "http://" not in first and "https://" not in first and " src=" not in first
    ids = [html.split("id='", 1)[1].split("'", 1)[0] for html in (first, second)]
    assert ids[0] != ids[1]


def test_static_svg_is_valid_xml_with_one_box_per_token_and_the_query_outlined(tiny_llama):
    patterns = hs.attention_patterns(tiny_llama, PROMPT, heads=["L1H1"])
    svg = patterns.to_svg("L1H1", query=4)
    root = ElementTree.fromstring(svg)
    boxes = root.findall("{http://www.w3.org/2000/svg}g")
    assert len(boxes) == len(patterns.tokens)
    assert [g.find("{http://www.w3.org/2000/svg}rect").get("stroke") for g in boxes].count("#d62728") == 1
    assert boxes[4].find("{http://www.w3.org/2000/svg}rect").get("stroke") == "#d62728"


def test_plot_labels_query_and_key_axes_with_the_tokens(tiny_llama, tmp_path):
    from matplotlib.figure import Figure

    patterns = hs.attention_patterns(tiny_llama, PROMPT, heads=["L1H1"])
    figure = patterns.plot("L1H1", path=tmp_path / "pattern.png")
    assert isinstance(figure, Figure) and (tmp_path / "pattern.png").stat().st_size > 1000
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == patterns.tokens
    assert ax.get_xlabel().startswith("key") and ax.get_ylabel().startswith("query")


def test_bad_prompts_and_heads_are_refused_with_the_fix(tiny_llama):
    with pytest.raises(hs.InputError, match="max_tokens"):
        hs.attention_patterns(tiny_llama, " ".join(["w3"] * 20), max_tokens=10)
    with pytest.raises(hs.InputError, match="one prompt"):
        hs.attention_patterns(tiny_llama, torch.tensor([[1, 2], [3, 4]]))
    with pytest.raises(hs.InputError, match="empty"):
        hs.attention_patterns(tiny_llama, "")
    with pytest.raises(hs.HeadIndexError):
        hs.attention_patterns(tiny_llama, PROMPT, heads=["L7H0"])
    patterns = hs.attention_patterns(tiny_llama, PROMPT, heads=["L0H0"])
    with pytest.raises(KeyError, match="L0H0"):
        patterns["L1H1"]


def test_a_pattern_that_is_not_finite_is_an_error_not_a_picture(tiny_llama, monkeypatch):
    import headscope.viz.patterns as module

    def nan_cache(model, batch, names):
        n = batch.tokens.shape[1]
        return None, {name: torch.full((1, 4, n, n), float("nan")) for name in names}

    monkeypatch.setattr(module, "forward_with_cache", nan_cache)
    with pytest.raises(hs.EmptyResultError, match="NaN"):
        hs.attention_patterns(tiny_llama, PROMPT, heads=["L0H0"])


def test_text_that_looks_like_html_cannot_break_out_of_the_views_script(tiny_text_llama):
    """A prompt holding '<!--<script>' or '</script>' is data: the view's JSON carries no '<'
    (a raw '<!--<script>' inside a script element swallows the rest of the page)."""
    patterns = hs.attention_patterns(tiny_text_llama, "a <!--<script> b </script> & c", heads=["L0H0"])
    html = patterns.to_html()
    data = html.split("<script type='application/json'>", 1)[1].split("</script>", 1)[0]
    assert "<" not in data and ">" not in data and "&" not in data
    assert html.count("<script") == 2 and html.count("</script>") == 2
    import json

    assert json.loads(data)["tokens"] == patterns.tokens


def test_the_view_starts_at_the_query_asked_for_and_refuses_one_outside_the_prompt(tiny_llama):
    patterns = hs.attention_patterns(tiny_llama, PROMPT, heads=["L0H0"])
    assert '"query": 2' in patterns.to_html(query=2) and '"query": 7' in patterns.to_html()
    for bad in (8, -9):
        with pytest.raises(hs.InputError, match="outside the prompt's 8 tokens"):
            patterns.to_svg(query=bad)
        with pytest.raises(hs.InputError, match="outside"):
            patterns.top_keys("L0H0", query=bad)
    assert patterns.to_html(view_id="view-1").startswith("<div class='hs-pv' id='view-1'>")


def test_a_cut_off_patterns_file_is_an_error_naming_the_head(tiny_llama):
    data = hs.attention_patterns(tiny_llama, PROMPT, heads=["L0H0", "L1H1"]).to_dict()
    data["rows"][1] = data["rows"][1][:-1]
    with pytest.raises(hs.ResultFileError, match="L1H1"):
        hs.AttentionPatterns.from_dict(data)
