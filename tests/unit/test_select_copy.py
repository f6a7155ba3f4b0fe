"""Multiple-choice data, option positions and the select-and-copy read-out."""

import json

import pytest
import torch

import headscope as hs
from headscope.detectors import select_copy as sc
from headscope.engine.tokens import encode_with_offsets
from headscope.errors import InputError
from headscope.tasks import multiple_choice as mc


def test_synthetic_questions_state_their_answer_and_offer_the_distractor_facts_values():
    questions = mc.synthetic_questions(60, n_options=5, distractor_facts=2, seed=3)
    assert [q.topic for q in questions[:5]] == list(mc.TEMPLATES)
    for q in questions:
        facts = q.context.split(". ")
        assert len(facts) == 3 and len(q.options) == 5
        assert q.answer_text in q.context  # the prompt states it
        assert sum(option in q.context for option in q.options) == 3  # answer + 2 distractor facts' values
    assert mc.synthetic_questions(60, 5, distractor_facts=2, seed=3) == questions
    assert mc.synthetic_questions(60, 5, distractor_facts=2, seed=4) != questions
    assert len({q.answer for q in questions}) == 5  # every position holds answers


def test_extra_options_come_last_and_are_never_the_answer():
    questions = mc.synthetic_questions(20, n_options=4, extra_options=("none", "unknown"))
    for q in questions:
        assert q.options[-2:] == ("None of the above", "I don't know") and q.answer < 4
    shuffled = mc.shuffle_options(questions, seed=1)
    assert all(s.options[-2:] == q.options[-2:] and s.answer_text == q.answer_text for s, q in zip(shuffled, questions, strict=True))
    assert any(s.options != q.options for s, q in zip(shuffled, questions, strict=True))


def test_world_set_loads_with_two_to_six_options():
    for n in (2, 6):
        questions = mc.world_questions(n_options=n)
        assert len(questions) == 120 and all(len(q.options) == n for q in questions)
    with pytest.raises(InputError, match="2..6"):
        mc.world_questions(n_options=7)


def test_read_questions_takes_index_letter_or_text_and_names_the_bad_line(tmp_path):
    path = tmp_path / "q.jsonl"
    rows = [{"question": "Q1?", "options": ["a", "b"], "answer": 1},
            {"question": "Q2?", "options": ["a", "b", "c"], "answer": "C", "context": "ctx"},
            {"question": "Q3?", "options": ["x", "y"], "answer": "x"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert [q.answer for q in mc.read_questions(path)] == [1, 2, 0]
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"question": "Q?", "options": ["a", "b"], "answer": "z"}))
    with pytest.raises(InputError, match="line 2"):
        mc.read_questions(path)


def test_bad_questions_and_formats_are_refused_with_the_reason():
    with pytest.raises(InputError, match="options"):
        mc.MCQuestion("Q?", ("only",), 0)
    with pytest.raises(InputError, match="repeat"):
        mc.MCQuestion("Q?", ("a", "a"), 0)
    with pytest.raises(InputError, match="Unknown multiple-choice format"):
        mc.mc_prompt(mc.MCQuestion("Q?", ("a", "b"), 0), format="essay")
    with pytest.raises(InputError, match="Unknown template"):
        mc.synthetic_questions(4, templates=("weather",))


TRICKY = ("3.14", "don't", "New York", "C++", "naïve café", "red.", "—", "1/2", "🙂 smile", "A", "x" * 40)


@pytest.mark.parametrize("format", mc.FORMATS)
def test_positions_from_offsets_find_each_letter_and_the_token_ending_each_option(smollm, format):
    questions = [mc.MCQuestion("Which one?", TRICKY[i : i + 6], 2, context="Some context.") for i in range(0, 6)]
    prompts = mc.mc_prompts(questions, format, n_shots=2)
    for prompt in prompts:
        ids, offsets = encode_with_offsets(smollm, prompt.text)
        assert ids == hs.tokenize(smollm, [prompt.text]).tokens[0].tolist()  # same rows as the engine's batches
        letters, ends = mc.option_positions(offsets, prompt)
        for letter, end, char, (_start, stop) in zip(letters, ends, prompt.letter_chars, prompt.option_spans, strict=True):
            assert smollm.tokenizer.decode(ids[letter]).strip() == prompt.text[char]
            assert offsets[end][0] <= stop - 1 < offsets[end][1]  # covers the option's last character
            assert offsets[end + 1][0] >= stop and end > letter  # and no later token holds any of it


def test_readout_matches_scores_computed_by_hand_with_the_kv_group_key(smollm):
    questions = mc.synthetic_questions(3, n_options=3, seed=1)
    prompts = mc.mc_prompts(questions, "plain")
    readout = sc.option_readout(smollm, prompts, batch_size=2)
    layer, head = 12, 5  # query head 5 reads KV head 1
    for row, prompt in enumerate(prompts):
        ids, offsets = encode_with_offsets(smollm, prompt.text)
        letters, ends = mc.option_positions(offsets, prompt)
        names = [f"blocks.{layer}.attn.hook_{k}" for k in ("q", "k", "pattern")]
        logits, cache = smollm.run_with_cache(torch.tensor([ids]), names_filter=names, return_cache_object=False)
        q = cache[names[0]][0, -1, head]
        k = cache[names[1]][0, ends, head // 3]
        assert torch.allclose(readout.qk["end"][row, layer, head], k @ q, rtol=1e-4, atol=1e-4)
        attention = cache[names[2]][0, head, -1, letters]
        assert torch.allclose(readout.attention["letter"][row, layer, head], attention, atol=1e-6)
        letter_ids = mc.letter_token_ids(smollm.tokenizer, 3, " ")
        assert torch.allclose(readout.letter_logits[row], logits[0, -1, letter_ids], atol=1e-4)


def _toy_readout(head_right, letters_right, n_options=4):
    """A readout where head (0, 1) picks the answer on ``head_right`` questions and the letter
    logits on ``letters_right``; padded options carry the highest scores (and must be ignored)."""
    n = len(head_right)
    answers = torch.arange(n) % 3
    mask = torch.ones(n, n_options, dtype=torch.bool)
    mask[:, 3] = False
    scores = torch.zeros(n, 2, 3, n_options)
    scores[..., 3] = 100.0  # padding
    for i in range(n):
        scores[i, 0, 1, answers[i] if head_right[i] else (answers[i] + 1) % 3] = 1.0
    logits = torch.zeros(n, n_options)
    logits[:, 3] = 100.0
    for i in range(n):
        logits[i, answers[i] if letters_right[i] else (answers[i] + 1) % 3] = 1.0
    both = {"end": scores, "letter": scores}
    return sc.OptionReadout(both, both, logits, torch.zeros(n, 2, 3), answers, mask)


def test_compare_gives_a_ci_and_permutation_p_for_a_head_that_beats_the_letters():
    n = 200
    readout = _toy_readout([True] * n, [i % 2 == 0 for i in range(n)])
    assert readout.head_correct("qk_end")[:, 0, 1].mean() == 1 and readout.letter_correct().mean() == 0.5
    (result,) = sc.compare(readout, range(50), range(50, n), methods=("qk_end",))
    assert result.head == "L0H1" and result.test_accuracy == 1 and result.difference == pytest.approx(0.5)
    assert 0.4 < result.ci_low < 0.5 < result.ci_high < 0.6 and result.p_value < 0.001
    same = sc.compare(_toy_readout([True] * 40, [True] * 40), range(10), range(10, 40), methods=("qk_end",))[0]
    assert same.difference == 0 and same.p_value == 1.0
    stability = sc.split_stability(readout, n_dev=50, n_splits=5)
    assert stability["chosen"] == {"L0H1": 5} and stability["test_accuracy_mean"] == 1


def test_scores_from_a_readout_select_on_dev_and_report_held_out(smollm):
    readout = _toy_readout([i >= 5 for i in range(60)], [True] * 60)  # the head is wrong on the first 5
    scores = hs.get_detector("select_copy", n_dev=30).scores_from(smollm, readout, {"known_rate": 1.0})
    assert scores.values.shape == (2, 3) and scores.values[0, 1] == pytest.approx(25 / 30)
    assert scores.extras["qk_end_test"][0, 1] == 1.0 and scores.metadata["best_qk_end"]["head"] == "L0H1"
    assert scores.metadata["letter_accuracy_test"] == 1.0 and scores.metadata["n_test"] == 30


def test_correct_letter_margin_reads_the_right_letters(smollm):
    prompts = mc.mc_prompts(mc.synthetic_questions(2, n_options=3, seed=2), "plain")
    metric = sc.CorrectLetterMargin(smollm, prompts)
    batch = sc.encode_prompts(smollm, prompts).batch
    logits = torch.zeros(2, batch.tokens.shape[1], hs.model_shape(smollm).d_vocab)
    ids = mc.letter_token_ids(smollm.tokenizer, 3, " ")
    for row, prompt in enumerate(prompts):
        logits[row, int(batch.last_positions[row]), ids[prompt.question.answer]] = 3.0
    assert torch.allclose(metric(logits, batch), torch.tensor([3.0, 3.0]))


def test_detector_refuses_unknown_scores_and_too_few_questions(smollm):
    with pytest.raises(ValueError, match="qk_end"):
        hs.get_detector("select_copy", score="dot").score(smollm, prompts=mc.mc_prompts(mc.synthetic_questions(4)))
    with pytest.raises(InputError, match="n_dev"):
        hs.get_detector("select_copy", n_questions=5, n_dev=10).prompts(smollm)
