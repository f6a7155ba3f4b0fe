"""Function-vector detector on tiny models: ICL prompts, the exact last-position patch scan against
a naive loop, a hand-computed average indirect effect, significance, validation and bad input."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import headscope as hs
from headscope.detectors.function_vector import AnswerProbability, FunctionVectorDetector, _row_seed
from headscope.engine.architecture import head_hook
from headscope.engine.heads import model_shape
from headscope.scans import final_position_patch_scan, final_position_patch_sets
from headscope.tasks.icl import ICLTask, build_prompts, icl_task, load_pairs, shuffled, split_pairs
from tests.conftest import active_hooks
from tests.families import tiny_family_model

SMALL = dict(tasks=("letter_upper",), only_correct=False, n_prompts=3, n_mean_prompts=3, n_validation_prompts=2)


@pytest.fixture(scope="module")
def model():
    return tiny_family_model("LlamaForCausalLM", with_tokenizer=True)


def test_prompts_show_n_shots_demonstrations_from_other_pairs_and_shuffling_moves_every_label():
    pairs = load_pairs("antonym")
    task = ICLTask("antonym", pairs, {y: i for i, (_, y) in enumerate(pairs)})
    prompts = build_prompts(task, pairs[:10], n_prompts=12, n_shots=4, seed=3)
    assert len(prompts) == 12 and all(len(p.demos) == 4 for p in prompts)
    assert all(p.query not in [x for x, _ in p.demos] for p in prompts)
    assert prompts[0].text.count("\n") == 4 and prompts[0].text.endswith(f"\n{prompts[0].query}:")
    assert prompts == build_prompts(task, pairs[:10], n_prompts=12, n_shots=4, seed=3)  # seeded
    for index, prompt in enumerate(prompts):
        mixed = shuffled(prompt, index)
        assert [x for x, _ in mixed.demos] == [x for x, _ in prompt.demos] and mixed.query == prompt.query
        assert Counter(y for _, y in mixed.demos) == Counter(y for _, y in prompt.demos)  # the same labels
        assert all(a != b for (_, a), (_, b) in zip(mixed.demos, prompt.demos))  # each one moved (distinct labels)
        assert mixed.shuffled and mixed.answer == prompt.answer


def test_pairs_split_by_query_word_into_disjoint_halves():
    pairs = load_pairs("present_past")
    scored, held_out = split_pairs(pairs, 0.5, seed=1)
    assert len(held_out) == 30 and sorted(scored + held_out) == sorted(pairs)
    assert not {x for x, _ in scored} & {x for x, _ in held_out}
    assert split_pairs(pairs, 0.5, seed=2) != (scored, held_out)


def test_the_means_and_the_scored_prompts_share_no_word(model):
    """The task means are taken over prompts whose queries and demonstrations are none of the
    scored prompts': otherwise a mean could carry a scored query's own answer."""
    detector = FunctionVectorDetector(**{**SMALL, "n_prompts": 8, "n_mean_prompts": 8})
    words = [{word for p in detector.prompts(model, split) for word in (p.query, *(x for x, _ in p.demos))}
             for split in ("mean", "score")]
    assert words[0] and words[1] and not words[0] & words[1]


def test_only_single_token_answers_are_kept(model):
    letters = icl_task(model, "letter_upper")  # " A" is one token of the byte tokenizer
    assert len(letters.pairs) == 26 and not letters.dropped
    capitals = icl_task(model, "country_capital")  # " Paris" is six
    assert not capitals.pairs and len(capitals.dropped) == 60


def naive_patched(model, tokens, layer, head, value, answer):
    """P(answer) at the last position of one full forward with the head's hook_z set to ``value`` there."""
    name, view = head_hook(model, layer, "z")

    def hook(activation, hook):
        out = activation.clone()
        view(out)[:, -1, head] = value
        return out

    with torch.no_grad(), model.hooks(fwd_hooks=[(name, hook)]):
        return float(model(tokens)[0, -1].softmax(-1)[answer])


@pytest.mark.parametrize("family", ["LlamaForCausalLM", "GPT2LMHeadModel", "Gemma3ForCausalLM"])
def test_last_position_patch_scan_equals_a_full_forward_per_head(family):
    model = tiny_family_model(family)
    tokens = torch.tensor([[3, 5, 7, 9, 11, 13, 2, 4], [6, 1, 2, 9, 9, 40, 41, 5]])
    shape = model_shape(model)
    torch.manual_seed(0)
    replacements = torch.randn(2, shape.n_layers, shape.n_heads, shape.d_head)
    metric = AnswerProbability([7, 9])
    scan = final_position_patch_scan(model, tokens, replacements, metric, rows_per_step=3, progress=False)
    sets = final_position_patch_sets(model, tokens, replacements, metric, [None, ["L0H1", "L1H2"], ["L1H0"]])
    for n, answer in enumerate([7, 9]):
        row = tokens[n: n + 1]
        with torch.no_grad():
            assert scan.clean[n] == pytest.approx(float(model(row)[0, -1].softmax(-1)[answer]), abs=1e-6)
        for layer in range(shape.n_layers):
            for head in range(shape.n_heads):
                naive = naive_patched(model, row, layer, head, replacements[n, layer, head], answer)
                assert scan.patched[layer, head, n] == pytest.approx(naive, abs=1e-6), (family, layer, head)
        assert sets[0, n] == pytest.approx(float(scan.clean[n]), abs=1e-6)
        assert sets[2, n] == pytest.approx(float(scan.patched[1, 0, n]), abs=1e-6)
    assert bool((sets[1] != sets[0]).all()) and active_hooks(model) == 0


def test_the_aie_equals_a_hand_computed_patching_loop(model):
    detector = FunctionVectorDetector(**SMALL)
    scores = detector.score(model, progress=False)
    # the task mean: hook_z at the last position of each clean mean prompt, averaged by hand
    means = []
    for prompt in detector.prompts(model, "mean"):
        _, cache = model.run_with_cache(hs.tokenize(model, prompt.text).tokens)
        means.append(torch.stack([cache[f"blocks.{layer}.attn.hook_z"][0, -1] for layer in range(2)]))
    mean = torch.stack(means).mean(dim=0)  # [n_layers, n_heads, d_head]
    rows = [shuffled(p, _row_seed(0, i)) for i, p in enumerate(detector.prompts(model, "score"))]
    for layer, head in [(0, 0), (1, 3)]:
        effects = []
        for prompt in rows:
            tokens = hs.tokenize(model, prompt.text).tokens
            with torch.no_grad():
                clean = float(model(tokens)[0, -1].softmax(-1)[prompt.answer_id])
            effects.append(naive_patched(model, tokens, layer, head, mean[layer, head], prompt.answer_id) - clean)
        assert float(scores.values[layer, head]) == pytest.approx(sum(effects) / len(effects), abs=1e-6)
        spread = torch.tensor(effects).std() / len(effects) ** 0.5
        assert float(scores.extras["standard_error"][layer, head]) == pytest.approx(float(spread), abs=1e-6)
    assert scores.metadata["n_prompts"] == 3 and scores.metadata["n_control_prompts"] == 1
    assert active_hooks(model) == 0


def test_significance_and_validation_run_on_held_out_prompts(model):
    detector = FunctionVectorDetector(**SMALL)
    scores = detector.score(model, progress=False)
    (role,) = detector.significance(model, scores)
    assert role.threshold > 3 and role.floor == pytest.approx(float(scores.extras["control"].max()))
    task = detector.validation_task(model)
    assert task.ablation_hurts_when == "increases" and all(p.shuffled for p in task.data)
    values = task.measure(model, [None, ["L1H0"], ["L0H1", "L1H2"]], "task_mean")
    assert values.shape == (3, len(task.data)) and bool(((values >= 0) & (values <= 1)).all())
    result = hs.validate(model, scores, k=2, n_random=2, progress=False)
    assert result.n_examples == len(task.data) and active_hooks(model) == 0
    with pytest.raises(hs.InputError, match="method 'task_mean'"):
        hs.validate(model, scores, k=2, n_random=2, method="zero", progress=False)


def test_bad_input_gives_one_clear_error(model):
    with pytest.raises(hs.SettingError, match="n_shots"):
        hs.get_detector("function_vector", n_shots=1)
    with pytest.raises(hs.SettingError, match="tasks"):
        hs.get_detector("function_vector", tasks=("synonyms",))
    with pytest.raises(hs.InputError, match="no tokenizer"):
        hs.detect(tiny_family_model("LlamaForCausalLM"), "function_vector", progress=False)
    with pytest.raises(hs.InputError, match="pairs on this side of the split"):
        hs.detect(model, "function_vector", tasks=("letter_upper",), n_shots=20, progress=False)
    with pytest.raises(hs.ArgumentError, match="'replacements' argument"):
        final_position_patch_scan(model, torch.tensor([[3, 4, 5]]), torch.zeros(1, 2, 4, 5), AnswerProbability([3]))
    with pytest.raises(hs.EmptyResultError, match="no task this model does in context"):
        hs.detect(model, "function_vector", tasks=("letter_upper",), progress=False)  # a random model answers none
    assert active_hooks(model) == 0
