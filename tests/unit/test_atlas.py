"""The atlas on tiny models: shared passes, significance, overlaps, role map, save/load, resume
after an interrupt, comparison, the CLI, and the significance helpers."""

import importlib
import json
import math

import pytest
import torch

import headscope as hs
from headscope.cli import main
from headscope.compare import depth_profile
from headscope.errors import InputError

atlas_module = importlib.import_module("headscope.atlas")  # hs.atlas is the function
from headscope.significance import Significance
from headscope.stats import binomial_critical_accuracy, bonferroni_z
from tests.conftest import tiny_llama_folder, tiny_model

TEMPLATES = ["induction", "previous_token", "duplicate_token"]
SMALL = {"n_sequences": 4, "n_validation_sequences": 4, "block_len": 10, "n_repeats": 3}
SETTINGS = {name: dict(SMALL) for name in TEMPLATES}


def small_atlas(model, out=None, **kwargs):
    options = dict(k=2, n_random=2, settings=SETTINGS, progress=False)
    options.update(kwargs)
    return hs.atlas(model, TEMPLATES, out=out, **options)


@pytest.fixture(scope="module")
def model():
    return tiny_model(n_layers=3, n_heads=4, d_vocab=128, n_ctx=64)


@pytest.fixture(scope="module")
def built(model):
    return small_atlas(model)


def test_template_detectors_share_one_scoring_pass_and_match_detect(model, built):
    assert built.timings["previous_token"]["scored_with"] == "induction"
    assert built.timings["duplicate_token"]["scored_with"] == "induction"
    for name in TEMPLATES:
        alone = hs.detect(model, name, progress=False, **SMALL)
        assert torch.allclose(alone.values, built.scores[name].values, atol=1e-6), name
        assert alone.extras.keys() == built.scores[name].extras.keys()


def test_template_significance_is_above_each_roles_own_null_and_the_majority_floor(model, built):
    """Induction and duplicate-token heads against their own template on unrepeated tokens;
    previous-token heads against what uniform attention gives at offset 1 (a null measured at
    other offsets let any recency-biased head pass); every role needs a majority of attention."""
    from headscope.detectors.attention_templates import MAJORITY, make_task, template_null, uniform_share

    nulls = {}
    for name in TEMPLATES:
        detector = hs.get_detector(name, **SMALL)
        (sig,) = built.significance[name]
        if name == "previous_token":
            nulls[name] = uniform_share(*detector.template(make_task(model, detector.config)))
            assert "uniform attention" in sig.rule
        else:
            nulls[name] = float(template_null(model, detector).max())
            assert "random tokens that never repeat" in sig.rule and sig.details["null_max_head"]
        assert sig.threshold == pytest.approx(nulls[name]) and sig.floor == MAJORITY
        values = built.scores[name].values
        expected = {hs.Head(l, h) for l in range(3) for h in range(4)  # noqa: E741
                    if values[l, h] > nulls[name] and values[l, h] > MAJORITY}
        assert set(sig.heads) == expected
    assert len(set(nulls.values())) == 3  # one null per statistic, not one shared threshold


def test_uniform_share_of_the_previous_token_template():
    from headscope.detectors.attention_templates import uniform_share
    from headscope.tasks.repeated_tokens import RepeatedTokens

    detector = hs.get_detector("previous_token", n_sequences=1, block_len=4, n_repeats=2)
    task = RepeatedTokens(torch.zeros(1, 9, dtype=torch.long), block_len=4, n_repeats=2, has_bos=True)
    template, queries = detector.template(task)  # 1 BOS + 8 tokens: queries 2..8 each see i + 1 keys
    assert uniform_share(template, queries) == pytest.approx(sum(1 / (i + 1) for i in range(2, 9)) / 7)


def test_significance_needs_both_the_null_and_the_floor():
    statistic = torch.tensor([[0.9, 0.4], [0.05, 0.7]])
    effect = torch.tensor([[0.1, 2.0], [3.0, 0.6]])
    sig = Significance("d", "role", statistic, 0.3, "z", "rule", effect=effect, floor=0.5, effect_name="mean")
    assert sig.above_null.tolist() == [[True, True], [False, True]]
    assert sig.above_floor.tolist() == [[False, True], [True, True]]
    assert sig.heads == [hs.Head(1, 1), hs.Head(0, 1)]
    again = Significance.from_dict(json.loads(json.dumps(sig.to_dict())))
    assert again.heads == sig.heads and again.floor == 0.5 and torch.equal(again.effect, effect)
    assert sig.to_dict()["n_above_null"] == 3
    no_floor = Significance("d", "role", statistic, 0.3, "z", "rule")
    assert math.isinf(no_floor.floor) and no_floor.heads == [hs.Head(0, 0), hs.Head(1, 1), hs.Head(0, 1)]
    assert Significance.from_dict(json.loads(json.dumps(no_floor.to_dict()))).heads == no_floor.heads


def test_every_detector_gets_validated_with_the_atlas_k(built):
    for name in TEMPLATES:
        result = built.validations[name]
        assert result.k == 2 and len(result.random_heads) == 2 and result.detector == name


def test_overlap_matrix_and_table_agree_with_the_significant_sets(built):
    names, matrix = built.overlap()
    assert names == TEMPLATES
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            set_a, set_b = set(built.significant_heads(a)), set(built.significant_heads(b))
            if set_a or set_b:
                assert matrix[i, j] == pytest.approx(len(set_a & set_b) / len(set_a | set_b))
            else:
                assert math.isnan(matrix[i, j])
    rows = built.overlap_table()
    assert len(rows) == 3 and {r["role_a"] + "/" + r["role_b"] for r in rows} >= {"induction/previous_token"}


def test_role_map_picks_each_heads_strongest_significant_role(built):
    names, index, strength = built.role_map()
    roles = built.roles
    for layer in range(3):
        for head in range(4):
            held = [n for n in names if roles[n].mask[layer, head]]
            if not held:
                assert index[layer, head] == -1 and strength[layer, head] == 0
                continue
            best = max(held, key=lambda n: float(roles[n].strength()[layer, head]))
            assert names[int(index[layer, head])] == best


def test_save_writes_report_csv_json_and_loads_back(built, tmp_path):
    report = built.save(tmp_path)
    assert report == tmp_path / "report.html"
    html = report.read_text()
    for section in ("summary", "role-map", "heatmaps", "validation", "significance", "overlap", "configs"):
        assert f"<section id='{section}'>" in html
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "") and "https://" not in html
    assert "<script" not in html and built.environment["torch"] in html
    header = (tmp_path / "heads.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["layer", "head", "name"] and "induction:significant" in header and "role" in header
    assert len((tmp_path / "heads.csv").read_text().splitlines()) == 1 + 12
    loaded = hs.Atlas.load(tmp_path)
    assert loaded.model == built.model and loaded.settings == built.settings
    for name in TEMPLATES:
        assert torch.equal(loaded.scores[name].values, built.scores[name].values)
        assert loaded.significant_heads(name) == built.significant_heads(name)
        assert loaded.validations[name] == built.validations[name]


def test_report_escapes_names(built, tmp_path):
    data = built.to_dict()
    data["model"] = "<script>alert(1)</script>"
    hs.Atlas.from_dict(data).save(tmp_path)
    assert "<script>alert" not in (tmp_path / "report.html").read_text()


def test_interrupted_atlas_recomputes_only_what_is_missing(model, tmp_path, monkeypatch):
    calls = []
    real_validate = atlas_module.validate

    def validate_until_interrupted(model, scores, **kwargs):
        calls.append(scores.detector)
        if scores.detector == "previous_token":
            raise KeyboardInterrupt
        return real_validate(model, scores, **kwargs)

    monkeypatch.setattr(atlas_module, "validate", validate_until_interrupted)
    with pytest.raises(KeyboardInterrupt):
        small_atlas(model, out=tmp_path)
    saved = sorted(p.name for p in (tmp_path / "parts").iterdir())
    # induction finished, and its shared pass saved the scores of previous_token and duplicate_token
    assert "induction.validation.json" in saved and "previous_token.significance.json" in saved
    assert "duplicate_token.scores.json" in saved
    assert "previous_token.validation.json" not in saved and "duplicate_token.significance.json" not in saved

    scored, calls[:] = [], []
    templates_module = importlib.import_module("headscope.detectors.attention_templates")
    real_score_together = templates_module.score_together  # every template scoring pass, shared or not

    def counting_score_together(model, detectors, *args):
        scored.extend(d.name for d in detectors)
        return real_score_together(model, detectors, *args)

    monkeypatch.setattr(atlas_module, "validate", lambda model, scores, **kw: (calls.append(scores.detector),
                                                                                 real_validate(model, scores, **kw))[1])
    monkeypatch.setattr(templates_module, "score_together", counting_score_together)
    calls_significance = []
    real_significance = hs.get_detector("duplicate_token").significance.__func__

    def counting_significance(self, model, scores, *args):
        calls_significance.append(self.name)
        return real_significance(self, model, scores, *args)

    from headscope.detectors.attention_templates import AttentionTemplateDetector
    monkeypatch.setattr(AttentionTemplateDetector, "significance", counting_significance)
    resumed = small_atlas(model, out=tmp_path)
    assert scored == []  # every score was on disk
    assert calls_significance == ["duplicate_token"]
    assert calls == ["previous_token", "duplicate_token"]
    assert resumed.timings["induction"]["resumed"] and set(resumed.validations) == set(TEMPLATES)


def test_changed_settings_are_recomputed(model, tmp_path, monkeypatch):
    small_atlas(model, out=tmp_path)
    calls = []
    real_validate = atlas_module.validate
    monkeypatch.setattr(atlas_module, "validate", lambda model, scores, **kw: (calls.append(kw["k"]),
                                                                                 real_validate(model, scores, **kw))[1])
    small_atlas(model, out=tmp_path, k=3)  # scores reused, validations redone with k=3
    assert calls == [3, 3, 3]
    calls.clear()
    small_atlas(model, out=tmp_path, k=3, resume=False)
    assert calls == [3, 3, 3]


def test_bad_requests_fail_before_any_work(model):
    with pytest.raises(hs.UnknownDetectorError, match="Did you mean 'induction'"):
        hs.atlas(model, ["inductoin"], progress=False)
    with pytest.raises(ValueError, match="settings given for retrieval"):
        hs.atlas(model, ["induction"], settings={"retrieval": {}}, progress=False)
    with pytest.raises(TypeError, match="no setting blok_len"):
        hs.atlas(model, ["induction"], settings={"induction": {"blok_len": 3}}, progress=False)


def test_compare_reports_appeared_vanished_and_role_map_changes(built):
    other = hs.Atlas.from_dict(json.loads(json.dumps(built.to_dict())))
    sig = other.significance["previous_token"][0]
    sig.statistic = torch.full_like(sig.statistic, sig.threshold - 1.0)
    chosen = [hs.Head(0, 0), hs.Head(2, 3)]
    for head in chosen:
        sig.statistic[head.layer, head.head] = sig.threshold + 1.0
    before = set(built.significant_heads("previous_token"))
    change = {r.role: r for r in hs.compare(built, other).roles}["previous_token"]
    assert set(change.appeared) == {str(h) for h in set(chosen) - before}
    assert set(change.vanished) == {str(h) for h in before - set(chosen)}
    assert set(change.kept) == {str(h) for h in before & set(chosen)}
    assert change.n_b == 2
    comparison = hs.compare(built, other)
    assert {r.role: r for r in comparison.roles}["induction"].verdict == "unchanged"
    _, index_a, _ = built.role_map()
    names_b, index_b, _ = other.role_map()
    changed = {h for h, _a, _b in comparison.role_map_changes}
    assert changed == {f"L{l}H{h}" for l in range(3) for h in range(4) if index_a[l, h] != index_b[l, h]}  # noqa: E741
    assert "previous_token" in str(comparison)


def test_compare_of_different_shapes_compares_roles_not_heads(built):
    small = tiny_model(n_layers=2, n_heads=4, d_vocab=128, n_ctx=64)
    other = small_atlas(small, validate=False)
    comparison = hs.compare(built, other)
    assert not comparison.same_shape and comparison.role_map_changes == []
    assert all(r.appeared == [] and r.vanished == [] for r in comparison.roles)
    assert comparison.depth_bins == 2 and comparison.shape_b == (2, 4)  # no more bins than the smaller model's layers
    for change in comparison.roles:
        for sig, profile in ((built.roles[change.role], change.depth_profile_a),
                             (other.roles[change.role], change.depth_profile_b)):
            assert profile == pytest.approx(depth_profile(sig.mask, 2))
    assert "share significant by depth" in str(comparison)
    assert all(r.verdict in ("in both", "in neither", "appeared", "vanished") for r in comparison.roles)


def test_depth_profile_is_the_share_of_significant_heads_per_depth_bin():
    mask = torch.zeros(5, 4, dtype=torch.bool)  # layers at depths 0, .25, .5, .75, 1
    mask[0, :2] = True  # 2 of 4 heads in layer 0
    mask[4, :] = True  # the last layer, every head
    assert depth_profile(mask, 2) == pytest.approx([2 / 8, 4 / 12])  # bins: layers {0, 1} and {2, 3, 4}
    assert depth_profile(mask, 5) == pytest.approx([0.5, 0, 0, 0, 1])
    with pytest.raises(InputError, match="6 bins for 5 layers"):
        depth_profile(mask, 6)


def test_compare_aligns_two_shapes_by_relative_depth(built, tmp_path):
    """A role at the same relative depth in a 3-layer and a 5-layer model has correlated profiles."""
    shallow, deep = (hs.Atlas.from_dict(json.loads(json.dumps(built.to_dict()))) for _ in range(2))
    sig = deep.significance["previous_token"][0]
    sig.statistic = torch.full((5, 2), sig.threshold - 1.0)
    sig.statistic[4, 0] = sig.threshold + 1.0  # only the last layer of B
    deep.shape = (5, 2)
    base = shallow.significance["previous_token"][0]
    base.statistic = torch.full_like(base.statistic, base.threshold - 1.0)
    base.statistic[2, 1] = base.threshold + 1.0  # only the last layer of A
    comparison = hs.compare(shallow, deep, depth_bins=3)
    change = {r.role: r for r in comparison.roles}["previous_token"]
    assert change.depth_profile_a == pytest.approx([0, 0, 1 / 4]) and change.depth_profile_b == pytest.approx([0, 0, 1 / 4])
    assert change.depth_correlation == pytest.approx(1.0) and change.share_b == pytest.approx(0.1)
    assert "peak depth 0.67-1.00 -> 0.67-1.00" in str(comparison)
    figure = comparison.plot(tmp_path / "depth.png")
    assert (tmp_path / "depth.png").stat().st_size > 0 and len([a for a in figure.axes if a.axison]) >= 2
    with pytest.raises(InputError, match="depth_bins"):
        hs.compare(built, deep, depth_bins=0)


def test_cli_atlas_resumes_and_compare_prints(tmp_path, capsys):
    folder = str(tiny_llama_folder(tmp_path / "llama"))
    config = tmp_path / "settings.json"
    config.write_text(json.dumps({"induction": SMALL, "previous_token": SMALL}))
    args = ["atlas", "--model", folder, "--detectors", "induction,previous_token", "--out", str(tmp_path / "a"),
            "--config", str(config), "-k", "2", "--n-random", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Head atlas of" in out and (tmp_path / "a" / "report.html").is_file()
    assert main(args) == 0  # everything resumed from parts/
    data = json.loads((tmp_path / "a" / "atlas.json").read_text())
    assert all(t.get("resumed") for t in data["timings"].values())
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "a"), "--out", str(tmp_path / "c.json")]) == 0
    assert "unchanged" in capsys.readouterr().out
    assert json.loads((tmp_path / "c.json").read_text())["roles"][0]["verdict"] == "unchanged"


def test_significance_round_trips_and_orders_heads():
    statistic = torch.tensor([[0.1, 0.9], [0.5, float("nan")]])
    sig = Significance("d", "role", statistic, 0.3, "score", "rule", {"n": 1})
    assert sig.heads == [hs.Head(0, 1), hs.Head(1, 0)]
    assert sig.strength()[0, 1] == 1 and 0 < sig.strength()[1, 0] < 1 and sig.strength()[0, 0] == 0
    again = Significance.from_dict(json.loads(json.dumps(sig.to_dict())))
    assert again.heads == sig.heads and math.isnan(again.statistic[1, 1])


def test_binomial_critical_accuracy_matches_brute_force():
    n, chance, tests = 40, 0.25, 270
    level = 0.05 / tests
    tail = lambda c: sum(math.comb(n, x) * chance**x * (1 - chance) ** (n - x) for x in range(c, n + 1))  # noqa: E731
    smallest = min(c for c in range(n + 1) if tail(c) <= level)
    assert binomial_critical_accuracy(n, chance, tests) == pytest.approx((smallest - 1) / n)


def test_bonferroni_z_values():
    assert bonferroni_z(1, 0.05) == pytest.approx(1.95996, abs=1e-4)
    assert bonferroni_z(1, 0.05, two_sided=False) == pytest.approx(1.64485, abs=1e-4)
    assert bonferroni_z(250) == pytest.approx(3.71902, abs=1e-4)  # a normal tail of 1e-4


def test_validation_shares_clean_runs_through_a_cache_and_reads_last_positions_only(model):
    """A cache shared by validations of tasks on the same tokens gives the same results as
    separate runs; a last-position task (logits only at each row's last token) gives the same
    result as the full logits."""
    from headscope.engine.metrics import final_logits

    scores = {name: hs.detect(model, name, progress=False, **SMALL) for name in ("induction", "previous_token")}
    cache = {}
    for result in scores.values():
        shared = hs.validate(model, result, k=2, n_random=2, cache=cache)
        alone = hs.validate(model, result, k=2, n_random=2)
        assert shared == alone
    assert len([key for key in cache if key[0] == "clean"]) == 1

    tokens = hs.get_detector("induction", **SMALL).validation_task(model).data
    metric = lambda logits, chunk: final_logits(logits, chunk).logsumexp(dim=-1)  # noqa: E731
    results = [hs.validate(model, scores["induction"], k=2, n_random=2,
                           task=hs.ValidationTask(tokens, metric, "lse", "increases", last_position=last))
               for last in (False, True)]
    assert results[0].top_k == pytest.approx(results[1].top_k, abs=1e-5)
    assert results[0].difference == pytest.approx(results[1].difference, abs=1e-5)


def test_the_shared_template_null_is_recomputed_when_the_weights_change():
    from headscope.detectors.attention_templates import template_null

    model = tiny_model(n_layers=2, n_heads=4, d_vocab=128, n_ctx=64)
    detector = hs.get_detector("induction", **SMALL)
    before = template_null(model, detector)
    assert template_null(model, detector) is before  # shared while the weights stay the same
    with torch.no_grad():
        for parameter in model.blocks[0].attn.parameters():
            parameter.mul_(3.0)
    assert not torch.equal(template_null(model, detector), before)


def _validate_failing_for(name, real_validate, calls):
    def validate(model, scores, **kwargs):
        calls.append(scores.detector)
        if scores.detector == name:
            raise hs.EmptyResultError(f"{name} made to fail\nsecond line")
        return real_validate(model, scores, **kwargs)

    return validate


def test_a_failing_detector_is_recorded_and_the_others_finish(model, tmp_path, monkeypatch):
    calls, real_validate = [], atlas_module.validate
    monkeypatch.setattr(atlas_module, "validate", _validate_failing_for("previous_token", real_validate, calls))
    result = small_atlas(model, out=tmp_path)
    assert calls == TEMPLATES  # the failure did not stop duplicate_token
    assert result.failures == {"previous_token": {"stage": "validation", "error": "EmptyResultError",
                                                  "message": "previous_token made to fail\nsecond line"}}
    assert set(result.validations) == {"induction", "duplicate_token"}
    assert "previous_token" in result.scores and result.significance["previous_token"]  # finished stages kept
    assert result.failure_summary() == ("1 of 3 detectors failed (previous_token in validation: EmptyResultError: "
                                        "previous_token made to fail)")
    failed = json.loads((tmp_path / "parts" / "previous_token.failed.json").read_text())
    assert failed["stage"] == "validation" and "Traceback" in failed["traceback"]
    result.save(tmp_path)
    report = (tmp_path / "report.html").read_text()
    assert "FAILED in validation: EmptyResultError" in report and "1 of 3 detectors failed" in report
    assert "previous_token" in (tmp_path / "failures.csv").read_text()
    assert hs.Atlas.load(tmp_path).failures == result.failures

    calls.clear()
    monkeypatch.setattr(atlas_module, "validate", _validate_failing_for("nothing", real_validate, calls))
    rerun = small_atlas(model, out=tmp_path)
    assert calls == ["previous_token"]  # only the failed stage is recomputed
    assert rerun.failures == {} and set(rerun.validations) == set(TEMPLATES)
    assert not (tmp_path / "parts" / "previous_token.failed.json").exists()
    rerun.save(tmp_path)
    assert not (tmp_path / "failures.csv").exists() and "FAILED" not in (tmp_path / "report.html").read_text()


def test_a_detector_failing_in_its_first_stage_leaves_an_atlas_of_the_others(model, monkeypatch):
    from headscope.detectors.attention_templates import AttentionTemplateDetector

    def broken_significance(self, model, scores, *args):
        raise RuntimeError("broken")

    monkeypatch.setattr(AttentionTemplateDetector, "significance", broken_significance)
    result = small_atlas(model, validate=False)
    assert set(result.failures) == set(TEMPLATES) and result.shape == (3, 4)
    assert result.roles == {} and "FAILED in significance" in str(result)
    with pytest.raises(RuntimeError, match="broken"):
        small_atlas(model, validate=False, on_error="raise")
    with pytest.raises(ValueError, match="on_error must be"):
        small_atlas(model, on_error="ignore")


def test_cli_atlas_exits_non_zero_on_a_failed_detector_and_a_rerun_retries_it(tmp_path, capsys, monkeypatch):
    folder = str(tiny_llama_folder(tmp_path / "llama"))
    config = tmp_path / "settings.json"
    config.write_text(json.dumps({"induction": SMALL, "previous_token": SMALL}))
    args = ["atlas", "--model", folder, "--detectors", "induction,previous_token", "--out", str(tmp_path / "a"),
            "--config", str(config), "-k", "2", "--n-random", "2"]
    calls, real_validate = [], atlas_module.validate
    monkeypatch.setattr(atlas_module, "validate", _validate_failing_for("induction", real_validate, calls))
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "headscope: error: 1 of 2 detectors failed (induction in validation" in err and "Traceback" not in err
    assert "FAILED" in (tmp_path / "a" / "report.html").read_text()
    calls.clear()
    monkeypatch.setattr(atlas_module, "validate", _validate_failing_for("nothing", real_validate, calls))
    assert main(args) == 0 and calls == ["induction"]


def test_a_detector_whose_scores_are_all_nan_raises_instead_of_returning_them(tiny):
    detector = hs.get_detector("induction")
    with pytest.raises(hs.EmptyResultError, match="induction detector scored no head: every score is NaN \\(why\\)"):
        detector.result(tiny, torch.full((2, 4), math.nan), metadata={"nan_reason": "why"})
    assert detector.result(tiny, torch.tensor([[math.nan, 1.0]])).values.shape == (1, 2)  # some NaN is fine


def test_a_saved_stage_made_by_other_code_is_recomputed(monkeypatch):
    """The part key holds a hash of the code that computes the stage: a new significance rule
    (significance.py, the detector's module) or validation (validation.py) invalidates saved parts."""
    detector = hs.get_detector("induction", **SMALL)
    keys = {stage: atlas_module.code_fingerprint(detector, stage) for stage in ("scores", "significance", "validation")}
    assert len(set(keys.values())) == 3
    import headscope.significance

    real = atlas_module.Path.read_bytes
    edited = headscope.significance.__file__
    monkeypatch.setattr(atlas_module.Path, "read_bytes",
                        lambda self: real(self) + (b"# new rule" if str(self) == edited else b""))
    assert atlas_module.code_fingerprint(detector, "significance") != keys["significance"]
    assert atlas_module.code_fingerprint(detector, "scores") == keys["scores"]
