"""Retrieval head studies — Wu et al. 2024: plots of the ``retrieval`` detector's needle
measurements (``headscope.detectors.retrieval``).

:func:`plot_needle_heatmaps` draws the usual length × depth heatmap of a needle metric
(``measure_needles``) for each condition.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor

from headscope.tasks.haystack import HaystackSample
from headscope.viz.figures import finish, new_figure


def plot_needle_heatmaps(
    samples: Sequence[HaystackSample],
    conditions: dict[str, Float[Tensor, " samples"]],
    title: str = "needle retrieval",
    path: Optional[Union[str, Path]] = None,
    vmin: float = 0.0,
    vmax: float = 1.0,
    label: str = "mean over the cell's samples",
) -> Any:
    """One length x depth heatmap per condition (cell colour = mean over the cell's samples), a
    shared colour bar labelled ``label`` (e.g. the metric's name); saves the figure at ``path``
    too; returns the matplotlib ``Figure`` (matplotlib's backend is never switched)."""
    lengths = sorted({s.length for s in samples})
    depths = sorted({s.depth for s in samples})
    figure = new_figure((3.4 * len(conditions) + 1, 3.6), layout="constrained")
    axes = figure.subplots(1, len(conditions), squeeze=False)
    for ax, (name, per_sample) in zip(axes[0], conditions.items(), strict=True):
        grid = _cell_means(samples, per_sample, lengths, depths)
        image = ax.imshow(grid.numpy(), cmap="RdYlGn", vmin=vmin, vmax=vmax, aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
        ax.set_xlabel("context length (tokens)")
        if ax is axes[0][0]:
            ax.set_ylabel("needle depth")
        ax.set_title(f"{name}\nmean {float(per_sample.float().mean()):.2f}", fontsize=9)
    bar = figure.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    bar.set_label(label, fontsize=8)
    figure.suptitle(title, fontsize=10)
    return finish(figure, path, dpi=110)


def _cell_means(samples, per_sample: Tensor, lengths: list, depths: list) -> Tensor:
    sums, counts = torch.zeros(len(depths), len(lengths)), torch.zeros(len(depths), len(lengths))
    for sample, value in zip(samples, per_sample.float().tolist(), strict=True):
        cell = depths.index(sample.depth), lengths.index(sample.length)
        sums[cell] += value
        counts[cell] += 1
    return sums / counts.clamp(min=1)
