"""Knowledge-conflict prompts: formats and item construction."""

import pytest

from headscope.tasks.conflicts import FORMATS, RELATIONS, conflict_prompt


def test_every_format_states_the_counterfactual_then_asks():
    qa = conflict_prompt("capital", "qa", "France", "Lima")
    assert qa == "The capital of France is Lima.\nQ: What is the capital of France?\nA:"
    assert conflict_prompt("capital", "restate", "France", "Lima") == "The capital of France is Lima. The capital of France is"
    according = conflict_prompt("capital", "according", "France", "Lima")
    assert according == "According to the text, the capital of France is Lima. According to the text, the capital of France is"
    assert conflict_prompt("continent", "according", "France", "Asia").startswith("According to the text, France is")
    with pytest.raises(ValueError, match="qa, restate, according"):
        conflict_prompt("capital", "poem", "France", "Lima")


def test_relations_have_facts_and_formats_are_listed():
    assert set(FORMATS) == {"qa", "restate", "according"}
    for relation in RELATIONS.values():
        assert len(relation.facts) >= 20 and "{s}" in relation.cloze and "{s}" in relation.question
