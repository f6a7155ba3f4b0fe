"""Xiao et al. 2023 and Gu et al. 2024 on the bundled model: attention sinks (issue 22, item 1).

Claims checked, on windows of 64 tokens of the shipped English prose (after the BOS), 32 scored and
16 held out:

* Most heads are sinks: more than half of the 270 heads put more than Gu et al.'s epsilon 0.3 of
  their attention on the first token (mean over queries i >= 1), the strongest nearly all of it
  (> 0.9), while the first two layers do not sink (their mean share is below 0.1, the level of
  uniform attention, ~0.06), as Xiao et al. saw in Llama-2 ("apart from the bottom two layers").
* The first token is a sink whatever it is (Xiao et al.): on the same windows without the BOS,
  more than half of the heads still exceed 0.3 on the first text token, and the two scores agree
  head by head (correlation > 0.9).
* Sink heads write little (Gu et al.: the sink acts as a key bias with small values; Guo et al.'s
  dormant heads): the ten strongest sinks have a median output norm below their layer's mean.
* The sink is needed: re-normalising the five strongest sink heads' attention without position 0
  (``hs.remove_sink``) raises the held-out next-token loss more than doing so in five random heads
  (5 draws, 95% CI above 0), by more than 0.1 nats.
* What the paper does not say and we see: the same heads' outputs hardly matter. Mean-ablating
  them raises the loss far less than removing their sink (paired 95% bootstrap CI over windows of
  the difference above 0): forced to read the text, they write something harmful; parked on the
  sink, they write almost nothing.

Seen here: 201 of 270 heads significant, the top five L18H8, L18H7, L18H6, L20H6, L23H2 (0.94 to
0.99); removing their sink +0.42 nats (random 5: +0.04; difference +0.38, CI [+0.31, +0.46]);
mean-ablating them -0.00. At the detector's defaults (64 scored and 32 held-out windows):
difference +0.36, CI [+0.31, +0.42]; ``hs.validate(..., method="mean")`` of the same top 5 is no
worse than of random 5 (-0.02, CI [-0.03, +0.00]).
"""

import pytest
import torch

import headscope as hs
from headscope.stats import paired_bootstrap_ci

pytestmark = pytest.mark.repro

SETTINGS = dict(n_sequences=32, n_validation_sequences=16)


def test_most_heads_sink_on_the_first_token_and_removing_the_sink_of_the_top_heads_hurts_more_than_random(smollm):
    detector = hs.get_detector("attention_sink", **SETTINGS)
    scores = detector.score(smollm, progress=False)
    (significance,) = detector.significance(smollm, scores)
    values, no_bos = scores.values, scores.extras["no_bos"]
    print(f"top {[(str(h[:2]), round(h.score, 3)) for h in scores.top(8)]}, {len(significance.heads)} of "
          f"{values.numel()} significant (uniform {significance.threshold:.3f}, floor 0.3)")
    print(f"per layer {[round(x, 2) for x in values.mean(dim=1).tolist()]}")
    assert len(significance.heads) > values.numel() / 2 and scores.top(1)[0].score > 0.9
    assert float(values[:2].mean()) < 0.1 < float(values[2:].mean())
    agreement = float(torch.corrcoef(torch.stack([values.flatten(), no_bos.flatten()]))[0, 1])
    print(f"without the BOS: {int((no_bos > 0.3).sum())} heads above 0.3, correlation {agreement:.3f}")
    assert int((no_bos > 0.3).sum()) > values.numel() / 2 and agreement > 0.9
    ratios = scores.extras["output_norm_ratio"]
    top = scores.top_heads(10)
    print(f"output norm / layer mean of the top 10: {[round(float(ratios[h.layer, h.head]), 2) for h in top]}")
    assert float(torch.tensor([ratios[h.layer, h.head] for h in top]).median()) < 1.0

    result = hs.validate(smollm, scores, k=5, n_random=5, progress=False)
    print(result)
    assert result.method == "sink" and result.ci_low > 0 and result.top_k - result.clean > 0.1

    task = detector.validation_task(smollm)
    (removed,) = task.measure(smollm, [scores.top_heads(5)], "sink")
    (mean_ablated,) = task.measure(smollm, [scores.top_heads(5)], "mean")
    low, high = paired_bootstrap_ci(removed - mean_ablated)
    print(f"top 5, loss over clean: sink removed {float(removed.mean()) - result.clean:+.3f}, mean-ablated "
          f"{float(mean_ablated.mean()) - result.clean:+.3f}; difference CI [{low:+.3f}, {high:+.3f}]")
    assert low > 0
