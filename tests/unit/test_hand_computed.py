"""Hand-computed checks of the weight-based scores on tiny GQA models (issue 18, item 6).

Each score is recomputed here from the raw Hugging Face parameters (``embed_tokens``, the
norms' weights, ``v_proj``, ``o_proj``, ``gate/up/down_proj``, ``lm_head``) with einsum and an
RMSNorm written out, never through headscope's helpers, and compared with what the library
returns. The norms' weights are randomised first (they start at 1, or 0 under Gemma's ``1 + w``),
so a norm the library skipped or applied twice would show. Two families: Llama (2 KV heads for 4
query heads, plain RMSNorm) and Gemma 2 (1 KV head, ``1 + w`` norms, a norm after attention and
after the MLP, embeddings scaled by sqrt(d_model)).

* Induction copying (``extras["copying"]``, ``extras["copying_top1"]``): at each query ``i`` of
  the later repeats, ``o = v_{i-n+1} W_O^h`` with ``v = RMSNorm_ln1(resid_pre) W_V^{kv(h)}`` (the
  residual stream is read from the run, the rest by hand), through the post-attention norm's
  weights where there is one, then the final norm's weights and ``W_U``; over the candidates
  (the block's tokens, or the vocabulary) the ReLU of the mean-subtracted logits, the share ``s``
  on the source token, ``2 s - 1``, averaged over positions and sequences; top-1 likewise.
* Successor effective OV: ``e(t) = s E[t] + MLP0(RMSNorm_ln2(s E[t]))`` (through the post-MLP
  norm where there is one), ``logits = RMSNorm_ln1^l(e) W_V W_O^h (w_post) diag(w_final)
  W_U[:, T]``, success when the successor has the top logit among the task's tokens; the score is
  the share of successful pairs pooled over tasks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import pytest
import torch
import torch.nn.functional as F
from einops import einsum

import headscope as hs
from headscope.detectors.attention_templates import make_task
from headscope.detectors.induction import InductionConfig
from headscope.detectors.successor import (
    SuccessorConfig,
    effective_embeddings,
    head_ov_logits,
    task_unembed,
)
from headscope.studies.successor import ov_scores
from headscope.tasks.succession import succession_tasks
from tests.families import tiny_family_model


@dataclass(frozen=True)
class Family:
    """Where a family keeps its norms, and how it applies them."""

    architecture: str
    ln2: str  # the norm before the MLP
    ln1_post: Optional[str]  # a norm between attention and the residual
    ln2_post: Optional[str]  # a norm between the MLP and the residual
    offset: float  # RMSNorm multiplies by (offset + w)
    embedding_scale: Any  # lambda d_model: factor on W_E rows
    act: Any  # the gate's activation


FAMILIES = {
    "llama": Family("LlamaForCausalLM", "post_attention_layernorm", None, None, 0.0, lambda d: 1.0, F.silu),
    "gemma2": Family("Gemma2ForCausalLM", "pre_feedforward_layernorm", "post_attention_layernorm",
                     "post_feedforward_layernorm", 1.0, math.sqrt, lambda x: F.gelu(x, approximate="tanh")),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_model(request):
    """A tiny model of the family (byte-level tokenizer, so succession tasks exist) with random
    norm weights, its family, and its raw weights under their Hugging Face names."""
    family = FAMILIES[request.param]
    model = tiny_family_model(family.architecture, seed=1, with_tokenizer=True)
    hf = model.original_model
    weights = {name.replace("._original_component", ""): p for name, p in hf.named_parameters()}
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in weights.items():
            if "norm" in name:
                parameter.copy_(1.0 - family.offset + 0.5 * torch.randn(parameter.shape, generator=generator))
    if "lm_head.weight" not in weights:
        assert hf.config.tie_word_embeddings
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    return model, family, {name: p.detach().float() for name, p in weights.items()}, hf.config


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps) * (offset + w)`` over ``d_model``."""
    return x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * (offset + weight)


def head_outputs(values: torch.Tensor, weights: dict, config: Any, layer: int) -> torch.Tensor:
    """``v^{kv(h)} W_O^h`` for every query head ``h``: ``[..., n_kv_heads, d_head] -> [..., n_heads, d_model]``."""
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    d_head = values.shape[-1]
    w_o = weights[f"model.layers.{layer}.self_attn.o_proj.weight"].view(config.hidden_size, n_heads, d_head)
    per_head = values[..., torch.arange(n_heads) // (n_heads // n_kv), :]  # each query head reads its KV group
    return einsum(per_head, w_o, "... n_heads d_head, d_model n_heads d_head -> ... n_heads d_model")


def final_unembed(weights: dict, family: Family, ids: Optional[list[int]] = None) -> torch.Tensor:
    """``diag(offset + w_final) W_U`` as ``[d_model, tokens]``."""
    unembed = weights["lm_head.weight"] if ids is None else weights["lm_head.weight"][ids]
    return (family.offset + weights["model.norm.weight"])[:, None] * unembed.T


# --- induction: OV copying --------------------------------------------------------------------------

def copying_by_hand(model, family, weights, config, settings, vocabulary):
    task = make_task(model, settings)
    tokens, n, start = task.tokens, task.block_len, task.offset
    queries = torch.nonzero(task.in_later_repeats()).flatten()
    sources = queries - n + 1
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(config.num_hidden_layers)]
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names)
    eps, d_head = config.rms_norm_eps, config.hidden_size // config.num_attention_heads
    d_head = getattr(config, "head_dim", None) or d_head
    copying, top1 = [], []
    for layer, name in enumerate(names):
        resid = cache[name].float()[:, sources]  # [batch, P, d_model]
        x = rms_norm(resid, weights[f"model.layers.{layer}.input_layernorm.weight"], eps, family.offset)
        w_v = weights[f"model.layers.{layer}.self_attn.v_proj.weight"].view(config.num_key_value_heads, d_head, -1)
        values = einsum(x, w_v, "batch P d_model, n_kv d_head d_model -> batch P n_kv d_head")
        outputs = head_outputs(values, weights, config, layer)  # [batch, P, n_heads, d_model]
        if family.ln1_post:
            outputs = outputs * (family.offset + weights[f"model.layers.{layer}.{family.ln1_post}.weight"])
        targets = tokens[:, sources]  # [batch, P]
        if vocabulary == "sequence":
            block = tokens[:, start:start + n]  # [batch, n]: the candidates, each row's own tokens
            unembed = final_unembed(weights, family)[:, block].permute(1, 0, 2)  # [batch, d_model, n]
            logits = einsum(outputs, unembed, "batch P n_heads d_model, batch d_model n -> batch P n_heads n")
            targets = (block[:, None, :] == targets[:, :, None]).float().argmax(dim=-1)  # index within the block
        else:
            logits = einsum(outputs, final_unembed(weights, family), "batch P n_heads d_model, d_model v -> batch P n_heads v")
        gains = torch.relu(logits - logits.mean(dim=-1, keepdim=True))
        target = targets[:, :, None, None].expand(-1, -1, config.num_attention_heads, 1)
        share = gains.gather(-1, target)[..., 0] / gains.sum(dim=-1)
        copying.append((2 * share - 1).mean(dim=(0, 1)))
        top1.append((logits.argmax(dim=-1) == target[..., 0]).float().mean(dim=(0, 1)))
    return torch.stack(copying), torch.stack(top1)


@pytest.mark.parametrize("vocabulary", ["sequence", "full"])
def test_induction_copying_equals_the_hand_computation(family_model, vocabulary):
    model, family, weights, config = family_model
    settings = dict(n_sequences=3, block_len=8, n_repeats=3, copying_vocabulary=vocabulary)
    scores = hs.detect(model, "induction", progress=False, **settings)
    copying, top1 = copying_by_hand(model, family, weights, config, InductionConfig(**settings), vocabulary)
    torch.testing.assert_close(scores.extras["copying"], copying, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores.extras["copying_top1"], top1, atol=1e-6, rtol=0)
    assert copying.std() > 1e-3  # the heads differ: the comparison has something to compare


# --- successor: effective OV ------------------------------------------------------------------------

def effective_embedding_by_hand(weights, family, config, ids, embedding):
    raw = weights["model.embed_tokens.weight"][ids] * family.embedding_scale(config.hidden_size)
    if embedding == "raw":
        return raw
    eps = config.rms_norm_eps
    hidden = rms_norm(raw, weights[f"model.layers.0.{family.ln2}.weight"], eps, family.offset)
    gate = einsum(hidden, weights["model.layers.0.mlp.gate_proj.weight"], "n d_model, d_mlp d_model -> n d_mlp")
    up = einsum(hidden, weights["model.layers.0.mlp.up_proj.weight"], "n d_model, d_mlp d_model -> n d_mlp")
    mlp = einsum(family.act(gate) * up, weights["model.layers.0.mlp.down_proj.weight"], "n d_mlp, d_model d_mlp -> n d_model")
    if family.ln2_post:
        mlp = rms_norm(mlp, weights[f"model.layers.0.{family.ln2_post}.weight"], eps, family.offset)
    return mlp if embedding == "mlp0" else raw + mlp


def ov_logits_by_hand(weights, family, config, layer, embedded, ids) -> torch.Tensor:
    """``[n_heads, n, n_out]``: each token's effective embedding through head ``h``'s OV circuit to the task tokens."""
    d_head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    x = rms_norm(embedded, weights[f"model.layers.{layer}.input_layernorm.weight"], config.rms_norm_eps, family.offset)
    w_v = weights[f"model.layers.{layer}.self_attn.v_proj.weight"].view(config.num_key_value_heads, d_head, -1)
    values = einsum(x, w_v, "n d_model, n_kv d_head d_model -> n n_kv d_head")
    outputs = head_outputs(values, weights, config, layer)  # [n, n_heads, d_model]
    if family.ln1_post:
        outputs = outputs * (family.offset + weights[f"model.layers.{layer}.{family.ln1_post}.weight"])
    return einsum(outputs, final_unembed(weights, family, ids), "n n_heads d_model, d_model n_out -> n_heads n n_out")


@pytest.mark.parametrize("embedding", ["mlp0_residual", "mlp0", "raw"])
def test_successor_effective_ov_equals_the_hand_computation(family_model, embedding):
    model, family, weights, config = family_model
    settings = SuccessorConfig(embedding=embedding)
    tasks = succession_tasks(model, settings.tasks, settings.forms)
    assert len(tasks) >= 2
    hits = []
    for task in tasks:
        items = sorted(task.token_ids)  # the library orders a task's tokens by item index
        ids = [task.token_ids[item] for item in items]
        embedded = effective_embedding_by_hand(weights, family, config, ids, embedding)
        torch.testing.assert_close(effective_embeddings(model, ids, embedding), embedded, atol=1e-5, rtol=1e-5)
        sources = torch.tensor([items.index(a) for a, _ in task.pairs])
        targets = torch.tensor([items.index(b) for _, b in task.pairs])
        per_layer = []
        for layer in range(config.num_hidden_layers):
            logits = ov_logits_by_hand(weights, family, config, layer, embedded, ids)
            library = head_ov_logits(model, layer, list(range(config.num_attention_heads)),
                                     effective_embeddings(model, ids, embedding), task_unembed(model, ids))
            torch.testing.assert_close(library, logits, atol=1e-5, rtol=1e-5)
            per_layer.append(logits[:, sources].argmax(dim=-1).T == targets[:, None])  # [pairs, n_heads]
        hits.append(torch.stack(per_layer, dim=1))  # [pairs, n_layers, n_heads]
    pooled = torch.cat(hits).float().mean(dim=0)
    assert torch.equal(ov_scores(model, settings), pooled)
    if embedding == SuccessorConfig.embedding:  # the detector's own score (also runs the contextual prompts)
        assert torch.equal(hs.detect(model, "successor", progress=False).values, pooled)
