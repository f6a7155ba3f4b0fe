"""Validation does less work for the same numbers: each ablated run starts at its lowest ablated
layer from the clean run's residual stream, and the clean run also sums the head outputs for mean
ablation. Every number must equal the full runs (``skip_layers=False``) exactly, on every family."""

from __future__ import annotations

import pytest
import torch

import headscope as hs
from headscope import validation
from headscope.engine import runner as runner_module
from headscope.engine.metrics import final_logits
from headscope.engine.tokens import TokenBatch
from headscope.models import model_name
from tests.conftest import tiny_model
from tests.families import FAMILIES, tiny_family_model


def _loss(logits, chunk):
    """Next-token loss per row over its real tokens (reads every position)."""
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logprobs.gather(-1, chunk.tokens[:, 1:, None])[..., 0]
    mask = chunk.attention_mask[:, 1:].float()
    return -(picked * mask).sum(dim=1) / mask.sum(dim=1)


def _last_logit(logits, chunk):
    """Logit of token 3 at each row's last real position."""
    return final_logits(logits, chunk)[:, 3].float()


def _padded_tokens(n_rows=6, width=12, vocab=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, vocab, (n_rows, width), generator=generator)
    mask = torch.ones_like(tokens)
    mask[1, 9:], mask[4, 7:] = 0, 0  # two shorter rows, right-padded
    return TokenBatch(tokens * mask + (1 - mask), mask)


def _scores(model, values):
    return hs.HeadScores(values=values, detector="induction", model=model_name(model))


def _both(model, scores, task, method, **kwargs):
    fast = hs.validate(model, scores, task=task, method=method, batch_size=4, progress=False, **kwargs)
    full = hs.validate(model, scores, task=task, method=method, batch_size=4, progress=False, skip_layers=False,
                       **kwargs)
    return fast, full


CASES = (("zero", _loss, False), ("mean", _last_logit, True), ("uniform", _loss, False))


@pytest.mark.parametrize("family", FAMILIES)
def test_validation_from_the_lowest_ablated_layer_equals_full_runs_on_every_family(family):
    """Each family with one ablation method in turn (all three over the eleven families), metrics
    reading every position or only the last, two right-padded rows."""
    model = tiny_family_model(family)
    values = torch.tensor([[0.0, 0.1, 0.2, 0.3], [0.9, 0.4, 0.8, 0.5]])  # the top head is in layer 1
    method, metric, last = CASES[FAMILIES.index(family) % len(CASES)]
    task = hs.ValidationTask(_padded_tokens(), metric, metric.__name__, last_position=last)
    fast, full = _both(model, _scores(model, values), task, method, k=1, n_random=3)
    assert fast == full, (family, method, metric.__name__)


def test_sharing_starts_the_ablated_runs_mid_model_and_folds_the_means_into_the_clean_run(monkeypatch):
    model = tiny_model(n_layers=4, n_heads=4)
    calls = []
    original = validation.run_batched

    def recording(*args, **kwargs):
        calls.append((kwargs.get("desc", ""), None if kwargs.get("start_at") is None else kwargs["start_at"][0]))
        return original(*args, **kwargs)

    monkeypatch.setattr(validation, "run_batched", recording)
    values = torch.zeros(4, 4)
    values[3] = torch.tensor([0.9, 0.8, 0.1, 0.1])
    task = hs.ValidationTask(_padded_tokens(), _loss, "loss")
    result = hs.validate(model, _scores(model, values), k=2, n_random=3, task=task, method="mean", batch_size=4,
                         progress=False, seed=1)
    clean_runs = [desc for desc, _start in calls if desc.endswith("clean and mean head outputs")]
    assert len(clean_runs) == 1  # means and the clean metric in one pass
    starts = [start for desc, start in calls if "ablated" in desc]
    lowest = [min(hs.Head.parse(h).layer for h in heads) for heads in [result.top_heads, *result.random_heads]]
    assert starts == [None if layer == 0 else layer for layer in lowest]
    assert starts[0] == 3  # the top heads' layer: layers 0-2 not run again


def test_shared_clean_runs_and_a_memory_budget_too_small_give_the_same_numbers(monkeypatch):
    model = tiny_model(n_layers=4, n_heads=4)
    values = torch.rand(4, 4, generator=torch.Generator().manual_seed(3))
    scores = _scores(model, values)
    task = hs.ValidationTask(_padded_tokens(), _last_logit, "last logit", last_position=True)
    reference = hs.validate(model, scores, k=2, n_random=4, task=task, method="mean", batch_size=4, progress=False,
                            skip_layers=False)
    cache: dict = {}
    first = hs.validate(model, scores, k=2, n_random=4, task=task, method="mean", batch_size=4, progress=False,
                        cache=cache)
    again = hs.validate(model, scores, k=2, n_random=4, task=task, method="mean", batch_size=4, progress=False,
                        cache=cache, seed=5)  # clean and means from the cache: residuals from a stopped run
    assert first == reference
    assert again == hs.validate(model, scores, k=2, n_random=4, task=task, method="mean", batch_size=4,
                                progress=False, skip_layers=False, seed=5)
    monkeypatch.setattr(validation, "PREFIX_MEMORY", 1)  # nothing kept: full runs
    assert hs.validate(model, scores, k=2, n_random=4, task=task, method="mean", batch_size=4, progress=False) == reference


def test_chunks_of_different_widths_and_a_halved_chunk_give_the_same_numbers(monkeypatch):
    """A chunk is as wide as its longest row: here the second chunk holds only short rows (and a
    chunk that runs out of memory is run again at half its rows, narrower still)."""
    model = tiny_model(n_layers=3, n_heads=4)
    tokens = torch.randint(2, 64, (6, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(tokens)
    mask[4:, 5:] = 0
    data = TokenBatch(tokens * mask + (1 - mask), mask)
    values = torch.zeros(3, 4)
    values[2, :2] = 1.0
    scores = _scores(model, values)
    for metric, last in ((_loss, False), (_last_logit, True)):
        task = hs.ValidationTask(data, metric, metric.__name__, last_position=last)
        for method in ("zero", "mean"):
            fast, full = _both(model, scores, task, method, k=2, n_random=2)
            assert fast == full, (metric.__name__, method)
    original = runner_module._forward_chunk

    def out_of_memory_above_two_rows(model, chunk, names, start_at, rows):
        if start_at is not None and len(chunk) > 2:
            raise torch.OutOfMemoryError("injected")
        return original(model, chunk, names, start_at, rows)

    monkeypatch.setattr(runner_module, "_forward_chunk", out_of_memory_above_two_rows)
    task = hs.ValidationTask(data, _loss, "loss")
    halved = hs.validate(model, scores, task=task, method="zero", k=2, n_random=2, batch_size=4, progress=False)
    full = hs.validate(model, scores, task=task, method="zero", k=2, n_random=2, batch_size=4, progress=False,
                       skip_layers=False)
    assert halved.top_k == pytest.approx(full.top_k, abs=1e-5) and halved.random_k == pytest.approx(full.random_k, abs=1e-5)
