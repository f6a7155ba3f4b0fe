"""Matplotlib helpers shared by every ``.plot()``: a new figure that never switches matplotlib's
backend, and one way to save it.

With pyplot already imported (Jupyter, a script that calls ``plt.show()``), figures are made
through pyplot, so the notebook's inline display and ``plt.show()`` see them. Otherwise a bare
:class:`matplotlib.figure.Figure` is made that no backend manages: it is returned to be saved or
displayed, and it leaks nothing when dropped (no figure manager holds it). Neither path calls
``matplotlib.use``. Inside a Jupyter kernel pyplot is used too (imported if need be, with the
backend the kernel configured): only pyplot's figures reach the notebook's inline display.

Also the pieces several plots share: :func:`head_heatmap` (a ``[n_layers, n_heads]`` grid with
every head ticked and a labelled colour bar), :func:`difference_bars` (conditions as bars and a
difference's 95% interval as an error bar) and the role palette (:data:`ROLE_COLOURS`,
:data:`NO_ROLE`) the report's role map uses too.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from jaxtyping import Bool, Float, Int
from torch import Tensor

from headscope.files import atomic_savefig

# One colour per role, in the atlas's role order (repeating after ten), and the colour of no role.
# Matplotlib's category colours less its grey (a background role's, BACKGROUND_ROLE), then eight
# more that none of them resembles: the atlas has 16 roles, and two roles of one colour on the role
# map cannot be told apart.
ROLE_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
                "#bcbd22", "#1a1a7e", "#6b8e23", "#800000", "#008080", "#ff1493", "#d4a017", "#4b0082",
                "#222222")
NO_ROLE = "#e8e8e8"
BACKGROUND_ROLE = "#a3a3a3"  # a background role's colour: grey, darker than no role at all
MAX_TICKED_LAYERS = 32  # up to this many layers every layer is ticked, beyond it every step-th


def _pyplot_in_use() -> bool:
    """Whether figures should go through pyplot: it is imported already, or this runs in a Jupyter
    kernel (whose inline display shows only pyplot's figures; importing pyplot there picks the
    backend the kernel set, it switches none)."""
    return "matplotlib.pyplot" in sys.modules or _in_kernel()


def _in_kernel() -> bool:
    """Whether this runs in a Jupyter kernel."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return getattr(shell, "kernel", None) is not None


def new_figure(figsize: tuple[float, float], **options: Any) -> Any:
    """A new figure of ``figsize`` inches (``options`` go to ``Figure``, e.g. ``layout="constrained"``)."""
    if _pyplot_in_use():
        import matplotlib.pyplot as plt

        figure = plt.figure(figsize=figsize, **options)
        figure._headscope_made = True  # finish() may close it once saved
        return figure
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, **options)


def axes_for(ax: Any, figsize: tuple[float, float]) -> tuple[Any, Any]:
    """``(figure, ax)``: the given axes and their figure, or a new figure with one axes."""
    if ax is not None:
        return ax.figure, ax
    figure = new_figure(figsize, layout="constrained")
    return figure, figure.add_subplot()


def finish(figure: Any, path: Optional[Union[str, Path]] = None, dpi: int = 120) -> Any:
    """Save ``figure`` as ``path`` (any format matplotlib writes, atomically) when given; returns it.

    A figure :func:`new_figure` made through pyplot is closed once saved (outside Jupyter), so a
    script that saves plots in a loop holds no open figures; the returned figure still draws
    and saves."""
    if path is not None:
        atomic_savefig(figure, path, dpi=dpi)
        if getattr(figure, "_headscope_made", False) and not _in_kernel():
            import matplotlib.pyplot as plt

            plt.close(figure)
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


def value_formatter(low: float, high: float) -> Callable[[float, Any], str]:
    """A tick formatter (``fn(value, position) -> str``) in :func:`number_format`'s spec for
    ``[low, high]``, showing a value that is zero at that scale (a tick at ``1e-17``) as zero."""
    spec = number_format(low, high)
    span = max(abs(low), abs(high), abs(high - low))

    def show(value: float, _position: Any = None) -> str:
        return spec.format(0.0 if abs(value) <= span * 1e-9 else value)

    return show


def layer_step(n_layers: int) -> int:
    """Every layer up to :data:`MAX_TICKED_LAYERS`, else the smallest of 2, 4, 5, 10, 20, ... that
    leaves at most 24 ticks."""
    if n_layers <= MAX_TICKED_LAYERS:
        return 1
    steps = [2, 4, 5] + [10 * 2**i for i in range(12)]
    return next(step for step in steps if math.ceil(n_layers / step) <= 24)


def head_axes(ax: Any, n_layers: int, n_heads: int) -> None:
    """Tick every head on x (label "head") and the layers on y (label "layer", :func:`layer_step`)."""
    small = {"fontsize": 7 if n_heads > 16 else 8}
    ax.set_xticks(range(n_heads), [str(h) for h in range(n_heads)], **small)
    layers = range(0, n_layers, layer_step(n_layers))
    ax.set_yticks(layers, [str(layer) for layer in layers], **small)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")


def head_figsize(n_layers: int, n_heads: int, extra_width: float = 1.6) -> tuple[float, float]:
    """Inches for a ``[n_layers, n_heads]`` grid plus ``extra_width`` for a colour bar or legend."""
    return (min(2.0 + 0.32 * n_heads, 14.0) + extra_width, min(1.6 + 0.24 * n_layers, 12.0))


def head_heatmap(
    ax: Any, values: Float[Tensor, "n_layers n_heads"], *, label: str, title: str, cmap: str = "viridis"
) -> Any:
    """Draw ``values[layer, head]`` on ``ax`` (NaN left blank) with every head ticked, a colour bar
    labelled ``label`` whose ticks :func:`value_formatter` writes, and ``title``; returns the colour bar."""
    import numpy as np
    from matplotlib.ticker import FuncFormatter

    grid = np.ma.masked_invalid(values.detach().cpu().float().numpy())
    image = ax.imshow(grid, aspect="auto", cmap=cmap, origin="upper", interpolation="nearest")
    head_axes(ax, *grid.shape)
    ax.set_title(title, fontsize=9)
    finite = grid.compressed()
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    bar = ax.figure.colorbar(image, ax=ax, fraction=0.06, aspect=30)
    bar.set_label(label, fontsize=8)
    if low == high:  # one value (or none): one tick saying it, not a made-up range around it
        bar.set_ticks([low] if finite.size else [], labels=[f"{low:.4g}"] if finite.size else [])
    else:
        bar.ax.yaxis.set_major_formatter(FuncFormatter(value_formatter(low, high)))
    bar.ax.tick_params(labelsize=7)
    return bar


def outline_heads(ax: Any, mask: Bool[Tensor, "n_layers n_heads"], colour: str = "#000000") -> int:
    """Outline the cells of ``ax``'s head grid where ``mask[layer, head]`` is true; returns how many."""
    from matplotlib.patches import Rectangle

    cells = [(int(layer), int(head)) for layer, head in mask.nonzero().tolist()]
    for layer, head in cells:
        ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1.0, 1.0, fill=False, edgecolor=colour, linewidth=1.8))
    return len(cells)


def role_colours(names: Sequence[str], background: Sequence[str] = ()) -> dict[str, str]:
    """Each role's colour: :data:`ROLE_COLOURS` in the roles' order (repeating after the last),
    background roles (``Significance.background``: held by most heads) a quiet grey of their own,
    :data:`BACKGROUND_ROLE`, that keeps the rarer roles in view."""
    foreground = [name for name in names if name not in background]
    colours = {name: ROLE_COLOURS[i % len(ROLE_COLOURS)] for i, name in enumerate(foreground)}
    return {name: colours.get(name, BACKGROUND_ROLE) for name in names}


def role_shade(colour: str, strength: float) -> str:
    """A role's ``#rrggbb`` colour for a head of that ``strength`` (0..1): mixed with white, from
    0.35 of the colour at strength 0 to all of it at 1 (the report's and ``RoleMap.plot``'s rule)."""
    amount = 0.35 + 0.65 * strength
    rgb = [int(colour[i:i + 2], 16) for i in (1, 3, 5)]
    return "#%02x%02x%02x" % tuple(round(255 + (c - 255) * amount) for c in rgb)


def role_map_image(
    ax: Any, names: Sequence[str], index: Int[Tensor, "n_layers n_heads"], strength: Float[Tensor, "n_layers n_heads"],
    *, title: str, background: Sequence[str] = (),
) -> None:
    """Draw each head in its strongest role's colour (``index`` into ``names``, -1: no role in
    :data:`NO_ROLE`; ``background`` roles in :data:`BACKGROUND_ROLE`), lighter the weaker its
    ``strength`` (0..1, :func:`role_shade`), with a legend of the roles and how many heads each has."""
    from matplotlib.colors import to_rgb
    from matplotlib.patches import Patch

    colours = role_colours(names, background)
    cells = [[to_rgb(NO_ROLE if role < 0 else role_shade(colours[names[role]], float(power)))
              for role, power in zip(row_index, row_strength, strict=True)]
             for row_index, row_strength in zip(index.tolist(), strength.tolist(), strict=True)]
    ax.imshow(cells, aspect="auto", origin="upper", interpolation="nearest")
    head_axes(ax, *index.shape)
    ax.set_title(title, fontsize=9)
    counts = [int((index == i).sum()) for i in range(len(names))] + [int((index < 0).sum())]
    handles = [Patch(facecolor=colours[name], label=f"{name} ({count})")
               for name, count in zip(names, counts[:-1], strict=True)]
    handles.append(Patch(facecolor=NO_ROLE, label=f"none ({counts[-1]})"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, frameon=False,
              title="strongest role\n(lighter = weaker)", title_fontsize=7)


def difference_bars(
    ax: Any, conditions: Sequence[tuple[str, float]], *, reference: float, compared: int, difference: float,
    ci: tuple[float, float], draws: Sequence[float] = (), draws_at: int = -1, ylabel: str = "",
    reference_label: str = "",
) -> None:
    """One bar per ``(label, value)`` of ``conditions``; ``draws`` as dots over bar ``draws_at``; a
    dashed line at ``reference`` (``reference_label`` in the legend); and on bar ``compared`` the
    difference from the reference with its 95% interval ``ci`` as an error bar at ``reference +
    difference``: the interval misses the dashed line exactly when it excludes 0."""
    positions = list(range(len(conditions)))
    colours = ["#9e9e9e"] * len(conditions)
    colours[compared] = ROLE_COLOURS[0]
    ax.bar(positions, [value for _, value in conditions], color=colours, width=0.6, alpha=0.75)
    ax.set_xticks(positions, [name for name, _ in conditions], fontsize=8)
    if draws:
        where = positions[draws_at]
        spread = [where + 0.24 * (i / max(len(draws) - 1, 1) - 0.5) for i in range(len(draws))]
        ax.scatter(spread, list(draws), s=14, color="#424242", zorder=3, label=f"each of {len(draws)} draws")
    ax.axhline(reference, color="#616161", linestyle="--", linewidth=1, label=reference_label or None)
    low, high = reference + ci[0], reference + ci[1]
    middle = reference + difference
    spread_below, spread_above = max(middle - low, 0.0), max(high - middle, 0.0)
    ax.errorbar([positions[compared]], [middle], yerr=[[spread_below], [spread_above]], fmt="o", color="#000000",
                capsize=5, zorder=4, label=f"difference {difference:+.3g}, 95% CI [{ci[0]:+.3g}, {ci[1]:+.3g}]")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
