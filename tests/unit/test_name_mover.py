"""The IOI task and the name_mover detector on tiny models.

The byte tokenizer of the tiny families makes " A" .. " Z" single tokens, so single letters serve
as names; the prompts are checked token by token, the direct logit attribution of one head is
recomputed by hand from the Hugging Face modules' own weights (Llama: RMSNorm; GPT-2: LayerNorm
with biases), and the exact S-inhibition patching is recomputed with hooks of the test's own."""

import math

import pytest
import torch

import headscope as hs
from headscope.detectors import name_mover
from headscope.tasks import ioi
from tests.conftest import active_hooks, tiny_model
from tests.families import tiny_family_model

LETTERS = tuple("ABCDEFGH")
SMALL = dict(names=LETTERS, n_prompts=8, n_validation=4)


@pytest.fixture(scope="module")
def llama():
    return tiny_family_model("LlamaForCausalLM", with_tokenizer=True)


@pytest.fixture(scope="module")
def gpt2():
    return tiny_family_model("GPT2LMHeadModel", with_tokenizer=True)


# --- the task --------------------------------------------------------------------------------


def test_shipped_data_has_templates_names_and_fillers():
    assert 15 <= len(ioi.templates()) <= 25
    for template in ioi.templates():
        ioi.check_template(template)  # n1, n2, s2 once each; no name first
    assert len(ioi.words()["names"]) > 100 and ioi.words()["places"] and ioi.words()["objects"]


def test_single_token_names_keeps_only_names_that_are_one_token(llama):
    assert ioi.single_token_names(llama, ["A", "Mary", "B", "A", "Zed"]) == ["A", "B"]


@pytest.mark.parametrize("order", ioi.ORDERS)
def test_a_prompt_puts_io_and_s_where_its_order_says(llama, order):
    prompt = ioi.make_prompt(0, "When {n1} and {n2} went to the {place}, {s2} gave a {object} to", order,
                             "A", "B", "C", "store", "drink")
    first, second = ("A", "B") if order == "ABBA" else ("B", "A")
    assert prompt.text == f"When {first} and {second} went to the store, B gave a drink to"
    assert prompt.abc_text == f"When {first} and {second} went to the store, C gave a drink to"
    item = ioi.locate(llama, prompt)
    tokens = hs.tokenize(llama, prompt.text).tokens[0].tolist()
    decode = llama.tokenizer.decode
    assert decode([tokens[item.io_position]]) == " A" and item.io_token == tokens[item.io_position]
    assert decode([tokens[item.s1_position]]) == " B" == decode([tokens[item.s2_position]])
    assert (item.io_position < item.s1_position) == (order == "ABBA") and item.s2_position > max(item.io_position,
                                                                                                item.s1_position)
    assert item.length == len(tokens) == len(hs.tokenize(llama, prompt.abc_text).tokens[0])


def test_prompts_cycle_templates_in_both_orders_with_three_distinct_names_by_seed():
    prompts = ioi.ioi_prompts([2, 5], LETTERS, 8, seed=3)
    assert [(p.template, p.order) for p in prompts[:4]] == [(2, "ABBA"), (2, "BABA"), (5, "ABBA"), (5, "BABA")]
    assert all(len({p.io, p.s, p.third}) == 3 and {p.io, p.s, p.third} <= set(LETTERS) for p in prompts)
    assert prompts == ioi.ioi_prompts([2, 5], LETTERS, 8, seed=3) != ioi.ioi_prompts([2, 5], LETTERS, 8, seed=4)
    for p in prompts:
        for which, name in (("io", p.io), ("s1", p.s), ("s2", p.s)):
            start, end = p.span(which)
            assert p.text[start:end] == name


def test_the_template_split_is_disjoint_covers_every_template_and_follows_the_seed():
    scored, held_out = ioi.split_templates(20, 0.3, seed=0)
    assert len(held_out) == 6 and not set(scored) & set(held_out) and sorted(scored + held_out) == list(range(20))
    assert ioi.split_templates(20, 0.3, seed=1) != (scored, held_out)
    assert ioi.split_templates(2, 0.99, seed=0)[0]  # at least one scored template


def test_the_detector_scores_and_validates_on_disjoint_templates(llama):
    detector = hs.get_detector("name_mover", **SMALL)
    scored = {item.prompt.template for item in detector.items(llama, "score")}
    held_out = {item.prompt.template for item in detector.items(llama, "held_out")}
    assert scored and held_out and not scored & held_out


# --- the score -------------------------------------------------------------------------------


def hand_dla_llama(model, text, layer, head, io, s):
    """DLA of one head at the last position, from the HF Llama's own weights, one coordinate at a time."""
    hf = model.original_model
    tokens = hs.tokenize(model, text).tokens
    _, cache = model.run_with_cache(tokens)
    last = tokens.shape[1] - 1
    d_head = hf.config.hidden_size // hf.config.num_attention_heads
    z = cache[f"blocks.{layer}.attn.hook_z"][0, last, head]
    w_o = hf.model.layers[layer].self_attn.o_proj.weight[:, head * d_head:(head + 1) * d_head]  # [d_model, d_head]
    residual = cache[f"blocks.{hf.config.num_hidden_layers - 1}.hook_resid_post"][0, last]
    rms = math.sqrt(float((residual ** 2).mean()) + hf.config.rms_norm_eps)
    norm, unembed = hf.model.norm.weight, hf.lm_head.weight
    total = 0.0
    for k in range(hf.config.hidden_size):
        contribution = sum(float(w_o[k, d]) * float(z[d]) for d in range(d_head))
        total += contribution / rms * float(norm[k]) * float(unembed[io, k] - unembed[s, k])
    return total


def hand_dla_gpt2(model, text, layer, head, io, s):
    """The same for GPT-2: LayerNorm centres the head's output and divides by the residual's std."""
    hf = model.original_model
    tokens = hs.tokenize(model, text).tokens
    _, cache = model.run_with_cache(tokens)
    last = tokens.shape[1] - 1
    d_head = hf.config.n_embd // hf.config.n_head
    z = cache[f"blocks.{layer}.attn.hook_z"][0, last, head]
    w_o = hf.transformer.h[layer].attn.c_proj.weight[head * d_head:(head + 1) * d_head]  # Conv1D: [d_head, d_model]
    contribution = [sum(float(z[d]) * float(w_o[d, k]) for d in range(d_head)) for k in range(hf.config.n_embd)]
    mean = sum(contribution) / len(contribution)
    residual = cache[f"blocks.{hf.config.n_layer - 1}.hook_resid_post"][0, last]
    std = math.sqrt(float(residual.var(unbiased=False)) + hf.config.layer_norm_epsilon)
    norm, unembed = hf.transformer.ln_f.weight, hf.lm_head.weight
    return sum((c - mean) / std * float(norm[k]) * float(unembed[io, k] - unembed[s, k])
               for k, c in enumerate(contribution))


@pytest.mark.parametrize("family, hand", [("llama", hand_dla_llama), ("gpt2", hand_dla_gpt2)])
def test_one_heads_dla_and_attention_match_a_hand_computation(family, hand, request):
    model = request.getfixturevalue(family)
    item = ioi.locate(model, ioi.make_prompt(1, ioi.templates()[1], "BABA", "C", "D", "E", "park", "ball"))
    with torch.no_grad():
        clean = name_mover.clean_pass(model, [item, item], [(5, 6), (5, 6)])
        _, cache = model.run_with_cache(hs.tokenize(model, item.text).tokens)
    last = item.length - 1
    for layer, head in ((0, 1), (1, 3)):
        with torch.no_grad():
            expected = hand(model, item.text, layer, head, item.io_token, item.s_token)
        assert float(clean["attribution"][0, layer, head]) == pytest.approx(expected, rel=1e-4, abs=1e-5)
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0, head, last]
        assert float(clean["attention_io"][0, layer, head]) == pytest.approx(float(pattern[item.io_position]))
        assert float(clean["attention_s2"][0, layer, head]) == pytest.approx(float(pattern[item.s2_position]))


def test_exact_s_inhibition_patching_matches_patching_by_hand(llama):
    items = hs.get_detector("name_mover", **SMALL).items(llama)
    receivers = [(1, 0), (1, 2)]
    inhibition = name_mover.s_inhibition_pass(llama, items, name_mover.control_prompts(items), receivers, None)
    batch = hs.tokenize(llama, [i.text for i in items])
    abc = hs.tokenize(llama, [i.prompt.abc_text for i in items])
    rows, last = torch.arange(len(items)), batch.last_positions

    def metric(z_patch=None):
        seen = {}
        hooks = [("blocks.1.attn.hook_pattern", lambda p, hook: seen.__setitem__("p", p.detach().clone()))]
        if z_patch is not None:
            hooks.append(("blocks.0.attn.hook_z", z_patch))
        with torch.no_grad(), llama.hooks(fwd_hooks=hooks):
            llama(batch.tokens, attention_mask=batch.attention_mask)
        total = 0
        for _, head in receivers:
            row = seen["p"][rows, head, last]
            total = total + sum(row[rows, torch.tensor([getattr(i, f"{k}_position") for i in items])] * sign
                                for k, sign in (("io", 1), ("s1", -1), ("s2", -1)))
        return total

    _, abc_cache = llama.run_with_cache(abc.tokens, attention_mask=abc.attention_mask)
    source = abc_cache["blocks.0.attn.hook_z"][rows, abc.last_positions, 2]

    def patch(z, hook):
        z = z.clone()
        z[rows, last, 2] = source
        return z

    clean = metric()
    by_hand = float(-(metric(patch) - clean).mean())
    exact = name_mover.confirm_exactly(llama, items, receivers, inhibition, clean, n_confirm=4)
    assert float(exact["values"][0, 2]) == pytest.approx(by_hand, rel=1e-4, abs=1e-6)
    assert torch.isnan(inhibition["effect"][:, 1]).all() and torch.isfinite(inhibition["effect"][:, 0]).all()
    assert active_hooks(llama) == 0


def test_score_gives_every_extra_and_three_roles_and_leaks_no_hook(llama):
    detector = hs.get_detector("name_mover", **SMALL)
    scores = detector.score(llama, progress=False)
    assert scores.values.shape == (2, 4) and scores.values.isfinite().all()
    for key in ("attention_io", "attention_s1", "attention_s2", "unrelated", "s_inhibition", "s_inhibition_control"):
        assert scores.extras[key].shape == (2, 4), key
    assert set(scores.metadata) >= {"receivers", "logit_diff", "accuracy", "name_movers", "s_inhibition_heads"}
    roles = detector.significance(llama, scores)
    assert [s.role for s in roles] == ["name_mover", "negative_name_mover", "s_inhibition"]
    assert roles[0].floor == pytest.approx(float(scores.extras["unrelated"].abs().max()))
    assert torch.equal(scores.values, detector.score(llama, progress=False).values)  # same seed, same scores
    task = detector.validation_task(llama)
    assert task.ablation_hurts_when == "decreases" and len(task.data) == 4
    assert active_hooks(llama) == 0


def test_the_name_mover_statistic_needs_both_the_dla_and_the_attention_test():
    """A head with a huge DLA t but no attention to IO beyond S1 is not a name mover."""
    values = torch.tensor([[2.0, 2.0], [-2.0, 0.0]])
    extras = {"standard_error": torch.full((2, 2), 0.1), "attention_io_excess": torch.tensor([[0.5, 0.0], [0.5, 0.0]]),
              "attention_excess_se": torch.full((2, 2), 0.05), "unrelated": torch.full((2, 2), 0.1),
              "s_inhibition": torch.zeros(2, 2), "s_inhibition_se": torch.ones(2, 2),
              "s_inhibition_control": torch.zeros(2, 2)}
    scores = hs.HeadScores(values, "name_mover", "toy", extras=extras, metadata={"n_items": 30})
    movers, negative, _ = hs.get_detector("name_mover").significance(None, scores)
    assert [str(h) for h in movers.heads] == ["L0H0"] and [str(h) for h in negative.heads] == ["L1H0"]


# --- bad input -------------------------------------------------------------------------------


def test_too_few_single_token_names_is_one_clear_error(llama):
    with pytest.raises(hs.InputError, match="at least 5 names that are one token"):
        hs.detect(llama, "name_mover", progress=False)  # the shipped names are many tokens for a byte tokenizer
    assert active_hooks(llama) == 0


def test_a_model_without_a_tokenizer_is_refused():
    with pytest.raises(hs.InputError, match="needs the model's tokenizer"):
        hs.detect(tiny_model(), "name_mover", progress=False)


@pytest.mark.parametrize("call, message", [
    (lambda: ioi.ioi_prompts([0], ["A", "B"], 4), "at least 3 different"),
    (lambda: ioi.ioi_prompts([], LETTERS, 4), "at least one template"),
    (lambda: ioi.ioi_prompts([99], LETTERS, 4), "template 99 does not exist"),
    (lambda: ioi.check_template("{n1} and {n2}: {s2} to"), "starts with a slot"),
    (lambda: ioi.check_template("When {n1} met {s2}, to"), "must hold"),
    (lambda: ioi.make_prompt(0, ioi.templates()[0], "AABB", "A", "B", "C", "park", "ball"), "order must be"),
    (lambda: ioi.split_templates(1, 0.5), "at least 2"),
])
def test_bad_task_input_says_what_is_wrong(call, message):
    with pytest.raises(hs.InputError, match=message):
        call()


def test_bad_settings_are_refused_before_any_work():
    with pytest.raises(hs.SettingError, match="held_out_share"):
        hs.get_detector("name_mover", held_out_share=1.0)
    with pytest.raises(hs.SettingError, match="n_prompts"):
        hs.get_detector("name_mover", n_prompts=1)
