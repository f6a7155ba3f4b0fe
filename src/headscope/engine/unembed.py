"""The direct path from a head's output to the logits, through the final norm's weights.

A head's contribution ``c`` to the final residual reaches the logits as
``W_U^T (w_norm * norm(c))``. The norm's division by the residual's RMS is a positive number per
position shared by every component, so scores that are invariant to a positive scale (argmax,
shares of a ReLU'd distribution) can skip it. LayerNorm models also subtract the mean over
``d_model``, which is linear and is applied here.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from headscope.engine.heads import hook_name

FINAL_SCALE = "ln_final.hook_scale"  # the final norm's per-position scale (cache it for attributions)


def final_norm_weight(model: Any) -> Float[Tensor, " d_model"]:
    norm = model.ln_final
    weight = getattr(norm, "weight", None)
    if weight is None and getattr(norm, "original_component", None) is not None:
        weight = getattr(norm.original_component, "weight", None)
    if weight is None:
        return torch.ones(model.cfg.d_model, device=model.W_U.device)
    return weight.detach()


def direct_unembed(model: Any) -> Float[Tensor, "d_model d_vocab"]:
    """``diag(w_norm) W_U``: maps a (normalised) residual direction to logits."""
    return final_norm_weight(model).float()[:, None] * model.W_U.detach().float()


def center_for_norm(model: Any, contribution: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
    """The linear part of the final norm before its weights: LayerNorm's mean removal (RMSNorm: none)."""
    contribution = contribution.float()
    if str(getattr(model.cfg, "normalization_type", "")).startswith("LN"):
        contribution = contribution - contribution.mean(dim=-1, keepdim=True)
    return contribution


def direct_logits(
    model: Any, contribution: Float[Tensor, "... d_model"], unembed: Tensor | None = None
) -> Float[Tensor, "... d_vocab"]:
    """Logits written by ``contribution`` along the direct path (up to the per-position RMS scale)."""
    return center_for_norm(model, contribution) @ (unembed if unembed is not None else direct_unembed(model))


def head_output_weights(model: Any) -> list[Float[Tensor, "n_heads d_head d_model"]]:
    """Every layer's ``W_O`` as float tensors, fetched once per run."""
    return [block.attn.W_O.detach().float() for block in model.blocks]


def last_position_head_outputs(
    model: Any, z: Float[Tensor, "batch pos n_heads d_head"], last: Tensor, w_o: Float[Tensor, "n_heads d_head d_model"]
) -> Float[Tensor, "batch n_heads d_model"]:
    """Each head's output ``z W_O^h`` at each row's ``last`` position, centred for the final norm."""
    rows = torch.arange(z.shape[0], device=z.device)
    return center_for_norm(model, torch.einsum("bhd,hdm->bhm", z[rows, last.to(z.device)].float(), w_o))


def final_position_attributions(
    model: Any,
    cache: dict,
    last: Tensor,
    directions: Float[Tensor, "batch d_model"],
    scale: Float[Tensor, " batch"],
    w_o: list[Tensor],
) -> Float[Tensor, "batch n_layers n_heads"]:
    """Direct logit attribution of every head at each row's ``last`` position: its output
    ``z W_O^h`` (centred for the norm) divided by the final norm's ``scale`` and projected on the
    row's direction (``diag(w_norm) (W_U[:, good] - ...)``). Needs every layer's ``hook_z``."""
    per_layer = []
    for layer, weights in enumerate(w_o):
        outputs = last_position_head_outputs(model, cache[hook_name(layer, "z")], last, weights)
        per_layer.append(torch.einsum("bhm,bm->bh", outputs, directions) / scale[:, None])
    return torch.stack(per_layer, dim=1)
