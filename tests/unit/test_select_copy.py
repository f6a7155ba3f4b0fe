"""Multiple-choice data, option positions and the select-and-copy read-out."""

import json
from dataclasses import replace

import pytest
import torch

import headscope as hs
from headscope.detectors import select_copy as sc
from headscope.engine.architecture import head_hook
from headscope.engine.tokens import encode_with_offsets
from headscope.errors import InputError, SettingError
from headscope.studies.select_copy import compare, split_stability
from headscope.tasks import multiple_choice as mc
from tests.families import tiny_family_model


@pytest.fixture(scope="module")
def tiny_text():
    """A random 2-layer Llama (4 query heads on 2 KV heads) with a byte-level tokenizer: every
    character one token, so an option's newline is the token after its text's last character."""
    return tiny_family_model("LlamaForCausalLM", with_tokenizer=True)


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


def test_default_set_states_every_option_so_repetition_cannot_pick_the_answer():
    """Every option's text appears in the context of the detector's default set (with
    distractor_facts=0, the easy set, only the answer's does: a head that finds repeated tokens
    would pick it)."""
    questions = sc.load_questions(sc.SelectCopyConfig())
    assert len(questions) == sc.SelectCopyConfig().n_questions and {q.topic for q in questions} == set(mc.TEMPLATES)
    for q in questions:
        facts = [f for f in q.context.split(". ") if f]
        assert len(facts) == len(q.options) == 4
        assert all(option in q.context for option in q.options)
        assert sum(f.count(option) for f in facts for option in q.options) == len(q.options)  # each once
    assert mc.synthetic_questions(40) == mc.synthetic_questions(40, distractor_facts=3)
    for q in sc.load_questions(sc.SelectCopyConfig(distractor_facts=0)):
        assert [option in q.context for option in q.options] == [i == q.answer for i in range(len(q.options))]
    with pytest.raises(InputError, match=r"distractor_facts must lie in 0\.\.3"):
        mc.synthetic_questions(4, n_options=4, distractor_facts=4)


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


@pytest.mark.parametrize("format", mc.FORMATS)
def test_line_end_is_the_newline_after_each_option_on_a_byte_level_tokenizer(tiny_text, format):
    """The paper's key: the last token of the whole option line, the newline after its text (one
    token after the option's last character here); the option end covers its last character."""
    questions = [mc.MCQuestion("Which one?", TRICKY[i : i + 4], 1, context="Some context.") for i in range(4)]
    for prompt in mc.mc_prompts(questions, format, n_shots=2):
        ids, offsets = encode_with_offsets(tiny_text, prompt.text)
        letters, option_ends = mc.option_positions(offsets, prompt)
        line_ends = mc.line_end_positions(offsets, prompt)
        for letter, option_end, line_end, (_start, stop) in zip(letters, option_ends, line_ends, prompt.option_spans, strict=True):
            assert offsets[option_end] == (stop - 1, stop) and letter < option_end
            assert line_end == option_end + 1 and offsets[line_end] == (stop, stop + 1)
            assert prompt.text[stop] == "\n" and tiny_text.tokenizer.decode(ids[line_end]) == "\n"


def _merged(offsets, position):
    """The offsets as if the tokenizer had merged the tokens at ``position`` and ``position + 1``."""
    return offsets[:position] + [(offsets[position][0], offsets[position + 1][1])] + offsets[position + 2 :]


def test_line_end_rule_where_the_newline_merges_back_forward_or_is_missing(tiny_text):
    prompt = mc.mc_prompt(mc.MCQuestion("Which one?", ("red.", "blue", "green"), 0), "plain")
    _ids, offsets = encode_with_offsets(tiny_text, prompt.text)
    _letters, option_ends = mc.option_positions(offsets, prompt)
    assert mc.line_end_positions(offsets, prompt) == [end + 1 for end in option_ends]
    # "red." + "\n" as one token (as Llama 3's tokenizer writes ".\n"): the merged token ends both
    back = _merged(offsets, option_ends[0])
    assert mc.option_positions(back, prompt)[1][0] == mc.line_end_positions(back, prompt)[0] == option_ends[0]
    assert mc.line_end_positions(back, prompt)[1:] == [end for end in option_ends[1:]]  # one token fewer before them
    # "\n" + "B" as one token: no token ends option A's line alone
    with pytest.raises(InputError, match=r"Option A's line has no token that ends it.*'\\nB', which runs into the next line.*key_position='option_end'"):
        mc.line_end_positions(_merged(offsets, option_ends[0] + 1), prompt)
    # no newline after the last option: its line ends with its text
    stop = prompt.option_spans[-1][1]
    cut = replace(prompt, text=prompt.text[:stop])
    _ids, cut_offsets = encode_with_offsets(tiny_text, cut.text)
    assert mc.line_end_positions(cut_offsets, cut) == [*[end + 1 for end in option_ends[:-1]], option_ends[-1]]
    # ... unless the text's last token runs on past the line
    joined = replace(prompt, text=prompt.text[:stop] + "x")
    _ids, joined_offsets = encode_with_offsets(tiny_text, joined.text)
    with pytest.raises(InputError, match="Option C's line"):
        mc.line_end_positions(_merged(joined_offsets, option_ends[-1]), joined)


def test_readout_reads_both_key_positions_as_computed_by_hand(tiny_text):
    """QK-score = pre-RoPE query at the last token . key of the head's KV group at the line end
    (the newline, the default) or the option end; attention likewise; values follow key_position."""
    questions = mc.synthetic_questions(3, n_options=3, seed=1)
    prompts = mc.mc_prompts(questions, "plain")
    readout = sc.option_readout(tiny_text, prompts, batch_size=2, progress=False)
    layer, head = 1, 3  # query head 3 reads KV head 1
    (q_name, q_view), (k_name, k_view) = head_hook(tiny_text, layer, "q"), head_hook(tiny_text, layer, "k")
    pattern = f"blocks.{layer}.attn.hook_pattern"
    for row, prompt in enumerate(prompts):
        ids, offsets = encode_with_offsets(tiny_text, prompt.text)
        line_ends, option_ends = mc.line_end_positions(offsets, prompt), mc.option_positions(offsets, prompt)[1]
        _logits, cache = tiny_text.run_with_cache(torch.tensor([ids]), names_filter=[q_name, k_name, pattern],
                                                  return_cache_object=False)
        q = q_view(cache[q_name])[0, -1, head].float()
        for position, at in (("line_end", line_ends), ("option_end", option_ends)):
            k = k_view(cache[k_name])[0, at, head // 2].float()
            assert torch.allclose(readout.qk[position][row, layer, head], k @ q, rtol=1e-4, atol=1e-5)
            assert torch.allclose(readout.attention[position][row, layer, head], cache[pattern][0, head, -1, at], atol=1e-6)
        assert not torch.allclose(readout.qk["line_end"][row], readout.qk["option_end"][row])
    detector = hs.get_detector("select_copy", n_dev=1)
    assert detector.config.key_position == "line_end" and detector.config.distractor_facts is None
    scores = detector.scores_from(tiny_text, readout)
    line = readout.head_correct("qk_line_end")
    assert torch.equal(scores.values, line[:1].mean(dim=0)) and torch.equal(scores.extras["qk_line_end_test"], line[1:].mean(dim=0))
    assert torch.equal(readout.head_correct("qk_end"), line)  # "end": the paper's key
    option = hs.get_detector("select_copy", n_dev=1, key_position="option_end").scores_from(tiny_text, readout)
    assert torch.equal(option.values, readout.head_correct("qk_option_end")[:1].mean(dim=0))
    for method in sc.METHODS:  # both key positions reported whichever values reads
        assert method in scores.extras and f"{method}_test" in scores.extras and f"best_{method}" in scores.metadata
    assert scores.metadata["method"] == "qk_line_end" and option.metadata["method"] == "qk_option_end"


def test_readout_matches_scores_computed_by_hand_with_the_kv_group_key(smollm):
    questions = mc.synthetic_questions(3, n_options=3, seed=1)
    prompts = mc.mc_prompts(questions, "plain")
    readout = sc.option_readout(smollm, prompts, batch_size=2)
    layer, head = 12, 5  # query head 5 reads KV head 1
    for row, prompt in enumerate(prompts):
        ids, offsets = encode_with_offsets(smollm, prompt.text)
        letters, ends = mc.option_positions(offsets, prompt)
        line_ends = mc.line_end_positions(offsets, prompt)
        assert [smollm.tokenizer.decode(ids[i]) for i in line_ends] == ["\n"] * 3  # its own newline token
        names = [f"blocks.{layer}.attn.hook_{k}" for k in ("q", "k", "pattern")]
        logits, cache = smollm.run_with_cache(torch.tensor([ids]), names_filter=names, return_cache_object=False)
        q = cache[names[0]][0, -1, head]
        for position, at in (("line_end", line_ends), ("option_end", ends)):
            k = cache[names[1]][0, at, head // 3]
            assert torch.allclose(readout.qk[position][row, layer, head], k @ q, rtol=1e-4, atol=1e-4)
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
    every = {position: scores for position in sc.POSITIONS}
    return sc.OptionReadout(every, every, logits, torch.zeros(n, 2, 3), answers, mask)


def test_compare_gives_a_ci_and_permutation_p_for_a_head_that_beats_the_letters():
    n = 200
    readout = _toy_readout([True] * n, [i % 2 == 0 for i in range(n)])
    assert readout.head_correct("qk_end")[:, 0, 1].mean() == 1 and readout.letter_correct().mean() == 0.5
    (result,) = compare(readout, range(50), range(50, n), methods=("qk_end",))
    assert result.head == "L0H1" and result.test_accuracy == 1 and result.difference == pytest.approx(0.5)
    assert 0.4 < result.ci_low < 0.5 < result.ci_high < 0.6 and result.p_value < 0.001
    same = compare(_toy_readout([True] * 40, [True] * 40), range(10), range(10, 40), methods=("qk_end",))[0]
    assert same.difference == 0 and same.p_value == 1.0
    stability = split_stability(readout, n_dev=50, n_splits=5)
    assert stability["chosen"] == {"L0H1": 5} and stability["test_accuracy_mean"] == 1


def test_scores_from_a_readout_select_on_dev_and_report_held_out(tiny_text):
    readout = _toy_readout([i >= 5 for i in range(60)], [True] * 60)  # the head is wrong on the first 5
    scores = hs.get_detector("select_copy", n_dev=30).scores_from(tiny_text, readout, {"known_rate": 1.0})
    assert scores.values.shape == (2, 3) and scores.values[0, 1] == pytest.approx(25 / 30)
    assert scores.extras["qk_line_end_test"][0, 1] == 1.0 and scores.metadata["best_qk_line_end"]["head"] == "L0H1"
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


def test_detector_refuses_unknown_scores_and_too_few_questions(tiny_text):
    prompts = mc.mc_prompts(mc.synthetic_questions(4))
    # The config's choices reject these at construction (SettingError); _check_config, at scoring.
    with pytest.raises(SettingError, match="'score'.*one of 'qk', 'attention'; got 'dot'"):
        hs.get_detector("select_copy", score="dot").score(tiny_text, prompts=prompts)
    with pytest.raises(SettingError, match="'key_position'.*one of 'line_end', 'option_end'"):
        hs.get_detector("select_copy", key_position="newline").score(tiny_text, prompts=prompts)
    with pytest.raises(InputError, match="qk_line_end"):
        _toy_readout([True], [True]).head_correct("qk_middle")
    with pytest.raises(InputError, match="n_dev"):
        hs.get_detector("select_copy", n_questions=5, n_dev=10).prompts(tiny_text)


def test_a_select_copy_head_must_beat_guessing_and_be_right_on_most_questions():
    """Held-out accuracy 0.45 on 400 questions beats guessing (1/4) by far, but a head that picks
    the wrong option on most questions does not select the answer: the floor is a majority."""
    detector = hs.get_detector("select_copy")
    method = sc.config_method(detector.config)
    accuracy = torch.full((2, 3), 0.25)
    accuracy[0, 1], accuracy[1, 2] = 0.45, 0.7
    scores = hs.HeadScores(accuracy, "select_copy", "tiny", extras={f"{method}_test": accuracy},
                           metadata={"n_test": 400})
    (sig,) = detector.significance(None, scores)
    assert sig.above_null[0, 1] and sig.above_null[1, 2] and sig.floor == sc.MAJORITY_ACCURACY
    assert sig.heads == [hs.Head(1, 2)]
