"""Time per-head ablation scans side by side on the bundled model, in one run, on the same prompts.

  (a) naive loop: one full forward per head under hs.ablate       (hs.naive_ablation_scan)
  (b) TransformerLens's per-head patching helper (patching.get_act_patch_attn_head_out_all_pos)
  (c) hs.ablation_scan: clean run once, each head's layer onwards only, a layer's heads batched
  (d) hs.attribution_scan: one forward + one backward per chunk
and plain forward vs forward with the score-collecting hooks of the induction detector.
Prints times, ratios, agreement of (a) and (c), rank agreement of (d) with (c), and peak memory.

    python benchmarks/scan_speed.py [--model smollm2-135m-instruct] [--sequences 4] [--block 20] [--device auto]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

import headscope as hs
from headscope.detectors.attention_templates import make_task, pattern_hooks, template_scores, repeat_template
from headscope.engine import model_shape, run_batched


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def timed(label, device, fn):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    print(f"{label:<44} {seconds:9.2f} s   peak memory {peak_memory_mb(device):8.0f} MB", flush=True)
    return result, seconds


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = lambda x: torch.argsort(torch.argsort(x)).float()  # noqa: E731
    return float(torch.corrcoef(torch.stack([ranks(a), ranks(b)]))[0, 1])


def tl_patching(model, tokens, metric_per_example):
    """TransformerLens's helper, patching zeros into each head's output (= zero ablation)."""
    from transformer_lens import patching

    names = [f"blocks.{layer}.attn.hook_z" for layer in range(model_shape(model).n_layers)]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    for name in names:
        cache.cache_dict[name] = torch.zeros_like(cache.cache_dict[name])
    batch = hs.TokenBatch(tokens, torch.ones_like(tokens))
    metric = lambda logits: metric_per_example(logits, batch).mean()  # noqa: E731
    return patching.get_act_patch_attn_head_out_all_pos(model, tokens, cache, metric)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sequences", type=int, default=4)
    parser.add_argument("--block", type=int, default=20)
    parser.add_argument("--skip-naive-mean", action="store_true")
    args = parser.parse_args()

    model = hs.load_model(args.model, device=args.device)
    device = next(model.parameters()).device
    detector = hs.get_detector("induction", n_sequences=args.sequences, block_len=args.block, n_repeats=2,
                               n_validation_sequences=args.sequences)
    task = detector.validation_task(model)
    tokens = task.data.to(device)
    metric = task.metric
    shape = model_shape(model)
    # The induction metric reads the logits that predict the second repeat only.
    positions = range(1 + args.block, tokens.shape[1] - 1)
    print(f"model {hs.models.model_name(model)} on {device}; {tokens.shape[0]} sequences x {tokens.shape[1]} tokens; "
          f"{shape.n_total_heads} heads; metric: {task.metric_name}; torch threads {torch.get_num_threads()}")

    naive, t_naive = timed("(a) naive loop, zero ablation", device,
                           lambda: hs.naive_ablation_scan(model, tokens, metric, method="zero", batch_size=len(tokens)))
    try:
        tl, t_tl = timed("(b) TransformerLens patching helper, zeros", device, lambda: tl_patching(model, tokens, metric))
    except Exception as exc:  # report, do not hide
        tl, t_tl = None, None
        print(f"(b) TransformerLens patching helper failed: {type(exc).__name__}: {exc}")
    fast, t_fast = timed("(c) hs.ablation_scan, zero ablation", device,
                         lambda: hs.ablation_scan(model, tokens, metric, method="zero", batch_size=len(tokens), positions=positions))
    attribution, t_attr = timed("(d) hs.attribution_scan, zero ablation", device,
                                lambda: hs.attribution_scan(model, tokens, metric, method="zero", batch_size=len(tokens)))
    fast_mean, t_fast_mean = timed("(c) hs.ablation_scan, mean ablation", device,
                                   lambda: hs.ablation_scan(model, tokens, metric, method="mean", batch_size=len(tokens), positions=positions))
    attribution_mean, t_attr_mean = timed("(d) hs.attribution_scan, mean ablation", device,
                                          lambda: hs.attribution_scan(model, tokens, metric, method="mean", batch_size=len(tokens)))
    if not args.skip_naive_mean:
        naive_mean, t_naive_mean = timed("(a) naive loop, mean ablation", device,
                                         lambda: hs.naive_ablation_scan(model, tokens, metric, method="mean", batch_size=len(tokens)))

    print("\n== agreement")
    print(f"zero: max |(c) - (a)| = {float((fast.values - naive.values).abs().max()):.3g} "
          f"(largest effect {float(naive.values.abs().max()):.3g})")
    if tl is not None:
        tl_effect = tl.detach().cpu() - float(metric(model(tokens), hs.TokenBatch(tokens, torch.ones_like(tokens))).mean())
        print(f"zero: max |(b) - clean - (a)| = {float((tl_effect - naive.values).abs().max()):.3g}")
    if not args.skip_naive_mean:
        print(f"mean: max |(c) - (a)| = {float((fast_mean.values - naive_mean.values).abs().max()):.3g} "
              f"(largest effect {float(naive_mean.values.abs().max()):.3g})")
    for label, exact, estimate in (("zero", fast, attribution), ("mean", fast_mean, attribution_mean)):
        overlap = len(set(exact.top_heads(10)) & set(estimate.top_heads(10)))
        print(f"attribution vs exact ({label}): Spearman over {shape.n_total_heads} heads "
              f"{spearman(estimate.values.flatten(), exact.values.flatten()):.3f}; top-10 overlap {overlap}/10")
        print("  exact top-10:", ", ".join(f"{h}" for h in exact.top_heads(10)))
        print("  attr  top-10:", ", ".join(f"{h}" for h in estimate.top_heads(10)))

    print("\n== speed (same run)")
    print(f"exact scan vs naive loop (zero):    {t_naive / t_fast:6.2f}x faster")
    if not args.skip_naive_mean:
        print(f"exact scan vs naive loop (mean):    {t_naive_mean / t_fast_mean:6.2f}x faster")
    if t_tl:
        print(f"exact scan vs TransformerLens helper: {t_tl / t_fast:6.2f}x faster")
    print(f"attribution vs exact scan (zero):   {t_fast / t_attr:6.2f}x faster")
    print(f"attribution vs exact scan (mean):   {t_fast_mean / t_attr_mean:6.2f}x faster")

    print("\n== hook overhead: plain forward vs forward with the induction detector's score-collecting hooks")
    score_task = make_task(model, detector.config)
    template, queries = repeat_template(score_task, shift=1)
    data = score_task.tokens.to(device)
    reduce_plain = lambda logits, cache, chunk: logits[:, -1, :1]  # noqa: E731
    reduce_scores = lambda logits, cache, chunk: template_scores(cache, shape.n_layers, template, queries, chunk)  # noqa: E731
    plain, hooked = [], []
    for _ in range(5):
        for target, reduce, names in ((plain, reduce_plain, ()), (hooked, reduce_scores, pattern_hooks(model))):
            start = time.perf_counter()
            run_batched(model, data, reduce, names=names, batch_size=len(data))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            target.append(time.perf_counter() - start)
    ratio = statistics.median(hooked) / statistics.median(plain)
    print(f"plain {statistics.median(plain):.3f} s, with hooks {statistics.median(hooked):.3f} s (median of 5): "
          f"overhead {100 * (ratio - 1):+.1f}%")


if __name__ == "__main__":
    main()
