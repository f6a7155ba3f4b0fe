"""CUDA out-of-memory halving (engine.runner.Halving), tested on CPU by raising the error on purpose
in every run wider than a few rows; and the rows per chunk that free CUDA memory gives."""

import contextlib

import pytest
import torch

import headscope as hs
from headscope.engine import masked_mean, next_token_losses, run_batched
from headscope.engine import runner
from headscope.engine.generation import generate
from headscope.engine.runner import ChunkOutOfMemoryError, Halving
from headscope.engine.tokens import pad_rows
from headscope.scans import readout_scan
from tests.conftest import active_hooks, tiny_model


@contextlib.contextmanager
def out_of_memory_above(model, rows: int):
    """Inside, every forward that reaches the unembedding with more than ``rows`` rows raises
    ``torch.OutOfMemoryError`` there (as CUDA would); yields the widths that failed."""
    failed: list[int] = []

    def refuse(module, args):
        width = args[0].shape[0]
        if width > rows:
            failed.append(width)
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated at {width} rows)")

    handle = model.unembed.register_forward_pre_hook(refuse)
    try:
        yield failed
    finally:
        handle.remove()


def mean_loss(logits, batch):
    return masked_mean(next_token_losses(logits, batch.tokens), batch.attention_mask[:, 1:].bool())


@pytest.fixture(scope="module")
def model():
    return tiny_model(n_layers=2, n_heads=4, n_kv_heads=2, attn_only=False)


@pytest.fixture(scope="module")
def prompts(model):
    torch.manual_seed(3)
    return pad_rows(model, [torch.randint(0, 64, (n,)).tolist() for n in [12, 9, 14, 10, 14, 8, 11, 13, 7]])


def notes(err: str) -> list[str]:
    return [line for line in err.splitlines() if "CUDA out of memory at" in line]


def test_halving_retries_at_half_keeps_the_smaller_size_and_reports_once(capsys):
    tried = []

    def run(span):
        tried.append(span.stop - span.start)
        if span.stop - span.start > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return list(range(span.start, span.stop))

    halving = Halving("test run")
    assert sum(halving.map(11, 8, run), []) == list(range(11))
    assert tried == [8, 4, 2, 2, 2, 2, 2, 1] and halving.limit == 2
    assert sum(halving.map(5, 8, run), []) == list(range(5)) and tried[8:] == [2, 2, 1]  # the next map starts at 2
    assert notes(capsys.readouterr().err) == ["headscope: test run: CUDA out of memory at 8 rows per run; continuing "
                                              "at 4 (halving again if needed) for the rest of the run"]


def test_one_row_out_of_memory_is_a_clear_error_and_a_fixed_chunk_is_never_split(capsys):
    def never(span):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    with pytest.raises(ChunkOutOfMemoryError, match="at 1 of the rows per run, so halving cannot help") as error:
        Halving("test run", progress=False).map(4, 4, never)
    assert isinstance(error.value, torch.OutOfMemoryError)  # the CLI's "out of memory" line; an outer halving halves
    with pytest.raises(ChunkOutOfMemoryError, match="at 4 rows per run, and chunks must stay whole"):
        Halving("test run", fixed="chunks must stay whole").map(4, 4, never)
    assert capsys.readouterr().err == ""
    with pytest.raises(ValueError, match="at least 1"):
        Halving("test run").map(4, 0, never)


def test_run_batched_after_halving_equals_the_plain_run(model, prompts, capsys):
    def per_row(logits, cache, chunk):  # what does not depend on the chunk's width (padding)
        losses = next_token_losses(logits, chunk.tokens) * chunk.attention_mask[:, 1:]
        return {"loss": losses.sum(dim=1), "pattern": cache["blocks.1.attn.hook_pattern"][:, :, 5, :5]}

    names = ["blocks.1.attn.hook_pattern"]
    plain = run_batched(model, prompts, per_row, names=names, batch_size=9)
    at_two = run_batched(model, prompts, per_row, names=names, batch_size=2)
    with out_of_memory_above(model, 2) as failed:
        halved = run_batched(model, prompts, per_row, names=names, batch_size=9, desc="losses")
    assert failed == [9, 4]
    for key in plain:  # the chunks of 2 rows it ended with, exactly; the chunk of 9 to float precision
        assert torch.equal(halved[key], at_two[key])
        torch.testing.assert_close(halved[key], plain[key], rtol=1e-6, atol=1e-6)
    assert notes(capsys.readouterr().err) == ["headscope: losses: CUDA out of memory at 9 rows per run; continuing at 4 "
                                              "(halving again if needed) for the rest of the run"]
    assert active_hooks(model) == 0


def test_an_ablation_scan_halves_heads_then_examples_and_gives_the_same_numbers(model, prompts, capsys):
    plain = hs.ablation_scan(model, prompts, mean_loss, batch_size=9)
    with out_of_memory_above(model, 2) as failed:
        halved = hs.ablation_scan(model, prompts, mean_loss, batch_size=9)
    assert failed[:3] == [9, 4, 2 * 4]  # the clean runs of 9 and 4 examples, then 4 heads on 2 examples
    torch.testing.assert_close(halved.values, plain.values, rtol=1e-6, atol=1e-6)
    err = capsys.readouterr().err
    assert len(notes(err)) == 2 and "at 9 examples per run" in err and "heads per run" in err
    readout = readout_scan(model, prompts, method="zero", heads=[(0, 1), (1, 2)], batch_size=9)
    with out_of_memory_above(model, 2):
        readout_halved = readout_scan(model, prompts, method="zero", heads=[(0, 1), (1, 2)], batch_size=9)
    torch.testing.assert_close(readout_halved.ablated, readout.ablated, rtol=1e-6, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(readout_halved.clean, readout.clean, rtol=1e-6, atol=1e-6)
    with out_of_memory_above(model, 2), pytest.raises(ChunkOutOfMemoryError, match="cannot be split"):
        hs.ablation_scan(model, prompts, mean_loss, method="resample", batch_size=3, progress=False)
    assert active_hooks(model) == 0


def test_attribution_scan_and_generation_after_halving(model, prompts, tiny_llama):
    plain = hs.attribution_scan(model, prompts, mean_loss, batch_size=9)
    with out_of_memory_above(model, 4):
        halved = hs.attribution_scan(model, prompts, mean_loss, batch_size=9, progress=False)
    torch.testing.assert_close(halved.values, plain.values, rtol=1e-6, atol=1e-6)
    texts = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9", "w10"]
    expected = [g.token_ids for g in generate(tiny_llama, texts, max_new_tokens=4, batch_size=4)]
    with out_of_memory_above(tiny_llama, 1):
        halved_texts = generate(tiny_llama, texts, max_new_tokens=4, batch_size=4)
    assert [g.token_ids for g in halved_texts] == expected


def test_batch_size_from_free_cuda_memory(model, monkeypatch):
    """The CUDA branch of auto_batch_size, with the device and its free memory mocked: float32,
    vocabulary 64, d_model 64, 4 heads; per row ``4 * seq * (64 + 24 * 64 + 2 * 4 * seq)`` bytes
    against half the free memory, between 1 and MAX_BATCH_SIZE."""
    free = [100 * 2**20]
    monkeypatch.setattr(runner, "model_device", lambda m: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free[0], 141 * 2**30))
    assert runner.auto_batch_size(model, 32) == (50 * 2**20) // (4 * 32 * (64 + 1536 + 8 * 32)) == 220
    assert runner.auto_batch_size(model, 32, n_cached=2) < 220  # cached patterns take room
    assert runner.auto_batch_size(model, 512) == (50 * 2**20) // (4 * 512 * (64 + 1536 + 8 * 512))
    free[0] = 1 * 2**20
    assert runner.auto_batch_size(model, 1024) == 1  # never zero
    free[0] = 140 * 2**30
    assert runner.auto_batch_size(model, 32) == runner.MAX_BATCH_SIZE
