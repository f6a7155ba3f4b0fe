"""benchmarks/gpu_check.py's sections on CPU with tiny shapes, so the script made for a lent GPU
machine cannot rot unseen (its pytest section is left out: a test does not start the tests)."""

import importlib.util
from pathlib import Path

import pytest
import torch

from tests.conftest import active_hooks

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_exact_scan_equals_the_naive_loop_on_a_random_model_of_each_dtype(gpu_check, capsys):
    result = gpu_check.scan_section("cpu", small=True, shapes=("llama-7b-like",))
    assert [row["dtype"] for row in result["rows"]] == ["float32", "bfloat16"]
    for row in result["rows"]:
        assert row["heads"] == 8 and row["max_abs_difference"] == 0 and row["largest_effect"] > 0
        assert row["naive_over_exact"] > 0
    gpu_check.print_section("scan", result)
    assert "naive_over_exact" in capsys.readouterr().out


def test_memory_section_halves_on_purpose_and_gets_the_same_numbers(gpu_check, capsys):
    result = gpu_check.memory_section("cpu", small=True)
    assert result["auto_batch_size smollm2-135m"]["rows"]["128"] == 16  # the CPU token budget, 2048 tokens
    oom = result["out_of_memory"]
    assert oom["rows_after_halving"] == 6 and oom["identical_to_a_plain_run_at_the_final_size"]
    assert oom["max_abs_difference_vs_uncapped"] == 0 and oom["scan_max_abs_difference_vs_uncapped"] == 0
    assert len(oom["notes"]) == 3 and all(note.startswith("headscope: ") for note in oom["notes"])
    gpu_check.print_section("memory", result)
    assert "forced batch: CUDA out of memory at 12 rows per run" in capsys.readouterr().out


def test_atlas_section_times_each_stage_and_stops_at_its_budget(gpu_check, capsys):
    group = [["induction", "previous_token", "duplicate_token"]]
    result = gpu_check.atlas_section("cpu", small=True, groups=group)
    assert result["ran"] == group[0] and not result["failures"] and "random" in result["weights"]
    assert set(result["timings"]["induction"]) >= {"scores", "significance", "validation"}
    gpu_check.print_section("atlas", result)
    assert "hs.atlas(model, [induction, previous_token, duplicate_token])" in capsys.readouterr().out
    stopped = gpu_check.atlas_section("cpu", small=True, budget_s=0.001, groups=group + [["successor"]])
    assert stopped["ran"] == [] and stopped["stopped_or_skipped_at_budget"] == group[0] + ["successor"]


def test_the_command_line_refuses_what_cannot_run(gpu_check, capsys, tmp_path):
    with pytest.raises(SystemExit):
        gpu_check.main(["--sections", "scan,bogus", "--out", str(tmp_path)])
    assert "unknown section" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            gpu_check.main(["--device", "cuda", "--out", str(tmp_path)])
        assert "--device cpu --small" in capsys.readouterr().err


def test_no_hook_is_left_on_the_models(gpu_check):
    model = gpu_check.random_model("smollm2-135m", "cpu", torch.float32, small=True)
    with gpu_check.simulated_out_of_memory(model, 1), pytest.raises(torch.OutOfMemoryError):
        model(torch.tensor([[2, 3], [4, 5]]))
    assert active_hooks(model) == 0 and not model.unembed._forward_pre_hooks
