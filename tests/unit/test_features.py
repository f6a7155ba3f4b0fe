"""The mod-10 probe on a tiny Llama: numeric tokens found, accuracies in range, features unit-normed."""

import torch

from headscope.features import mod10_probe, numeric_tokens


def test_mod10_probe_runs_and_reports_held_out_accuracy_against_chance(tiny_llama):
    tokens = numeric_tokens(tiny_llama)
    assert tokens and len({t.token_id for t in tokens}) == len(tokens)
    result = mod10_probe(tiny_llama, embedding="raw")
    assert result.n_tokens == len(tokens) and 0 <= result.loo_accuracy <= 1 and 0 < result.chance <= 1
    norms = result.features.norm(dim=1)
    assert torch.allclose(norms[norms > 0], torch.ones_like(norms[norms > 0]), atol=1e-5)
