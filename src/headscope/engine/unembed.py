"""The direct path from a head's output to the logits, through the final norm's weights.

A head's contribution ``c`` to the final residual reaches the logits as
``W_U^T (w_norm * norm(c))``. The norm's division by the residual's RMS is a positive number per
position shared by every component, so scores that are invariant to a positive scale (argmax,
shares of a ReLU'd distribution) can skip it. LayerNorm models also subtract the mean over
``d_model``, which is linear and is applied here. What differs between families (the norm's
``1 + w`` offset, a post-attention norm between a head and the residual, soft-capping) comes from
:mod:`headscope.engine.architecture`: a head's contribution through a post-attention norm is
``w_post ⊙ (z W_O) / scale_post`` with the run's own scale (exact for the sum of the heads).
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, Sequence, runtime_checkable

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from headscope.engine.architecture import architecture, final_norm_weight, head_hook, norm_weight, softcap
from headscope.engine.devices import readable_weights
from headscope.engine.heads import hook_name, model_shape

FINAL_SCALE = "ln_final.hook_scale"  # the final norm's per-position scale (cache it for attributions)


@runtime_checkable
class Cache(Protocol):
    """Activations by hook name: the dict of ``run_with_cache(..., return_cache_object=False)`` or a
    TransformerLens ``ActivationCache``."""

    def __getitem__(self, name: str) -> Tensor: ...

__all__ = ["Cache", "FINAL_SCALE", "final_norm_weight", "direct_unembed", "center_for_norm", "direct_logits",
           "input_embedding", "unembedding", "unembedding_bias", "head_output_weight", "head_output_weights",
           "head_output_hooks", "post_attention_weights", "last_position_head_outputs",
           "final_position_attributions", "head_contributions", "attention_bias_contribution", "logits_from_residual"]


def direct_unembed(model: Any) -> Float[Tensor, "d_model d_vocab"]:
    """``diag(w_norm) W_U``: maps a (normalised) residual direction to logits (on the unembedding's
    device)."""
    unembed = unembedding(model)
    return final_norm_weight(model).float().to(unembed.device)[:, None] * unembed


def unembedding(model: Any) -> Float[Tensor, "d_model d_vocab"]:
    """``W_U`` as float32, read on the unembedding's execution device (also when it is offloaded)."""
    with readable_weights(model.unembed):
        return model.W_U.detach().float()


def input_embedding(model: Any) -> Float[Tensor, "d_vocab d_model"]:
    """``W_E`` as float32 (unscaled: see ``architecture.embedding_scale``), read on the input
    embedding's execution device (also when it is offloaded)."""
    with readable_weights(model.embed):
        return model.W_E.detach().float()


def unembedding_bias(model: Any) -> Optional[Float[Tensor, " d_vocab"]]:
    """``b_U`` as float32 (None without one), read like :func:`unembedding`."""
    with readable_weights(model.unembed):
        bias = getattr(model, "b_U", None)
        return None if bias is None else bias.detach().float()


def center_for_norm(model: Any, contribution: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
    """The linear part of the final norm before its weights: LayerNorm's mean removal (RMSNorm: none)."""
    contribution = contribution.float()
    if architecture(model).final_norm == "layernorm":
        contribution = contribution - contribution.mean(dim=-1, keepdim=True)
    return contribution


def direct_logits(
    model: Any, contribution: Float[Tensor, "... d_model"], unembed: Tensor | None = None
) -> Float[Tensor, "... d_vocab"]:
    """Logits written by ``contribution`` along the direct path (up to the per-position RMS scale)."""
    return center_for_norm(model, contribution) @ (unembed if unembed is not None else direct_unembed(model))


def head_output_weights(model: Any) -> list[Float[Tensor, "n_heads d_head d_model"]]:
    """Every layer's ``W_O`` as float tensors, fetched once per run (each on its layer's device)."""
    return [head_output_weight(model, layer) for layer in range(len(model.blocks))]


def head_output_weight(model: Any, layer: int) -> Float[Tensor, "n_heads d_head d_model"]:
    """``W_O`` of ``layer`` as float32, read on the layer's execution device (also when offloaded)."""
    attn = model.blocks[layer].attn
    with readable_weights(attn):
        return attn.W_O.detach().float()


def post_attention_weights(model: Any) -> list[Optional[Float[Tensor, " d_model"]]]:
    """Every layer's post-attention norm weight (offset included), or None where the model adds
    attention's output to the residual directly."""
    if not architecture(model).post_attention_norm:
        return [None] * model_shape(model).n_layers
    return [norm_weight(model, block.ln1_post).float() for block in model.blocks]


def head_output_hooks(model: Any, layer: int) -> list[str]:
    """The hooks a head's direct contribution in ``layer`` needs: ``hook_z`` and, where the
    model has one, the post-attention norm's scale."""
    scale = architecture(model).post_attention_scale_hook(layer)
    return [hook_name(layer, "z")] + ([scale] if scale else [])


def last_position_z(model: Any, cache: Cache, last: Tensor,
                    layers: Sequence[int]) -> Float[Tensor, "batch n_layers n_heads d_head"]:
    """Every head's ``hook_z`` of ``layers`` at each row's ``last`` position (cache the names
    ``hook_name(layer, "z")``), as float32, read through each model's per-head view."""
    views = [head_hook(model, layer, "z") for layer in layers]
    first = cache[views[0][0]]
    rows = torch.arange(first.shape[0], device=first.device)
    last = last.to(first.device)

    def at_last(z: Tensor, view: Any) -> Tensor:  # each layer's z on its own device (a split model)
        return view(z)[rows.to(z.device), last.to(z.device)].float().to(first.device)

    return torch.stack([at_last(cache[name], view) for name, view in views], dim=1)


def last_position_head_outputs(
    model: Any,
    z: Float[Tensor, "batch pos n_heads d_head"],
    last: Tensor,
    w_o: Float[Tensor, "n_heads d_head d_model"],
    post_weight: Optional[Float[Tensor, " d_model"]] = None,
    post_scale: Optional[Float[Tensor, "batch pos 1"]] = None,
) -> Float[Tensor, "batch n_heads d_model"]:
    """Each head's contribution to the residual at each row's ``last`` position, centred for the
    final norm: ``z W_O^h``, or ``w_post ⊙ z W_O^h / scale_post`` through a post-attention norm
    (``post_weight`` and the run's ``post_scale``)."""
    rows = torch.arange(z.shape[0], device=z.device)
    last = last.to(z.device)
    outputs = einops.einsum(z[rows, last].float(), w_o.to(z.device),
                            "batch n_heads d_head, n_heads d_head d_model -> batch n_heads d_model")
    if post_weight is not None:
        if post_scale is None:
            raise ValueError("A model with a post-attention norm needs its scale (cache head_output_hooks).")
        scale = post_scale[rows.to(post_scale.device), last.to(post_scale.device)].float().to(z.device)
        outputs = outputs * post_weight.to(z.device) / scale[:, :, None]
    return center_for_norm(model, outputs)


def final_position_attributions(
    model: Any,
    cache: Cache,
    last: Tensor,
    directions: Float[Tensor, "batch d_model"],
    scale: Float[Tensor, " batch"],
    w_o: list[Tensor],
) -> Float[Tensor, "batch n_layers n_heads"]:
    """Direct logit attribution of every head at each row's ``last`` position: its contribution
    to the residual (``last_position_head_outputs``) divided by the final norm's ``scale`` and
    projected on the row's direction (``diag(w_norm) (W_U[:, good] - ...)``). Needs every layer's
    :func:`head_output_hooks` in ``cache``. Attributions are in logits before any soft-capping."""
    per_layer = []
    post_weights = post_attention_weights(model)
    for layer, weights in enumerate(w_o):
        names = head_output_hooks(model, layer)
        post_scale = cache[names[1]] if len(names) > 1 else None
        outputs = last_position_head_outputs(model, cache[names[0]], last, weights, post_weights[layer], post_scale)
        here = directions.to(outputs.device)  # each layer on its own device (a split model)
        per_layer.append((einops.einsum(outputs, here, "batch n_heads d_model, batch d_model -> batch n_heads")
                          / scale.to(outputs.device)[:, None]).to(directions.device))
    return torch.stack(per_layer, dim=1)


def head_contributions(model: Any, cache: Cache, layer: int) -> Float[Tensor, "batch pos n_heads d_model"]:
    """What each head of ``layer`` adds to the residual stream at every position: ``z W_O^h``, or,
    through a post-attention norm, ``w_post ⊙ z W_O^h / scale_post`` with the run's own scale
    (:func:`head_output_hooks` must be in ``cache``). With :func:`attention_bias_contribution` the
    heads sum to the layer's ``hook_attn_out``."""
    names = head_output_hooks(model, layer)
    z = cache[names[0]]
    outputs = einops.einsum(z.float(), head_output_weight(model, layer).to(z.device),
                            "batch pos n_heads d_head, n_heads d_head d_model -> batch pos n_heads d_model")
    return _through_post_norm(model, layer, outputs, cache, names, head_axis=True)


def attention_bias_contribution(model: Any, cache: Cache, layer: int) -> Float[Tensor, "batch pos d_model"]:
    """What the attention output bias of ``layer`` adds to the residual (zeros without one)."""
    names = head_output_hooks(model, layer)
    z = cache[names[0]]
    with readable_weights(model.blocks[layer].attn):
        bias = getattr(model.blocks[layer].attn, "b_O", None)
        bias = None if bias is None else bias.detach().float().to(z.device)
    outputs = torch.zeros(*z.shape[:2], model.cfg.d_model, device=z.device)
    if bias is not None:
        outputs = outputs + bias
    return _through_post_norm(model, layer, outputs, cache, names, head_axis=False)


def _through_post_norm(model: Any, layer: int, outputs: Tensor, cache: Cache, names: list[str], head_axis: bool) -> Tensor:
    weight = post_attention_weights(model)[layer]
    if weight is None:
        return outputs
    scale = cache[names[1]].float().to(outputs.device)  # [batch, pos, 1]
    return outputs * weight.to(outputs.device) / (scale[:, :, None] if head_axis else scale)


def logits_from_residual(
    model: Any, residual: Float[Tensor, "... d_model"], scale: Float[Tensor, "... 1"]
) -> Float[Tensor, "... d_vocab"]:
    """The model's logits from a final residual and the final norm's scale (the run's own):
    mean removal for LayerNorm, division by ``scale``, the norm's weight (offset included) and
    bias, the unembedding with its bias, and soft-capping where the model caps."""
    device = residual.device
    weight = final_norm_weight(model).float().to(device)
    normalised = center_for_norm(model, residual) / scale.float().to(device) * weight
    with readable_weights(model.ln_final):
        norm_bias = getattr(getattr(model.ln_final, "original_component", model.ln_final), "bias", None)
        norm_bias = None if norm_bias is None else norm_bias.detach().float().to(device)
    if norm_bias is not None:
        normalised = normalised + norm_bias
    logits = normalised @ unembedding(model).to(device)
    unembed_bias = unembedding_bias(model)
    if unembed_bias is not None:
        logits = logits + unembed_bias.to(device)
    return softcap(model, logits)
