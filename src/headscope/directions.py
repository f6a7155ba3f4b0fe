"""The refusal direction (Arditi et al. 2024, "Refusal in Language Models Is Mediated by a Single
Direction") and each head's share of it: a localisation of refusal independent of ablation scans.

Data: two prompt sets, harmful and harmless requests, in the format the model is asked in (for a
chat model its template, ending where the answer starts). :func:`capture_last_position` runs each
set once, batched, and keeps the activations at each prompt's last real token.

Direction: per layer ``l`` the difference of means ``r_l = mean(harmful resid_l) - mean(harmless
resid_l)`` of the residual stream entering layer ``l`` (index ``n_layers``: the final residual,
before the final norm). :func:`refusal_direction` picks the layer by held-out separation (below)
unless given one; :func:`headscope.interventions.ablate_direction` removes ``r̂`` from the residual
stream (Arditi's directional ablation) to test it causally.

Layer choice (``layer=None``): among the layers ``l < 0.8 * n_layers`` (Arditi et al. filter the
last 20% of layers), the one whose direction separates best on held-out halves: the direction
``u_l`` from the even-indexed prompts of each kind, the separation measured on the odd-indexed
ones as ``(mean_harmful(x·u_l) - mean_harmless(x·u_l)) / pooled sd`` (the two-sample pooled
standard deviation of the projections, ``n_1 + n_2 - 2`` degrees of freedom; a layer whose
projections do not vary scores 0 when their means agree and ±inf when they differ). Ties go to the
earlier layer. It needs at least 4 prompts of each kind (2 on each side of the split). The
direction is then computed from every prompt at the chosen layer. Arditi et al. choose among
(layer, position) candidates by the effect of ablating and adding each on refusal scores; this
choice needs no generation (no model at all), and the ablation checks it afterwards.

Head score: :func:`head_shares`, each head's output at the last position projected on ``r̂``,
harmful mean minus harmless mean, over ``||r||``: the fraction of the direction's length that the
head writes. :func:`head_share_frequency`: how often each head is among the top ``k`` by share over
bootstrap resamples of the prompts (the stability of that ranking).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union, cast

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from headscope.engine.architecture import architecture, head_hook, norm_weight, residual_stream_hooks
from headscope.engine.devices import readable_weights
from headscope.engine.heads import Head, model_shape
from headscope.engine.runner import run_batched
from headscope.engine.tokens import TokenBatch, as_token_batch
from headscope.errors import ArgumentError, EmptyResultError, InputError
from headscope.identity import weights_digest
from headscope.models import model_name
from headscope.stability import bootstrap_rows, heads_of, resample_weights, top_k_mask
from headscope.viz.figures import axes_for, finish

LAYER_FRACTION = 0.8  # layers l < 0.8 * n_layers are considered (Arditi et al. filter the last 20%)
MIN_PROMPTS_FOR_CHOICE = 4  # of each kind: two on each side of the even/odd split
RESAMPLE_CHUNK_ELEMENTS = 1 << 24  # float64 entries of wᵀP for one chunk of resamples in head_share_frequency


@dataclass(frozen=True)
class LastPositionCapture:
    """Activations at each prompt's last real token, from one batched run (:func:`capture_last_position`).

    Memory layout: head outputs are kept factored, as ``z`` per head and one copy of ``W_O``
    (``n_heads`` times smaller than ``z W_O`` per prompt); :meth:`head_outputs` multiplies them out
    and :meth:`head_projections` projects them on vectors without doing so. All tensors are on the
    CPU, float32 (float64 for a model that runs in float64).

    Attributes:
        residual: ``[prompts, n_layers + 1, d_model]``: the residual stream entering each layer
            (``resid_pre``; index 0 holds the embeddings), then the last layer's ``resid_post`` (the
            final norm's input).
        z: ``[prompts, n_layers, n_heads, d_head]``: each query head's ``hook_z`` (its output
            before ``W_O``; with grouped KV heads, one slot per query head).
        w_o: ``[n_layers, n_heads, d_head, d_model]``: every layer's ``W_O``.
        post_weight: ``[n_layers, d_model]``: the post-attention norm's weight (offset included),
            where the model has one (Gemma 2/3, OLMo-2), else None.
        post_scale: ``[prompts, n_layers]``: that norm's scale (divisor) at the last position, else None.
        model: the model's name; weights: a hash of its weights (captures of two models never mix).
    """

    residual: Float[Tensor, "prompts resid_layers d_model"]
    z: Float[Tensor, "prompts n_layers n_heads d_head"]
    w_o: Float[Tensor, "n_layers n_heads d_head d_model"]
    post_weight: Optional[Float[Tensor, "n_layers d_model"]]
    post_scale: Optional[Float[Tensor, "prompts n_layers"]]
    model: str
    weights: str

    def __post_init__(self) -> None:
        if self.residual.shape[1] != self.w_o.shape[0] + 1:
            raise ArgumentError(f"A LastPositionCapture holds the residual stream at n_layers + 1 = "
                                f"{self.w_o.shape[0] + 1} places; got {self.residual.shape[1]}.")
        if (self.post_weight is None) != (self.post_scale is None):
            raise ArgumentError("A LastPositionCapture needs both post_weight and post_scale (a model with a "
                                "post-attention norm) or neither.")

    @property
    def n_prompts(self) -> int:
        return int(self.residual.shape[0])

    @property
    def n_layers(self) -> int:
        return int(self.w_o.shape[0])

    @property
    def n_heads(self) -> int:
        return int(self.w_o.shape[1])

    @property
    def d_model(self) -> int:
        return int(self.w_o.shape[-1])

    def select(self, rows: Union[Sequence[int], Tensor, slice]) -> "LastPositionCapture":
        """The capture of some prompts only (e.g. a train/test split), sharing ``W_O``."""
        return LastPositionCapture(self.residual[rows], self.z[rows], self.w_o, self.post_weight,
                                   None if self.post_scale is None else self.post_scale[rows], self.model, self.weights)

    def head_outputs(self) -> Float[Tensor, "prompts n_layers n_heads d_model"]:
        """What each head writes into the residual stream at the last position: ``z W_O^h``, or,
        through a post-attention norm, ``w_post ⊙ z W_O^h / scale_post`` with the run's own scale
        (the engine's linearisation, exact for the sum of a layer's heads)."""
        outputs = einops.einsum(self.z, self.w_o.to(self.z), "prompts n_layers n_heads d_head, "
                                "n_layers n_heads d_head d_model -> prompts n_layers n_heads d_model")
        if self.post_weight is not None and self.post_scale is not None:
            outputs = outputs * self.post_weight.to(outputs)[None, :, None] / self.post_scale.to(outputs)[:, :, None, None]
        return outputs

    def head_projections(self, vectors: Float[Tensor, "k d_model"]) -> Float[Tensor, "prompts k n_layers n_heads"]:
        """``head_outputs() · v`` for each vector, in float64, computed as ``z · (W_O^h v)``
        without forming the head outputs."""
        vectors = vectors.double()
        w_o = self.w_o.double()
        if self.post_weight is not None:
            scaled = vectors[:, None, :] * self.post_weight.double()[None]  # [k, n_layers, d_model]
            read = einops.einsum(w_o, scaled, "n_layers n_heads d_head d_model, k n_layers d_model -> k n_layers n_heads d_head")
        else:
            read = einops.einsum(w_o, vectors, "n_layers n_heads d_head d_model, k d_model -> k n_layers n_heads d_head")
        projections = einops.einsum(self.z.double(), read, "prompts n_layers n_heads d_head, "
                                    "k n_layers n_heads d_head -> prompts k n_layers n_heads")
        if self.post_scale is not None:
            projections = projections / self.post_scale.double()[:, None, :, None]
        return projections

    def __repr__(self) -> str:
        return (f"LastPositionCapture(model={self.model!r}, prompts={self.n_prompts}, n_layers={self.n_layers}, "
                f"n_heads={self.n_heads}, d_model={self.d_model})")


def capture_last_position(
    model: Any, prompts: Any, batch_size: Optional[int] = None, progress: Optional[bool] = None,
) -> LastPositionCapture:
    """One batched pass over ``prompts`` keeping, at each prompt's last real token, the residual
    stream at every layer and every head's ``z`` (see :class:`LastPositionCapture`).

    Args:
        prompts: strings (BOS prepended, as everywhere in headscope), token ids or a ``TokenBatch``;
            rows are right-padded, so a prompt's last real token is at ``length - 1``.
        batch_size: prompts per forward (default from the memory budget).
        progress: a bar (the rule of :mod:`headscope.engine.runner`).

    Raises:
        InputError: no prompts (from the tokenizer), or prompts the model cannot run.
        EmptyResultError: NaN or infinite activations (a model in float16 that overflows, broken weights).

    Example::

        harmful = capture_last_position(model, refusal.request_prompts(requests, "chatml"))
    """
    batch = as_token_batch(model, prompts)
    shape, arch = model_shape(model), architecture(model)
    residual_names = residual_stream_hooks(model)
    z_views = [head_hook(model, layer, "z") for layer in range(shape.n_layers)]
    scales = [arch.post_attention_scale_hook(layer) for layer in range(shape.n_layers)]
    scale_names = [name for name in scales if name is not None]  # every layer's, or none
    names = list(dict.fromkeys(residual_names + [name for name, _ in z_views] + scale_names))

    def reduce(logits: Tensor, cache: dict, chunk: TokenBatch) -> dict[str, Tensor]:
        last = chunk.last_positions
        out = {"residual": torch.stack([_at(cache[name], last) for name in residual_names], dim=1),
               "z": torch.stack([_at(view(cache[name]), last) for name, view in z_views], dim=1)}
        if scale_names:
            out["post_scale"] = torch.stack([_at(cache[name], last)[:, 0] for name in scale_names], dim=1)
        return out

    captured = cast(dict, run_batched(model, batch, reduce, names=names, batch_size=batch_size, progress=progress,
                                      desc="last-position activations", logits="last"))
    dtype = captured["residual"].dtype
    for key, values in captured.items():
        _check_finite_activations(values, key)
    post_weight = None
    if arch.post_attention_norm:
        post_weight = torch.stack([norm_weight(model, block.ln1_post).to("cpu", dtype) for block in model.blocks])
    return LastPositionCapture(captured["residual"], captured["z"], _output_weights(model, dtype), post_weight,
                               captured.get("post_scale"), model_name(model), weights_digest(model))


def _at(activation: Tensor, last: Tensor) -> Tensor:
    """Each row's activation at its ``last`` position, on the CPU in float32 (float64 kept)."""
    rows = torch.arange(activation.shape[0], device=activation.device)
    picked = activation[rows, last.to(activation.device)]
    return picked.to("cpu", torch.float64 if picked.dtype == torch.float64 else torch.float32)


def _output_weights(model: Any, dtype: torch.dtype) -> Float[Tensor, "n_layers n_heads d_head d_model"]:
    """Every layer's ``W_O`` on the CPU (read on each layer's execution device, also when offloaded)."""
    weights = []
    for block in model.blocks:
        with readable_weights(block.attn):
            weights.append(block.attn.W_O.detach().to("cpu", dtype))
    return torch.stack(weights)


def _check_finite_activations(values: Tensor, what: str) -> None:
    finite = torch.isfinite(values).flatten(1).all(dim=1)
    if not bool(finite.all()):
        raise EmptyResultError(
            f"The model's {what} activations are NaN or infinite on {int((~finite).sum())} of {len(finite)} prompts "
            f"(first: prompt {int((~finite).nonzero()[0, 0])}), so no direction can be computed from them. Load the "
            "model in float32 or bfloat16 (float16 overflows in many models) and check its weights.")


@dataclass(frozen=True)
class RefusalDirection:
    """A difference-of-means direction in the residual stream entering ``layer``.

    Attributes:
        layer: where the direction was read: the residual stream entering that layer (``n_layers``:
            the final residual, before the final norm).
        direction: ``[d_model]``, the unit vector ``r̂ = r / ||r||`` (float32, CPU).
        norm: ``||r||``, the length of the difference of means.
        separations: ``[n_layers + 1]``, each layer's held-out separation (see the module
            docstring), or None with fewer than 4 prompts of a kind (``layer`` then given).
        n_harmful / n_harmless: the prompts behind the direction.
        considered: layers ``0 .. considered - 1`` could be chosen (``l < 0.8 * n_layers``).
        chosen_by: ``"separation"`` (chosen by held-out separation) or ``"given"``.
        model: the model's name; weights: a hash of its weights.
    """

    layer: int
    direction: Float[Tensor, " d_model"]
    norm: float
    separations: Optional[Float[Tensor, " resid_layers"]]
    n_harmful: int
    n_harmless: int
    considered: int
    chosen_by: str
    model: str
    weights: str

    def head_shares(self, harmful: LastPositionCapture, harmless: LastPositionCapture) -> Float[Tensor, "n_layers n_heads"]:
        """:func:`head_shares` of this direction."""
        return head_shares(self, harmful, harmless)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (the direction as a list), e.g. for a result's metadata."""
        return {"layer": self.layer, "norm": self.norm, "n_harmful": self.n_harmful, "n_harmless": self.n_harmless,
                "considered": self.considered, "chosen_by": self.chosen_by, "model": self.model, "weights": self.weights,
                "separations": None if self.separations is None else [float(s) for s in self.separations],
                "direction": [float(x) for x in self.direction]}

    def plot(self, ax: Any = None, path: Optional[Union[str, Path]] = None) -> Any:
        """Each layer's held-out separation, the layers that could not be chosen (the last 20%)
        shaded and the direction's layer marked.

        Args:
            ax: matplotlib axes to draw on (default: a new figure; the backend is never switched).
            path: save the figure there too (the suffix picks the format), atomically.

        Returns:
            The matplotlib ``Figure``.

        Raises:
            ArgumentError: a direction without separations (fewer than 4 prompts of a kind).
        """
        if self.separations is None:
            raise ArgumentError("This refusal direction has no per-layer separations to plot: it was computed at a "
                                "given layer from fewer than 4 prompts of a kind; compute it from at least 4 of each.")
        figure, ax = axes_for(ax, (5.2, 3.4))
        values = self.separations.double()
        finite = values[torch.isfinite(values)]
        top = float(finite.abs().max()) if len(finite) else 1.0
        shown = torch.nan_to_num(values, posinf=1.1 * top, neginf=-1.1 * top)  # a perfect split drawn at the top
        layers = list(range(len(values)))
        ax.plot(layers, shown.tolist(), marker="o", markersize=3, color="#1f77b4", label="held-out separation")
        if self.considered < len(values):
            ax.axvspan(self.considered - 0.5, len(values) - 0.5, color="#e8e8e8",
                       label=f"not considered (layers ≥ {LAYER_FRACTION:g} × {len(values) - 1})")
        ax.axvline(self.layer, color="#d62728", linestyle="--", linewidth=1,
                   label=f"direction: layer {self.layer} ({self.chosen_by})")
        ax.axhline(0.0, color="#9e9e9e", linewidth=0.6)
        ax.set_xlabel(f"residual stream entering layer ({len(values) - 1} = final, before the norm)")
        ax.set_ylabel("separation (pooled-sd units)")
        ax.set_title(f"refusal direction — {self.model}: {self.n_harmful} harmful, {self.n_harmless} harmless\n"
                     "direction from the even-indexed prompts, separation on the odd-indexed", fontsize=8)
        ax.legend(fontsize=7, frameon=False)
        return finish(figure, path)

    def __repr__(self) -> str:
        return (f"RefusalDirection(model={self.model!r}, layer={self.layer}, norm={self.norm:.3g}, "
                f"chosen_by={self.chosen_by!r}, n_harmful={self.n_harmful}, n_harmless={self.n_harmless})")


def refusal_direction(
    harmful: LastPositionCapture, harmless: LastPositionCapture, layer: Optional[int] = None,
) -> RefusalDirection:
    """The difference-of-means direction ``mean(harmful resid_l) - mean(harmless resid_l)``.

    Args:
        harmful / harmless: :func:`capture_last_position` of each prompt set, on one model.
        layer: the residual stream entering this layer (``0 .. n_layers``; ``n_layers`` is the final
            residual). None: chosen by held-out separation among ``l < 0.8 * n_layers`` (module
            docstring), which needs at least 4 prompts of each kind.

    Raises:
        InputError: an empty capture, captures of two models, a layer out of range, too few prompts.
    """
    _check_pair(harmful, harmless, "refusal_direction")
    n_layers = harmful.n_layers
    if layer is not None:
        layer = _check_layer(layer, n_layers, "refusal_direction")
    enough = min(harmful.n_prompts, harmless.n_prompts) >= MIN_PROMPTS_FOR_CHOICE
    if layer is None and not enough:
        raise InputError(
            f"refusal_direction chooses its layer on held-out halves and needs at least {MIN_PROMPTS_FOR_CHOICE} "
            f"prompts of each kind; got {harmful.n_prompts} harmful and {harmless.n_prompts} harmless. Capture more "
            "prompts, or pass layer=... to use a layer you chose.")
    separations = layer_separations(harmful.residual, harmless.residual) if enough else None
    considered = considered_layers(n_layers)
    chosen_by = "given"
    if layer is None:
        assert separations is not None
        layer, chosen_by = int(torch.argmax(separations[:considered])), "separation"  # the first maximum
    difference = harmful.residual[:, layer].double().mean(0) - harmless.residual[:, layer].double().mean(0)
    norm = float(difference.norm())
    if not norm > 0:
        raise EmptyResultError(f"The harmful and harmless means are equal at layer {layer}, so there is no direction "
                               "there; choose another layer or prompts that differ.")
    return RefusalDirection(layer, (difference / norm).float(), norm,
                            None if separations is None else separations.float(), harmful.n_prompts,
                            harmless.n_prompts, considered, chosen_by, harmful.model, harmful.weights)


def considered_layers(n_layers: int) -> int:
    """How many layers (``0 .. count - 1``) the automatic choice considers: ``l < 0.8 * n_layers``."""
    return max(1, (4 * n_layers + 4) // 5)  # ceil(0.8 n) in integers: 0.8 * 35 is 28.000000000000004


def layer_separations(
    harmful: Float[Tensor, "harmful resid_layers d_model"], harmless: Float[Tensor, "harmless resid_layers d_model"],
) -> Float[Tensor, " resid_layers"]:
    """Per layer: the direction from the even-indexed prompts of each kind, its separation on the
    odd-indexed ones, ``(mean harmful projection - mean harmless projection) / pooled sd`` (float64)."""
    harmful, harmless = harmful.double(), harmless.double()
    direction = harmful[0::2].mean(0) - harmless[0::2].mean(0)  # [resid_layers, d_model]
    norm = direction.norm(dim=-1, keepdim=True)
    unit = torch.where(norm > 0, direction / norm.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    on_harmful = einops.einsum(harmful[1::2], unit, "harmful resid_layers d_model, resid_layers d_model -> harmful resid_layers")
    on_harmless = einops.einsum(harmless[1::2], unit, "harmless resid_layers d_model, resid_layers d_model -> harmless resid_layers")
    gap = on_harmful.mean(0) - on_harmless.mean(0)
    squares = ((on_harmful - on_harmful.mean(0)) ** 2).sum(0) + ((on_harmless - on_harmless.mean(0)) ** 2).sum(0)
    sd = (squares / (len(on_harmful) + len(on_harmless) - 2)).sqrt()
    flat = torch.where(gap == 0, torch.zeros_like(gap), gap.sign() * math.inf)  # projections that do not vary
    return torch.where(sd > 0, gap / sd.clamp_min(torch.finfo(torch.float64).tiny), flat)


def head_shares(
    direction: RefusalDirection, harmful: LastPositionCapture, harmless: LastPositionCapture,
) -> Float[Tensor, "n_layers n_heads"]:
    """The fraction of the direction's length each head writes at the last position:
    ``(mean_harmful o_h - mean_harmless o_h) · r̂ / ||r||``, with ``o_h`` what head ``h`` adds to the
    residual stream (:meth:`LastPositionCapture.head_outputs`).

    For the captures the direction was computed from, the shares of the heads below its layer,
    with those of the embeddings, the attention biases and the MLPs below it, sum to 1 (``r`` is
    their sum). On Gemma 2/3 and OLMo-2 a head's output reaches the stream through the
    post-attention norm; it is taken with the run's own norm scale (the engine's linearisation,
    exact for the sum of a layer's heads), so the identity holds there too, but a head's share then
    depends on the other heads of its layer through that scale. Heads at or above the direction's
    layer write into ``r̂`` after the direction was read (what reaches the output along it); they
    are scored all the same. ``direction`` may come from other captures of a model of the same shape
    (e.g. the base model's direction scored on a fine-tuned model's heads).

    Returns:
        ``[n_layers, n_heads]`` float32 on the CPU.

    Raises:
        InputError: an empty capture, captures of two models, a direction of another shape.
    """
    _check_pair(harmful, harmless, "head_shares")
    _check_direction(direction, harmful, "head_shares")
    unit = direction.direction.double()[None]
    gap = harmful.head_projections(unit).mean(0) - harmless.head_projections(unit).mean(0)  # [1, n_layers, n_heads]
    return (gap[0] / direction.norm).float()


def head_share_frequency(
    harmful: LastPositionCapture,
    harmless: LastPositionCapture,
    layer: int,
    k: int = 5,
    n_resamples: int = 200,
    seed: int = 0,
) -> Float[Tensor, "n_layers n_heads"]:
    """How often each head is among the ``k`` largest :func:`head_shares` over bootstrap resamples:
    each resample draws the harmful and the harmless prompts with replacement (each kind
    separately, as many as there are), recomputes the direction at ``layer`` and every head's share.

    Every resample puts exactly ``k`` heads in its top ``k``, so the frequencies sum to ``k``.
    Vectorised: the shares of a resample with prompt weights ``w`` (``+count/n`` harmful, ``-count/n``
    harmless) are ``wᵀ P w / wᵀ G w``, with ``P[i, j] = o_i · x_j`` (head outputs against residuals
    at ``layer``) and ``G`` the residuals' Gram matrix, both computed once.

    Args:
        layer: the direction's layer (``RefusalDirection.layer``), fixed across resamples.
        k: the size of the top set (1 .. n_layers * n_heads).
        n_resamples: bootstrap resamples (at least 1).
        seed: the same seed gives the same frequencies.

    Returns:
        ``[n_layers, n_heads]`` float32 frequencies in ``[0, 1]``.
    """
    _check_pair(harmful, harmless, "head_share_frequency")
    layer = _check_layer(layer, harmful.n_layers, "head_share_frequency")
    total = harmful.n_layers * harmful.n_heads
    k = _check_count(k, "k", 1, total, f"the model has {total} heads", "head_share_frequency")
    n_resamples = _check_count(n_resamples, "n_resamples", 1, None, "", "head_share_frequency")
    residuals = torch.cat([harmful.residual[:, layer], harmless.residual[:, layer]]).double()  # [prompts, d_model]
    outer = torch.cat([harmful.head_projections(residuals), harmless.head_projections(residuals)])
    outer = outer.flatten(2)  # [prompts, prompts, heads]: P[i, j] = o_i · x_j
    gram = residuals @ residuals.T
    weights = _resample_weights(harmful.n_prompts, harmless.n_prompts, n_resamples, seed)  # [resamples, prompts]
    chunk = max(1, RESAMPLE_CHUNK_ELEMENTS // outer[0].numel())  # resamples per pass over P
    counts = torch.zeros(total, dtype=torch.long)
    for start in range(0, n_resamples, chunk):
        w = weights[start:start + chunk]
        squared_norm = ((w @ gram) * w).sum(dim=1)  # ||r||² of each resample
        if not bool((squared_norm > 0).all()):
            raise EmptyResultError("A bootstrap resample has equal harmful and harmless means at layer "
                                   f"{layer}, so no direction; use prompts whose activations differ, or another layer.")
        left = (w @ outer.flatten(1)).view(len(w), *outer.shape[1:])  # [resamples, j, heads]: wᵀP, one matmul
        along = einops.einsum(left, w, "resamples j heads, resamples j -> resamples heads")
        top = (along / squared_norm[:, None]).topk(k, dim=1).indices
        counts += torch.bincount(top.flatten(), minlength=total)
    return (counts.double() / n_resamples).float().reshape(harmful.n_layers, harmful.n_heads)


def _resample_weights(n_harmful: int, n_harmless: int, n_resamples: int, seed: int) -> Float[Tensor, "resamples prompts"]:
    """Signed bootstrap weights: ``count / n`` of each harmful prompt, ``-count / n`` of each harmless
    one (each kind resampled on its own, :func:`headscope.stability.bootstrap_rows`)."""
    harmful = resample_weights(bootstrap_rows(n_harmful, n_resamples, seed), n_harmful)
    harmless = resample_weights(bootstrap_rows(n_harmless, n_resamples, seed + 1), n_harmless)
    return torch.cat([harmful, -harmless], dim=1)


def top_share_heads(shares: Float[Tensor, "n_layers n_heads"], k: int) -> list[Head]:
    """The ``k`` heads of largest share, best first (the selection rule of :mod:`headscope.stability`)."""
    return heads_of(top_k_mask(shares, k), order=shares)


# ----- checks -----------------------------------------------------------------------------------
def _check_pair(harmful: LastPositionCapture, harmless: LastPositionCapture, caller: str) -> None:
    """Two non-empty captures of one model."""
    for name, capture in (("harmful", harmful), ("harmless", harmless)):
        if not isinstance(capture, LastPositionCapture):
            raise InputError(f"The {name!r} argument of {caller} must be a LastPositionCapture; got "
                             f"{type(capture).__name__}. Make one with capture_last_position(model, prompts).")
        if capture.n_prompts == 0:
            raise InputError(f"The {name!r} capture given to {caller} holds no prompts; capture at least one "
                             "prompt with capture_last_position(model, prompts).")
    if (harmful.model, harmful.weights) != (harmless.model, harmless.weights) or harmful.w_o.shape != harmless.w_o.shape:
        raise InputError(f"The captures given to {caller} come from two models ({harmful.model!r}, weights "
                         f"{harmful.weights[:12]}; {harmless.model!r}, weights {harmless.weights[:12]}); capture the "
                         "harmful and the harmless prompts with the same model.")


def _check_direction(direction: RefusalDirection, capture: LastPositionCapture, caller: str) -> None:
    if not isinstance(direction, RefusalDirection):
        raise InputError(f"The 'direction' argument of {caller} must be a RefusalDirection; got "
                         f"{type(direction).__name__}. Make one with refusal_direction(harmful, harmless).")
    if direction.direction.shape[0] != capture.d_model or direction.layer > capture.n_layers:
        raise InputError(f"The direction given to {caller} was read at layer {direction.layer} of a model with "
                         f"d_model {direction.direction.shape[0]} ({direction.model!r}); the captures are of a "
                         f"model with {capture.n_layers} layers and d_model {capture.d_model} ({capture.model!r}). "
                         "Use a direction of the captured model.")


def _check_layer(layer: Any, n_layers: int, caller: str) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= n_layers:
        raise InputError(f"The 'layer' parameter of {caller} is {layer!r}, outside 0..{n_layers} (the residual "
                         f"stream entering each of the {n_layers} layers, then {n_layers} for the final residual); "
                         "pass a layer in that range, or None to choose it by held-out separation.")
    return layer


def _check_count(value: Any, name: str, low: int, high: Optional[int], why: str, caller: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"between {low} and {high} ({why})" if high is not None else f"at least {low}"
        raise ArgumentError(f"The {name!r} parameter of {caller} must be an integer {bound}; got {value!r}.")
    return value


__all__ = ["LastPositionCapture", "RefusalDirection", "capture_last_position", "considered_layers", "head_shares",
           "head_share_frequency", "layer_separations", "refusal_direction", "top_share_heads"]
