"""Issue 19, the Python API rows: bad input gets one HeadscopeError naming the argument, never a
traceback from deep inside, a NaN or a silent no-op; damaged part and result files are named and
recomputed; long steps report progress and reused work says "resumed"."""

import json
import math

import pytest
import torch

import headscope as hs
from headscope.errors import ArgumentError, HeadscopeError, ResultFileError, ResultFileWarning, ScoresMismatchError
from headscope.interventions import head_output_means, kv_groups_touched
from headscope.models import model_name
from tests.conftest import active_hooks, tiny_model

TOKENS = torch.tensor([[3, 9, 4, 17, 8, 21, 5, 30], [7, 2, 19, 11, 25, 6, 13, 40]])
SMALL = {"n_sequences": 4, "n_validation_sequences": 4, "block_len": 10, "n_repeats": 3}


def nan_at(size, index=3, value=math.nan):
    vector = torch.ones(size)
    vector[index] = value
    return vector


# (intervention on the tiny model: 2 layers x 4 heads, d_model 64, d_head 16), argument named
INTERVENTION_ROWS = {
    "add_vector NaN": (lambda m: hs.add_vector(m, nan_at(64), layer=0), "vector"),
    "add_vector inf": (lambda m: hs.add_vector(m, nan_at(64, value=math.inf), layer=1, hook="resid_post"), "vector"),
    "add_vector head NaN": (lambda m: hs.add_vector(m, nan_at(16), layer=0, head=(0, 1)), "vector"),
    "add_vector scale NaN": (lambda m: hs.add_vector(m, torch.ones(64), layer=0, scale=math.nan), "scale"),
    "add_vector layer 9": (lambda m: hs.add_vector(m, torch.ones(64), layer=9), "layer"),
    "add_vector positions 999": (lambda m: hs.add_vector(m, torch.ones(64), layer=0, positions=999), "positions"),
    "add_vector positions -999": (lambda m: hs.add_vector(m, torch.ones(64), layer=0, positions=[0, -999]), "positions"),
    "add_vector head positions 999": (lambda m: hs.add_vector(m, torch.ones(16), layer=0, head="L0H1", positions=999),
                                      "positions"),
    "add_vector positions empty": (lambda m: hs.add_vector(m, torch.ones(64), layer=0, positions=[]), "positions"),
    "add_vector positions 'last'": (lambda m: hs.add_vector(m, torch.ones(64), layer=0, positions="last"), "positions"),
    "edit remove inf": (lambda m: hs.edit(m, nan_at(64, value=-math.inf), torch.ones(64), layer=0), "remove"),
    "edit positions 999": (lambda m: hs.edit(m, torch.zeros(64), torch.ones(64), layer=0, positions=999), "positions"),
    "scale_output NaN": (lambda m: hs.scale_output(m, [(0, 0)], math.nan), "factor"),
    "scale_output inf": (lambda m: hs.scale_output(m, [(0, 0)], math.inf), "factor"),
    "scale_query inf": (lambda m: hs.scale_query(m, [(0, 0)], -math.inf), "factor"),
    "scale_values NaN": (lambda m: hs.scale_values(m, [(0, 0)], math.nan), "factor"),
    "uniform_attention eps -1": (lambda m: hs.uniform_attention(m, [(0, 0)], epsilon=-1), "epsilon"),
    "uniform_attention eps 0": (lambda m: hs.uniform_attention(m, [(0, 0)], epsilon=0), "epsilon"),
    "uniform_attention eps NaN": (lambda m: hs.uniform_attention(m, [(0, 0)], epsilon=math.nan), "epsilon"),
    "ablate uniform eps inf": (lambda m: hs.ablate(m, [(0, 0)], method="uniform", epsilon=math.inf), "epsilon"),
    "mask_at_decode eps -1": (lambda m: hs.mask_at_decode(m, [(0, 0)], epsilon=-1)(m), "epsilon"),
    "ablate_per_row eps 0": (lambda m: hs.ablate_per_row(m, [[(0, 0)], None], method="uniform", epsilon=0), "epsilon"),
    "ablate no heads": (lambda m: hs.ablate(m, [], method="zero"), "heads"),
    "ablate mean no heads": (lambda m: hs.ablate(m, [], method="mean"), "heads"),
    "scale_output no heads": (lambda m: hs.scale_output(m, [], 2.0), "heads"),
    "scale_query no heads": (lambda m: hs.scale_query(m, (), 2.0), "heads"),
    "scale_values no heads": (lambda m: hs.scale_values(m, [], 2.0, per="kv_group"), "heads"),
    "uniform_attention no heads": (lambda m: hs.uniform_attention(m, []), "heads"),
    "mask_at_decode no heads": (lambda m: hs.mask_at_decode(m, [])(m), "heads"),
    "ablate method typo": (lambda m: hs.ablate(m, [(0, 0)], method="meen"), "method"),
    "ablate_per_row no head sets": (lambda m: hs.ablate_per_row(m, []), "head_sets"),
    "ablation_scan no heads": (lambda m: _scan(m, heads=[]), "heads"),
    "ablation_scan uniform factor 0": (lambda m: _scan(m, method="uniform", factor=0.0), "factor"),
    "ablation_scan scale factor NaN": (lambda m: _scan(m, method="scale", factor=math.nan), "factor"),
}


def _scan(model, **options):
    """A scan raises before it starts; a context manager keeps the table's shape."""
    import contextlib

    hs.ablation_scan(model, TOKENS, lambda logits, chunk: logits[:, -1, 0], **options)
    return contextlib.nullcontext()


def logits(model):
    with torch.no_grad():
        return model(TOKENS)


WRONG_TYPE_ROWS = {"add_vector positions 'last'", "k=1.5"}  # headscope's own check, not the annotation's


def rows(table):
    return [pytest.param(row, marks=pytest.mark.wrong_type) if row in WRONG_TYPE_ROWS else row for row in sorted(table)]


@pytest.mark.parametrize("row", rows(INTERVENTION_ROWS))
def test_a_bad_intervention_raises_one_named_error_and_leaves_the_model_as_it_was(tiny, row):
    make, argument = INTERVENTION_ROWS[row]
    before = logits(tiny)
    with pytest.raises(HeadscopeError) as raised:
        with make(tiny):  # checks up front, or (positions) in the forward pass
            logits(tiny)
    assert isinstance(raised.value, (ArgumentError, hs.InputError)), type(raised.value)
    message = str(raised.value)
    assert f"'{argument}'" in message and "\n" not in message
    assert active_hooks(tiny) == 0
    assert torch.equal(logits(tiny), before)


def test_kv_groups_touched_needs_a_head(tiny_gqa):
    with pytest.raises(ArgumentError, match="'heads' argument of kv_groups_touched is empty"):
        kv_groups_touched(tiny_gqa, [])


def test_the_checks_accept_what_they_should(tiny):
    """Integer-like positions (numpy, tensors), negative positions within range, a zero vector and
    a zero factor are fine; the interventions still change the logits."""
    import numpy as np

    before = logits(tiny)
    for context in (hs.add_vector(tiny, torch.ones(64), layer=0, positions=np.int64(-1)),
                    hs.add_vector(tiny, torch.ones(64), layer=0, positions=torch.tensor([0, 7])),
                    hs.scale_output(tiny, [(0, 0)], 0),
                    hs.uniform_attention(tiny, [(1, 1)], epsilon=1e-3)):
        with context:
            assert not torch.equal(logits(tiny), before)
    assert active_hooks(tiny) == 0


# --- validate: the arguments are checked before any run ------------------------------------------------------

def tiny_scores(model, shape=(2, 4), name=None):
    values = torch.arange(float(shape[0] * shape[1])).view(shape)
    return hs.HeadScores(values, "induction", name or model_name(model), config=dict(SMALL))


VALIDATE_ROWS = {  # keyword arguments of validate on the tiny model's 8 heads, error class, argument named
    "k=0": (dict(k=0), ArgumentError, "k"),
    "k=-2": (dict(k=-2), ArgumentError, "k"),
    "k=4 (no disjoint random 4-set beyond the top 4 of 8)": (dict(k=4), ArgumentError, "k"),
    "k larger than the model": (dict(k=100), ArgumentError, "k"),
    "k=1.5": (dict(k=1.5), ArgumentError, "k"),
    "n_random=0": (dict(n_random=0), ArgumentError, "n_random"),
    "n_random=1": (dict(n_random=1), ArgumentError, "n_random"),
    "scores of a 12x12 model": (dict(scores=(12, 12)), ScoresMismatchError, "scores"),
    "scores labelled with another model": (dict(scores="gpt2"), ScoresMismatchError, "scores"),
}


@pytest.mark.parametrize("row", rows(VALIDATE_ROWS))
def test_validate_refuses_bad_arguments_before_any_run(tiny, row, monkeypatch):
    options, error, argument = VALIDATE_ROWS[row]
    options = {"k": 1, **options}
    scores = options.pop("scores", None)
    if isinstance(scores, tuple):
        scores = tiny_scores(tiny, shape=scores)
    elif isinstance(scores, str):
        scores = tiny_scores(tiny, name=scores)
    else:
        scores = tiny_scores(tiny)
    monkeypatch.setattr(hs.validation, "_measure_forward", lambda *a, **k: pytest.fail("ran the model"))
    with pytest.raises(error) as raised:
        hs.validate(tiny, scores, **options)
    message = str(raised.value)
    assert f"'{argument}'" in message and "\n" not in message
    if "another model" in row:
        assert "'gpt2'" in message and f"'{model_name(tiny)}'" in message and "check_model=False" in message
    if "12x12" in row:
        assert "12 layers x 12 heads" in message and "2 x 4" in message


def test_validate_takes_scores_of_another_name_with_check_model_false(tiny):
    def measure(model, head_sets, method):  # a decoded task's metric, without decoding
        return torch.stack([torch.arange(4.0) - (1.0 if heads else 0.0) for heads in head_sets])

    task = hs.ValidationTask(None, None, "a metric", "decreases", measure=measure)
    result = hs.validate(tiny, tiny_scores(tiny, name="smollm2-135m-instruct"), k=1, n_random=2, task=task,
                         check_model=False)
    assert result.model == "smollm2-135m-instruct" and result.top_heads == ["L1H3"]


def test_scores_check_model_names_both_models(tiny):
    with pytest.raises(ScoresMismatchError, match="'gpt2', but the model is 'native'"):
        tiny_scores(tiny, name="gpt2").check_model(tiny)
    tiny_scores(tiny, name="gpt2").check_model(tiny, check_name=False)  # same shape: accepted


# --- saved files: named, and recomputed where headscope wrote them -------------------------------------------

LOAD_ROWS = {
    "missing": None,
    "truncated": lambda text: text[: len(text) // 2],
    "a JSON list": lambda text: "[1, 2, 3]",
    "values of the wrong shape": lambda text: json.dumps({**json.loads(text), "values": [1.0, 2.0]}),
    "no values": lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "values"}),
    "empty": lambda text: "",
}


@pytest.mark.parametrize("row", sorted(LOAD_ROWS))
def test_loading_a_damaged_scores_file_names_the_file(tmp_path, row):
    path = tmp_path / "induction.json"
    if LOAD_ROWS[row] is not None:
        text = tiny_scores(tiny_model()).save(path).read_text()
        path.write_text(LOAD_ROWS[row](text))
    with pytest.raises(ResultFileError) as raised:
        hs.HeadScores.load(path)
    assert str(path) in str(raised.value) and "HeadScores.save" in str(raised.value)


def small_atlas(model, out, **options):
    return hs.atlas(model, ["previous_token"], validate=False, settings={"previous_token": dict(SMALL)}, out=out,
                    **options)


def damage_record(record):
    """Part records that parse as JSON but not as a scores part."""
    return {
        "a JSON list": [1, 2],
        "an object without a value": {"model": record["model"], "key": record["key"]},
        "scores of another shape": {**record, "value": {**record["value"], "values": [[0.5, 0.5], [0.5, 0.5]]}},
        "a value that is a list": {**record, "value": [record["value"]]},
        "a value without its values": {**record, "value": {"detector": "previous_token", "model": record["model"]}},
        "a string": "scores",
    }


PART_ROWS = sorted(damage_record({"model": "", "key": {}, "value": {}})) + ["truncated", "not JSON"]


@pytest.fixture(scope="module")
def atlas_model():
    return tiny_model(n_layers=3, n_heads=4, d_vocab=128, n_ctx=64)


@pytest.fixture
def first_atlas(atlas_model, tmp_path_factory):
    """Built per test: a part is reused only while the detector's source files are unchanged."""
    out = tmp_path_factory.mktemp("atlas")
    return out, small_atlas(atlas_model, out, progress=False)


@pytest.mark.parametrize("row", PART_ROWS)
def test_a_damaged_part_is_named_set_aside_and_recomputed(atlas_model, first_atlas, tmp_path, row):
    import shutil

    source, built = first_atlas
    out = tmp_path / "atlas"
    shutil.copytree(source, out)
    part = out / "parts" / "previous_token.scores.json"
    text = part.read_text()
    if row == "truncated":
        part.write_text(text[: len(text) // 3])
    elif row == "not JSON":
        part.write_text("scores: [1, 2]")
    else:
        part.write_text(json.dumps(damage_record(json.loads(text))[row]))
    with pytest.warns(ResultFileWarning, match="previous_token.scores.json") as caught:
        again = small_atlas(atlas_model, out, progress=False)
    assert "computed again" in str(caught[0].message)
    assert torch.equal(again.scores["previous_token"].values, built.scores["previous_token"].values)
    assert not again.failures
    assert json.loads(part.read_text())["value"]["shape"] == [3, 4]  # recomputed and rewritten whole
    assert (out / "parts" / "previous_token.scores.json.damaged").is_file()


def test_a_damaged_atlas_json_names_the_file(tmp_path):
    (tmp_path / "atlas.json").write_text('{"model": "native", "shape": [3')
    with pytest.raises(ResultFileError, match="atlas.json"):
        hs.Atlas.load(tmp_path)


def test_a_scan_recomputes_a_damaged_saved_result_and_names_it(tiny, tmp_path):
    detector = hs.get_detector("previous_token", **SMALL)
    (tmp_path / "previous_token.json").write_text('{"format_version": 1, "detector": "previous')
    with pytest.warns(ResultFileWarning, match="previous_token.json"):
        results = hs.scan(tiny, [detector], out=tmp_path, progress=False)
    assert hs.HeadScores.load(tmp_path / "previous_token.json").values.equal(results["previous_token"].values)


# --- feedback: progress off a terminal, and "resumed" lines ----------------------------------------------------

def test_mean_ablation_means_report_progress_off_a_terminal(tiny, capsys):
    head_output_means(tiny, [0, 1], TOKENS, progress=True)
    err = capsys.readouterr().err
    assert "mean head outputs (2 layers): 2 examples ..." in err and "mean head outputs (2 layers): 2 examples done in" in err
    head_output_means(tiny, [0, 1], TOKENS, progress=False)
    assert capsys.readouterr().err == ""


def test_validate_prints_a_start_and_finish_line_per_run_off_a_terminal(tiny, capsys):
    scores = hs.detect(tiny, "induction", progress=False, **SMALL)
    capsys.readouterr()
    hs.validate(tiny, scores, k=1, n_random=2, progress=True)
    lines = capsys.readouterr().err.splitlines()
    steps = [f"validate induction: {step}" for step in  # the clean run also sums the outputs for mean ablation
             ("clean and mean head outputs", "top-1 ablated", "random 1-set 1/2 ablated", "random 1-set 2/2 ablated")]
    for step in steps:  # one line as the step starts, one as it ends
        assert sum(line.startswith(f"headscope: {step}") for line in lines) == 2, (step, lines)


def test_a_resumed_scan_and_atlas_say_what_they_reused_and_from_where(atlas_model, first_atlas, tmp_path, capsys):
    detector = hs.get_detector("previous_token", **SMALL)
    hs.scan(atlas_model, [detector], out=tmp_path, progress=False)
    hs.scan(atlas_model, [detector], out=tmp_path, progress=None)
    err = capsys.readouterr().err
    assert f"resumed previous_token: its scores for native are read from {tmp_path / 'previous_token.json'}" in err
    hs.scan(atlas_model, [detector], out=tmp_path, progress=False)
    assert capsys.readouterr().err == ""  # progress=False: silent

    out, _ = first_atlas
    again = small_atlas(atlas_model, out, progress=None)
    assert again.timings["previous_token"]["resumed"]
    assert f"atlas: previous_token: resumed scores, significance from {out / 'parts'}" in capsys.readouterr().err


def test_settings_that_only_fail_together_are_refused_at_construction():
    """Sahara's step 2 onwards add one new candidate each: fewer candidates than steps would end,
    after the whole first scan, in an empty head list."""
    with pytest.raises(hs.SettingError, match="sahara_candidates=1 leaves nothing to add at step 2"):
        hs.get_detector("safety", sahara_steps=3, sahara_candidates=1)
    assert hs.get_detector("safety", sahara_steps=3, sahara_candidates=3).config.sahara_candidates == 3


@pytest.mark.wrong_type
@pytest.mark.parametrize("factor", ["2", True, [2.0]])
def test_a_scan_factor_that_is_no_number_is_named(tiny, factor):
    with pytest.raises(hs.ArgumentError, match="'factor' parameter of the scan must be a number"):
        _scan(tiny, method="scale", factor=factor)
