"""Select-and-copy heads (Tulchinskii et al. 2024) and correct-letter heads (Lieberum et al. 2023)
on the bundled SmolLM2-135M-Instruct.

Data: synthetic four-option questions whose answer the prompt states, five templates, in the chat
format (ChatML user turn, "Answer with the letter of the correct option.", assistant turn opened)
and in the paper's plain format ("... Answer:", the detector's default). Two sets:

* the default set, 1300 questions: every option is stated, the answer's fact among one about
  someone else per wrong option ("Tom's cup is pink. Grace's cup is purple. Hugo's cup is brown.
  Clara's cup is orange. Question: What colour is Grace's cup?"), so repetition alone cannot pick
  the answer;
* the easy set, 340 questions (``distractor_facts=0``): only the answer is stated.

Only questions the model answers in free form (two answered examples first) are scored; the first
120 of them select heads (dev), the rest (>= 200) are held out. Each option's key is read at the
end of its line (the newline after its text, where the authors' code reads it; the detector's
default ``key_position="line_end"``) and at the token ending its text (``"option_end"``).

What we see, in short: on the default set the model does not bind a question to its fact: its
free-form answer names one of the four stated values at chance (0.26), its letters sit at chance,
and at the paper's key (the line end) no head picks the correct option: the best dev heads reach
0.23-0.27 on held-out questions (chance 0.25) and the detector's rule finds no head in either
format (nor at the text end, where none reaches its majority floor). At the text end an early head (L4H5) is the best dev head of both scores in both formats,
at 0.29-0.36 held out: above chance in the plain format, far below the easy set.

On the easy set the earlier finding holds at the option's text end: in chat, the query-key score
of a middle-layer head (L10H8) picks the correct option on ~0.7 of held-out questions, the same
head on every random dev split, robust to reshuffled options. At the paper's key, the line end,
the best QK head in chat reaches only ~0.37 and changes between dev splits (the attention score
there, ~0.5, does better); in the plain format the two key positions are close (~0.58 and ~0.59).
The information sits at the options' own tokens, not at their letters, and no head writes the
correct letter into the logits.
"""

from __future__ import annotations

import pytest
import torch

from headscope.detectors import select_copy as sc
from headscope.engine.heads import Head
from headscope.stats import paired_bootstrap_ci
from headscope.studies.select_copy import compare, split_stability
from headscope.tasks import multiple_choice as mc

pytestmark = pytest.mark.repro

N_DEFAULT, N_EASY = sc.SelectCopyConfig().n_questions, 340
N_DEV = 120
FORMATS = ("chat", "plain")
CHANCE = 0.25


def _study(model, n_questions, distractor_facts):
    """Knowledge check, read-outs in both formats and the comparisons of every score's best dev head."""
    questions = mc.synthetic_questions(n_questions, n_options=4, distractor_facts=distractor_facts, seed=0)
    known = sc.knows_answer(model, questions, n_shots=2)
    scored = [q for q, k in zip(questions, known.tolist(), strict=True) if k]
    dev, test = range(N_DEV), range(N_DEV, len(scored))
    readouts, comparisons = {}, {}
    for format in FORMATS:
        readouts[format] = sc.option_readout(model, mc.mc_prompts(scored, format))
        comparisons[format] = {c.method: c for c in compare(readouts[format], dev, test, methods=sc.METHODS)}
        for c in comparisons[format].values():
            print(f"distractor_facts={distractor_facts} {format:5s} {c.method:20s} {c.head:6s} dev {c.dev_accuracy:.2f} "
                  f"held-out {c.test_accuracy:.2f} vs letters {c.letter_accuracy:.2f}: {c.difference:+.2f} "
                  f"[{c.ci_low:+.2f}, {c.ci_high:+.2f}] p={c.p_value:.4f}; all heads {c.random_head_accuracy:.2f}")
    return {"questions": questions, "known": known, "scored": scored, "readouts": readouts,
            "comparisons": comparisons, "dev": dev, "test": test}


@pytest.fixture(scope="module")
def default_set(smollm):
    return _study(smollm, N_DEFAULT, None)


@pytest.fixture(scope="module")
def easy_set(smollm):
    return _study(smollm, N_EASY, 0)


def _known_by_topic(study):
    known, questions = study["known"], study["questions"]
    return {t: known[[q.topic == t for q in questions]].float().mean().item() for t in mc.TEMPLATES}


def test_model_answers_in_free_form_only_when_the_answer_is_the_only_option_stated(easy_set, default_set):
    """Precondition of the easy set: with two answered examples the model completes the stated
    answer. On the default set it names one of the four stated values at chance: it does not bind
    the question's name to its fact (0.48 with one distractor fact, 0.33 with two: chance again)."""
    easy, hard = easy_set["known"].float().mean().item(), default_set["known"].float().mean().item()
    easy_topics, hard_topics = _known_by_topic(easy_set), _known_by_topic(default_set)
    print(f"known: easy {easy:.3f}", {t: round(v, 2) for t, v in easy_topics.items()},
          f"default {hard:.3f}", {t: round(v, 2) for t, v in hard_topics.items()})
    assert easy > 0.9 and min(easy_topics.values()) > 0.8
    assert abs(hard - CHANCE) < 0.05 and max(hard_topics.values()) < 0.4
    assert len(default_set["test"]) >= 200 and len(easy_set["test"]) >= 200


def test_letter_logits_sit_at_chance_naming_mostly_one_letter(easy_set, default_set):
    """What we see: the model's own answer (highest option letter) is not better than chance."""
    for name, study, share in (("easy", easy_set, 0.7), ("default", default_set, 0.6)):
        readout, test = study["readouts"]["chat"], list(study["test"])
        letters = readout.letter_correct()[test]
        low, high = paired_bootstrap_ci(letters - CHANCE)
        choices = torch.bincount(readout.letter_choices(), minlength=4)
        print(f"{name}: letters held-out {letters.mean():.2f}, CI vs chance [{low:+.2f}, {high:+.2f}]; letters named {choices.tolist()}")
        assert low < 0.05 and choices.max() > share * len(readout)


def test_on_the_default_set_no_head_picks_the_answer_at_the_papers_key(smollm, default_set, easy_set):
    """With every option stated, the best dev head of every score (QK and attention at the line end,
    the text end and the letter), in either format, stays below 0.4 on held-out questions (chance
    0.25; the easy set's best reaches 0.71). At the line end the best QK head is at chance. The
    detector's own rule (exact binomial on the held-out questions, Bonferroni over 270 heads, and
    the majority floor: right on more than half of them) finds no head in either format at either
    key position; at the line end no head even beats the binomial null, at the text end at most
    two do (0.36-0.37 held out, below the floor)."""
    assert easy_set["comparisons"]["chat"]["qk_option_end"].test_accuracy > 0.4 + 0.3
    for format in FORMATS:
        comparisons = default_set["comparisons"][format]
        for c in comparisons.values():
            assert c.test_accuracy < 0.4, (format, c)
        assert comparisons["qk_line_end"].test_accuracy < 0.3
        for key_position in sc.KEY_POSITIONS:
            detector = sc.SelectCopyDetector(n_dev=N_DEV, format=format, key_position=key_position)
            scores = detector.scores_from(smollm, default_set["readouts"][format])
            (significance,) = detector.significance(smollm, scores)
            above_null = int(significance.above_null.sum())
            print(f"default set, {format}, qk at {key_position}: critical held-out accuracy {significance.threshold:.3f}, "
                  f"best held-out {scores.extras[f'qk_{key_position}_test'].max():.3f}, {above_null} heads above the "
                  f"null, significant (floor {significance.floor}) {[str(h) for h in significance.heads]}")
            assert not significance.heads
            assert above_null <= (0 if key_position == "line_end" else 2)


def test_on_the_easy_set_a_qk_head_at_the_option_end_beats_the_letters(easy_set):
    """Tulchinskii et al.: a head's QK-score to the options answers better than the letters (up to
    +16% on real sets, ~+60% on a synthetic set). It holds on the easy set with the key at the
    token ending each option's text. Control: the letters on the same questions, and the mean of
    all heads."""
    best = easy_set["comparisons"]["chat"]["qk_option_end"]
    assert best.n_test >= 200
    assert best.ci_low > 0.3 and best.p_value < 0.001
    assert best.test_accuracy > best.random_head_accuracy + 0.4


def test_on_the_easy_set_the_papers_key_reads_the_answer_less_well_in_chat(easy_set):
    """At the end of each option's line (the newline, where the authors' code reads the key) the
    best QK head still beats the letters, but in chat far less than at the text end; in the plain
    format the two key positions are close."""
    chat, plain = easy_set["comparisons"]["chat"], easy_set["comparisons"]["plain"]
    assert chat["qk_line_end"].ci_low > 0 and chat["qk_line_end"].p_value < 0.001
    assert chat["qk_option_end"].test_accuracy > chat["qk_line_end"].test_accuracy + 0.2
    assert plain["qk_line_end"].ci_low > 0.2 and plain["qk_line_end"].p_value < 0.001
    assert abs(plain["qk_line_end"].test_accuracy - plain["qk_option_end"].test_accuracy) < 0.1


def test_attention_score_beats_the_letters_too_more_than_qk_at_the_line_end_less_at_the_text_end(easy_set):
    chat = easy_set["comparisons"]["chat"]
    for key_position in sc.KEY_POSITIONS:
        assert chat[f"attention_{key_position}"].ci_low > 0 and chat[f"attention_{key_position}"].p_value < 0.01
    assert chat["qk_option_end"].test_accuracy > chat["attention_option_end"].test_accuracy + 0.1
    assert chat["attention_line_end"].test_accuracy > chat["qk_line_end"].test_accuracy + 0.05


def test_the_answer_is_read_at_the_options_tokens_not_at_their_letters(easy_set):
    """Heads scored at the letter positions do no better than the letters themselves."""
    comparisons = easy_set["comparisons"]["chat"]
    for method in ("qk_letter", "attention_letter"):
        assert comparisons[method].ci_low < 0 < comparisons[method].ci_high
        assert comparisons[method].test_accuracy < comparisons["qk_option_end"].test_accuracy - 0.3


def test_best_select_and_copy_heads_sit_in_middle_layers(easy_set):
    """The paper (and its follow-up): the best heads sit in the middle layers, at either key."""
    readout, dev = easy_set["readouts"]["chat"], list(easy_set["dev"])
    for key_position in sc.KEY_POSITIONS:
        accuracy = readout.head_correct(f"qk_{key_position}")[dev].mean(dim=0)
        top = torch.topk(accuracy.flatten(), 5).indices
        n_layers, n_heads = accuracy.shape
        print(f"top-5 QK heads at {key_position} (dev):",
              [f"L{int(i) // n_heads}H{int(i) % n_heads} {accuracy.flatten()[i]:.2f}" for i in top])
        assert all(0.25 <= (int(i) // n_heads) / (n_layers - 1) <= 0.75 for i in top)


def test_the_selected_head_is_the_same_on_random_dev_splits_only_at_the_text_end(easy_set):
    """At the text end one head is chosen on (nearly) every random dev split and keeps its lead
    over the letters; at the line end the choice moves between a few middle-layer heads."""
    readout = easy_set["readouts"]["chat"]
    letters = easy_set["comparisons"]["chat"]["qk_option_end"].letter_accuracy
    option_end = split_stability(readout, n_dev=N_DEV, n_splits=20, method="qk_option_end")
    line_end = split_stability(readout, n_dev=N_DEV, n_splits=20, method="qk_line_end")
    print(option_end, line_end, sep="\n")
    assert option_end["most_chosen_share"] >= 0.8
    assert option_end["test_accuracy_min"] > letters + 0.3
    assert line_end["most_chosen_share"] < 0.8


def test_the_selected_head_keeps_its_accuracy_when_options_are_reshuffled(smollm, easy_set):
    """Robustness: the held-out questions with their options in a new order."""
    held_out = [easy_set["scored"][i] for i in easy_set["test"]]
    shuffled = sc.option_readout(smollm, mc.mc_prompts(mc.shuffle_options(held_out, seed=1), "chat"))
    letters = shuffled.letter_correct().mean().item()
    for method in ("qk_option_end", "qk_line_end"):
        best = easy_set["comparisons"]["chat"][method]
        layer, head = Head.parse(best.head)
        head_accuracy = shuffled.head_correct(method)[:, layer, head].mean().item()
        print(f"reshuffled {method}: {best.head} {head_accuracy:.2f} (was {best.test_accuracy:.2f}), letters {letters:.2f}")
        assert abs(head_accuracy - best.test_accuracy) < 0.1
        if method == "qk_option_end":
            assert head_accuracy > letters + 0.3


def test_no_head_writes_the_correct_letter_where_the_letters_fail(easy_set):
    """Lieberum et al.'s correct-letter heads (direct logit attribution to the correct letter minus
    the wrong ones): on a model whose letters are at chance, the best such head on dev carries
    almost nothing to held-out questions, next to the letter logits' spread."""
    readout, dev, test = easy_set["readouts"]["chat"], list(easy_set["dev"]), list(easy_set["test"])
    dev_mean = readout.correct_letter[dev].mean(dim=0)
    index = int(dev_mean.flatten().argmax())
    layer, head = divmod(index, dev_mean.shape[1])
    held_out = readout.correct_letter[test, layer, head]
    low, high = paired_bootstrap_ci(held_out)
    spread = readout.letter_logits[test].std(dim=1).mean().item()
    print(f"best correct-letter head L{layer}H{head}: dev {dev_mean[layer, head]:.3f}, held-out {held_out.mean():.3f} "
          f"[{low:+.3f}, {high:+.3f}] logits; letters' spread {spread:.2f}")
    assert held_out.mean().abs() < 0.1 * spread
