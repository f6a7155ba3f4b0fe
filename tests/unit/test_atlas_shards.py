"""An atlas spread over processes (issue 23, part 4): its units and shards, parts made apart (in any
order, or by two processes writing into one folder at once) assembling to the sequential atlas
byte for byte, missing parts named before any work, a failed unit recorded without ending the
others.

"The same atlas" is compared on ``Atlas.results_json()``: everything ``atlas.json`` holds except
``environment`` (date, versions, device) and ``timings`` (seconds), which differ between any two
runs, plus the attention patterns; the files written beside it (``patterns.json`` and the CSV
files) are compared byte for byte as they are.
"""

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import headscope as hs
from headscope.cli import main
from tests.conftest import tiny_llama_folder
from tests.unit import shard_helpers
from tests.unit.shard_helpers import DETECTORS, SETTINGS, TEMPLATES

atlas_module = importlib.import_module("headscope.atlas")  # hs.atlas is the function

CLI_SETTINGS = {name: SETTINGS[name] for name in TEMPLATES}
SAME_FILES = ["patterns.json", "heads.csv", "validation.csv", "significance.csv", "overlap.csv"]
ROOT = Path(__file__).resolve().parents[2]


def run(model, out, **kwargs):
    return hs.atlas(model, DETECTORS, k=2, n_random=2, settings=SETTINGS, progress=False, out=out, **kwargs)


@pytest.fixture(scope="module")
def model():
    """The tiny model, with the test detector ``top_two`` (significant heads: patterns to draw)
    registered for this module's tests only."""
    yield shard_helpers.build_model()
    hs.unregister_detector("top_two")


def test_units_run_apart_in_any_order_assemble_to_the_sequential_atlas(model, tmp_path):
    sequential = run(model, tmp_path / "sequential")
    out = tmp_path / "apart"
    with pytest.raises(hs.MissingPartsError, match=r"induction\.validation need\(s\) the scores part.*--only induction\.scores"):
        run(model, out, only=["induction.validation"])  # before any work: nothing written
    assert not (out / "parts").exists() or not list((out / "parts").iterdir())
    scored = run(model, out, only=["induction.scores"])  # the shared pass writes all three scores parts
    assert list(scored.scores) == ["induction"] and scored.patterns == {} and scored.settings.detectors == ["induction"]
    assert {p.name for p in (out / "parts").iterdir()} == {f"{name}.scores.json" for name in TEMPLATES}
    run(model, out, only="duplicate_token, previous_token.validation,top_two")
    with pytest.raises(hs.MissingPartsError) as missing:
        run(model, out, assemble=True)
    assert "lacks 3 part(s) of 2 detector(s): induction.significance,induction.validation, previous_token.significance" in str(missing.value)
    run(model, out, only=["induction.validation", "induction.significance", "previous_token.significance"])
    assembled = run(model, out, assemble=True)
    assert list(sequential.patterns) == list(assembled.patterns) == ["top_two"]  # drawn, and compared below
    assert assembled.results_json() == sequential.results_json()
    assert assembled.timings["previous_token"]["scored_with"] == "induction"  # kept in the part
    assert all(assembled.timings[name]["resumed"] for name in TEMPLATES)


def test_a_rerun_of_a_unit_keeps_its_parts_and_an_assembly_reuses_the_patterns(model, tmp_path, monkeypatch):
    run(model, tmp_path, shard="1/1")
    run(model, tmp_path, assemble=True)

    def no_compute(*args, **kwargs):
        raise AssertionError("a saved stage was computed again")

    monkeypatch.setattr(atlas_module, "validate", no_compute)
    monkeypatch.setattr(atlas_module, "attention_patterns", no_compute)
    again = run(model, tmp_path, shard=(1, 1))
    assert set(again.scores) == set(DETECTORS) and again.failures == {}
    assert run(model, tmp_path, assemble=True).timings["attention_patterns"]["resumed"]


def test_units_keep_a_shared_pass_together_and_shards_partition_them():
    units = hs.atlas_units()
    assert units[0].detectors == ("induction", "previous_token", "duplicate_token")
    named = [name for unit in units for name in unit.detectors]
    assert sorted(named) == sorted(hs.list_detectors()) and len(named) == len(set(named))
    for count in range(1, len(units) + 3):
        shards = [atlas_module.shard_units(units, index, count) for index in range(1, count + 1)]
        assert sorted(str(u) for shard in shards for u in shard) == sorted(str(u) for u in units)
        assert shards == [atlas_module.shard_units(units, index, count) for index in range(1, count + 1)]
        loads = [sum(u.weight for u in shard) for shard in shards]
        heaviest = max(u.weight for u in units)
        assert max(loads) <= sum(loads) / count + heaviest  # the greedy bound
    assert atlas_module.shard_units(units, len(units) + 1, len(units) + 1) == []  # more shards than units


def test_rough_seconds_add_up_a_cost_text():
    assert atlas_module.rough_seconds("score 8 s (with previous_token and duplicate_token), random-token null 4 s, "
                                      "validation 51 s") == 63
    assert atlas_module.rough_seconds("score 27 s (9 samples, ~3 s each), validation 11 s", validate=False) == 27
    assert atlas_module.rough_seconds("") == atlas_module.UNIT_SECONDS


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(shard="3/2"), "1 <= I <= N"),
    (dict(shard="0/2"), "numbered from 1"),
    (dict(shard="a/b"), "is not I/N"),
    (dict(only=["induction.nostage"]), "scores, significance, validation"),
    (dict(only=["induction.validation"], validate=False), "not run with validate=False"),
    (dict(only=["successor"]), "not in this atlas"),
    (dict(only=","), "names no unit"),
    (dict(only=["induction"], shard="1/2"), "only and shard were given together"),
    (dict(assemble=True, resume=False), "drop resume=False"),
])
def test_bad_unit_requests_fail_before_any_work(model, tmp_path, kwargs, fragment):
    with pytest.raises(hs.ArgumentError, match=fragment):
        run(model, tmp_path, **kwargs)
    assert not tmp_path.joinpath("parts").exists()


def test_an_unknown_unit_is_named_with_the_nearest_detector_and_units_need_out(model, tmp_path):
    with pytest.raises(hs.UnknownDetectorError, match="'inductoin'.*Did you mean 'induction'"):
        run(model, tmp_path, only=["inductoin"])
    with pytest.raises(hs.ArgumentError, match="needs out="):
        hs.atlas(model, DETECTORS, settings=SETTINGS, only=["induction"])


def _cli_args(folder: Path, out: Path, config: Path) -> list[str]:
    return ["atlas", "--model", str(folder), "--detectors", "induction,previous_token,duplicate_token,successor,"
            "memory_context", "--config", str(config), "-k", "2", "--n-random", "2", "--out", str(out)]


def _wait_for_a_part(parts: Path, other: subprocess.Popen, seconds: float = 120) -> None:
    """Until the other process has written a part (or ended)."""
    deadline = time.monotonic() + seconds
    while other.poll() is None and time.monotonic() < deadline and not list(parts.glob("*.json")):
        time.sleep(0.05)


def test_two_shard_processes_at_once_then_assemble_equal_the_sequential_run(tmp_path, capsys, monkeypatch):
    """``headscope atlas --shard 1/2`` in a second process and ``--shard 2/2`` in this one write
    into one folder at the same time (this one starts once the other has written a part), then
    ``--assemble`` writes the atlas: equal to a sequential ``headscope atlas``. memory_context
    fails on this model (it knows no facts) in both runs: its shard records it and finishes the
    others. The runs in this process share one loaded model (the load is the slow part)."""
    import headscope.cli as cli

    folder, config = tiny_llama_folder(tmp_path / "llama"), tmp_path / "settings.json"
    config.write_text(json.dumps(CLI_SETTINGS))
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
                   "OMP_NUM_THREADS": "1", "HEADSCOPE_TYPECHECK": "0"}
    other = subprocess.Popen([sys.executable, "-m", "headscope.cli", *_cli_args(folder, tmp_path / "apart", config),
                              "--shard", "1/2"], env=environment, cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    loaded = hs.load_model(str(folder))
    monkeypatch.setattr(cli, "load_model", lambda spec, **kwargs: loaded)
    assert main(_cli_args(folder, tmp_path / "sequential", config)) == 1  # memory_context fails
    _wait_for_a_part(tmp_path / "apart" / "parts", other)
    capsys.readouterr()
    assert main(_cli_args(folder, tmp_path / "apart", config) + ["--shard", "2/2"]) == 1
    out, err = capsys.readouterr()
    assert "atlas shard 2/2: successor, memory_context in" in out
    assert "memory_context in scores" in err and "Traceback" not in err
    other_out, other_err = other.communicate(timeout=240)
    assert other.returncode == 0, other_err
    assert "atlas shard 1/2: induction, previous_token, duplicate_token in" in other_out
    parts = tmp_path / "apart" / "parts"
    assert not [p.name for p in parts.iterdir() if p.name.endswith((".tmp", ".damaged"))]
    assert (parts / "memory_context.failed.json").is_file() and not (tmp_path / "apart" / "atlas.json").exists()
    assert main(_cli_args(folder, tmp_path / "apart", config) + ["--assemble"]) == 1  # the failure, as sequential
    assert "1 of 5 detectors failed (memory_context in scores" in capsys.readouterr().err
    sequential, assembled = (hs.Atlas.load(tmp_path / name) for name in ("sequential", "apart"))
    assert assembled.results_json() == sequential.results_json()
    assert list(assembled.failures) == ["memory_context"]
    for name in SAME_FILES:
        assert (tmp_path / "apart" / name).read_bytes() == (tmp_path / "sequential" / name).read_bytes(), name


def test_cli_assemble_names_the_missing_units_before_loading(tmp_path, capsys, monkeypatch):
    import headscope.cli as cli

    folder, config = tiny_llama_folder(tmp_path / "llama"), tmp_path / "settings.json"
    config.write_text(json.dumps(CLI_SETTINGS))
    args = ["atlas", "--model", str(folder), "--detectors", ",".join(TEMPLATES), "--config", str(config), "-k", "2",
            "--n-random", "2", "--out", str(tmp_path / "a")]
    assert main(args + ["--only", "induction"]) == 0  # its pass also writes the other two scores parts
    assert "atlas --only induction: induction in" in capsys.readouterr().out
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("the model was loaded before the check"))
    assert main(args + ["--assemble"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "lacks 4 part(s) of 2 detector(s): previous_token.significance," in err
    assert "'headscope atlas --only previous_token.significance,previous_token.validation,duplicate_token" in err
