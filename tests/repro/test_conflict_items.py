"""Conflict items on the bundled model are what they claim to be."""

import pytest
import torch

import headscope as hs
from headscope.tasks.conflicts import RELATIONS, conflict_items, known_facts

pytestmark = pytest.mark.repro


def test_kept_facts_are_answered_from_memory_and_contexts_contradict_them(smollm):
    facts = {relation: known_facts(smollm, relation) for relation in ("capital", "language")}
    print({r: f"{len(v)}/{len(RELATIONS[r].facts)} known" for r, v in facts.items()})
    assert len(facts["capital"]) >= 20  # measured: 39 of 45
    items = conflict_items(smollm, relations=("capital", "language"), formats=("restate", "qa"), facts=facts)
    assert all(item.context_token != item.memory_token for item in items)
    plain = hs.tokenize(smollm, [RELATIONS[i.relation].cloze.format(s=i.subject) for i in items])
    with torch.no_grad():
        logits = smollm(plain.tokens, attention_mask=plain.attention_mask)
    top = logits[torch.arange(len(items)), plain.last_positions].argmax(dim=-1)
    assert top.tolist() == [item.memory_token for item in items]
