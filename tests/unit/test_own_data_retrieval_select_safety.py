"""Your own data for retrieval (needles and haystack), select_copy (questions) and safety (requests):
readers that name the line, held-out splits of the user's items, the files' SHA-256 in the saved
config, and one scan per detector through the CLI on a file of the user's own (issue 19, item 4)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest

import headscope as hs
from headscope.cli import main
from headscope.detectors import retrieval
from headscope.errors import DataError, SettingError
from headscope.tasks import refusal
from headscope.tasks.haystack import read_haystack, read_needles
from headscope.tasks.multiple_choice import read_questions
from tests.conftest import tiny_text_llama_folder
from tests.families import tiny_family_model

NEEDLES = [
    {"needle": "The secret ingredient of the soup is saffron.", "question": "What is the secret ingredient of the soup?",
     "answer": "saffron"},
    {"needle": "The password of the blue shed is marigold.", "question": "What is the password of the blue shed?",
     "answer": "marigold"},
    {"needle": "Old Petra keeps her spare key under the green stone.",
     "question": "Where does Old Petra keep her spare key?", "answer": "under the green stone"},
    {"needle": "The lighthouse keeper's cat is called Biscuit.", "question": "What is the lighthouse keeper's cat called?",
     "answer": "Biscuit"},
]
WORDS = ("river", "stone", "field", "cloud", "bread", "lamp", "window", "garden", "road", "hill", "boat", "wall")
# A filler of ~550 characters (the byte tokenizer: as many tokens, less than the context of 1,024);
# sentences end with "." or "!".
HAYSTACK = " ".join(f"The {WORDS[i % 12]} by the {WORDS[(3 * i + 1) % 12]} was {WORDS[(5 * i + 2) % 12]} "
                    f"and {WORDS[(7 * i + 5) % 12]} again{'!' if i % 5 == 0 else '.'}" for i in range(12))
# Small grids: prompts of 250 tokens (a needle, question and template take ~140), 3 greedy tokens.
RETRIEVAL = {"lengths": [250], "depths": [0, 100], "format": "plain", "max_new_tokens": 3}


def write_lines(path: Path, rows) -> str:
    path.write_text("\n".join(row if isinstance(row, str) else json.dumps(row) for row in rows) + "\n")
    return str(path)


def sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def questions(n: int) -> list[dict]:
    colours = ("red", "blue", "green", "black", "white", "pink")
    return [{"context": f"Item {i} is {colours[i % 6]}.", "question": f"What colour is item {i}?",
             "options": [colours[(i + j) % 6] for j in range(4)], "answer": colours[i % 6]} for i in range(n)]


@pytest.fixture(scope="module")
def model():
    """An in-memory tiny Llama with a byte-level tokenizer (every character one token)."""
    return tiny_family_model("LlamaForCausalLM", with_tokenizer=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The same kind of model saved as a Hugging Face folder, for the CLI (context 1,024)."""
    return str(tiny_text_llama_folder(tmp_path_factory.mktemp("tiny-text-llama")))


@pytest.fixture
def files(tmp_path):
    return {"needles": write_lines(tmp_path / "needles.jsonl", NEEDLES),
            "haystack": write_lines(tmp_path / "haystack.txt", [HAYSTACK])}


# --- readers: every error names the file and the line ------------------------------------------


@pytest.mark.parametrize("line, problem", [
    ('{"needle": "The key is red.", "question": "What colour is the key?", "answer": "blue"}', "does not occur"),
    ('{"needle": "The key is red.", "question": "What colour?"', "not JSON"),
    ('{"needle": "The key is red.", "answer": "red"}', "no 'question'"),
    ('{"needle": "The key is red.", "question": "What is the password of the blue shed?", "answer": "red"}',
     "repeats line 2"),
    ('{"needle": "", "question": "Q?", "answer": ""}', "not a non-empty string"),
])
def test_needle_errors_name_the_line(tmp_path, line, problem):
    path = write_lines(tmp_path / "needles.jsonl", [*NEEDLES[:2], "", line])
    with pytest.raises(DataError, match=rf"needles.jsonl, line 4: .*{problem}"):
        read_needles(path)


def test_haystack_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "haystack.txt"
    path.write_bytes(b"A first line.\nA second \xff line.\n")
    with pytest.raises(DataError, match="haystack.txt, line 2: not UTF-8"):
        read_haystack(path)
    path.write_text("  \n\n")
    with pytest.raises(DataError, match="holds no text"):
        read_haystack(path)
    path.write_text("One sentence. Another one!\nA third? Yes")
    assert read_haystack(path).sentences == ("One sentence.", "Another one!", "A third?", "Yes")


def test_question_errors_name_the_line(tmp_path):
    rows = questions(3)
    for bad, problem in [({**rows[0], "answer": "purple"}, "neither an option"),
                         ({**rows[0], "question": "What colour is item 9?", "options": "red"}, "not a list"),
                         (rows[1], "repeats line 2"), ("[1, 2]", "a JSON list, not an object")]:
        path = write_lines(tmp_path / "q.jsonl", [*rows[:2], bad])
        with pytest.raises(DataError, match=rf"q.jsonl, line 3: .*{problem}"):
            read_questions(path)


def test_request_errors_name_the_line(tmp_path):
    with pytest.raises(DataError, match=r"r.jsonl, line 2: not JSON"):
        refusal.read_requests(write_lines(tmp_path / "r.jsonl", ['{"goal": "one"}', '{"goal": "two"', '{"goal": "x"}']))
    with pytest.raises(DataError, match=r"r.jsonl, line 2: no 'goal'"):
        refusal.read_requests(write_lines(tmp_path / "r.jsonl", ['{"goal": "one"}', '{"text": "two"}']))
    with pytest.raises(DataError, match=r"r.txt, line 3: the request repeats line 1"):
        refusal.read_requests(write_lines(tmp_path / "r.txt", ["Do a thing.", "", "Do a thing."]))
    with pytest.raises(DataError, match=r"r.csv, line 1: the header names none of the columns"):
        refusal.read_requests(write_lines(tmp_path / "r.csv", ["prompt,target", "a,b"]))
    with pytest.raises(DataError, match=r"r.csv, line 3: the request is ''"):
        refusal.read_requests(write_lines(tmp_path / "r.csv", ["goal,target", "a,b", ",c"]))
    with pytest.raises(DataError, match=r"not a requests file: they are .txt"):
        refusal.read_requests(write_lines(tmp_path / "r.md", ["a"]))
    csv = refusal.read_requests(write_lines(tmp_path / "r.csv", ["goal,target", *(f"request {i},t" for i in range(8))]))
    assert [r.split for r in csv] == ["train"] * 3 + ["test"] + ["train"] * 3 + ["test"]  # every fourth held out


# --- too few items, conflicting settings: errors before any model ---------------------------------


def test_too_few_items_say_how_many_are_needed(tmp_path, files):
    with pytest.raises(DataError, match=r"holds 4 needles.*so it needs 6"):
        hs.get_detector("retrieval", data=files["needles"], lengths=(250,), depths=(0, 50, 100)).check_data()
    path = write_lines(tmp_path / "q.jsonl", questions(5))
    with pytest.raises(DataError, match=r"holds 5 questions.*at least 6"):
        hs.get_detector("select_copy", data=path, n_dev=5).check_data()
    path = write_lines(tmp_path / "r.txt", ["first", "second", "third"])
    with pytest.raises(DataError, match=r"holds 3 requests.*at least 4"):
        hs.get_detector("safety", data=path).check_data()
    with pytest.raises(DataError, match=r"at least 8"):
        hs.get_detector("safety", data=path, split="test").check_data()
    with pytest.raises(SettingError, match="both data=.* and questions='world'"):
        hs.get_detector("select_copy", data=path, questions="world").check_data()


def test_a_haystack_too_short_for_a_length_names_the_length_and_is_never_repeated(model, files):
    detector = hs.get_detector("retrieval", data=files["needles"], haystack=files["haystack"], lengths=(250, 900),
                               depths=(0,), format="plain")
    detector.check_data()  # reads; the length needs the tokenizer
    with pytest.raises(DataError, match=r"haystack.txt has \d+ tokens of text .* length=900 needs \d+ tokens"):
        detector.samples(model)


# --- the Python API on the user's data -------------------------------------------------------------


def test_retrieval_scores_the_users_needles_in_the_users_haystack_and_validates_on_the_next(model, files):
    # A random model retrieves nothing (EmptyResultError by design): rouge_threshold=-1 counts every
    # sample, so the copy scores are computed on the user's needles and haystack.
    settings = dict(RETRIEVAL, lengths=(250,), depths=(0, 100), rouge_threshold=-1.0)
    detector = hs.get_detector("retrieval", data=files["needles"], haystack=files["haystack"], **settings)
    samples = detector.samples(model)
    assert [s.needle.answer for s in samples] == ["saffron", "marigold"]
    assert all(HAYSTACK[:40] in s.text and "Based on the content" in s.text for s in samples)
    held_out = detector.validation_task(model).data
    assert [s.needle.answer for s in held_out] == ["under the green stone", "Biscuit"]
    scores = detector.score(model, progress=False, samples=samples)
    assert all(math.isfinite(v) for v in scores.values.flatten().tolist())
    assert scores.config["data_sha256"] == {files["needles"]: sha256(files["needles"]),
                                            files["haystack"]: sha256(files["haystack"])}
    assert scores.metadata["needle_source"] == "data" and scores.metadata["filler_source"] == "haystack"


def test_a_retrieval_checkpoint_is_never_reused_for_other_data(model, files, tmp_path, monkeypatch):
    checkpoint = tmp_path / "needles.ckpt.jsonl"
    calls = []
    real = retrieval.answer_needle
    monkeypatch.setattr(retrieval, "answer_needle", lambda m, sample, *a: calls.append(sample.needle) or real(m, sample, *a))
    settings = dict(RETRIEVAL, lengths=(250,), depths=(0, 100), rouge_threshold=-1.0, checkpoint=str(checkpoint))
    hs.get_detector("retrieval", data=files["needles"], haystack=files["haystack"], **settings).score(model, progress=False)
    assert len(calls) == 2
    hs.get_detector("retrieval", data=files["needles"], haystack=files["haystack"], **settings).score(model, progress=False)
    assert len(calls) == 2  # the same files: resumed
    other = write_lines(tmp_path / "other.txt", [HAYSTACK.replace("river", "meadow")])
    hs.get_detector("retrieval", data=files["needles"], haystack=other, **settings).score(model, progress=False)
    assert len(calls) == 4  # same needles and questions, another haystack: recomputed, not reused
    assert len(checkpoint.read_text().splitlines()) == 4


def test_select_copy_scores_the_users_questions(model, tmp_path):
    path = write_lines(tmp_path / "q.jsonl", questions(12))
    scores = hs.detect(model, "select_copy", data=path, n_dev=8, only_known=False, progress=False)
    assert scores.metadata["n_questions"] == 12 and scores.metadata["n_test"] == 4
    assert scores.metadata["questions_source"] == "data"
    assert scores.values.isfinite().all() and scores.config["data_sha256"] == {path: sha256(path)}
    legacy = hs.get_detector("select_copy", questions=path, n_dev=8)  # a path in questions still reads
    assert legacy.data_paths() == [path]


def test_safety_scores_three_quarters_of_the_users_requests_and_validates_on_the_rest(model, tmp_path):
    texts = [f"Tell me how to do forbidden thing number {i}." for i in range(8)]
    path = write_lines(tmp_path / "requests.jsonl", [{"goal": t} for t in texts])
    detector = hs.get_detector("safety", data=path, n_queries=None)
    scores = detector.score(model, progress=False)
    assert sorted(scores.metadata["queries"]) == sorted(t for i, t in enumerate(texts) if i % 4 != 3)
    assert [r.text for r in detector.validation_task(model).data] == [texts[3], texts[7]]
    assert scores.values.isfinite().all() and scores.config["data_sha256"] == {path: sha256(path)}


# --- one scan per detector through the CLI, on a file of the user's own ---------------------------


def cli_scan(folder: str, tmp_path: Path, name: str, data: str, settings: dict) -> tuple[int, Path]:
    """``headscope scan`` of one detector with ``--data`` and the other settings in ``--config``."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({name: settings}))
    out = tmp_path / "out"
    rc = main(["scan", "--model", folder, "--detectors", name, "--data", data, "--config", str(config), "--out", str(out),
               "--device", "cpu"])
    return rc, out / f"{name}.json"


def test_cli_retrieval_on_the_users_needles_and_haystack(folder, files, tmp_path):
    settings = dict(RETRIEVAL, haystack=files["haystack"], rouge_threshold=-1.0)  # see the Python API test above
    rc, result = cli_scan(folder, tmp_path, "retrieval", files["needles"], settings)
    assert rc == 0
    saved = json.loads(result.read_text())
    assert saved["config"]["data_sha256"] == {files["needles"]: sha256(files["needles"]),
                                              files["haystack"]: sha256(files["haystack"])}
    keys = [sample["key"] for sample in saved["metadata"]["samples"]]
    assert [key.split("|")[3] for key in keys] == [NEEDLES[0]["question"], NEEDLES[1]["question"]]


def test_cli_select_copy_on_the_users_questions(folder, tmp_path):
    path = write_lines(tmp_path / "q.jsonl", questions(10))
    rc, result = cli_scan(folder, tmp_path, "select_copy", path, {"n_dev": 6, "only_known": False})
    assert rc == 0
    saved = json.loads(result.read_text())
    assert saved["config"]["data_sha256"] == {path: sha256(path)}
    assert saved["metadata"]["n_questions"] == 10 and saved["metadata"]["n_test"] == 4


def test_cli_safety_on_the_users_requests(folder, tmp_path):
    texts = [f"Explain how to do forbidden thing number {i}." for i in range(8)]
    path = write_lines(tmp_path / "requests.txt", texts)
    rc, result = cli_scan(folder, tmp_path, "safety", path, {"n_queries": None})
    assert rc == 0
    saved = json.loads(result.read_text())
    assert saved["config"]["data_sha256"] == {path: sha256(path)}
    assert saved["metadata"]["n_queries"] == 6 and texts[3] not in saved["metadata"]["queries"]


def test_cli_names_the_bad_line_of_the_users_file_before_loading_the_model(folder, tmp_path, capsys, monkeypatch):
    import headscope.cli

    loaded = []
    monkeypatch.setattr(headscope.cli, "load_model", lambda *a, **k: loaded.append(a))
    path = write_lines(tmp_path / "q.jsonl", [*questions(9), '{"question": "Q?", "options": ["a"], "answer": 0}'])
    rc, _ = cli_scan(folder, tmp_path, "select_copy", path, {"n_dev": 6, "only_known": False})
    assert rc == 2 and "q.jsonl, line 10: A question needs 2..8 options" in capsys.readouterr().err and not loaded
    path = write_lines(tmp_path / "r.txt", ["only one", "and two"])
    rc, _ = cli_scan(folder, tmp_path, "safety", path, {})
    assert rc == 2 and "holds 2 requests" in capsys.readouterr().err and not loaded


def test_safety_on_four_requests_skips_the_refusal_direction_and_says_why(model, tmp_path):
    path = write_lines(tmp_path / "requests.txt", [f"Explain forbidden thing {i}." for i in range(4)])
    scores = hs.get_detector("safety", data=path, n_queries=None, n_bootstrap=10).score(model, progress=False)
    assert "refusal_direction" not in scores.extras and "needs 4" in scores.metadata["refusal_direction"]["skipped"]
    assert scores.values.isfinite().all() and "ships_frequency" in scores.extras
