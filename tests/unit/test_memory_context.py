"""The memory/context attribution is exact: a last-layer head's attribution equals the change of
the logit difference when its output is removed with everything after it that is not the
direct path held fixed (the last MLP's output and the final norm's scale)."""

import pytest
import torch

import headscope as hs
from headscope.detectors.memory_context import LogitDifference, final_head_attributions
from headscope.tasks.conflicts import ConflictItem
from tests.conftest import tiny_llama_folder
from tests.families import tiny_family_model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return hs.load_model(tiny_llama_folder(tmp_path_factory.mktemp("mc-llama")), device="cpu")


def items():
    prompts = ["w3 w4 w5 w6", "w7 w8 w9", "w10 w11 w12 w13 w14"]
    return [ConflictItem("toy", "restate", f"s{i}", "m", "c", p, memory_token=20 + i, context_token=30 + i)
            for i, p in enumerate(prompts)]


def test_a_last_layer_heads_attribution_equals_removing_it_with_the_norm_scale_fixed(llama):
    conflict = items()
    attributions = final_head_attributions(llama, conflict, [i.prompt for i in conflict])
    metric = LogitDifference(llama, conflict)
    batch = hs.tokenize(llama, [i.prompt for i in conflict])
    layer, head = 1, 2
    frozen = {}

    def keep(name):
        def hook(value, hook):
            frozen.setdefault(name, value.clone())
            return frozen[name]

        return hook

    held = [(name, keep(name)) for name in ("ln_final.hook_scale", f"blocks.{layer}.hook_mlp_out")]
    with torch.no_grad(), llama.hooks(fwd_hooks=held):
        clean = metric(llama(batch.tokens, attention_mask=batch.attention_mask), batch)
        rows = torch.arange(len(conflict))

        def remove_at_last(z, hook):
            z = z.clone()
            z[rows, batch.last_positions, head] = 0
            return z

        with llama.hooks(fwd_hooks=[(f"blocks.{layer}.attn.hook_z", remove_at_last)]):
            removed = metric(llama(batch.tokens, attention_mask=batch.attention_mask), batch)
    torch.testing.assert_close(attributions["attribution"][:, layer, head], clean - removed, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(attributions["logit_diff"], clean, rtol=1e-4, atol=1e-5)


def test_significance_takes_the_student_t_critical_value_at_n_items_minus_one_df():
    """A head at t = 3.0 over 20 items: above the normal Bonferroni value for 8 heads (2.73) but
    below Student t's at 19 df (3.07), so it is not significant."""
    from headscope.stats import bonferroni_t, bonferroni_z

    values = torch.zeros(2, 4)
    values[1, 2], values[0, 1] = 3.0, -4.0
    scores = hs.HeadScores(values, "memory_context", "tiny",
                           extras={"standard_error": torch.ones(2, 4), "unrelated": torch.full((2, 4), 0.5)},
                           metadata={"n_items": 20})
    context, memory = hs.get_detector("memory_context").significance(None, scores)
    critical = bonferroni_t(8, 19)
    assert bonferroni_z(8) < 3.0 < critical < 4.0  # the normal rule would have passed t = 3.0
    assert context.threshold == memory.threshold == pytest.approx(critical)
    assert context.details["df"] == 19 and context.heads == [] and [str(h) for h in memory.heads] == ["L0H1"]
    with pytest.raises(hs.InputError, match="at least 2 scored items"):
        hs.get_detector("memory_context").significance(None, hs.HeadScores(
            values, "memory_context", "tiny", extras={"standard_error": torch.ones(2, 4)}, metadata={"n_items": 1}))


def test_a_memory_or_context_head_needs_an_attribution_beyond_what_unrelated_answers_get():
    """A precise but tiny attribution (t = 40, mean 0.2 logits) is not a context head when some
    head gives an unrelated fact's answer direction 0.3 logits."""
    values = torch.zeros(2, 4)
    values[0, 0], values[1, 1] = 0.2, 2.0
    unrelated = torch.zeros(2, 4)
    unrelated[1, 3] = -0.3
    scores = hs.HeadScores(values, "memory_context", "tiny", metadata={"n_items": 20},
                           extras={"standard_error": torch.full((2, 4), 0.005), "unrelated": unrelated})
    context, memory = hs.get_detector("memory_context").significance(None, scores)
    assert context.floor == memory.floor == pytest.approx(0.3) and "unrelated fact" in context.floor_rule
    assert context.above_null[0, 0] and not context.above_floor[0, 0]
    assert context.heads == [hs.Head(1, 1)] and memory.heads == []


def test_unrelated_answers_share_no_answer_with_the_item():
    from headscope.detectors.memory_context import unrelated_answers
    from headscope.tasks.conflicts import ConflictItem

    fields = {f: "" for f in ConflictItem.__dataclass_fields__}
    items = [ConflictItem(**{**fields, "context_token": c, "memory_token": m}) for c, m in [(1, 2), (2, 3), (4, 5), (1, 6)]]
    for item, other in zip(items, unrelated_answers(items), strict=True):
        assert not {item.context_token, item.memory_token} & {other.context_token, other.memory_token}
    with pytest.raises(hs.InputError, match="two different answer pairs"):
        unrelated_answers(items[:2])


def test_scoring_and_validation_items_are_split_by_subject(monkeypatch):
    """Every item of a subject (all relations, all formats) is on one side; the split is the same
    every time and holds held_out_share of the subjects out of scoring."""
    from headscope.tasks import conflicts

    facts = {r: list(conflicts.RELATIONS[r].facts) for r in ("capital", "language")}
    monkeypatch.setattr(conflicts, "known_facts", lambda model, relation, batch_size=32: facts[relation])
    model = tiny_family_model("LlamaForCausalLM", with_tokenizer=True)
    detector = hs.get_detector("memory_context", formats=("restate", "qa"))
    every, scored, held_out = (detector.items(model, split) for split in ("all", "score", "held_out"))
    assert sorted(scored + held_out, key=every.index) == every
    assert not {i.subject for i in scored} & {i.subject for i in held_out}
    subjects = {i.subject for i in every}
    assert len({i.subject for i in held_out}) == round(len(subjects) * 0.5)
    assert detector.items(model, "held_out") == held_out  # deterministic
    other_seed = hs.get_detector("memory_context", seed=1, formats=("restate", "qa")).items(model, "held_out")
    assert {i.subject for i in held_out} != {i.subject for i in other_seed}
    with pytest.raises(hs.InputError, match="'split' parameter of items"):
        detector.items(model, "test")
    with pytest.raises(hs.InputError, match="held_out_share"):
        hs.get_detector("memory_context", held_out_share=1.0).items(model, "score")
