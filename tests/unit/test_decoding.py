"""KV-cached greedy decoding with top-1 keys, decode-only masks and per-row ablations (tiny Llama)."""

from __future__ import annotations

import pytest
import torch

import headscope as hs
from headscope.engine.decoding import Prefix, continuation_logprobs, greedy_decode, greedy_decode_rows
from headscope.engine.kv_cache import cache_kwarg_alias
from headscope.engine.memory import peak_memory
from headscope.errors import InputError, PromptTooLongError
from tests.conftest import active_hooks

PROMPT = torch.tensor([0, 5, 9, 12, 5, 9, 30, 41, 7, 5, 9, 12, 50, 3])
PATTERNS = [f"blocks.{layer}.attn.hook_pattern" for layer in range(2)]


def naive_decode(model, prompt, steps):
    """Re-run the whole sequence each step; argmax token and each head's argmax key."""
    sequence, tokens, keys = prompt.clone(), [], []
    for _ in range(steps):
        logits, cache = model.run_with_cache(sequence[None], names_filter=PATTERNS)
        token = int(logits[0, -1].argmax())
        tokens.append(token)
        keys.append(torch.stack([cache[name][0, :, -1].argmax(dim=-1) for name in PATTERNS]))
        sequence = torch.cat([sequence, torch.tensor([token])])
    return torch.tensor(tokens), torch.stack(keys)


def test_cached_decode_matches_rerunning_the_whole_prefix(tiny_llama):
    prefix = Prefix(tiny_llama, PROMPT, chunk_size=4)  # three prefill chunks
    trace = greedy_decode(tiny_llama, prefix, max_new_tokens=6)
    tokens, keys = naive_decode(tiny_llama, PROMPT, 6)
    assert trace.tokens.tolist() == tokens.tolist()
    assert torch.equal(trace.top_keys.long(), keys)
    assert trace.top_keys.shape == (6, 2, 4) and trace.top_keys.dtype == torch.int32
    assert prefix.cache.get_seq_length() == PROMPT.numel() - 1  # rewound for the next use
    assert active_hooks(tiny_llama) == 0


def test_decode_stops_at_a_stop_token_without_keeping_it(tiny_llama):
    tokens, _ = naive_decode(tiny_llama, PROMPT, 4)
    prefix = Prefix(tiny_llama, PROMPT)
    trace = greedy_decode(tiny_llama, prefix, max_new_tokens=10, stop_ids=[int(tokens[2])])
    first_stop = tokens.tolist().index(int(tokens[2]))
    assert trace.stopped and trace.tokens.tolist() == tokens[:first_stop].tolist()
    assert trace.top_keys.shape[0] == first_stop


def test_teacher_forced_logprobs_match_a_full_forward(tiny_llama):
    continuation = torch.tensor([8, 9, 10, 11])
    prefix = Prefix(tiny_llama, PROMPT)
    got = continuation_logprobs(tiny_llama, prefix, continuation)[0]
    with torch.no_grad():
        logits = tiny_llama(torch.cat([PROMPT, continuation])[None])[0]
    positions = torch.arange(PROMPT.numel() - 1, PROMPT.numel() + 3)
    expected = torch.log_softmax(logits[positions], dim=-1).gather(1, continuation[:, None])[:, 0]
    assert torch.allclose(got, expected, atol=1e-5)


def test_decode_mask_leaves_the_prefill_clean_and_acts_at_decode_steps(tiny_llama):
    mask = hs.mask_at_decode(tiny_llama, ["L1H0", "L1H1", "L1H2", "L1H3"], method="uniform")
    prefix = Prefix(tiny_llama, PROMPT)
    clean_keys = [layer.keys.clone() for layer in prefix.cache.layers]
    continuation = torch.tensor([8, 9, 10])
    masked = continuation_logprobs(tiny_llama, prefix, continuation, mask)
    # Prefill untouched: the cached keys are the clean ones, also after the masked pass.
    assert all(torch.equal(a, layer.keys) for a, layer in zip(clean_keys, prefix.cache.layers, strict=True))
    # Same numbers as masking every position of the decode-step forward by hand.
    with torch.no_grad(), cache_kwarg_alias(tiny_llama), mask(tiny_llama):
        logits, _ = tiny_llama(torch.cat([PROMPT[-1:], continuation[:-1]])[None], return_type="logits_and_cache",
                               past_key_values=prefix.cache)
    prefix.rewind()
    by_hand = torch.log_softmax(logits[0], dim=-1).gather(1, continuation[:, None])[:, 0]
    assert torch.allclose(masked[0], by_hand, atol=1e-5)
    clean = continuation_logprobs(tiny_llama, prefix, continuation)
    assert (masked - clean).abs().max() > 1e-5  # a random tiny model moves little, but it moves


@pytest.mark.parametrize("method", ["zero", "uniform", "mean"])
def test_per_row_ablation_equals_one_ablated_run_per_head_set(tiny_llama, method):
    head_sets = [None, ["L0H1"], ["L1H0", "L1H3"], ["L0H2", "L1H2"]]
    prefix = Prefix(tiny_llama, PROMPT)
    batched = greedy_decode_rows(tiny_llama, prefix, len(head_sets), 5, (),
                                 lambda m: hs.ablate_per_row(m, head_sets, method))
    batched_lp = continuation_logprobs(tiny_llama, prefix, torch.tensor([4, 6, 8]),
                                       lambda m: hs.ablate_per_row(m, head_sets, method), rows=len(head_sets))
    for row, heads in enumerate(head_sets):
        mask = None if heads is None else hs.mask_at_decode(tiny_llama, heads, method)
        single = greedy_decode(tiny_llama, prefix, 5, (), mask, record_top_keys=False)
        assert batched[row].tokens.tolist() == single.tokens.tolist()
        single_lp = continuation_logprobs(tiny_llama, prefix, torch.tensor([4, 6, 8]), mask)
        assert torch.allclose(batched_lp[row], single_lp[0], atol=1e-5)
    assert prefix.rows == 1 and prefix.cache.get_seq_length() == PROMPT.numel() - 1
    assert active_hooks(tiny_llama) == 0


def test_per_row_ablation_refuses_a_batch_of_the_wrong_size(tiny_llama):
    with pytest.raises(InputError, match="2 head sets but the batch has 1 rows"):
        with hs.ablate_per_row(tiny_llama, [None, ["L0H0"]]):
            tiny_llama(PROMPT[None])
    assert active_hooks(tiny_llama) == 0


def test_bad_decoding_input_gets_clear_errors(tiny_llama):
    with pytest.raises(InputError, match="at least two tokens"):
        Prefix(tiny_llama, torch.tensor([0]))
    with pytest.raises(PromptTooLongError, match="exceeds the model's context of 128"):
        greedy_decode(tiny_llama, Prefix(tiny_llama, PROMPT), max_new_tokens=120)
    with pytest.raises(PromptTooLongError):
        Prefix(tiny_llama, torch.zeros(200, dtype=torch.long))
    with pytest.raises(ValueError, match="Unknown decode-time mask"):
        hs.mask_at_decode(tiny_llama, ["L0H0"], method="resample")
    with pytest.raises(hs.HeadIndexError):
        hs.mask_at_decode(tiny_llama, ["L2H0"])


def test_peak_memory_sees_a_large_temporary():
    _, peak = peak_memory(lambda: torch.ones(50_000_000).sum())  # 200 MB
    if peak is None:
        pytest.skip("no /proc/self/clear_refs on this system")
    assert 150e6 < peak < 600e6
