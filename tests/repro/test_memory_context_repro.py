"""Yu et al. 2023 / Jin et al. 2024 on the bundled model: memory heads and context heads.

Claims checked, on knowledge-conflict prompts ("The capital of France is Lima. The capital of
France is") for facts the model knows (capitals and languages, plain restatement format):
1. Direct logit attribution onto (context answer - memorised answer) singles out memory heads
   (consistently negative) and context heads (consistently positive).
2. Scaling one memory head's values, chosen on dev items, moves held-out items: to 0 (pruning)
   raises the rate of preferring the context answer by at least 30 points over clean, and up
   (x2) lowers it; both far beyond the same scaling of random heads (95% bootstrap CI).
   Context-answer rate here = share of items with logit(context) > logit(memorised), the
   measure of the issue's first check. Measured in the "according to the text" format, whose
   clean rate (0.42 on the held-out half) leaves room both ways; in the plain restatement the
   clean rate is 0.13, so pruning raises it (to 0.71) but x2 cannot lower it measurably, and in
   the Q:/A: format (clean 0.55) pruning adds only 23 points (see the closing note's table).
"""

import pytest

import headscope as hs
from headscope.studies.memory_context import split_items, steer, sweep

pytestmark = pytest.mark.repro


@pytest.fixture(scope="module")
def items(smollm):
    return hs.get_detector("memory_context").items(smollm)


def test_attribution_singles_out_a_consistent_memory_head(smollm, items):
    scores = hs.detect(smollm, "memory_context", progress=False)
    memory = hs.Head.parse(scores.metadata["memory_heads"][0])
    context = hs.Head.parse(scores.metadata["context_heads"][0])
    share = scores.extras["positive_share"]
    print(f"{len(items)} items; clean context-preferred rate {scores.metadata['context_preferred_rate']:.2f}")
    print("memory heads", scores.metadata["memory_heads"], "context heads", scores.metadata["context_heads"])
    print(f"{memory}: attribution {scores[memory]:.3f}, positive on {float(share[memory.layer, memory.head]):.2f} of items")
    print(f"{context}: attribution {scores[context]:.3f}, positive on {float(share[context.layer, context.head]):.2f}")
    typical = float(scores.values.abs().median())
    assert scores[memory] < -10 * typical and float(share[memory.layer, memory.head]) < 0.2
    assert scores[context] > 10 * typical and float(share[context.layer, context.head]) > 0.8


@pytest.mark.parametrize("steer_to, scale", [("context", 0.0), ("memory", 2.0)])
def test_scaling_one_memory_head_moves_held_out_items_far_beyond_random_heads(smollm, steer_to, scale):
    items = hs.get_detector("memory_context", formats=("according",)).items(smollm)
    dev, test = split_items(items, seed=0)
    result = steer(smollm, dev, test, steer_to=steer_to, k=1, scale=scale, n_random=5)
    print(f"steer to {steer_to}: heads {result.heads} x{result.scale} on {result.n_items} held-out items: "
          f"context-preferred clean {result.clean_rate:.2f} -> steered {result.steered_rate:.2f}, random heads "
          f"{result.random_rate:.2f}; difference {result.difference:+.2f} CI [{result.ci_low:+.2f}, {result.ci_high:+.2f}]")
    if steer_to == "context":
        assert result.steered_rate - result.clean_rate >= 0.30
        assert result.ci_low > 0
    else:
        assert result.steered_rate < result.clean_rate
        assert result.ci_high < 0


def test_value_scaling_sweep_of_the_memory_head(smollm, items):
    scores = hs.detect(smollm, "memory_context", progress=False)
    memory = hs.Head.parse(scores.metadata["memory_heads"][0])
    result = sweep(smollm, items, [memory], [-2.0, 0.0, 1.0, 2.0])
    print(result)
    clean = result.prefers_context[result.scales.index(1.0)]
    assert result.prefers_context[result.scales.index(0.0)] > clean > result.prefers_context[result.scales.index(2.0)]


def test_memory_heads_transfer_across_relations_and_formats(smollm):
    """Yu et al. and Jin et al. report that the heads found on one relation or prompt format act
    on others. Checked: every source (relation x format) finds the same top memory head, and
    pruning it (values x 0) raises the context-preferred rate on every target more than pruning
    random heads does."""
    from headscope.studies.memory_context import transfer_table
    from headscope.tasks.conflicts import conflict_items, known_facts

    facts = {relation: known_facts(smollm, relation) for relation in ("capital", "language")}
    def items(relation, fmt):
        return conflict_items(smollm, (relation,), (fmt,), facts=facts)

    sources = {f"{r}/{f}": items(r, f) for r, f in [("capital", "restate"), ("language", "restate"), ("capital", "qa")]}
    targets = {f"{r}/{f}": items(r, f) for r in ("capital", "language") for f in ("restate", "qa", "according")}
    rows = transfer_table(smollm, sources, targets)
    print(f"\n{'source':<18}{'target':<20}{'head':<8}{'clean':>7}{'pruned':>8}{'change':>8}{'random':>8}")
    for row in rows:
        print(f"{row['source']:<18}{row['target']:<20}{row['heads'][0]:<8}{row['clean']:7.2f}{row['steered']:8.2f}"
              f"{row['change']:+8.2f}{row['random_change']:+8.2f}")
    assert len({tuple(row["heads"]) for row in rows}) == 1
    assert all(row["change"] > row["random_change"] for row in rows)


def test_ablating_the_top_context_heads_lowers_the_context_preference_beyond_random_heads(smollm):
    """hs.validate on the memory_context detector: mean-ablating the 3 most positive heads lowers
    logit(context) - logit(memorised) more than 3 random heads (CI of the difference below 0)."""
    scores = hs.detect(smollm, "memory_context", progress=False)
    result = hs.validate(smollm, scores, k=3, method="mean")
    print(result)
    assert result.ablation_hurts_when == "decreases" and result.significant and result.ci_high < 0
