"""The copy-suppression detector on tiny models: its circuits against the models' own projections
and against a computation by hand, a head set by hand to suppress copies, the validation metric on
hand-made logits, bad input, and hooks."""

from __future__ import annotations

import pytest
import torch

import headscope as hs
from headscope.detectors.copy_suppression import CopySuppressionConfig, EarlierTokenLogit, circuit_scores
from headscope.detectors.successor import effective_embeddings, head_ov_logits, task_unembed
from headscope.engine.architecture import architecture, as_pos_head
from headscope.engine.circuits import head_keys, head_queries, ov_logits
from headscope.engine.heads import model_shape
from headscope.engine.tokens import TokenBatch
from tests.conftest import active_hooks
from tests.families import FAMILIES, tiny_family_model

SMALL = dict(tokens="all", n_tokens=40, text_length=24, n_sequences=2, n_validation_sequences=2)


@pytest.mark.parametrize("family", FAMILIES)
def test_queries_keys_and_ov_logits_are_the_models_own(family):
    """``head_queries`` / ``head_keys`` on a run's residual equal the query and key the model
    computes (after QK-norm, pre-RoPE, biases included); ``ov_logits`` in factored order equals the
    successor detector's unfactored path."""
    model = tiny_family_model(family)
    arch, layer = architecture(model), 1
    tokens = torch.tensor([[3, 5, 7, 9, 11, 13, 2]])
    names = [f"blocks.{layer}.hook_resid_pre", arch.query_hook(layer), arch.key_hook(layer)]
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names)
    residual = cache[names[0]][0].float()
    shape = model_shape(model)
    query = as_pos_head(cache[names[1]], arch.query_layout, shape.n_heads)[0].transpose(0, 1).float()
    key = as_pos_head(cache[names[2]], arch.key_layout, shape.n_kv_heads)[0].transpose(0, 1).float()
    torch.testing.assert_close(head_queries(model, layer, residual), query, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(head_keys(model, layer, residual), key, atol=1e-4, rtol=1e-4)
    unembed = task_unembed(model, list(range(10)))
    expected = head_ov_logits(model, layer, list(range(shape.n_heads)), residual, unembed)
    torch.testing.assert_close(ov_logits(model, layer, residual, unembed), expected, atol=1e-4, rtol=1e-4)


def rms_norm(x, weight, eps):
    return x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight


def test_shares_are_the_hand_computed_ranks():
    """On a tiny Llama (4 query heads on 2 KV heads, random norm weights), the OV, copying and QK
    shares recomputed from the raw Hugging Face weights, with a loop over tokens counting ranks."""
    model = tiny_family_model("LlamaForCausalLM", seed=2)
    hf = model.original_model
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in hf.named_parameters():
            if "norm" in name:
                parameter.copy_(1.0 + 0.5 * torch.randn(parameter.shape, generator=generator))
    config = CopySuppressionConfig(tokens="all", n_tokens=30, bottom_k=3, top_k=2)
    ids = list(range(0, 60, 2))
    got = circuit_scores(model, ids, config)
    weights = {n.replace("._original_component", ""): p.detach().float() for n, p in hf.named_parameters()}
    cfg, layer = hf.config, 1
    eps, d_head, group = cfg.rms_norm_eps, cfg.hidden_size // cfg.num_attention_heads, 2
    embedded = effective_embeddings(model, ids, "mlp0_residual")  # by hand in test_hand_computed
    unembed = (weights["model.norm.weight"][:, None] * weights["lm_head.weight"][ids].T)  # [d_model, n]
    prefix = f"model.layers.{layer}."
    x = rms_norm(embedded, weights[prefix + "input_layernorm.weight"], eps)
    x_query = rms_norm(unembed.T, weights[prefix + "input_layernorm.weight"], eps)
    w_q = weights[prefix + "self_attn.q_proj.weight"].view(cfg.num_attention_heads, d_head, -1)
    w_k = weights[prefix + "self_attn.k_proj.weight"].view(cfg.num_key_value_heads, d_head, -1)
    w_v = weights[prefix + "self_attn.v_proj.weight"].view(cfg.num_key_value_heads, d_head, -1)
    w_o = weights[prefix + "self_attn.o_proj.weight"].view(cfg.hidden_size, cfg.num_attention_heads, d_head)
    n = len(ids)
    for head in range(cfg.num_attention_heads):
        kv = head // group
        logits = (x @ w_v[kv].T) @ w_o[:, head, :].T @ unembed  # [source, predicted]
        scores = (x_query @ w_q[head].T) @ (x @ w_k[kv].T).T  # [predicted, source]
        ov = copying = qk = 0
        for s in range(n):
            others = [u for u in range(n) if u != s]
            ov += sum(float(logits[s, u]) <= float(logits[s, s]) for u in others) < 3
            copying += sum(float(logits[s, u]) >= float(logits[s, s]) for u in others) < 2
            qk += sum(float(scores[s, u]) >= float(scores[s, s]) for u in others) < 2
        assert float(got["ov"][layer, head]) == pytest.approx(ov / n)
        assert float(got["copying"][layer, head]) == pytest.approx(copying / n)
        assert float(got["qk"][layer, head]) == pytest.approx(qk / n)


def planted_model():
    """A 2-layer Llama whose embeddings are orthogonal (d_model = vocabulary = 32, tied), layer 0's
    MLP writes nothing, and in layer 1 head 0 is a copy suppressor (W_V W_O = -I, W_Q W_K^T = I)
    and head 1 a copier (W_V W_O = +I)."""
    import transformers
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    config = transformers.LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, head_dim=32,
                                      max_position_embeddings=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    eye = torch.eye(32)
    attn = hf.model.layers[1].self_attn
    with torch.no_grad():
        hf.model.embed_tokens.weight.copy_(3 * eye)
        hf.model.layers[0].mlp.down_proj.weight.zero_()
        attn.v_proj.weight.copy_(torch.cat([eye, eye]))
        attn.o_proj.weight.copy_(torch.cat([-eye, eye], dim=1))
        attn.q_proj.weight[:32].copy_(eye)
        attn.k_proj.weight[:32].copy_(eye)
    return build_bridge_from_module(hf, "LlamaForCausalLM", hf_config=hf.config).eval()


def test_a_head_set_by_hand_to_suppress_copies_scores_one_and_is_significant():
    model = planted_model()
    detector = hs.get_detector("copy_suppression", tokens="all", n_tokens=32, bottom_k=1, top_k=1)
    scores = detector.score(model, progress=False)
    assert float(scores.values[1, 0]) == 1.0 and float(scores.extras["qk"][1, 0]) == 1.0
    assert float(scores.extras["ov_signed_rank"][1, 0]) == pytest.approx(1.0)
    assert float(scores.values[1, 1]) == 0.0 and float(scores.extras["copying"][1, 1]) == 1.0
    assert float(scores.extras["ov_signed_rank"][1, 1]) == pytest.approx(-1.0)
    assert "context" not in scores.extras and "no tokenizer" in scores.metadata["context"]
    significance = detector.significance(model, scores)[0]
    assert significance.heads == [hs.Head(1, 0)]
    assert significance.threshold < 0.5 and significance.floor == 0.5
    assert active_hooks(model) == 0


def test_the_earlier_token_logit_by_hand():
    """Hand-made logits: per window, the mean over positions of the mean centred logit of the
    distinct earlier text tokens that are not the next token (BOS at position 0, padding)."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 8, generator=generator)
    tokens = torch.tensor([[0, 3, 4, 3, 5, 4], [0, 2, 2, 6, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    got = EarlierTokenLogit(offset=1)(logits, TokenBatch(tokens, mask))
    expected = []
    for b in range(2):
        length, per_position = int(mask[b].sum()), []
        for p in range(length - 1):
            following = int(tokens[b, p + 1])
            seen = {int(t) for t in tokens[b, 1:p + 1]} - {following}
            if seen:
                centred = logits[b, p] - logits[b, p].mean()
                per_position.append(sum(float(centred[v]) for v in seen) / len(seen))
        expected.append(sum(per_position) / len(per_position))
    torch.testing.assert_close(got, torch.tensor(expected))


def test_the_metric_rises_when_earlier_tokens_are_promoted():
    tokens = torch.tensor([[0, 3, 4, 5, 6]])
    batch = TokenBatch(tokens, torch.ones_like(tokens))
    logits = torch.zeros(1, 5, 10)
    boosted = logits.clone()
    boosted[..., 3] = 2.0
    metric = EarlierTokenLogit(offset=1)
    assert float(metric(boosted, batch)) > float(metric(logits, batch)) == 0.0


def test_scores_validation_and_significance_on_a_text_model_leave_no_hook():
    model = tiny_family_model("Qwen3ForCausalLM", with_tokenizer=True)
    detector = hs.get_detector("copy_suppression", **SMALL)
    scores = detector.score(model, progress=False)
    assert scores.values.shape == (2, 4) and set(scores.extras) == {"qk", "copying", "ov_signed_rank", "context"}
    assert scores.metadata["n_tokens"] == 40 and scores.metadata["chance_ov"] == pytest.approx(10 / 40)
    again = hs.get_detector("copy_suppression", **SMALL).score(model, progress=False)
    assert torch.equal(scores.values, again.values)
    task = detector.validation_task(model)
    assert task.ablation_hurts_when == "increases" and task.default_method == "mean"
    result = hs.validate(model, scores, k=1, n_random=2, progress=False)
    assert torch.isfinite(torch.tensor(result.difference))
    assert detector.examples(model) and len(detector.examples(model)) == 2
    assert active_hooks(model) == 0


def test_bad_input_gives_one_clear_error():
    model = tiny_family_model("LlamaForCausalLM")
    with pytest.raises(hs.InputError, match="'words' token pool reads the tokenizer"):
        hs.detect(model, "copy_suppression", progress=False)
    with pytest.raises(hs.InputError, match="need at least 51"):
        hs.detect(model, "copy_suppression", progress=False, tokens="all", n_tokens=20, bottom_k=50)
    with pytest.raises(hs.SettingError, match="bottom_k"):
        hs.get_detector("copy_suppression", bottom_k=0)
    with pytest.raises(hs.InputError, match="every position"):
        EarlierTokenLogit(1)(torch.zeros(1, 8), TokenBatch(torch.zeros(1, 3, dtype=torch.long),
                                                           torch.ones(1, 3, dtype=torch.long)))
    with pytest.raises(hs.InputError, match="tokenizer"):
        hs.get_detector("copy_suppression", **SMALL).validation_task(model)
    assert active_hooks(model) == 0


def test_the_copying_sign_picks_an_identity_ov_head_not_a_suppressor():
    """A contrast within one score: on the planted model the suppressor and the copier swap their
    places between ``values`` and ``extras['copying']``."""
    scores = hs.get_detector("copy_suppression", tokens="all", n_tokens=32, bottom_k=1, top_k=1).score(
        planted_model(), progress=False)
    copying = hs.HeadScores(scores.extras["copying"], "copying", scores.model)
    assert scores.top_heads(1) == [hs.Head(1, 0)] and copying.top_heads(1) == [hs.Head(1, 1)]
    assert float(scores.extras["copying"][1, 0]) == 0.0
