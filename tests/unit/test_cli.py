"""The headscope command on a tiny local Llama folder."""

import json

import pytest

from headscope.cli import main
from tests.conftest import tiny_llama_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(tiny_llama_folder(tmp_path_factory.mktemp("cli-llama")))


def test_info_prints_shape_and_kv_groups(folder, capsys):
    assert main(["info", "--model", folder, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "layers       2" in out and "KV heads     2 per layer (KV0: q0-1, KV1: q2-3)" in out
    assert "induction" in out


def test_scan_writes_json_and_png_per_detector(folder, tmp_path, capsys):
    out = tmp_path / "results"
    code = main(["scan", "--model", folder, "--device", "cpu", "--detectors", "induction,previous_token", "--out", str(out), "--top", "3"])
    assert code == 0
    for name in ("induction", "previous_token"):
        data = json.loads((out / f"{name}.json").read_text())
        assert data["detector"] == name and data["shape"] == [2, 4] and len(data["top_heads"]) == 3
        assert data["metadata"]["headscope_version"] and data["config"]["block_len"] == 25
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert "induction: top 3 heads" in capsys.readouterr().out


def test_scan_takes_detector_settings_from_a_config_file(folder, tmp_path):
    config = tmp_path / "settings.json"
    config.write_text('{"previous_token": {"block_len": 10, "n_repeats": 2, "n_sequences": 4}}')
    assert main(["scan", "--model", folder, "--detectors", "previous_token", "--out", str(tmp_path), "--config", str(config)]) == 0
    data = json.loads((tmp_path / "previous_token.json").read_text())
    assert data["config"]["block_len"] == 10 and data["metadata"]["sequence_length"] == 21


def test_validate_reads_saved_scores(folder, tmp_path, capsys):
    main(["scan", "--model", folder, "--device", "cpu", "--detectors", "induction", "--out", str(tmp_path)])
    report = tmp_path / "validation.json"
    code = main(["validate", "--model", folder, "--device", "cpu", "--scores", str(tmp_path / "induction.json"),
                 "-k", "2", "--n-random", "2", "--out", str(report)])
    assert code == 0
    result = json.loads(report.read_text())
    assert result["k"] == 2 and len(result["random_heads"]) == 2 and result["ci_low"] <= result["ci_high"]


def test_unknown_detector_exits_with_a_clear_message(folder, capsys):
    assert main(["scan", "--model", folder, "--detectors", "induction,sucessor"]) == 2
    assert "Unknown detector 'sucessor'" in capsys.readouterr().err


def test_data_flag_sets_the_detectors_data_setting(tmp_path):
    """--data NAME=PATH gives the detector the user's text (a bare PATH is tested in
    test_bad_input_cli.py); --data wins over a 'data' in --config."""
    from tests.conftest import tiny_text_llama_folder

    folder = str(tiny_text_llama_folder(tmp_path / "text-llama"))
    text = tmp_path / "story.txt"
    text.write_text("The cat sat on the mat. The dog sat on the log. " * 12)
    config = tmp_path / "settings.json"
    config.write_text(json.dumps({"induction": {"data": str(tmp_path / "other.txt"), "text_length": 60,
                                                "n_sequences": 2, "n_validation_sequences": 1}}))
    assert main(["scan", "--model", folder, "--detectors", "induction", "--config", str(config), "--data",
                 f"induction={text}", "--out", str(tmp_path / "out")]) == 0
    saved = json.loads((tmp_path / "out" / "induction.json").read_text())
    assert saved["config"]["data"] == str(text) and list(saved["config"]["data_sha256"]) == [str(text)]


def test_scan_refuses_another_models_saved_scores_before_running_any_detector(folder, tmp_path, capsys):
    other = str(tiny_llama_folder(tmp_path / "other"))  # the same weights under another name: another model
    out = tmp_path / "results"
    small = tmp_path / "small.json"
    small.write_text('{"previous_token": {"block_len": 10, "n_repeats": 2, "n_sequences": 4}}')
    assert main(["scan", "--model", other, "--detectors", "previous_token", "--out", str(out), "--config", str(small)]) == 0
    capsys.readouterr()
    code = main(["scan", "--model", folder, "--detectors", "induction,previous_token", "--out", str(out),
                 "--config", str(small)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("headscope: error: The saved scores") and "--no-resume" in err[-1]
    assert not (out / "induction.json").exists()  # refused before the first detector ran
