"""Everything that differs between model families, in one place.

headscope's detectors and interventions ask this adapter instead of assuming Llama. It is
measured on the model itself, once per model, by one probe forward of a few tokens (which hooks
fire, with which shapes) and read from the TransformerLens config:

=========================  ==========================================================  ==========
what                       how it is found                                             families
=========================  ==========================================================  ==========
final norm                 ``cfg.normalization_type`` (LayerNorm subtracts the mean)   all
norm offset                ``cfg.rmsnorm_uses_offset``: RMSNorm multiplies by ``1+w``  Gemma 1-3
post-attention/-MLP norm   ``blocks.L.ln1_post`` / ``ln2_post`` hooks fire             Gemma 2/3, OLMo-2
QK-norm                    ``blocks.L.attn.hook_q_normed`` fires (its layout: per      Gemma 3, Qwen3,
                           head ``[batch, n_heads, pos, d_head]`` or full width        OLMo-2
                           ``[batch, pos, n_heads*d_head]``)
embedding scale            ``hook_embed`` of a token over its row of ``W_E``           Gemma (√d_model)
logit soft-capping         ``cfg.output_logits_soft_cap`` > 0                          Gemma 2
parallel attention + MLP   ``cfg.parallel_attn_mlp``                                   GPT-NeoX, Phi
positions                  ``cfg.positional_embedding_type``                           GPT-2: absolute
=========================  ==========================================================  ==========

Where a norm sits between a head and the residual stream (the post-attention norm), a head's
contribution is linearised with the run's own norm scale held fixed: ``w ⊙ (z W_O) / scale``.
For an RMSNorm this is exact for the sum of the heads (the norm is linear once its scale is
fixed); the per-head split is the stated linearisation.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

import torch
from jaxtyping import Float
from torch import Tensor

from headscope.engine.devices import execution_device, input_device, readable_weights
from headscope.engine.heads import hook_name, model_shape, residual_hook

NormKind = Literal["layernorm", "rmsnorm", "none"]
# Where a head's query (or key) sits in the activation of the hook that scales it:
# "pos_head" [batch, pos, n_heads, d_head], "head_pos" [batch, n_heads, pos, d_head],
# "flat" [batch, pos, n_heads * d_head].
HeadLayout = Literal["pos_head", "head_pos", "flat"]

_ARCHITECTURES: "weakref.WeakKeyDictionary[Any, Architecture]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Architecture:
    """What a model family does differently, as far as per-head analyses are concerned.

    Attributes:
        family: the Hugging Face class the bridge wraps (``"native"`` for TransformerLens-native models).
        final_norm: ``"layernorm"`` (mean removed, then scaled), ``"rmsnorm"`` or ``"none"``.
        norm_offset: added to every RMSNorm weight (1.0 where the norm multiplies by ``1 + w``).
        post_attention_norm / post_mlp_norm: a norm between the sublayer's output and the residual add.
        qk_norm: queries and keys are normalised after ``hook_q`` / ``hook_k``.
        query_layout / key_layout: layout of the hooks that hold the attention-ready query / key.
        embedding_scale: the factor the model applies to ``W_E`` rows (√d_model for Gemma).
        logit_softcap: final-logit soft-capping ``cap · tanh(logits / cap)``, or None.
        parallel_attn_mlp: attention and MLP read the same residual (GPT-NeoX, Phi).
        positions: TransformerLens's ``positional_embedding_type`` ("standard" is absolute).
    """

    family: str
    final_norm: NormKind
    norm_offset: float
    post_attention_norm: bool
    post_mlp_norm: bool
    qk_norm: bool
    query_layout: HeadLayout
    key_layout: HeadLayout
    embedding_scale: float
    logit_softcap: Optional[float]
    parallel_attn_mlp: bool
    positions: str

    def query_hook(self, layer: int) -> str:
        """The hook whose per-head slices are the query that meets the keys (after any QK-norm,
        before RoPE): scaling a slice by ε makes that head's attention uniform."""
        return hook_name(layer, "q_normed" if self.qk_norm else "q")

    def key_hook(self, layer: int) -> str:
        """The hook holding the key the query meets (after any QK-norm, before RoPE)."""
        return hook_name(layer, "k_normed" if self.qk_norm else "k")

    def post_attention_scale_hook(self, layer: int) -> Optional[str]:
        """The post-attention norm's per-position scale (divisor) of ``layer``, if the model has one."""
        return f"blocks.{layer}.ln1_post.hook_scale" if self.post_attention_norm else None


def architecture(model: Any) -> Architecture:
    """The :class:`Architecture` of ``model``, measured once per model object."""
    found = _ARCHITECTURES.get(model)
    if found is None:
        found = _measure(model)
        _ARCHITECTURES[model] = found
    return found


def _measure(model: Any) -> Architecture:
    cfg = model.cfg
    fired = _probe_shapes(model)
    shape = model_shape(model)
    norm_type = str(getattr(cfg, "normalization_type", None) or "")
    softcap = float(getattr(cfg, "output_logits_soft_cap", -1.0) or -1.0)
    original = getattr(model, "original_model", None)
    return Architecture(
        family=type(original).__name__ if original is not None else "native",
        final_norm="layernorm" if norm_type.startswith("LN") else "rmsnorm" if norm_type.startswith("RMS") else "none",
        norm_offset=1.0 if getattr(cfg, "rmsnorm_uses_offset", False) else 0.0,
        post_attention_norm="blocks.0.ln1_post.hook_scale" in fired,
        post_mlp_norm="blocks.0.ln2_post.hook_scale" in fired,
        qk_norm=hook_name(0, "q_normed") in fired,
        query_layout=_layout(fired.get(hook_name(0, "q_normed"), None), shape.n_heads),
        key_layout=_layout(fired.get(hook_name(0, "k_normed"), None), shape.n_kv_heads),
        embedding_scale=_embedding_scale(model),
        logit_softcap=softcap if softcap > 0 else None,
        parallel_attn_mlp=bool(getattr(cfg, "parallel_attn_mlp", False)),
        positions=str(getattr(cfg, "positional_embedding_type", "standard")),
    )


PROBE_HOOKS = ("blocks.0.ln1_post.hook_scale", "blocks.0.ln2_post.hook_scale", "blocks.0.attn.hook_q_normed",
               "blocks.0.attn.hook_k_normed")


def _probe_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    """Shapes of the family-specific hooks that fire in one forward of ``n_heads + 1`` tokens (a
    length that cannot be mistaken for a head count)."""
    length = model_shape(model).n_heads + 1
    tokens = torch.arange(1, length + 1, device=input_device(model))[None] % model_shape(model).d_vocab
    shapes: dict[str, tuple[int, ...]] = {}

    def record(activation: Tensor, hook: Any, name: str) -> None:
        shapes[name] = tuple(activation.shape)

    hooks = [(name, lambda a, hook, name=name: record(a, hook, name)) for name in PROBE_HOOKS if name in model.hook_dict]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        model(tokens, return_type="logits")
    return shapes


def _layout(shape: Optional[tuple[int, ...]], n_heads: int) -> HeadLayout:
    if shape is None or (len(shape) == 4 and shape[2] == n_heads):
        return "pos_head"
    if len(shape) == 4 and shape[1] == n_heads:
        return "head_pos"
    if len(shape) == 3:
        return "flat"
    raise ValueError(f"Unrecognised query/key layout {shape} for {n_heads} heads.")


def _embedding_scale(model: Any) -> float:
    """``hook_embed`` of one token over its row of ``W_E`` (the row of largest norm, so never a
    zeroed padding row): the factor the model applies to embeddings."""
    with readable_weights(model.embed):
        embedding = model.W_E.detach().float()
    token = int(embedding.norm(dim=-1).argmax())
    seen: list[Tensor] = []
    with torch.no_grad(), model.hooks(fwd_hooks=[("hook_embed", lambda a, hook: seen.append(a.detach()))]):
        model(torch.tensor([[token]], device=input_device(model)), return_type="logits")
    return float(seen[0][0, 0].float().norm().cpu() / embedding[token].norm().cpu())


# ----- per-head views of query/key hooks -------------------------------------------------------
def as_pos_head(activation: Tensor, layout: HeadLayout, n_heads: int) -> Float[Tensor, "batch pos n_heads d_head"]:
    """A ``[batch, pos, n_heads, d_head]`` view of a query/key activation (shares its storage)."""
    if layout == "head_pos":
        return activation.transpose(1, 2)
    if layout == "flat":
        return activation.unflatten(-1, (n_heads, activation.shape[-1] // n_heads))
    return activation


# ----- norms on the direct path ---------------------------------------------------------------
def norm_weight(model: Any, norm: Any) -> Float[Tensor, " d_model"]:
    """The elementwise weight a norm module applies, offset included (``1 + w`` for Gemma); ones
    for a norm without weights. On the norm's execution device."""
    offset = architecture(model).norm_offset
    with readable_weights(norm):
        weight = getattr(norm, "weight", None)
        if weight is None and getattr(norm, "original_component", None) is not None:
            weight = getattr(norm.original_component, "weight", None)
        if weight is None:
            return torch.ones(model.cfg.d_model, device=execution_device(norm) or input_device(model))
        return weight.detach() + offset  # a new tensor: still real once the weights go back offloaded


def final_norm_weight(model: Any) -> Float[Tensor, " d_model"]:
    """The final norm's elementwise weight as the model applies it (offset included)."""
    return norm_weight(model, model.ln_final)


def softcap(model: Any, logits: Float[Tensor, "... d_vocab"]) -> Float[Tensor, "... d_vocab"]:
    """The model's final-logit soft-capping (identity where it has none)."""
    cap = architecture(model).logit_softcap
    return logits if cap is None else cap * torch.tanh(logits / cap)


def head_hook(model: Any, layer: int, kind: str) -> tuple[str, Callable[[Tensor], Tensor]]:
    """The hook to edit ``kind`` per head in ``layer``, and a function giving a
    ``[batch, pos, heads, d_head]`` view of its activation (edits to the view edit the activation).

    ``kind``: ``"q"`` (the query that meets the keys: after QK-norm where the model has one,
    before RoPE), ``"k"`` (likewise), or any per-head hook with that layout already (``"z"``,
    ``"v"``, ...).
    """
    arch, shape = architecture(model), model_shape(model)
    if kind == "q":
        name, layout, heads = arch.query_hook(layer), arch.query_layout, shape.n_heads
    elif kind == "k":
        name, layout, heads = arch.key_hook(layer), arch.key_layout, shape.n_kv_heads
    else:
        name, layout, heads = hook_name(layer, kind), "pos_head", shape.n_heads  # type: ignore[arg-type]
    return name, lambda activation: as_pos_head(activation, layout, heads)


def residual_stream_hooks(model: Any) -> list[str]:
    """The residual stream at every layer boundary, ``n_layers + 1`` hook names: index ``l`` is
    ``resid_pre`` of layer ``l`` (what layer ``l`` reads; index 0 is the embeddings), the last is the
    last layer's ``resid_post`` (the final norm's input). The same names on every family."""
    n_layers = model_shape(model).n_layers
    return [residual_hook(layer, "resid_pre") for layer in range(n_layers)] + [residual_hook(n_layers - 1, "resid_post")]
