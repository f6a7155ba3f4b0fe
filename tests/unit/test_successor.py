"""Successor detector on a tiny Llama: effective OV scores, contextual scores, prompts and validation task."""

from __future__ import annotations

import pytest
import torch

import headscope as hs
from headscope.detectors.successor import SuccessorDetector, effective_embeddings, succession_prompts
from headscope.tasks.succession import SuccessionTask


def test_prompts_show_the_items_before_each_pair_and_wrap_only_where_the_task_wraps():
    days = SuccessionTask("days", "space", [" Mon", " Tue", " Wed", " Thu"], {0: 1, 1: 2, 2: 3, 3: 4},
                          [(0, 1), (1, 2), (2, 3), (3, 0)], wraps=True)
    prompts = succession_prompts(days, context_items=2)
    assert [p.text for p in prompts] == [" Thu, Mon,", " Mon, Tue,", " Tue, Wed,", " Wed, Thu,"]
    assert [p.target_index for p in prompts] == [1, 2, 3, 0]
    letters = SuccessionTask("letters", "space", [" A", " B", " C"], {0: 1, 1: 2, 2: 3}, [(0, 1), (1, 2)])
    assert [p.text for p in succession_prompts(letters, context_items=2)] == [" A, B,"]


def test_effective_embedding_conventions(tiny_llama):
    ids = [3, 4, 5]
    raw = effective_embeddings(tiny_llama, ids, "raw")
    mlp = effective_embeddings(tiny_llama, ids, "mlp0")
    both = effective_embeddings(tiny_llama, ids, "mlp0_residual")
    assert torch.allclose(raw, tiny_llama.W_E[ids].float())
    assert torch.allclose(both, raw + mlp, atol=1e-6)


def test_successor_detector_scores_every_head_with_per_task_extras(tiny_llama):
    scores = hs.detect(tiny_llama, "successor", tasks=("letters",), forms=("bare",), progress=False)
    assert scores.values.shape == (2, 4)
    assert {"contextual", "ov:letters:bare", "context:letters:bare"} <= set(scores.extras)
    assert ((scores.values >= 0) & (scores.values <= 1)).all()
    assert scores.metadata["tasks"]["letters:bare"]["pairs"] >= 1
    with pytest.raises(hs.SettingError, match="'embedding' setting of the successor detector must be one of"):
        hs.detect(tiny_llama, "successor", embedding="unembedding")  # refused by the setting's choices, before work


def test_validation_task_uses_held_out_prompts_and_zero_ablation(tiny_llama):
    detector = SuccessorDetector(tasks=("letters", "days"), forms=("bare",))
    dev, test = detector.prompts(tiny_llama, "dev"), detector.prompts(tiny_llama, "test")
    assert not {p.text for p in dev} & {p.text for p in test}
    task = detector.validation_task(tiny_llama)
    assert task.default_method == "zero" and len(task.data) == len(test)
    with torch.no_grad():
        logits = tiny_llama(task.data.tokens, attention_mask=task.data.attention_mask)
    accuracy = task.metric(logits, task.data)
    assert accuracy.shape == (len(test),) and set(accuracy.tolist()) <= {0.0, 1.0}


# --- the mod-10 edit interval: edits of one token are one cluster ---------------------------------

def clustered_edits(reps: int, tokens: int = 40, edits: int = 9, token_sd: float = 0.4, noise_sd: float = 0.2,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``reps`` data sets of success-minus-control per edit, ``edits`` edits per token sharing the
    token's own effect (within-token correlation ``token_sd^2 / (token_sd^2 + noise_sd^2)`` = 0.8),
    true mean 0.3; and the token of each edit."""
    generator = torch.Generator().manual_seed(seed)
    token_effect = token_sd * torch.randn(reps, tokens, 1, generator=generator)
    values = 0.3 + token_effect + noise_sd * torch.randn(reps, tokens, edits, generator=generator)
    return values.reshape(reps, -1), torch.arange(tokens).repeat_interleave(edits)


def test_the_clustered_interval_is_wider_than_the_naive_one_and_covers(one_thread):
    from headscope.stats import cluster_bootstrap_ci

    values, token = clustered_edits(200)
    naive_hits = clustered_hits = 0
    for rep, row in enumerate(values):
        naive = cluster_bootstrap_ci(row, torch.arange(len(row)), n_bootstrap=500, seed=rep)  # every edit independent
        clustered = cluster_bootstrap_ci(row, token, n_bootstrap=500, seed=rep)
        assert clustered[1] - clustered[0] > 2 * (naive[1] - naive[0])  # design effect 1 + 8 * 0.8 = 7.4: ~2.7x wider
        naive_hits += naive[0] <= 0.3 <= naive[1]
        clustered_hits += clustered[0] <= 0.3 <= clustered[1]
    assert naive_hits / len(values) < 0.6 and clustered_hits / len(values) >= 0.9


def test_the_clustered_interval_matches_the_plain_bootstrap_without_clusters():
    from headscope.stats import cluster_bootstrap_ci

    values = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    generator = torch.Generator().manual_seed(1)  # the helper's generator: seed + 1
    means = values[torch.randint(8, (2000, 8), generator=generator)].mean(dim=1).double()
    expected = (float(torch.quantile(means, 0.025)), float(torch.quantile(means, 0.975)))
    assert cluster_bootstrap_ci(values, torch.arange(8) * 3) == (pytest.approx(expected[0]), pytest.approx(expected[1]))
    # one cluster of unequal size per token: resampled as a whole
    low, high = cluster_bootstrap_ci(torch.tensor([1.0, 1.0, 1.0, 0.0]), torch.tensor([7, 7, 7, 2]))
    assert low == pytest.approx(0.0) and high == pytest.approx(1.0)
    assert all(map(lambda x: x != x, cluster_bootstrap_ci(torch.tensor([]), torch.tensor([], dtype=torch.long))))


def test_a_successor_head_must_beat_the_permutation_null_and_the_accuracy_floor(tiny_llama):
    """Above random successor maps is not enough: the head must also map more than 0.4 of the
    tokens to their successor (circuits-over-time's fixed threshold)."""
    detector = SuccessorDetector(tasks=("letters",), forms=("bare",))
    scores = detector.score(tiny_llama, progress=False)
    scores.values = torch.zeros_like(scores.values)
    scores.values[0, 0], scores.values[1, 1] = 0.9, 0.35  # beats any null of a tiny task; only one passes the floor
    (sig,) = detector.significance(tiny_llama, scores)
    assert sig.floor == 0.4 and "circuits-over-time" in sig.floor_rule
    assert sig.above_floor[0, 0] and not sig.above_floor[1, 1]
    assert sig.heads == [hs.Head(0, 0)]
