"""Successor detector on a tiny Llama: effective OV scores, contextual scores, prompts and validation task."""

from __future__ import annotations

import pytest
import torch

import headscope as hs
from headscope.detectors.successor import SuccessorDetector, effective_embeddings, succession_prompts
from headscope.errors import InputError
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
    with pytest.raises(InputError, match="Unknown effective embedding"):
        hs.detect(tiny_llama, "successor", embedding="unembedding")


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
