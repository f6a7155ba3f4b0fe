"""Head addressing, token batches and batched runs on tiny native models."""

import pytest
import torch

import headscope as hs
from headscope.engine import (
    Head,
    TokenBatch,
    as_token_batch,
    check_heads,
    hook_name,
    kv_group,
    kv_head,
    model_shape,
    run_batched,
)
from headscope.engine.tokens import pad_rows


def test_head_parses_pairs_strings_and_heads():
    assert Head.parse((3, 1)) == Head(3, 1)
    assert Head.parse("L18H6") == Head(18, 6)
    assert Head.parse(Head(2, 0)) == Head(2, 0)
    layer, head = Head(4, 2)
    assert (layer, head) == (4, 2)
    assert str(Head(18, 6)) == "L18H6"
    with pytest.raises(ValueError, match="L18H6"):
        Head.parse("head six")


def test_head_out_of_range_names_the_valid_range(tiny):
    with pytest.raises(hs.HeadIndexError, match=r"layers 0\.\.1"):
        check_heads(tiny, [(2, 0)])
    with pytest.raises(hs.HeadIndexError, match=r"query heads 0\.\.3"):
        check_heads(tiny, [(0, 4)])
    with pytest.raises(hs.HeadIndexError):
        hs.ablate(tiny, [(0, -1)])


def test_check_heads_accepts_one_head_and_drops_duplicates(tiny):
    assert check_heads(tiny, (1, 2)) == [Head(1, 2)]
    assert check_heads(tiny, ["L0H1", (0, 1), Head(1, 0)]) == [Head(0, 1), Head(1, 0)]


def test_grouped_query_bookkeeping(tiny_gqa):
    shape = model_shape(tiny_gqa)
    assert (shape.n_heads, shape.n_kv_heads, shape.group_size) == (4, 2, 2)
    assert kv_head(tiny_gqa, Head(0, 3)) == 1
    assert kv_group(tiny_gqa, 1, 0) == [Head(1, 0), Head(1, 1)]
    _, cache = tiny_gqa.run_with_cache(torch.randint(0, 64, (1, 5)))
    assert cache[hook_name(0, "z")].shape[2] == 4
    assert cache[hook_name(0, "v")].shape[2] == 2


def test_empty_and_too_long_inputs_fail_clearly(tiny):
    with pytest.raises(hs.InputError, match="empty"):
        as_token_batch(tiny, [])
    with pytest.raises(hs.InputError, match="empty"):
        as_token_batch(tiny, torch.zeros((1, 0), dtype=torch.long))
    with pytest.raises(hs.PromptTooLongError, match="more than the model's context of 64"):
        as_token_batch(tiny, torch.zeros((1, 65), dtype=torch.long))
    with pytest.raises(hs.InputError, match=r"0\.\.63"):
        as_token_batch(tiny, torch.full((1, 3), 64))
    with pytest.raises(hs.InputError, match="no tokenizer"):
        as_token_batch(tiny, ["a prompt"])


def test_padded_batches_give_the_same_numbers_as_unpadded_runs(tiny):
    rows = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    batch = pad_rows(tiny, rows)
    assert batch.tokens.shape == (2, 6) and batch.lengths.tolist() == [6, 3]
    padded = run_batched(tiny, batch, lambda logits, cache, chunk: logits, batch_size=2)
    for index, row in enumerate(rows):
        alone = tiny(torch.tensor([row]))
        torch.testing.assert_close(padded[index, : len(row)], alone[0], rtol=1e-4, atol=1e-4)


def test_run_batched_caches_only_requested_hooks_and_concatenates(tiny):
    tokens = torch.randint(0, 64, (5, 7))
    seen = []

    def reduce(logits, cache, chunk):
        seen.append(sorted(cache))
        return cache[hook_name(1, "pattern")].sum(dim=(1, 2, 3))

    out = run_batched(tiny, tokens, reduce, names=[hook_name(1, "pattern")], batch_size=2)
    assert out.shape == (5,)
    assert seen == [[hook_name(1, "pattern")]] * 3
    torch.testing.assert_close(out, torch.full((5,), 4.0 * 7))  # each pattern row sums to 1


def test_token_batch_select_trims_to_longest_row(tiny):
    batch = pad_rows(tiny, [[1, 2], [3, 4, 5, 6]])
    assert batch.select(slice(0, 1)).tokens.shape == (1, 2)
    assert isinstance(batch.select([1]), TokenBatch)


def test_run_batched_with_last_logits_unembeds_each_rows_last_position_only(tiny_llama):
    batch = pad_rows(tiny_llama, [[1, 5, 6, 7, 8], [1, 9, 10], [1, 11, 12, 13]])

    def at_last(logits, cache, chunk):
        return logits[torch.arange(len(chunk)), chunk.last_positions]

    full = run_batched(tiny_llama, batch, at_last, batch_size=2)
    last = run_batched(tiny_llama, batch, lambda logits, cache, chunk: logits, batch_size=2, logits="last")
    assert last.shape == full.shape and torch.allclose(last, full, atol=1e-5)
    with pytest.raises(ValueError, match="'all', 'last' or 'last_states'"):
        run_batched(tiny_llama, batch, at_last, logits="first")
