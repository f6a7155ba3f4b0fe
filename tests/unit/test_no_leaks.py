"""No hook survives any public call, including calls that fail half-way."""

import pytest
import torch

import headscope as hs
from headscope.detectors import attention_templates
from tests.conftest import active_hooks

SMALL = dict(n_sequences=4, block_len=6, n_repeats=3, n_validation_sequences=4)


def test_detect_scan_and_validate_leave_no_hooks(tiny):
    before = tiny(torch.arange(10)[None])
    scores = hs.detect(tiny, "induction", **SMALL)
    assert active_hooks(tiny) == 0
    hs.scan(tiny, [hs.get_detector("duplicate_token", **SMALL)])
    assert active_hooks(tiny) == 0
    for method in ("zero", "mean", "resample", "uniform"):
        hs.validate(tiny, scores, k=1, n_random=2, method=method)
        assert active_hooks(tiny) == 0
    assert torch.equal(tiny(torch.arange(10)[None]), before)


def test_a_detector_that_fails_mid_run_leaves_no_hooks(tiny, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C inside a cached run

    monkeypatch.setattr(attention_templates, "template_scores", broken)
    with pytest.raises(KeyboardInterrupt):
        hs.detect(tiny, "previous_token", **SMALL)
    assert active_hooks(tiny) == 0


def test_validation_that_fails_under_ablation_leaves_no_hooks(tiny):
    scores = hs.detect(tiny, "induction", **SMALL)

    def failing_metric(logits, chunk):
        raise RuntimeError("metric failed")

    with pytest.raises(RuntimeError, match="metric failed"):
        hs.validate(tiny, scores, k=1, n_random=2, metric=failing_metric)
    assert active_hooks(tiny) == 0
