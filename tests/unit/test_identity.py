"""One model identity keys every cache, checkpoint and atlas part: equal for equal weights,
different after any weight edit (also through ``p.data``), and a file written for another
identity is refused, never reused."""

import json
import re
from pathlib import Path

import pytest
import torch

import headscope as hs
from headscope.detectors import attention_templates, select_copy
from headscope.detectors.retrieval import needle_scan
from headscope.engine import masked_mean, next_token_losses
from headscope.errors import IdentityMismatchError, ResultFileError
from headscope.identity import ModelIdentity, RecentCache, metric_identity, model_identity, stored_result
from headscope.interventions import _DEFAULT_MEANS, _mean_outputs, default_reference_text, head_output_means
from headscope.tasks.haystack import needle_grid
from tests.conftest import tiny_llama_folder, tiny_model

SMALL = {"n_sequences": 4, "n_validation_sequences": 4, "block_len": 10, "n_repeats": 3}
SRC = Path(hs.__file__).parent


def mean_loss(logits, batch):
    return masked_mean(next_token_losses(logits, batch.tokens), batch.attention_mask[:, 1:].bool())


mean_loss.cache_key = "mean next-token loss"


def edit_through_data(model):
    """A user's in-place edit that bumps no version counter."""
    with torch.no_grad():
        next(model.parameters()).data[0] += 1


def test_equal_weights_give_equal_identities_and_any_difference_another():
    a, same, other = tiny_model(seed=0), tiny_model(seed=0), tiny_model(seed=1)
    assert model_identity(a) == model_identity(same)
    assert [name for name, *_ in model_identity(other).differences(model_identity(a))] == ["weights"]
    wider = model_identity(tiny_model(seed=0).to(torch.float64))
    assert {name for name, *_ in wider.differences(model_identity(a))} == {"weights", "dtype"}
    assert wider.dtype == "torch.float64"


def test_an_edit_through_data_changes_the_identity():
    model = tiny_model()
    before = model_identity(model)
    edit_through_data(model)
    assert model_identity(model).weights != before.weights
    assert model_identity(model) == model_identity(model)  # nothing else moves it: a forward pass neither
    model(torch.randint(0, 64, (2, 8)))
    assert model_identity(model).weights != before.weights and model_identity(model) == model_identity(model)


def test_a_buffer_edit_changes_the_identity():
    model = tiny_model()
    before = model_identity(model)
    with torch.no_grad():
        next(model.buffers()).data.logical_not_()  # a causal mask is part of the computation
    assert model_identity(model) != before


def test_the_identity_round_trips_and_a_mismatch_names_the_fields_and_the_fix():
    identity = model_identity(tiny_model())
    assert ModelIdentity.from_dict(json.loads(json.dumps(identity.to_dict()))) == identity
    with pytest.raises(ResultFileError, match="not a model identity"):
        ModelIdentity.from_dict({"model": "x"})
    other = dict(identity.to_dict(), weights="0" * 32, torch="1.0")
    with pytest.raises(IdentityMismatchError) as error:
        identity.check_matches(other, source="The file f.pt", fix="delete f.pt")
    message = str(error.value)
    assert message.startswith("The file f.pt was written for another model") and message.endswith("delete f.pt.")
    assert "weights 000000000000... there" in message and "torch '1.0' there" in message and "dtype" not in message
    with pytest.raises(IdentityMismatchError, match="records no model identity"):
        identity.check_matches(None, source="The file f.pt", fix="delete f.pt")
    identity.check_matches(identity.to_dict(), source="The file f.pt", fix="delete f.pt")  # the same: no error


def test_a_metric_is_identified_by_its_cache_key_only():
    def plain(logits, batch):
        return logits[:, 0, 0]

    assert metric_identity(plain) is None and metric_identity(mean_loss) == "mean next-token loss"
    plain.cache_key = ""
    assert metric_identity(plain) is None


def test_the_recent_cache_keeps_the_last_few_keys():
    cache, calls = RecentCache(size=2), []
    for key in ["a", "b", "a", "c", "a", "b"]:
        cache.get_or_set(key, lambda key=key: calls.append(key) or key.upper())
    assert calls == ["a", "b", "c", "b"] and len(cache) == 2  # "b" fell out when "c" came, "a" stayed in use


# --- the scan checkpoint ------------------------------------------------------------------------

def test_a_scan_checkpoint_is_refused_for_another_model_and_after_a_weight_edit(tmp_path):
    model, tokens = tiny_model(), torch.randint(0, 64, (4, 12))
    path = tmp_path / "scan.pt"
    first = hs.ablation_scan(model, tokens, mean_loss, batch_size=2, checkpoint=path)
    saved = torch.load(path, weights_only=True)
    assert saved["identity"] == model_identity(model).to_dict()
    resumed = hs.ablation_scan(model, tokens, mean_loss, batch_size=2, checkpoint=path)  # the same model: resumed
    torch.testing.assert_close(resumed.values, first.values)
    with pytest.raises(IdentityMismatchError, match=rf"scan checkpoint {re.escape(str(path))} .*\(weights .*delete"):
        hs.ablation_scan(tiny_model(seed=1), tokens, mean_loss, batch_size=2, checkpoint=path)
    edit_through_data(model)
    with pytest.raises(IdentityMismatchError, match="weights"):
        hs.ablation_scan(model, tokens, mean_loss, batch_size=2, checkpoint=path)
    assert torch.load(path, weights_only=True)["identity"] == saved["identity"]  # refused, not overwritten


def test_a_scan_checkpoint_needs_a_metric_with_a_cache_key(tmp_path):
    def unnamed(logits, batch):
        return mean_loss(logits, batch)

    with pytest.raises(hs.ArgumentError, match="has no 'cache_key'"):
        hs.ablation_scan(tiny_model(), torch.randint(0, 64, (2, 8)), unnamed, checkpoint=tmp_path / "scan.pt")
    assert not (tmp_path / "scan.pt").exists()


def test_every_torch_load_in_headscope_is_weights_only():
    calls = [(path.name, line) for path in SRC.rglob("*.py") for line in path.read_text().splitlines()
             if "torch.load(" in line]
    assert calls and all("weights_only=True" in line for _, line in calls), calls


# --- the needle checkpoint ----------------------------------------------------------------------

@pytest.fixture
def llama(tmp_path):
    return hs.load_model(tiny_llama_folder(tmp_path / "llama"), device="cpu")


def test_a_needle_checkpoint_is_refused_for_another_model_and_after_a_weight_edit(llama, tmp_path):
    samples = needle_grid(llama, [80], [0, 100], format="plain")
    path = tmp_path / "needles.jsonl"
    needle_scan(llama, samples, max_new_tokens=2, checkpoint=path, progress=False)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 2 and all(line["identity"] == model_identity(llama).to_dict() for line in lines)
    assert len(needle_scan(llama, samples, max_new_tokens=2, checkpoint=path, progress=False)) == 2
    assert len(path.read_text().splitlines()) == 2  # resumed: nothing decoded again

    other = hs.load_model(tiny_llama_folder(tmp_path / "other-llama"), device="cpu")  # same weights, another model
    with pytest.raises(IdentityMismatchError, match=r"needle checkpoint .*\(model 'llama' there, 'other-llama' here\)"):
        needle_scan(other, samples, max_new_tokens=2, checkpoint=path, progress=False)
    edit_through_data(llama)
    with pytest.raises(IdentityMismatchError, match="weights .* delete"):
        needle_scan(llama, samples, max_new_tokens=2, checkpoint=path, progress=False)
    assert len(path.read_text().splitlines()) == 2


def test_a_needle_checkpoint_without_identities_is_refused(llama, tmp_path):
    samples = needle_grid(llama, [80], [0], format="plain")
    path = tmp_path / "needles.jsonl"
    needle_scan(llama, samples, max_new_tokens=2, checkpoint=path, progress=False)
    row = json.loads(path.read_text())
    del row["identity"]  # as an older headscope wrote it
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(IdentityMismatchError, match="records no model identity"):
        needle_scan(llama, samples, max_new_tokens=2, checkpoint=path, progress=False)


def test_an_append_to_a_needle_checkpoint_begun_for_another_model_is_refused(llama, tmp_path):
    from headscope.detectors.retrieval import _append_checkpoint

    samples = needle_grid(llama, [80], [0, 100], format="plain")
    path = tmp_path / "needles.jsonl"
    outcomes = needle_scan(llama, samples[:1], max_new_tokens=2, checkpoint=path, progress=False)
    other = model_identity(tiny_model())  # another process, another model, the same file
    with pytest.raises(IdentityMismatchError):
        _append_checkpoint(path, outcomes[0], other)
    assert len(path.read_text().splitlines()) == 1


# --- atlas parts --------------------------------------------------------------------------------

def small_atlas(model, out, **kwargs):
    return hs.atlas(model, ["previous_token"], out=out, validate=False, settings={"previous_token": SMALL},
                    progress=False, **kwargs)


def test_an_atlas_part_is_refused_for_another_model_and_after_a_weight_edit(tmp_path):
    model = tiny_model(n_layers=2, n_heads=4, d_vocab=128)
    small_atlas(model, tmp_path)
    part = json.loads((tmp_path / "parts" / "previous_token.scores.json").read_text())
    assert part["identity"] == model_identity(model).to_dict()
    assert small_atlas(model, tmp_path).timings["previous_token"]["resumed"]
    folder = re.escape(str(tmp_path))
    with pytest.raises(IdentityMismatchError, match=rf"atlas part {folder}/parts/previous_token\..*--no-resume"):
        small_atlas(tiny_model(n_layers=2, n_heads=4, d_vocab=128, seed=1), tmp_path)
    edit_through_data(model)
    with pytest.raises(IdentityMismatchError, match=rf"\(weights .*another folder .*{folder}"):
        small_atlas(model, tmp_path)
    rebuilt = small_atlas(model, tmp_path, resume=False)  # the fix: recompute every part
    assert not rebuilt.timings["previous_token"].get("resumed")
    assert small_atlas(model, tmp_path).timings["previous_token"]["resumed"]
    assert rebuilt.environment["weights"] == model_identity(model).weights


def test_saved_scan_scores_are_refused_for_another_model_and_after_a_weight_edit(tmp_path):
    model = tiny_model(n_layers=2, n_heads=4, d_vocab=128)
    detector = hs.get_detector("previous_token", **SMALL)
    first = hs.scan(model, [detector], out=tmp_path, progress=False)["previous_token"]
    saved = hs.HeadScores.load(tmp_path / "previous_token.json")
    assert saved.metadata["identity"] == model_identity(model).to_dict()
    assert torch.equal(hs.scan(model, [detector], out=tmp_path, progress=False)["previous_token"].values, first.values)
    with pytest.raises(IdentityMismatchError, match=r"saved scores .*previous_token\.json .*resume=False"):
        hs.scan(tiny_model(n_layers=2, n_heads=4, d_vocab=128, seed=1), [detector], out=tmp_path, progress=False)
    edit_through_data(model)
    with pytest.raises(IdentityMismatchError, match=r"\(weights "):
        hs.scan(model, [detector], out=tmp_path, progress=False)
    again = hs.scan(model, [detector], out=tmp_path, resume=False, progress=False)["previous_token"]
    assert again.metadata["identity"]["weights"] == model_identity(model).weights


def test_a_scan_refuses_another_models_file_before_scoring_anything(tmp_path, monkeypatch):
    model, other = tiny_model(n_layers=2, n_heads=4, d_vocab=128), tiny_model(n_layers=2, n_heads=4, d_vocab=128, seed=1)
    duplicate = hs.get_detector("duplicate_token", **SMALL)
    hs.scan(other, [duplicate], out=tmp_path, progress=False)
    previous = hs.get_detector("previous_token", **SMALL)
    monkeypatch.setattr(type(previous), "score", lambda *a, **k: pytest.fail("scored before the refusal"))
    with pytest.raises(IdentityMismatchError, match="duplicate_token.json"):
        hs.scan(model, [previous, duplicate], out=tmp_path, progress=False)
    assert not (tmp_path / "previous_token.json").exists()


def test_saved_scan_scores_with_a_damaged_identity_are_named_and_recomputed(tmp_path):
    model = tiny_model(n_layers=2, n_heads=4, d_vocab=128)
    detector = hs.get_detector("previous_token", **SMALL)
    first = hs.scan(model, [detector], out=tmp_path, progress=False)["previous_token"]
    path = tmp_path / "previous_token.json"
    data = json.loads(path.read_text())
    data["metadata"]["identity"] = {"model": "native"}
    path.write_text(json.dumps(data))
    with pytest.warns(hs.ResultFileWarning, match="cannot be read: not a model identity"):
        again = hs.scan(model, [detector], out=tmp_path, progress=False)["previous_token"]
    assert torch.equal(again.values, first.values) and again.metadata["identity"] == model_identity(model).to_dict()


# --- in-memory caches ---------------------------------------------------------------------------

def test_default_means_follow_a_weight_edit_and_stay_bounded(llama):
    heads = [hs.Head(0, 0), hs.Head(1, 0)]
    before = {layer: value.clone() for layer, value in _mean_outputs(llama, heads, None, None).items()}
    edit_through_data(llama)
    after = _mean_outputs(llama, heads, None, None)
    fresh = head_output_means(llama, [0, 1], default_reference_text())
    assert not torch.equal(after[0], before[0])
    for layer in (0, 1):
        torch.testing.assert_close(after[layer], fresh[layer], rtol=0, atol=0)
    for _ in range(6):  # each edit is another identity
        edit_through_data(llama)
        _mean_outputs(llama, heads[:1], None, None)
    assert len(_DEFAULT_MEANS) <= _DEFAULT_MEANS.size


def test_template_nulls_follow_a_weight_edit_and_stay_bounded():
    model = tiny_model(n_layers=2, n_heads=4, d_vocab=128)
    detector = hs.get_detector("induction", **SMALL)
    before = attention_templates.template_null(model, detector)
    with torch.no_grad():
        for parameter in model.blocks[0].attn.parameters():
            parameter.data.mul_(3.0)  # through .data: no version counter moves
    after = attention_templates.template_null(model, detector)
    assert not torch.equal(after, before)
    attention_templates._NULLS.clear()
    torch.testing.assert_close(attention_templates.template_null(model, detector), after, rtol=0, atol=0)
    for seed in range(1, 11):
        attention_templates.template_null(tiny_model(n_layers=2, n_heads=4, d_vocab=128, seed=seed), detector)
    assert len(attention_templates._NULLS) <= attention_templates._NULLS.size


def test_the_known_answer_check_follows_a_weight_edit_and_stays_bounded(monkeypatch):
    calls = []
    def knows_every_answer(model, questions, *args):
        calls.append(1)
        return torch.ones(len(questions), dtype=torch.bool)

    monkeypatch.setattr(select_copy, "knows_answer", knows_every_answer)
    monkeypatch.setattr(select_copy, "_KNOWN", RecentCache(size=2))
    detector = hs.get_detector("select_copy", n_questions=8, n_dev=2)
    questions = select_copy.load_questions(detector.config)
    model = tiny_model()
    detector._known(model, questions, None)
    hs.get_detector("select_copy", n_questions=8, n_dev=2)._known(model, questions, None)  # another instance shares it
    assert len(calls) == 1
    edit_through_data(model)
    detector._known(model, questions, None)
    assert len(calls) == 2
    for seed in range(1, 4):
        detector._known(tiny_model(seed=seed), questions, None)
    assert len(select_copy._KNOWN) == 2


def test_the_validation_cache_never_serves_a_clean_run_of_other_weights():
    model = tiny_model(n_layers=3, n_heads=4, d_vocab=128)
    scores = hs.detect(model, "induction", progress=False, **SMALL)
    cache = {}
    hs.validate(model, scores, k=2, n_random=2, cache=cache)
    edit_through_data(model)
    shared = hs.validate(model, scores, k=2, n_random=2, cache=cache)
    assert shared == hs.validate(model, scores, k=2, n_random=2)
    assert len([key for key in cache if key[0] == "clean"]) == 2  # one per identity

    tokens = hs.get_detector("induction", **SMALL).validation_task(model).data

    def unkeyed(logits, chunk):
        return mean_loss(logits, chunk)

    hs.validate(model, scores, k=2, n_random=2, cache=cache, task=hs.ValidationTask(tokens, unkeyed, "loss"))
    assert len([key for key in cache if key[0] == "clean"]) == 2  # a metric without a cache_key is not cached


def test_a_stored_result_is_reused_by_the_same_model_and_inputs_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADSCOPE_RESULTS_CACHE", str(tmp_path))
    model = tiny_model()
    calls = []

    def compute(value):
        calls.append(value)
        return torch.tensor([value, 1.0])

    first = stored_result(model, "kind", {"prompts": ["a", "b"]}, lambda: compute(2.0))
    again = stored_result(model, "kind", {"prompts": ["a", "b"]}, lambda: compute(3.0))
    assert calls == [2.0] and torch.equal(first, again)
    stored_result(model, "kind", {"prompts": ["a", "c"]}, lambda: compute(4.0))  # other inputs
    edit_through_data(model)
    assert float(stored_result(model, "kind", {"prompts": ["a", "b"]}, lambda: compute(5.0))[0]) == 5.0  # other weights
    assert calls == [2.0, 4.0, 5.0]
    files = sorted((tmp_path / "kind").glob("*.pt"))
    assert len(files) == 3
    for file in files:
        file.write_bytes(b"not a torch file")
    with pytest.warns(hs.errors.ResultFileWarning, match="cannot be read"):
        stored_result(model, "kind", {"prompts": ["a", "b"]}, lambda: compute(6.0))
    monkeypatch.setenv("HEADSCOPE_RESULTS_CACHE", "off")
    stored_result(model, "kind", {"prompts": ["a", "b"]}, lambda: compute(7.0))
    assert calls[-1] == 7.0
    blocked = tmp_path / "a file, not a folder"
    blocked.write_text("")
    monkeypatch.setenv("HEADSCOPE_RESULTS_CACHE", str(blocked))
    with pytest.warns(hs.errors.ResultFileWarning, match="Could not keep"):
        assert float(stored_result(model, "kind", {"prompts": ["a"]}, lambda: compute(8.0))[0]) == 8.0


def test_the_knowledge_check_is_stored_for_other_processes(tmp_path, monkeypatch):
    from tests.families import tiny_family_model

    monkeypatch.setenv("HEADSCOPE_RESULTS_CACHE", str(tmp_path))
    model = tiny_family_model("LlamaForCausalLM", with_tokenizer=True)
    questions = select_copy.load_questions(hs.get_detector("select_copy", n_questions=6).config)
    known = select_copy.knows_answer(model, questions)
    monkeypatch.setattr(select_copy, "final_states", lambda *args, **kwargs: pytest.fail("not read from the store"))
    assert torch.equal(select_copy.knows_answer(model, questions), known)
    assert len(list((tmp_path / "select_copy.known").glob("*.pt"))) == 1
