"""A head's QK and OV circuits read from its weights, for any family (no forward pass).

Weight-based scores feed chosen residual vectors (effective embeddings, unembedding directions)
through one layer's attention norm and projections instead of running text. What differs between
families is handled here and in :mod:`headscope.engine.architecture`: biases (GPT-2), grouped
key/value heads (a query head reads KV head ``head // group_size``), QK-norm after the
projections (per head for Gemma 3 and Qwen3, over all heads at once for OLMo-2), and a
post-attention norm's weights on the OV side. Queries and keys are pre-RoPE, as the
select-and-copy QK score reads them: rotary position is left out, since the token pairs scored
here have no positions.
"""

from __future__ import annotations

from typing import Any, Optional

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from headscope.engine.architecture import architecture
from headscope.engine.devices import execution_device, readable_weights
from headscope.engine.heads import model_shape
from headscope.engine.unembed import center_for_norm, post_attention_weights

__all__ = ["apply_norm", "head_queries", "head_keys", "ov_logits"]


def apply_norm(norm: Any, x: Tensor) -> Tensor:
    """``norm(x)`` in the norm's dtype, returned as float; ``x`` itself where ``norm`` is None."""
    if norm is None:
        return x
    dtype = next(norm.parameters(), x).dtype
    return norm(x.to(dtype)).float()


def _layer_input(model: Any, layer: int, residual: Float[Tensor, "n d_model"], input_norm: bool) -> Tensor:
    """The residual vectors as the layer's attention reads them: through its input norm (``ln1``),
    on the layer's device."""
    norm = getattr(model.blocks[layer], "ln1", None) if input_norm else None
    device = execution_device(model.blocks[layer].attn) or residual.device
    return apply_norm(norm, residual.float().to(device)[None])[0].to(device)


def _qk_norm(model: Any, layer: int, which: str, projected: Float[Tensor, "heads n d_head"]) -> Tensor:
    """``projected`` through the layer's QK-norm (``q_norm`` / ``k_norm``) where the model has one:
    per head over ``d_head``, or over all heads at once where the hook is full width ("flat")."""
    arch = architecture(model)
    if not arch.qk_norm:
        return projected
    attn = model.blocks[layer].attn
    norm = getattr(getattr(attn, "original_component", attn), f"{which}_norm")
    layout = arch.query_layout if which == "q" else arch.key_layout
    if layout == "flat":
        heads, n, d_head = projected.shape
        flat = einops.rearrange(projected, "heads n d_head -> n (heads d_head)")
        normed = apply_norm(norm, flat)
        return einops.rearrange(normed, "n (heads d_head) -> heads n d_head", heads=heads)
    return apply_norm(norm, projected)


def _project(weight: Tensor, bias: Optional[Tensor], x: Float[Tensor, "n d_model"]) -> Float[Tensor, "heads n d_head"]:
    out = einops.einsum(x, weight.detach().float().to(x.device), "n d_model, heads d_model d_head -> heads n d_head")
    if bias is not None:
        out = out + bias.detach().float().to(x.device)[:, None, :]
    return out


def head_queries(
    model: Any, layer: int, residual: Float[Tensor, "n d_model"], input_norm: bool = True
) -> Float[Tensor, "n_heads n d_head"]:
    """Every query head's pre-RoPE query for each residual vector: ``ln1(x) W_Q^h + b_Q^h``, then
    the QK-norm where the model has one (what ``architecture.query_hook`` holds). On the layer's
    device."""
    attn = model.blocks[layer].attn
    with torch.no_grad(), readable_weights(attn):
        x = _layer_input(model, layer, residual, input_norm)
        return _qk_norm(model, layer, "q", _project(attn.W_Q, getattr(attn, "b_Q", None), x))


def head_keys(
    model: Any, layer: int, residual: Float[Tensor, "n d_model"], input_norm: bool = True
) -> Float[Tensor, "n_kv_heads n d_head"]:
    """Every KV head's pre-RoPE key for each residual vector: ``ln1(x) W_K + b_K``, then the
    QK-norm where the model has one. Query head ``h`` meets KV head ``h // group_size``. On the
    layer's device."""
    attn = model.blocks[layer].attn
    with torch.no_grad(), readable_weights(attn):
        x = _layer_input(model, layer, residual, input_norm)
        return _qk_norm(model, layer, "k", _project(attn.W_K, getattr(attn, "b_K", None), x))


def ov_logits(
    model: Any, layer: int, residual: Float[Tensor, "n d_model"], unembed: Float[Tensor, "d_model n_out"],
    input_norm: bool = True,
) -> Float[Tensor, "n_heads n n_out"]:
    """Each head's direct logits for each residual vector it attends to:
    ``ln1(x) W_V^{kv(h)} · center(W_O^h ⊙ w_post) · unembed``, computed in the factored order
    (``[n, d_head] @ [d_head, n_out]``), so thousands of tokens cost little. Value biases are left
    out (they add the same vector whatever the token); a post-attention norm's weights apply, its
    positive scale does not (it cannot reorder one head's logits). On the layer's device."""
    attn = model.blocks[layer].attn
    group = model_shape(model).group_size
    post_weight = post_attention_weights(model)[layer]
    with torch.no_grad(), readable_weights(attn):
        x = _layer_input(model, layer, residual, input_norm)
        values = _project(attn.W_V, None, x)  # [n_kv_heads, n, d_head]
        w_o = attn.W_O.detach().float().to(x.device)  # [n_heads, d_head, d_model]
        if post_weight is not None:
            w_o = w_o * post_weight.to(x.device)
        readout = center_for_norm(model, w_o) @ unembed.float().to(x.device)  # [n_heads, d_head, n_out]
        kv_of_head = torch.arange(w_o.shape[0], device=values.device) // group
        return einops.einsum(values[kv_of_head], readout, "heads n d_head, heads d_head n_out -> heads n n_out")
