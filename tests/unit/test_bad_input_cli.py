"""Bad input on the command line gets one clear line, exit code 2, and no model load (issue 19).

The table runs each row of the issue's table through ``headscope.cli.main``; every row is a
mistake that can be seen without a model, so loading one fails the test. Below it: ``--data``,
``--debug``, internal errors, ``headscope detectors`` and ``headscope info``, then the setting
checks of ``Detector.__init__`` through the Python API.
"""

from __future__ import annotations

import json
import re
import math
import os
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

import headscope as hs
import headscope.cli as cli
from headscope.detectors.base import Detector, DetectorConfig, register_detector, setting, unregister_detector
from headscope.errors import CommandLineError, DataError, SettingError

SCORES_JSON = "induction.json"


@dataclass
class PlainConfig(DetectorConfig):
    size: int = setting(3, "a size", min=1)


@dataclass
class DataConfig(DetectorConfig):
    data: Optional[str] = setting(None, "a text file; a line 'bad' is an error")


class _NoWork(Detector):
    """A detector that must never be asked to score: the CLI stops before any model loads."""

    def score(self, model, batch_size=None, progress=None):
        raise AssertionError("score() ran: the CLI should have stopped before loading a model")

    def validation_task(self, model):
        raise AssertionError("validation_task() ran")


class PlainDetector(_NoWork):
    name = "cli_test_plain"
    Config = PlainConfig


class DataDetector(_NoWork):
    name = "cli_test_data"
    Config = DataConfig

    def check_data(self) -> None:
        if self.config.data is None:
            return
        lines = open(self.config.data).read().splitlines()
        for number, line in enumerate(lines, start=1):
            if line == "bad":
                raise DataError(f"{self.config.data}, line {number}: 'bad' is not allowed. Remove that line.")


@pytest.fixture(autouse=True, scope="module")
def test_detectors():
    """Two throwaway detectors: one without a data setting, one with."""
    for cls in (PlainDetector, DataDetector):
        register_detector(cls)
    yield
    for cls in (PlainDetector, DataDetector):
        unregister_detector(cls.name)


@pytest.fixture
def loads(monkeypatch):
    """The specs the CLI tried to load a model from (the load itself fails the command)."""
    calls = []

    def fake_load(spec, **kwargs):
        calls.append(spec)
        raise RuntimeError("a model was loaded; this check should come before the load")

    monkeypatch.setattr(cli, "load_model", fake_load)
    return calls


@pytest.fixture
def files(tmp_path):
    """Bad input files, by name, in ``tmp_path``."""
    contents = {
        "malformed.json": '{"induction": {"block_len": 50,}}',
        "list.json": '[{"induction": {"block_len": 50}}]',
        "four.json": '{"induction": {"block_len": "four"}}',
        "range.json": '{"induction": {"copying_positions": -1}}',
        "choice.json": '{"induction": {"copying_vocabulary": "ful"}}',
        "nodetector.json": '{"inducton": {"block_len": 50}}',
        "nosetting.json": '{"induction": {"blok_len": 50}}',
        "notobject.json": '{"induction": 50}',
        "notrun.json": '{"induction": {}, "previous_token": {}}',
        "a_file": "not a folder",
    }
    for name, text in contents.items():
        (tmp_path / name).write_text(text)
    scores = hs.HeadScores(values=torch.rand(2, 4), detector="induction", model="tiny")
    saved = scores.save(tmp_path / SCORES_JSON).read_text()
    (tmp_path / "truncated.json").write_text(saved[: len(saved) // 2])
    (tmp_path / "not_scores.json").write_text('{"detector": "induction"}')
    (tmp_path / "data.txt").write_text("good\nbad\n")
    return tmp_path


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(code: int, err: str, *fragments: str) -> None:
    """Exit code 2, one stderr line ``headscope: error: ...`` holding every fragment, no traceback."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("headscope: error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# Each row: id, the command line ({d} is the folder of the files fixture), fragments the line must hold.
ROWS = [
    ("model-gguf-missing", "scan --model {d}/nope.gguf", ["nope.gguf", "existing .gguf"]),
    ("model-folder-missing", "info --model {d}/no-such-folder", ["no-such-folder", "Hugging Face folder"]),
    ("model-folder-not-hf", "scan --model {d}", ["config.json"]),
    ("device-unknown", "scan --device tpu", ["--device tpu", "cpu, cuda or auto"]),
    ("config-malformed", "scan --config {d}/malformed.json", ["malformed.json", "line 1, column", "not valid JSON"]),
    ("config-missing", "scan --config {d}/missing.json", ["missing.json", "No --config file"]),
    ("config-folder", "atlas --config {d}", ["is a folder"]),
    ("config-list", "scan --config {d}/list.json", ["list.json", "JSON array", "object"]),
    ("config-entry-not-object", "scan --config {d}/notobject.json", ["notobject.json", "induction", "JSON object"]),
    ("config-wrong-type", "scan --config {d}/four.json", ["'block_len'", "induction", "'four'", "int"]),
    ("config-out-of-range", "scan --config {d}/range.json", ["'copying_positions'", "-1", "at least 0"]),
    ("config-wrong-type-atlas", "atlas --config {d}/four.json", ["'block_len'", "induction", "'four'", "int"]),
    ("config-out-of-range-atlas", "atlas --config {d}/range.json", ["'copying_positions'", "-1", "at least 0"]),
    ("config-not-a-choice", "scan --config {d}/choice.json", ["'copying_vocabulary'", "'ful'", "did you mean 'full'"]),
    ("config-unknown-detector-scan", "scan --config {d}/nodetector.json", ["'inducton'", "Did you mean 'induction'"]),
    ("config-unknown-detector-atlas", "atlas --config {d}/nodetector.json", ["'inducton'", "Did you mean 'induction'"]),
    ("config-unknown-setting", "scan --config {d}/nosetting.json", ["no setting blok_len", "Did you mean 'block_len'"]),
    ("config-detector-not-run", "atlas --detectors induction --config {d}/notrun.json", ["previous_token", "--detectors"]),
    ("out-is-a-file-scan", "scan --out {d}/a_file", ["--out", "a_file", "is a file"]),
    ("out-is-a-file-atlas", "atlas --out {d}/a_file", ["--out", "a_file", "is a file"]),
    ("out-under-a-file", "atlas --out {d}/a_file/atlas", ["--out", "a_file", "cannot be created"]),
    ("validate-out-is-a-folder", "validate --out {d}", ["--out", "is a folder"]),
    ("scores-missing", "validate --scores {d}/missing.json", ["--scores", "missing.json", "does not exist"]),
    ("scores-truncated", "validate --scores {d}/truncated.json", ["--scores", "truncated.json"]),
    ("scores-not-scores", "validate --scores {d}/not_scores.json", ["--scores", "not_scores.json"]),
    ("scores-other-detector", "validate --scores {d}/" + SCORES_JSON + " --detector previous_token",
     ["--detector previous_token", "induction scores"]),
    ("detectors-comma", "scan --detectors ,", ["--detectors ','", "names no detector"]),
    ("detectors-empty", "atlas --detectors=", ["--detectors ''", "names no detector"]),
    ("detector-unknown", "scan --detectors induction,sucessor", ["'sucessor'", "Did you mean 'successor'"]),
    ("data-detector-without-data", "scan --detectors cli_test_plain --data {d}/data.txt",
     ["cli_test_plain", "takes no --data", "cli_test_data"]),
    ("data-bare-path-two-detectors", "scan --detectors cli_test_data,cli_test_plain --data {d}/data.txt",
     ["--data", "NAME=PATH"]),
    ("data-name-not-in-run", "scan --detectors cli_test_plain --data cli_test_data={d}/data.txt",
     ["cli_test_data", "not in this run"]),
    ("data-file-missing", "scan --detectors cli_test_data --data {d}/nothing.txt", ["nothing.txt", "No cli_test_data data file"]),
    ("data-bad-line", "validate --detector cli_test_data --data cli_test_data={d}/data.txt", ["data.txt", "line 2"]),
    ("data-with-scores", "validate --scores {d}/" + SCORES_JSON + " --data {d}/data.txt", ["--data", "--scores"]),
    ("validate-k-0", "validate -k 0", ["argument -k", "at least 1", "validate --help"]),
    ("atlas-k-0", "atlas -k 0", ["argument -k", "at least 1"]),
    ("atlas-n-random-0", "atlas --n-random 0", ["argument --n-random", "at least 1"]),
    ("scan-top-0", "scan --top 0", ["argument --top", "at least 1"]),
    ("scan-batch-size-0", "scan --batch-size 0", ["argument --batch-size", "at least 1"]),
    ("k-not-a-number", "validate -k five", ["argument -k", "'five'"]),
    ("unknown-flag", "scan --modle x", ["unrecognized arguments", "--modle"]),
    ("compare-missing-atlas", "compare {d}/none {d}/none", ["no atlas", "none"]),
    ("atlas-shard-out-of-range", "atlas --shard 3/2", ["--shard '3/2'", "1 <= I <= N", "numbered from 1"]),
    ("atlas-shard-not-i-n", "atlas --shard 2", ["--shard '2'", "is not I/N", "e.g. 2/4"]),
    ("atlas-only-unknown-detector", "atlas --only nosuchdetector", ["--only 'nosuchdetector'", "Unknown detector"]),
    ("atlas-only-unknown-stage", "atlas --only induction.nostage", ["--only 'induction.nostage'", "no stage",
                                                                     "scores, significance, validation"]),
    ("atlas-only-not-in-run", "atlas --detectors induction --only successor", ["--only 'successor'", "not in this atlas"]),
    ("atlas-only-and-shard", "atlas --only induction --shard 1/2", ["--shard", "not allowed with argument --only"]),
    ("atlas-assemble-nothing-run", "atlas --assemble --out {d}/empty", ["no parts yet", "--shard I/N"]),
    ("atlas-assemble-no-resume", "atlas --assemble --no-resume --out {d}/empty", ["--assemble", "drop --no-resume"]),
    ("detectors-unknown-name", "detectors inductoin", ["'inductoin'", "Did you mean 'induction'"]),
]


@pytest.mark.parametrize("argv, fragments", [row[1:] for row in ROWS], ids=[row[0] for row in ROWS])
def test_bad_input_is_one_line_before_any_model_loads(argv, fragments, files, loads, capsys):
    code, out, err = run_cli(argv.format(d=files).split(), capsys)
    assert_one_error_line(code, err, *fragments)
    assert loads == [], "the model was loaded before the mistake was reported"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="as root, chmod does not stop writes")
def test_out_not_writable_is_reported_before_loading(tmp_path, loads, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, _, err = run_cli(["scan", "--out", str(locked / "results")], capsys)
    finally:
        locked.chmod(0o700)
    assert_one_error_line(code, err, "--out", "not writable")
    assert loads == []


def test_out_not_writable_message_even_as_root(tmp_path, loads, capsys, monkeypatch):
    """The same branch with os.access denying writes (chmod cannot when the tests run as root)."""
    monkeypatch.setattr(cli.os, "access", lambda path, mode: False)
    code, _, err = run_cli(["atlas", "--out", str(tmp_path / "atlas")], capsys)
    assert_one_error_line(code, err, "--out", "not writable", "permission denied")
    assert loads == []


def test_data_path_reaches_the_detector_setting(files, loads, capsys):
    """A good --data file passes every check, so the CLI goes on to load the model (faked here)."""
    (files / "good.txt").write_text("good\n")
    for data in (str(files / "good.txt"), f"cli_test_data={files / 'good.txt'}"):
        code, _, err = run_cli(["scan", "--detectors", "cli_test_data", "--data", data, "--out", str(files / "o")], capsys)
        assert code == 1 and "internal error" in err  # the fake load raises
    assert len(loads) == 2
    settings = cli.detector_settings(["cli_test_data", "cli_test_plain"], _namespace(data=[f"cli_test_data={files}/good.txt"]))
    assert settings == {"cli_test_data": {"data": f"{files}/good.txt"}}


def _namespace(**values):
    import argparse

    return argparse.Namespace(**{"config": None, "data": [], **values})


def test_debug_shows_the_traceback(capsys):
    for argv in (["--debug", "scan", "--detectors", ","], ["scan", "--detectors", ",", "--debug"]):
        with pytest.raises(CommandLineError, match="names no detector"):
            cli.main(argv)


def test_a_bug_is_one_line_with_exit_1_and_debug_reraises(loads, tmp_path, capsys):
    argv = ["scan", "--out", str(tmp_path / "out")]
    code, _, err = run_cli(argv, capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("headscope: internal error: RuntimeError") and "--debug" in err
    with pytest.raises(RuntimeError, match="a model was loaded"):
        cli.main(["--debug", *argv])


@pytest.mark.parametrize("failure, words", [
    (MemoryError(), ("out of memory", "--batch-size")),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), ("out of memory", "--batch-size")),
    (OSError(28, "No space left on device", "atlas/parts/x.json"), ("No space left on device", "atlas/parts/x.json",
                                                                     "Free disk space")),
])
def test_a_failure_of_the_machine_is_one_line_saying_what_to_change(monkeypatch, tmp_path, capsys, failure, words):
    def fail(spec, **kwargs):
        raise failure

    monkeypatch.setattr(cli, "load_model", fail)
    code, _, err = run_cli(["scan", "--out", str(tmp_path / "out")], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err and "bug" not in err
    assert err.startswith("headscope: error: ") and all(word in err for word in words) and "rerun resumes" in err


def test_detectors_lists_every_detector_and_its_settings(loads, capsys):
    code, out, _ = run_cli(["detectors"], capsys)
    assert code == 0 and loads == []
    for name in hs.list_detectors():
        assert f"\n{name}: " in out
    assert "  block_len: int = 25 (at least " in out and "cost: " in out
    assert 'copying_vocabulary: str = "sequence" (one of "sequence", "full")' in out


def test_detectors_json_is_machine_readable(capsys):
    code, out, _ = run_cli(["detectors", "--json"], capsys)
    data = json.loads(out)
    by_name = {d["name"]: d for d in data["detectors"]}
    assert code == 0 and sorted(by_name) == hs.list_detectors() and "2 CPU cores" in data["cost_source"]
    block_len = {s["name"]: s for s in by_name["induction"]["settings"]}["block_len"]
    assert block_len["default"] == 25 and block_len["type"] == "int" and block_len["min"] is not None
    shipped = [d for name, d in by_name.items() if not name.startswith("cli_test")]
    assert all(d["summary"] and re.search(r"score .*\d+ s", d["cost"]) for d in shipped)  # a measured time each


def test_info_without_a_model_loads_none(loads, capsys):
    code, out, _ = run_cli(["info"], capsys)
    assert code == 0 and loads == []
    assert "transformer-lens" in out and "induction" in out and "none loaded" in out


# --- the setting checks in Detector.__init__ (the Python API gets them too) ---------------------


@pytest.mark.parametrize("settings, fragments", [
    ({"block_len": "four"}, ["'block_len'", "induction", "'four'", "int", "default 25"]),
    ({"block_len": True}, ["'block_len'", "True", "bool"]),
    ({"seed": 1.5}, ["'seed'", "1.5"]),
    ({"token_range": [1]}, ["'token_range'", "[int, int] or None"]),
    ({"token_range": "1-5"}, ["'token_range'", "'1-5'"]),
    ({"copying": "yes"}, ["'copying'", "bool"]),
    ({"copying_vocabulary": "ful"}, ["'copying_vocabulary'", "one of 'sequence', 'full'", "'full'"]),
    ({"copying_positions": -1}, ["'copying_positions'", "at least 0", "-1"]),
    ({"blok_len": 3}, ["no setting blok_len", "Did you mean 'block_len'", "headscope detectors induction"]),
])
def test_induction_settings_are_checked(settings, fragments):
    with pytest.raises(SettingError) as caught:
        hs.get_detector("induction", **settings)
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_values_that_fit_are_kept_and_json_lists_become_tuples():
    induction = hs.get_detector("induction", token_range=[2, 30], copying_vocabulary="full")
    assert induction.config.token_range == (2, 30) and induction.config.copying_vocabulary == "full"
    retrieval = hs.get_detector("retrieval", depths=[0, 50.5], lengths=[300])
    assert retrieval.config.depths == (0, 50.5) and retrieval.config.lengths == (300,)
    assert hs.get_detector("induction", token_range=None).config.token_range is None


def test_float_settings_refuse_nan_and_tuples_check_each_item():
    with pytest.raises(SettingError, match="finite"):
        hs.get_detector("retrieval", depths=[0, math.nan])
    with pytest.raises(SettingError, match="'lengths'"):
        hs.get_detector("retrieval", lengths=[300, "long"])


@pytest.mark.wrong_type  # block_len="four"
def test_a_saved_config_reads_back_and_a_config_instance_is_checked():
    saved = json.loads(json.dumps(hs.get_detector("induction", token_range=(2, 30)).config_record()))
    saved["data_sha256"] = {}  # written by config_record for data files: a record, not a setting
    assert hs.get_detector("induction", config=saved).config.token_range == (2, 30)
    config_class = hs.get_detector("induction").Config
    with pytest.raises(SettingError, match="block_len"):
        hs.get_detector("induction", config=config_class(block_len="four"))
    with pytest.raises(SettingError, match="dict of settings"):
        hs.get_detector("induction", config=42)


def test_detect_checks_settings_before_any_work():
    from tests.conftest import tiny_model

    model = tiny_model()
    with pytest.raises(SettingError, match="'four'"):
        hs.detect(model, "induction", block_len="four")
