"""The attention-template detectors (induction, previous-token, duplicate-token) on the
researcher's own text: templates read from the text's own repeats, exact against naive loops,
errors that name the file and line, held-out windows, and the CLI."""

import json

import pytest
import torch

import headscope as hs
from headscope.cli import main
from headscope.detectors.attention_templates import make_task, text_task
from headscope.engine.heads import hook_name
from tests.conftest import tiny_text_llama_folder
from tests.families import tiny_family_model

TEMPLATE_DETECTORS = ("induction", "previous_token", "duplicate_token")
TEXT = ("The cat sat on the mat. The dog sat on the log. " * 3 + "Once upon a time there was a king. ") * 12


@pytest.fixture(scope="module")
def model():
    return tiny_family_model("LlamaForCausalLM", seed=3, with_tokenizer=True)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "story.txt"
    path.write_text(TEXT)
    return path


@pytest.mark.parametrize("name", TEMPLATE_DETECTORS)
def test_templates_read_from_tokens_equal_the_repeated_token_templates(model, name):
    """On repeated random tokens (distinct within a block) the template read from the tokens is
    the block-structure template, row for row."""
    detector = hs.get_detector(name, n_sequences=3, block_len=7, n_repeats=3)
    task = make_task(model, detector.config)
    shared, queries = detector.template(task)
    per_row, row_queries = detector.token_template(task.tokens, torch.ones_like(task.tokens), task.offset)
    assert per_row.shape == (3, *shared.shape) and bool(per_row.any())
    assert torch.equal(per_row, shared.expand_as(per_row)) and torch.equal(row_queries, queries.expand_as(row_queries))


def naive_text_scores(model, windows, name):
    """Per head: the attention on each query's template keys, found by plain loops over positions,
    averaged over every query of every window (a window without a query adds nothing)."""
    tokens, mask, offset = windows.tokens, windows.attention_mask, windows.offset
    _, cache = model.run_with_cache(tokens, attention_mask=mask)
    n_layers = len([hook for hook in cache if hook.endswith("hook_pattern")])
    shares = [[] for _ in range(n_layers)]
    for row in range(len(tokens)):
        length = int(mask[row].sum())
        ids = tokens[row, :length].tolist()
        for query in range(offset, length):
            if name == "previous_token":
                keys = [query - 1] if query >= offset + 1 else []
            else:
                copies = [j for j in range(offset, query) if ids[j] == ids[query]]
                keys = [j + 1 for j in copies if j + 1 < query] if name == "induction" else copies
            for layer in range(n_layers):
                if keys:
                    shares[layer].append(cache[hook_name(layer, "pattern")][row, :, query, keys].sum(dim=-1))
    return torch.stack([torch.stack(layer).mean(dim=0) for layer in shares])


@pytest.mark.parametrize("name", TEMPLATE_DETECTORS)
def test_text_scores_equal_a_naive_loop_over_positions(model, tmp_path, name):
    """Documents of unequal length (padding), one without any repeated character (a window with no
    induction or duplicate query), scored in chunks of two rows."""
    path = tmp_path / "docs.jsonl"
    documents = [TEXT[:300], "Quickly", TEXT[300:420], TEXT[500:700]]  # "Quickly": no character twice
    path.write_text("\n".join(json.dumps({"text": document}) for document in documents))
    settings = dict(data=str(path), text_length=90, n_sequences=8)
    scores = hs.detect(model, name, batch_size=2, **settings)  # per-row templates must follow the chunks' rows
    windows = text_task(model, hs.get_detector(name, **settings).config)
    assert int(windows.attention_mask.sum(dim=1).min()) == 8  # BOS + "Quickly": a window without a repeat is scored
    torch.testing.assert_close(scores.values, naive_text_scores(model, windows, name), rtol=1e-4, atol=1e-5)


def test_scored_and_held_out_windows_are_disjoint_and_cover_the_text(model, tmp_path):
    counting = " ".join(str(number) for number in range(400))  # no two windows alike
    path = tmp_path / "counting.txt"
    path.write_text(counting)
    config = hs.get_detector("induction", data=str(path), text_length=40, n_sequences=1000,
                             n_validation_sequences=1000).config
    scored, held_out = text_task(model, config), text_task(model, config, validation=True)
    rows = lambda w: {tuple(r[m.bool()].tolist()) for r, m in zip(w.tokens, w.attention_mask)}  # noqa: E731
    n_tokens = len(model.tokenizer(counting, add_special_tokens=False)["input_ids"])
    assert not rows(scored) & rows(held_out)
    assert scored.n_text_tokens + held_out.n_text_tokens == n_tokens  # every token in one window, none dropped


def test_the_saved_config_holds_the_texts_hash_and_a_changed_text_is_recomputed(tmp_path, text_file):
    folder = tiny_text_llama_folder(tmp_path / "model")
    config = tmp_path / "settings.json"
    config.write_text(json.dumps({"induction": {"data": str(text_file), "text_length": 60, "n_sequences": 2}}))
    args = ["scan", "--model", str(folder), "--detectors", "induction", "--out", str(tmp_path / "out"), "--config",
            str(config)]
    assert main(args) == 0
    first = json.loads((tmp_path / "out" / "induction.json").read_text())
    text_file.write_text(TEXT.replace("cat", "rat"))
    assert main(args) == 0
    second = json.loads((tmp_path / "out" / "induction.json").read_text())
    assert first["config"]["data_sha256"] != second["config"]["data_sha256"]
    assert first["values"] != second["values"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(tiny_text_llama_folder(tmp_path_factory.mktemp("text-llama")))


@pytest.mark.parametrize("name", TEMPLATE_DETECTORS)
def test_the_cli_scores_the_researchers_own_text(folder, tmp_path, name):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": TEXT[i::2]}) for i in range(2)))
    config = tmp_path / "settings.json"
    config.write_text(json.dumps({name: {"data": str(path), "text_length": 80, "n_sequences": 4}}))
    assert main(["scan", "--model", folder, "--detectors", name, "--out", str(tmp_path), "--config", str(config)]) == 0
    saved = json.loads((tmp_path / f"{name}.json").read_text())
    assert saved["config"]["data_sha256"] == {str(path): hs.tasks.user_data.file_sha256(path)}
    assert saved["metadata"]["data"] == str(path) and saved["metadata"]["n_sequences"] == 4
    assert all(value == value for row in saved["values"] for value in row)  # no NaN


@pytest.mark.parametrize("content, suffix, problem", [
    ('{"text": "fine"}\n{"text": 5}\n', ".jsonl", "line 2: 'text' must be a non-empty string"),
    ('{"text": "fine"}\n\n{"txt": "typo"}\n', ".jsonl", "line 3: no 'text'"),
    ('{"text": "fine"}\n{"text": "unclosed\n', ".jsonl", "line 2: not JSON"),
    ("  \n", ".txt", "holds no text"),
    ("a,b\n", ".csv", "a .txt file (one document) or a .jsonl file"),
])
def test_a_bad_text_file_is_one_error_naming_file_and_line_without_a_model(tmp_path, content, suffix, problem):
    path = tmp_path / f"text{suffix}"
    path.write_text(content)
    with pytest.raises(hs.DataError, match="text") as error:
        hs.get_detector("induction", data=str(path)).check_data()
    assert str(path.name) in str(error.value) and problem in str(error.value)


def test_too_little_text_or_too_long_windows_are_errors_that_say_the_fix(model, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("A few words.")
    with pytest.raises(hs.DataError, match="at least two"):
        hs.detect(model, "induction", data=str(short), text_length=64)
    with pytest.raises(hs.SettingError, match="text_length"):
        hs.detect(model, "induction", data=str(short), text_length=5000)


def test_text_in_which_no_token_repeats_is_an_error_not_a_zero_score(model, tmp_path):
    path = tmp_path / "distinct.txt"
    path.write_text("Quickly")  # seven distinct characters: windows of 3 never repeat a token
    with pytest.raises(hs.DataError, match="No window of the text data has a position that induction can score"):
        hs.detect(model, "induction", data=str(path), text_length=3)
    assert torch.isfinite(hs.detect(model, "previous_token", data=str(path), text_length=3).values).all()


def test_scores_of_a_text_that_changed_since_are_refused_before_the_model_loads(model, tmp_path, text_file,
                                                                                 monkeypatch, capsys):
    scores = hs.detect(model, "induction", data=str(text_file), text_length=60, n_sequences=2)
    scores.save(tmp_path / "induction.json")
    text_file.write_text(TEXT.replace("cat", "rat"))
    with pytest.raises(hs.DataError, match="changed since these induction scores were computed"):
        hs.validate(model, scores, k=1, n_random=2)
    monkeypatch.setattr("headscope.cli.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["validate", "--model", "smollm2-135m-instruct", "--scores", str(tmp_path / "induction.json")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and str(text_file) in error and "changed since" in error
