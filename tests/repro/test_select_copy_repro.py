"""Select-and-copy heads (Tulchinskii et al. 2024) and correct-letter heads (Lieberum et al. 2023)
on the bundled SmolLM2-135M-Instruct.

Data: 340 synthetic four-option questions whose answer the prompt states ("Felix lives in
Dublin. Question: Where does Felix live? ..."), five templates, in the chat format (ChatML user
turn, "Answer with the letter of the correct option.", assistant turn opened). Only questions the
model answers in free form (two answered examples first) are scored; the first 120 of them select
heads (dev), the rest (>= 200) are held out.

What we see, in short: the model knows the answers (free form ~0.98) but its letter logits sit at
chance, nearly always naming one letter; the query-key score of a middle-layer head picks the
correct option on ~0.7 of held-out questions, the same head on every random dev split, robust to
reshuffled options. The information sits at the options' own tokens, not at their letters, and no
head writes the correct letter into the logits.
"""

from __future__ import annotations

import pytest
import torch

from headscope.detectors import select_copy as sc
from headscope.engine.heads import Head
from headscope.tasks import multiple_choice as mc

pytestmark = pytest.mark.repro

N_QUESTIONS = 340
N_DEV = 120
FORMAT = "chat"


@pytest.fixture(scope="module")
def known_questions(smollm):
    questions = mc.synthetic_questions(N_QUESTIONS, n_options=4, distractor_facts=0, seed=0)
    known = sc.knows_answer(smollm, questions, n_shots=2)
    return questions, known


@pytest.fixture(scope="module")
def study(smollm, known_questions):
    questions, known = known_questions
    scored = [q for q, k in zip(questions, known.tolist(), strict=True) if k]
    readout = sc.option_readout(smollm, mc.mc_prompts(scored, FORMAT))
    dev, test = range(N_DEV), range(N_DEV, len(scored))
    comparisons = {c.method: c for c in sc.compare(readout, dev, test, methods=sc.METHODS)}
    for c in comparisons.values():
        print(f"{c.method:16s} {c.head:6s} dev {c.dev_accuracy:.2f} held-out {c.test_accuracy:.2f} vs letters "
              f"{c.letter_accuracy:.2f}: {c.difference:+.2f} [{c.ci_low:+.2f}, {c.ci_high:+.2f}] p={c.p_value:.4f}; "
              f"all heads {c.random_head_accuracy:.2f}")
    return {"questions": scored, "readout": readout, "dev": dev, "test": test, "comparisons": comparisons}


def test_model_knows_the_stated_answers_in_free_form(known_questions):
    """Precondition: with two answered examples the model completes the stated answer."""
    questions, known = known_questions
    by_topic = {t: known[[q.topic == t for q in questions]].float().mean().item() for t in mc.TEMPLATES}
    print(f"known {known.float().mean():.3f}", {t: round(v, 2) for t, v in by_topic.items()})
    assert known.float().mean() > 0.9 and min(by_topic.values()) > 0.8


def test_letter_logits_sit_at_chance_naming_mostly_one_letter(study):
    """What we see: the model's own answer (highest option letter) is not better than chance."""
    readout, test = study["readout"], list(study["test"])
    letters = readout.letter_correct()[test]
    low, high = sc.paired_bootstrap_ci(letters - 0.25)
    choices = torch.bincount(readout.letter_choices(), minlength=4)
    print(f"letters held-out {letters.mean():.2f}, CI vs chance [{low:+.2f}, {high:+.2f}]; letters named {choices.tolist()}")
    assert low < 0.05 and choices.max() > 0.7 * len(readout)


def test_qk_head_chosen_on_dev_beats_the_letter_logits_on_held_out_questions(study):
    """Tulchinskii et al.: a head's QK-score to the option-end tokens answers better than the
    letters (up to +16% on real sets, ~+60% on a synthetic set). Control: the letters on the same
    questions, and the mean of all heads."""
    best = study["comparisons"]["qk_end"]
    assert best.n_test >= 200
    assert best.ci_low > 0.3 and best.p_value < 0.001
    assert best.test_accuracy > best.random_head_accuracy + 0.4


def test_attention_score_beats_the_letters_too_but_less_than_the_qk_score(study):
    qk, attention = study["comparisons"]["qk_end"], study["comparisons"]["attention_end"]
    assert attention.ci_low > 0 and attention.p_value < 0.01
    assert qk.test_accuracy > attention.test_accuracy + 0.1


def test_the_answer_is_read_at_the_options_tokens_not_at_their_letters(study):
    """Heads scored at the letter positions do no better than the letters themselves."""
    comparisons = study["comparisons"]
    for method in ("qk_letter", "attention_letter"):
        assert comparisons[method].ci_low < 0 < comparisons[method].ci_high
        assert comparisons[method].test_accuracy < comparisons["qk_end"].test_accuracy - 0.3


def test_best_select_and_copy_heads_sit_in_middle_layers(smollm, study):
    """The paper (and its follow-up): the best heads sit in the middle layers."""
    readout, dev = study["readout"], list(study["dev"])
    accuracy = readout.head_correct("qk_end")[dev].mean(dim=0)
    top = torch.topk(accuracy.flatten(), 5).indices
    layers = [int(i) // accuracy.shape[1] for i in top]
    depth = [layer / (accuracy.shape[0] - 1) for layer in layers]
    n_heads = accuracy.shape[1]
    print("top-5 QK heads (dev):", [f"L{int(i) // n_heads}H{int(i) % n_heads} {accuracy.flatten()[i]:.2f}" for i in top])
    assert all(0.25 <= d <= 0.75 for d in depth)


def test_the_selected_head_is_the_same_on_random_dev_splits(study):
    stability = sc.split_stability(study["readout"], n_dev=N_DEV, n_splits=20)
    print(stability)
    letters = study["comparisons"]["qk_end"].letter_accuracy
    assert stability["most_chosen_share"] >= 0.8
    assert stability["test_accuracy_min"] > letters + 0.3


def test_the_selected_head_keeps_its_accuracy_when_options_are_reshuffled(smollm, study):
    """Robustness: the held-out questions with their options in a new order."""
    best = study["comparisons"]["qk_end"]
    layer, head = Head.parse(best.head)
    held_out = [study["questions"][i] for i in study["test"]]
    shuffled = sc.option_readout(smollm, mc.mc_prompts(mc.shuffle_options(held_out, seed=1), FORMAT))
    head_accuracy = shuffled.head_correct("qk_end")[:, layer, head].mean().item()
    letters = shuffled.letter_correct().mean().item()
    print(f"reshuffled: {best.head} {head_accuracy:.2f} (was {best.test_accuracy:.2f}), letters {letters:.2f}")
    assert abs(head_accuracy - best.test_accuracy) < 0.1 and head_accuracy > letters + 0.3


def test_no_head_writes_the_correct_letter_where_the_letters_fail(study):
    """Lieberum et al.'s correct-letter heads (direct logit attribution to the correct letter minus
    the wrong ones): on a model whose letters are at chance, the best such head on dev carries
    almost nothing to held-out questions, next to the letter logits' spread."""
    readout, dev, test = study["readout"], list(study["dev"]), list(study["test"])
    dev_mean = readout.correct_letter[dev].mean(dim=0)
    index = int(dev_mean.flatten().argmax())
    layer, head = divmod(index, dev_mean.shape[1])
    held_out = readout.correct_letter[test, layer, head]
    low, high = sc.paired_bootstrap_ci(held_out)
    spread = readout.letter_logits[test].std(dim=1).mean().item()
    print(f"best correct-letter head L{layer}H{head}: dev {dev_mean[layer, head]:.3f}, held-out {held_out.mean():.3f} "
          f"[{low:+.3f}, {high:+.3f}] logits; letters' spread {spread:.2f}")
    assert held_out.mean().abs() < 0.1 * spread
