"""Matplotlib helpers shared by every ``.plot()``: a new figure that never switches matplotlib's
backend, and one way to save it.

With pyplot already imported (Jupyter, a script that calls ``plt.show()``), figures are made
through pyplot, so the notebook's inline display and ``plt.show()`` see them. Otherwise a bare
:class:`matplotlib.figure.Figure` is made that no backend manages: it is returned to be saved or
displayed, and it leaks nothing when dropped (no figure manager holds it). Neither path calls
``matplotlib.use``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional, Union

from headscope.files import atomic_savefig


def new_figure(figsize: tuple[float, float], **options: Any) -> Any:
    """A new figure of ``figsize`` inches (``options`` go to ``Figure``, e.g. ``layout="constrained"``)."""
    if "matplotlib.pyplot" in sys.modules:
        import matplotlib.pyplot as plt

        return plt.figure(figsize=figsize, **options)
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, **options)


def axes_for(ax: Any, figsize: tuple[float, float]) -> tuple[Any, Any]:
    """``(figure, ax)``: the given axes and their figure, or a new figure with one axes."""
    if ax is not None:
        return ax.figure, ax
    figure = new_figure(figsize, layout="constrained")
    return figure, figure.add_subplot()


def finish(figure: Any, path: Optional[Union[str, Path]] = None, dpi: int = 120) -> Any:
    """Save ``figure`` as ``path`` (any format matplotlib writes, atomically) when given; returns it."""
    if path is not None:
        atomic_savefig(figure, path, dpi=dpi)
    return figure


def number_format(low: float, high: float) -> str:
    """A ``str.format`` spec that shows values in ``[low, high]`` readably: fixed point with as
    few decimals as tell the range apart, never ``1.85e-10`` for what is zero at that scale."""
    span = max(abs(low), abs(high), abs(high - low))
    if span == 0 or span >= 100:
        return "{:.0f}"
    if span >= 1:
        return "{:.1f}" if span < 10 else "{:.0f}"
    if span >= 0.01:
        return "{:.2f}"
    return "{:.1e}"
