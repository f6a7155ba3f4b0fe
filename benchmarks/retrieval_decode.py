"""Retrieval-head decoding on the bundled model: speed against a naive loop, memory against length.

  speed   per needle sample, the same greedy answer and top-1 keys two ways, side by side:
          (a) naive: every step re-runs the whole prefix with the attention patterns cached
              (the first try of issue 5), argmax of each head's last row;
          (b) headscope: chunked prefill into a KV cache, one cached step per token, only the
              argmax kept (headscope.detectors.retrieval.answer_needle).
          Checks that both give the same tokens and keys, prints the ratio.
  memory  peak memory added by (b) at 500, 1,000, 2,000 (and --lengths) tokens of context, next
          to what keeping the full attention patterns of one forward would take
          (layers x heads x context^2 floats).

    python benchmarks/retrieval_decode.py [--lengths 500 1000 2000] [--speed-lengths 300 800] [--device auto]
"""

from __future__ import annotations

import argparse
import time

import torch

import headscope as hs
from headscope.detectors.retrieval import answer_needle, copy_scores, stop_token_ids
from headscope.engine import model_device, model_shape
from headscope.engine.decoding import DecodeTrace
from headscope.engine.memory import peak_memory
from headscope.tasks.haystack import make_haystack, shipped_needles


def naive_answer(model, sample, max_new_tokens: int, stops: list[int]) -> DecodeTrace:
    """Re-run the whole sequence every step, caching every layer's pattern."""
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(model_shape(model).n_layers)]
    sequence = sample.tokens.to(model_device(model))
    tokens, keys = [], []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits, cache = model.run_with_cache(sequence[None], names_filter=names)
            token = int(logits[0, -1].argmax())
            if token in stops:
                break
            tokens.append(token)
            keys.append(torch.stack([cache[name][0, :, -1].argmax(dim=-1) for name in names]).cpu())
            sequence = torch.cat([sequence, sequence.new_tensor([token])])
    return DecodeTrace(sample.n_tokens, torch.tensor(tokens), torch.zeros(len(tokens)),
                       torch.stack(keys).to(torch.int32), True)


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def compare_speed(model, lengths, max_new_tokens):
    device, stops, needle = model_device(model), stop_token_ids(model), shipped_needles()[0]
    print(f"speed: greedy answer (at most {max_new_tokens} tokens) with top-1 keys, needle at depth 50%")
    for length in lengths:
        sample = make_haystack(model, needle, length, 50, "chat")
        fast, fast_s = timed(lambda sample=sample: answer_needle(model, sample, max_new_tokens), device)
        slow, slow_s = timed(lambda sample=sample: naive_answer(model, sample, max_new_tokens, stops), device)
        same_tokens = model.tokenizer.decode(slow.tokens.tolist(), skip_special_tokens=True) == fast.response
        score_gap = float((copy_scores(slow, sample) - fast.copy_scores).abs().max())
        print(f"  {sample.n_tokens:5d} tokens, {len(slow.tokens)} new: naive {slow_s:6.1f} s   headscope {fast_s:5.1f} s"
              f"   ratio {slow_s / fast_s:5.1f}x   same answer {same_tokens}, max copy-score gap {score_gap:.3g}")


def compare_memory(model, lengths, max_new_tokens):
    device = model_device(model)
    shape = model_shape(model)
    element = torch.finfo(next(model.parameters()).dtype).bits // 8
    print("memory: peak added by one retrieval sample (prefill chunks of 512, KV cache, top-1 keys)")
    answer_needle(model, make_haystack(model, shipped_needles()[1], 300, 50, "chat"), 4)  # warm-up: first-call allocations
    for length in lengths:
        sample = make_haystack(model, shipped_needles()[1], length, 50, "chat")
        outcome, peak = peak_memory(lambda sample=sample: answer_needle(model, sample, max_new_tokens), device)
        patterns = shape.n_layers * shape.n_heads * sample.n_tokens**2 * element
        peak_text = "n/a" if peak is None else f"{peak / 2**20:7.0f} MiB"
        print(f"  {sample.n_tokens:5d} tokens: peak added {peak_text}   "
              f"(full patterns of one forward would be {patterns / 2**20:7.0f} MiB)   answer {outcome.response[:40]!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=hs.DEFAULT_MODEL)
    parser.add_argument("--device", default=None)
    parser.add_argument("--lengths", type=int, nargs="+", default=[500, 1000, 2000])
    parser.add_argument("--speed-lengths", type=int, nargs="+", default=[300, 800])
    parser.add_argument("--max-new-tokens", type=int, default=30)
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    model = hs.load_model(args.model, device=args.device)
    print(f"model {hs.models.model_name(model)} on {model_device(model)}, torch threads {torch.get_num_threads()}")
    compare_memory(model, args.lengths, args.max_new_tokens)
    if not args.skip_speed:
        compare_speed(model, args.speed_lengths, args.max_new_tokens)


if __name__ == "__main__":
    main()
