"""Li et al. 2023 ("Inference-Time Intervention") on the bundled model: truthfulness heads.

Claims checked on the shipped true/false statement pairs (229, split by pair: 115 fit the
probes, 57 score them, 57 are held out), SmolLM2-135M-Instruct (Q4_1 weights dequantised):

1. Some heads' last-token outputs tell true from false statements linearly on pairs their
   probes never saw: the best probes reach 0.70 statement accuracy and 0.81 pair accuracy on the
   57 probe-validation pairs; 6 heads pass both the exact binomial test of pair accuracy against
   0.5 (Bonferroni over 270 heads: above 0.737) and the shuffled-label control (above 0.605, the
   best accuracy any head's probe reaches after fitting on labels flipped at random per pair).
   They sit in the middle layers (12-17 of 30), as the paper's best heads sit in LLaMA-7B's
   early-to-middle layers (its Fig. 2). The
   mass-mean direction alone separates less well here (at most 0.68).
2. Shifting the top-5 heads' outputs by alpha = 10 standard deviations along their mass-mean
   (true minus false) directions, at every position, raises the model's preference for the true
   statement (log P(true) - log P(false)) on the 57 held-out pairs more than shifting random
   5-sets of heads along their own directions: difference +0.27 nats, 95% CI [+0.02, +0.51].
   What reproduces is modest: the top heads' shift raises the preference over the clean model by
   only 0.14 nats (clean 3.22; the model already prefers the true statement in most pairs), and
   half of the difference is random heads' shifts lowering it (-0.13). alpha was chosen on the
   probe-validation pairs, never the held-out ones (top-5 gain 0.14, 0.16, 0.16, 0.15, 0.09 nats
   at alpha 7.5, 10, 12.5, 15, 20: the smallest alpha within 0.01 of the best).
"""

import pytest

import headscope as hs

pytestmark = pytest.mark.repro


@pytest.fixture(scope="module")
def scores(smollm):
    return hs.detect(smollm, "truthfulness", progress=False)


def test_some_middle_layer_heads_tell_true_from_false_on_unseen_pairs_beyond_chance_and_control(smollm, scores):
    (significance,) = hs.get_detector("truthfulness").significance(smollm, scores)
    pair = scores.extras["pair_accuracy"]
    print(f"best statement accuracy {float(scores.values.max()):.3f}, best pair accuracy {float(pair.max()):.3f}, "
          f"best mass-mean accuracy {float(scores.extras['mass_mean_accuracy'].max()):.3f}; binomial threshold "
          f"{significance.threshold:.3f}, shuffled-label floor {significance.floor:.3f}; significant "
          f"{[str(h) for h in significance.heads]}")
    assert significance.threshold > 0.7 and 0.5 < significance.floor < significance.threshold  # probes of noise fit a little
    assert len(significance.heads) >= 3
    assert all(10 <= head.layer < 20 for head in significance.heads)  # the middle third of 30 layers
    assert float(scores.values.max()) > significance.floor + 0.05


def test_shifting_the_top_heads_raises_the_preference_for_true_statements_more_than_random_heads(smollm, scores):
    result = hs.validate(smollm, scores, k=5, n_random=5)
    print(result)
    assert result.significant and result.ci_low > 0
    assert result.top_k > result.clean > result.random_k  # top heads raise it, random heads' shifts lower it
