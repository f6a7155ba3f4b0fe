"""The mod-10 probe on a tiny Llama: numeric tokens found, accuracies in range, features unit-normed."""

import torch

from headscope.studies.successor import mod10_probe, numeric_tokens


def test_mod10_probe_runs_and_reports_held_out_accuracy_against_chance(tiny_llama):
    tokens = numeric_tokens(tiny_llama)
    assert tokens and len({t.token_id for t in tokens}) == len(tokens)
    result = mod10_probe(tiny_llama, embedding="raw")
    assert result.n_tokens == len(tokens) and 0 <= result.loo_accuracy <= 1 and 0 < result.chance <= 1
    norms = result.features.norm(dim=1)
    assert torch.allclose(norms[norms > 0], torch.ones_like(norms[norms > 0]), atol=1e-5)


def test_swap_feature_and_edit_do_the_same_arithmetic(tiny_llama):
    import headscope as hs
    from tests.conftest import active_hooks

    vector, remove, add = torch.randn(64), torch.randn(64), torch.randn(64)
    assert torch.allclose(hs.swap_feature(vector, remove, add), vector - remove + add)
    tokens = torch.tensor([[0, 5, 6, 7]])
    with torch.no_grad(), hs.edit(tiny_llama, remove, add, layer=1, positions=[2]):
        edited = tiny_llama(tokens)
    with torch.no_grad(), hs.add_vector(tiny_llama, add - remove, layer=1, positions=[2]):
        added = tiny_llama(tokens)
    assert torch.allclose(edited, added) and active_hooks(tiny_llama) == 0


def test_mod10_edits_report_rates_and_a_paired_interval(tiny_llama):
    from headscope.studies.successor import mod10_edits

    result = mod10_edits(tiny_llama, "L1H0", embedding="raw")
    assert result.head == "L1H0" and result.n_edits >= 0


def test_the_edit_interval_resamples_tokens_not_edits():
    """Nine edits of one token share its embedding: the interval resamples tokens."""
    from headscope.studies.successor import _paired_bootstrap_ci
    from headscope.stats import cluster_bootstrap_ci

    outcomes = [(token % 2 == 0, False, token) for token in range(6) for _ in range(9)]  # all or nothing per token
    differences = torch.tensor([float(a) - float(b) for a, b, _ in outcomes])
    tokens = torch.tensor([token for *_, token in outcomes])
    clustered = _paired_bootstrap_ci(outcomes, seed=0)
    assert clustered == cluster_bootstrap_ci(differences, tokens, seed=0)
    naive = cluster_bootstrap_ci(differences, torch.arange(len(outcomes)), seed=0)
    assert clustered[1] - clustered[0] > 2 * (naive[1] - naive[0])
