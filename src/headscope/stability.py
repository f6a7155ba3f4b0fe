"""Selection stability: how often each head is selected when the items it was selected on are
drawn again.

A head chosen on one set of queries and not on another drawn from the same pool is a property of
that set, not of the model. :func:`bootstrap_rows` draws ``n_resamples`` resamples of the items
(with replacement, each as large as the pool); a selection rule is run on each, and a head's
*selection frequency* is the share of resamples that selected it. For a score that is a mean over
items (Ships, a share of a direction), :func:`mean_score_stability` resamples the per-item scores
directly, without running the model again. A selection of ``k`` heads per resample gives
frequencies that sum to ``k`` over all heads.

:class:`SelectionStability` holds the frequencies with the heads selected on the whole pool, reads
as a table (:meth:`~SelectionStability.table`) and plots itself (the most selected heads as bars,
the heads selected on the whole pool marked).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from headscope.engine.heads import Head
from headscope.errors import InputError
from headscope.stats import resample
from headscope.viz.figures import ROLE_COLOURS, axes_for, finish

STABLE_FREQUENCY = 0.5  # a head selected in at least half the resamples is called stable


def bootstrap_rows(n_items: int, n_resamples: int, seed: int = 0) -> Int[Tensor, "resamples items"]:
    """``n_resamples`` bootstrap resamples of ``n_items`` items: row ``r`` holds the item indices
    of resample ``r`` (drawn with replacement, ``n_items`` of them)."""
    if n_items < 2:
        raise InputError(f"A bootstrap of the selection needs at least 2 items, got {n_items}.")
    if n_resamples < 1:
        raise InputError(f"n_resamples must be at least 1, got {n_resamples}.")
    return resample(n_items, n_resamples, torch.Generator().manual_seed(seed))


def resample_weights(rows: Int[Tensor, "resamples draws"], n_items: int) -> Float[Tensor, "resamples items"]:
    """Each resample as weights on the items (how often each was drawn, over the draws): a
    resample's mean of per-item values is ``weights @ values``."""
    counts = torch.zeros(rows.shape[0], n_items, dtype=torch.float64)
    counts.scatter_add_(1, rows, torch.ones_like(rows, dtype=torch.float64))
    return counts / rows.shape[1]


def top_k_mask(scores: Float[Tensor, "*resamples layers heads"], k: int) -> Bool[Tensor, "*resamples layers heads"]:
    """True at the ``k`` highest scores of each ``[layers, heads]`` grid (NaN = not scored, never
    selected)."""
    flat = scores.flatten(start_dim=-2).nan_to_num(nan=-torch.inf, posinf=torch.inf)
    if k > int(torch.isfinite(flat).sum(dim=-1).min()):
        raise InputError(f"Cannot select the top {k} heads: some resample has fewer scored heads; pass a smaller k.")
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask.scatter_(-1, flat.topk(k, dim=-1).indices, True)
    return mask.view(scores.shape)


def heads_of(mask: Bool[Tensor, "layers heads"], order: Optional[Tensor] = None) -> list[Head]:
    """The heads where ``mask`` is True, highest ``order`` first (default: layer by layer)."""
    indices = mask.flatten().nonzero().flatten()
    if order is not None:
        indices = indices[order.flatten()[indices].argsort(descending=True, stable=True)]
    return [Head(int(i) // mask.shape[1], int(i) % mask.shape[1]) for i in indices]


@dataclass
class SelectionStability:
    """How often each head was among the ``k`` selected over bootstrap resamples of the items.

    Attributes:
        score: what selected the heads (e.g. ``"ships"``).
        frequency: share of resamples that selected each head (sums to ``k`` over heads).
        k: heads selected per resample.
        n_resamples: resamples drawn.
        n_items: items in the pool each resample was drawn from.
        selected: the heads selected on the whole pool, best first.
    """

    score: str
    frequency: Float[Tensor, "layers heads"]
    k: int
    n_resamples: int
    n_items: int
    selected: list[Head]

    def of(self, head: Any) -> float:
        """The selection frequency of one head."""
        layer, index = Head.parse(head)
        return float(self.frequency[layer, index])

    def most_selected(self, n: Optional[int] = None) -> list[tuple[Head, float]]:
        """The ``n`` (default ``k``) most often selected heads with their frequencies, most first
        (ties: the heads selected on the whole pool first, then layer by layer)."""
        n = self.k if n is None else n
        bonus = torch.zeros_like(self.frequency, dtype=torch.float64)
        for rank, head in enumerate(self.selected):
            bonus[head.layer, head.head] = (len(self.selected) - rank) * 1e-6 / self.n_resamples
        order = (self.frequency.double() + bonus).flatten().argsort(descending=True, stable=True)[:n]
        heads = [Head(int(i) // self.frequency.shape[1], int(i) % self.frequency.shape[1]) for i in order]
        return [(head, self.of(head)) for head in heads]

    def stable_heads(self, min_frequency: float = STABLE_FREQUENCY) -> list[Head]:
        """Heads selected in at least ``min_frequency`` of the resamples, most often first."""
        return [head for head, share in self.most_selected(self.frequency.numel()) if share >= min_frequency]

    def table(self, n: Optional[int] = None) -> list[dict[str, Any]]:
        """The most selected heads as rows: head, frequency, and whether the whole pool selected it."""
        chosen = set(self.selected)
        return [{"head": str(head), "frequency": round(share, 3), "selected_on_all_items": head in chosen}
                for head, share in self.most_selected(n)]

    def to_dict(self, n: int = 10) -> dict[str, Any]:
        return {"score": self.score, "k": self.k, "n_resamples": self.n_resamples, "n_items": self.n_items,
                "selected_on_all_items": [str(h) for h in self.selected], "most_selected": self.table(n),
                "stable": [str(h) for h in self.stable_heads()]}

    def plot(self, ax: Any = None, path: Optional[Union[str, Path]] = None, n: int = 12) -> Any:
        """Bars of the ``n`` most often selected heads' frequencies; the heads selected on the whole
        pool in colour, a dashed line at the stability threshold."""
        rows = self.most_selected(min(n, self.frequency.numel()))
        figure, ax = axes_for(ax, (max(4.0, 0.45 * len(rows) + 1.5), 3.2))
        chosen = set(self.selected)
        colours = [ROLE_COLOURS[0] if head in chosen else "#9e9e9e" for head, _ in rows]
        ax.bar(range(len(rows)), [share for _, share in rows], color=colours, width=0.65)
        ax.set_xticks(range(len(rows)), [str(head) for head, _ in rows], rotation=60, fontsize=7)
        ax.axhline(STABLE_FREQUENCY, color="#616161", linestyle="--", linewidth=1)
        ax.set_ylim(0, 1.02)
        ax.set_ylabel(f"share of {self.n_resamples} resamples")
        ax.set_title(f"{self.score}: top-{self.k} selection over bootstrap resamples of {self.n_items} items\n"
                     f"(coloured: selected on all items)", fontsize=9)
        return finish(figure, path)

    def __repr__(self) -> str:
        top = ", ".join(f"{head} {share:.2f}" for head, share in self.most_selected())
        return f"SelectionStability({self.score}, top-{self.k} of {self.n_resamples} resamples: {top})"


def frequency_of_masks(masks: Bool[Tensor, "resamples layers heads"]) -> Float[Tensor, "layers heads"]:
    """Share of resamples whose mask holds each head."""
    return masks.double().mean(dim=0).float()


def stability_of(
    full: Float[Tensor, "layers heads"], resampled: Float[Tensor, "resamples layers heads"], k: int, score: str,
    n_items: int,
) -> SelectionStability:
    """The selection stability of a score computed on the whole pool (``full``) and on each
    resample (``resampled``), the top ``k`` selected each time."""
    selected = heads_of(top_k_mask(full, k), order=full.nan_to_num(nan=-torch.inf))
    return SelectionStability(score, frequency_of_masks(top_k_mask(resampled, k)), k, resampled.shape[0], n_items,
                              selected)


def mean_score_stability(
    per_item: Float[Tensor, "layers heads items"], k: int, rows: Int[Tensor, "resamples draws"], score: str
) -> SelectionStability:
    """Selection stability of a score that is the mean of per-item scores (NaN heads: not scored):
    each resample's means are a weighted sum of the per-item scores."""
    weights = resample_weights(rows, per_item.shape[-1]).to(per_item.dtype)
    means = torch.einsum("lhn,rn->rlh", per_item, weights)  # NaN heads stay NaN
    return stability_of(per_item.mean(dim=-1), means, k, score, per_item.shape[-1])
