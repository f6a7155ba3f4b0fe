"""Retrieval head studies — Wu et al. 2024: plots of the ``retrieval`` detector's needle
measurements (``headscope.detectors.retrieval``).

:func:`plot_needle_heatmaps` draws the usual length × depth heatmap of a needle metric
(``measure_needles``) for each condition.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor

from headscope.files import atomic_savefig
from headscope.tasks.haystack import HaystackSample


def plot_needle_heatmaps(
    samples: Sequence[HaystackSample],
    conditions: dict[str, Float[Tensor, " samples"]],
    title: str = "needle retrieval",
    path: Optional[Union[str, Path]] = None,
    vmin: float = 0.0,
    vmax: float = 1.0,
):
    """One length × depth heatmap per condition (cell colour = mean over the cell's samples)."""
    import matplotlib.pyplot as plt

    lengths = sorted({s.length for s in samples})
    depths = sorted({s.depth for s in samples})
    figure, axes = plt.subplots(1, len(conditions), figsize=(3.4 * len(conditions) + 1, 3.6), squeeze=False,
                                constrained_layout=True)
    for ax, (name, per_sample) in zip(axes[0], conditions.items(), strict=True):
        grid = _cell_means(samples, per_sample, lengths, depths)
        image = ax.imshow(grid.numpy(), cmap="RdYlGn", vmin=vmin, vmax=vmax, aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
        ax.set_xlabel("context length (tokens)")
        if ax is axes[0][0]:
            ax.set_ylabel("needle depth")
        ax.set_title(f"{name}\nmean {float(per_sample.float().mean()):.2f}", fontsize=9)
    figure.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    figure.suptitle(title, fontsize=10)
    if path is not None:
        atomic_savefig(figure, path, dpi=110, bbox_inches="tight")
    return figure


def _cell_means(samples, per_sample: Tensor, lengths: list, depths: list) -> Tensor:
    sums, counts = torch.zeros(len(depths), len(lengths)), torch.zeros(len(depths), len(lengths))
    for sample, value in zip(samples, per_sample.float().tolist(), strict=True):
        cell = depths.index(sample.depth), lengths.index(sample.length)
        sums[cell] += value
        counts[cell] += 1
    return sums / counts.clamp(min=1)
