"""Own data for memory_context (conflict facts, JSONL) and successor (ordered lists, .txt or
.jsonl): readers name the file and line of a bad line, scores use the user's items and record the
file's hash, from Python and through the CLI, on a tiny Llama with a byte-level tokenizer."""

from __future__ import annotations

import json
import math

import pytest

import headscope as hs
from headscope.cli import main
from headscope.errors import DataError, EmptyResultError
from headscope.tasks.conflicts import first_token, read_conflict_facts, top_next_tokens
from headscope.tasks.succession import read_succession_lists
from headscope.tasks.user_data import file_sha256
from tests.conftest import tiny_text_llama_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(tiny_text_llama_folder(tmp_path_factory.mktemp("own-data-llama")))


@pytest.fixture(scope="module")
def model(folder):
    return hs.load_model(folder, device="cpu")


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def jsonl(path, rows):
    return write(path, [row if isinstance(row, str) else json.dumps(row) for row in rows])


# --- successor ------------------------------------------------------------------------------------
# The byte tokenizer makes every character a token and " A" ... " Z" one token each: capital
# letters are single tokens in both forms, digits only bare.

LISTS_TXT = ["# capitals and digits", "A, B, C, D, E, F, G, H", "", "1, 2, 3, 4, 5, 6, 7"]


@pytest.mark.parametrize("name, lines, problem", [
    ("short.txt", ["A, B, C, D", "A, B, C"], r"short.txt, line 2: a list of 3 items; each list needs at least 4"),
    ("gap.txt", ["A, B, , D, E"], r"gap.txt, line 1: an empty item"),
    ("twice.txt", ["A, B, C, A, E"], r"twice.txt, line 1: the item 'A' appears twice"),
    ("bad.jsonl", ['{"items": ["A", "B", "C", "D"]}', '{"items": ["A", "B"'], r"bad.jsonl, line 2: not JSON"),
    ("keyless.jsonl", ['{"name": "x", "list": ["A", "B", "C", "D"]}'], r"keyless.jsonl, line 1: no 'items'"),
    ("names.jsonl", ['{"name": "x", "items": ["A", "B", "C", "D"]}', '{"name": "x", "items": ["E", "F", "G", "H"]}'],
     r"names.jsonl, line 2: the name 'x' is also used on line 1"),
    ("wraps.jsonl", ['{"items": ["A", "B", "C", "D"], "wraps": "yes"}'], r"wraps.jsonl, line 1: 'wraps' must be true"),
    ("typo.jsonl", ['{"itmes": ["A"], "items": ["A", "B", "C", "D"]}'], r"typo.jsonl, line 1: unknown key 'itmes'"),
])
def test_successor_reader_errors_name_the_file_and_line(tmp_path, name, lines, problem):
    path = write(tmp_path / name, lines)
    with pytest.raises(DataError, match=problem):
        read_succession_lists(path)
    with pytest.raises(DataError, match=problem):
        hs.get_detector("successor", data=str(path)).check_data()


def test_successor_lists_read_as_written_and_too_few_prompts_are_refused(tmp_path):
    lists = read_succession_lists(write(tmp_path / "lists.txt", LISTS_TXT))
    assert [(lst.name, lst.line, lst.items[:2], lst.wraps) for lst in lists] == [
        ("line2", 2, ("A", "B"), False), ("line4", 4, ("1", "2"), False)]
    rows = [{"name": "ring", "items": ["A", "B", "C", "D"], "wraps": True}]
    assert read_succession_lists(jsonl(tmp_path / "ring.jsonl", rows))[0].wraps
    one_prompt = write(tmp_path / "one.txt", ["A, B, C, D"])  # 4 items, 3 shown before the 4th: one prompt a form
    with pytest.raises(DataError, match=r"one.txt: in 1 form\(s\), its lists give 1 in-context prompt; .* at least 2"):
        hs.get_detector("successor", data=str(one_prompt), forms=("bare",)).check_data()
    hs.get_detector("successor", data=str(one_prompt)).check_data()  # two forms, two prompts
    with pytest.raises(DataError, match="at least 6"):  # context_items + 1
        hs.get_detector("successor", data=str(one_prompt), context_items=5).check_data()


def test_a_list_without_a_single_token_item_is_named(tmp_path, model):
    path = write(tmp_path / "days.txt", ["A, B, C, D, E", "Monday, Tuesday, Wednesday, Thursday"])
    detector = hs.get_detector("successor", data=str(path))
    detector.check_data()  # the file itself is fine: single tokens need the model's tokenizer
    with pytest.raises(DataError, match=r"days.txt, line 2: no item of the list 'line2' is a single token"):
        detector.tasks(model)


def test_successor_scores_user_lists_from_python(tmp_path, model):
    rows = [{"name": "capitals", "items": list("ABCDEFGHIJ"), "wraps": True},
            {"name": "digits", "items": list("123456789")}]
    path = jsonl(tmp_path / "lists.jsonl", rows)
    scores = hs.detect(model, "successor", data=str(path), progress=False)
    assert scores.values.shape == (2, 4) and all(math.isfinite(v) for v in scores.values.flatten().tolist())
    assert scores.config["data_sha256"] == {str(path): file_sha256(path)}
    assert set(scores.metadata["tasks"]) == {"capitals:space", "capitals:bare", "digits:bare"}  # " 1" is 2 tokens
    assert scores.metadata["data_lists"]["capitals"] == {"line": 1, "items": 10, "wraps": True}
    detector = hs.get_detector("successor", data=str(path))
    dev, test = detector.prompts(model, "dev"), detector.prompts(model, "test")
    assert dev and test and not {p.text for p in dev} & {p.text for p in test}  # scored and held out apart
    assert {p.task.name for p in dev + test} == {"capitals", "digits"}


def test_successor_scores_a_user_file_through_the_cli(tmp_path, folder):
    path = write(tmp_path / "lists.txt", LISTS_TXT)
    out = tmp_path / "out"
    assert main(["scan", "--model", folder, "--detectors", "successor", "--data", str(path), "--out", str(out)]) == 0
    saved = json.loads((out / "successor.json").read_text())
    assert saved["config"]["data"] == str(path)
    assert saved["config"]["data_sha256"] == {str(path): file_sha256(path)}
    assert set(saved["metadata"]["tasks"]) == {"line2:space", "line2:bare", "line4:bare"}
    assert set(saved["metadata"]["data_lists"]) == {"line2", "line4"}


# --- memory_context -------------------------------------------------------------------------------
# A random model knows nothing, so the facts are written to be "known": for clozes where its top
# next token starts an answer (" " or " A".." Z"), the answer starts with that token.

CLOZES = ("{s} lives in", "{s} is from", "{s} went to")
SUBJECTS = tuple(a + b for a in "ABCDEFGHIJKLMNOPRSTUVW" for b in "aeiou")
COUNTERFACTUAL_LETTERS = "QKJWYZ"


def known_rows(model, per_token=2):
    """Facts the model 'knows': at most ``per_token`` subjects per predicted answer token, each
    with a counterfactual starting with another capital letter."""
    prompts = [(cloze, subject) for cloze in CLOZES for subject in SUBJECTS]
    tops = top_next_tokens(model, [cloze.replace("{s}", subject) for cloze, subject in prompts])
    rows, used = [], {}
    for (cloze, subject), token in zip(prompts, tops):
        text = model.tokenizer.decode([token])
        if not text.startswith(" ") or used.get(token, 0) >= per_token:
            continue
        answer = text.strip() + "ab" if text.strip() else "zab"
        counterfactual = next(c + "o" for c in COUNTERFACTUAL_LETTERS[len(rows) % 6:] + COUNTERFACTUAL_LETTERS
                              if " " + c != text)
        assert first_token(model, answer) == token
        used[token] = used.get(token, 0) + 1
        rows.append({"subject": subject, "cloze": cloze, "answer": answer, "counterfactual": counterfactual})
    assert len(used) >= 3 and len(rows) >= 6  # several answer tokens: the unrelated-answer control has pairs
    return rows


@pytest.fixture(scope="module")
def facts_rows(model):
    return known_rows(model)


FACT = {"subject": "France", "cloze": "The capital of {s} is", "answer": "Paris", "counterfactual": "Rome"}


@pytest.mark.parametrize("rows, formats, problem", [
    ([FACT, '{"subject": "Peru", "cloze": "The capital of {s} is", "answer": "Lima",'], ("restate",),
     r"facts.jsonl, line 2: not JSON"),
    ([FACT, {"subject": "Peru", "cloze": "The capital of {s} is"}], ("restate",), r"facts.jsonl, line 2: no 'answer'"),
    ([{**FACT, "answr": "Paris"}], ("restate",), r"facts.jsonl, line 1: unknown key 'answr'"),
    ([{**FACT, "counterfactual": "Paris"}], ("restate",), r"line 1: the counterfactual is the answer itself"),
    ([{**FACT, "subject": ""}], ("restate",), r"line 1: 'subject' must be a non-empty string"),
    ([{**FACT, "context": "{s} has {s}."}], ("restate",), r"line 1: 'context' has no \{c\}"),
    ([FACT], ("qa",), r"line 1: no 'question', which the 'qa' format asks"),
    ([FACT, FACT], ("restate",), r"line 2: the same cloze and subject as line 1"),
])
def test_memory_context_reader_errors_name_the_file_and_line(tmp_path, rows, formats, problem):
    path = jsonl(tmp_path / "facts.jsonl", rows)
    with pytest.raises(DataError, match=problem):
        read_conflict_facts(path, formats)
    with pytest.raises(DataError, match=problem):
        hs.get_detector("memory_context", data=str(path), formats=formats).check_data()


def test_memory_context_needs_subjects_for_its_split_and_facts_the_model_knows(tmp_path, model):
    one_subject = jsonl(tmp_path / "one.jsonl", [FACT, {**FACT, "cloze": "{s} lies in", "answer": "Europe"}])
    with pytest.raises(DataError, match=r"one.jsonl: facts about 1 subject; memory_context needs at least 2"):
        hs.get_detector("memory_context", data=str(one_subject)).check_data()
    prompts = [cloze.replace("{s}", s) for cloze in CLOZES for s in SUBJECTS[:20]]
    unknown = [{"subject": s, "cloze": c, "answer": "zab", "counterfactual": "Qo"}
               for (c, s), t in zip([(c, s) for c in CLOZES for s in SUBJECTS[:20]], top_next_tokens(model, prompts))
               if t != first_token(model, "zab")][:4]
    path = jsonl(tmp_path / "unknown.jsonl", unknown)
    with pytest.raises(EmptyResultError, match=r"The model knows none of the 4 facts in .*unknown.jsonl"):
        hs.detect(model, "memory_context", data=str(path), progress=False)


def test_memory_context_items_come_from_the_file_split_by_subject(tmp_path, model, facts_rows):
    rows = facts_rows[:-1] + [{k: v for k, v in facts_rows[-1].items() if k != "counterfactual"}]
    path = jsonl(tmp_path / "facts.jsonl", rows)
    detector = hs.get_detector("memory_context", data=str(path), formats=("restate", "according"))
    every, scored, held_out = (detector.items(model, split) for split in ("all", "score", "held_out"))
    assert len(every) == 2 * len(rows) and {i.subject for i in every} == {r["subject"] for r in rows}
    assert scored and held_out and not {i.subject for i in scored} & {i.subject for i in held_out}
    first, asked = every[0], rows[0]["cloze"].replace("{s}", rows[0]["subject"])
    assert first.prompt == f"{asked} {rows[0]['counterfactual']}. {asked}"
    assert first.restated(first.memory_answer) == f"{asked} {rows[0]['answer']}. {asked}"  # context agrees
    last = every[-1]  # no counterfactual on its line: another answer of its relation, another first token
    assert last.context_answer in {r["answer"] for r in rows if r["cloze"] == rows[-1]["cloze"]}
    assert last.context_token != last.memory_token


def test_memory_context_scores_a_user_file_through_the_cli(tmp_path, folder, facts_rows):
    path = jsonl(tmp_path / "facts.jsonl", facts_rows)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"memory_context": {"data": str(path)}}))
    out = tmp_path / "out"
    assert main(["scan", "--model", folder, "--detectors", "memory_context", "--config", str(config),
                 "--out", str(out)]) == 0
    saved = json.loads((out / "memory_context.json").read_text())
    assert saved["config"]["data_sha256"] == {str(path): file_sha256(path)}
    assert set(saved["metadata"]["subjects"]) <= {r["subject"] for r in facts_rows}
    assert set(saved["metadata"]["relations"]) <= set(CLOZES)
    assert saved["metadata"]["n_items"] >= 2


def test_templates_of_a_users_fact_make_every_format():
    from headscope.tasks.conflicts import conflict_prompt

    templates = {"cloze": "The capital of {s} is", "question": "Which city is the capital of {s}?",
                 "context": "{s} moved its capital to {c}."}
    assert conflict_prompt("own", "qa", "Peru", "Quito", **templates) == \
        "Peru moved its capital to Quito.\nQ: Which city is the capital of Peru?\nA:"
    assert conflict_prompt("own", "according", "Peru", "Quito", cloze=templates["cloze"]) == \
        "According to the text, the capital of Peru is Quito. According to the text, the capital of Peru is"


@pytest.mark.parametrize("detector, lines, where", [
    ("successor", ["A, B, C, D, E", "A, B"], "line 2: a list of 2 items"),
    ("memory_context", [json.dumps(FACT), '{"subject": "Peru"}'], "line 2: no 'cloze', 'answer'"),
])
def test_a_bad_data_line_is_one_cli_error_before_the_model_loads(tmp_path, capsys, monkeypatch, folder, detector,
                                                                 lines, where):
    import headscope.cli

    monkeypatch.setattr(headscope.cli, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    path = write(tmp_path / ("data.txt" if detector == "successor" else "data.jsonl"), lines)
    code = main(["scan", "--model", folder, "--detectors", detector, "--data", str(path),
                 "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert code == 2 and where in error and "Traceback" not in error and len(error.strip().splitlines()) == 1


def test_detect_hands_items_built_in_python_to_score(monkeypatch):
    """``hs.detect(model, "memory_context", items=...)`` (issue 19's table): items are no setting,
    they go to ``score``; settings still go to the config."""
    import torch

    from headscope.detectors.memory_context import MemoryContextDetector

    seen = {}
    scored = hs.HeadScores(torch.zeros(2, 4), "memory_context", "m")

    def fake_score(self, model, batch_size=None, progress=None, items=None):
        seen.update(items=items, seed=self.config.seed)
        return scored

    monkeypatch.setattr(MemoryContextDetector, "score", fake_score)
    monkeypatch.setattr("headscope.api.check_head_hooks", lambda model: None)
    assert hs.detect(object(), "memory_context", items=["an item"], seed=3) is scored
    assert seen == {"items": ["an item"], "seed": 3}
    with pytest.raises(hs.SettingError, match="has no setting itemz"):
        hs.detect(object(), "memory_context", itemz=["an item"])
