"""The atlas's report: a self-contained HTML page (inline SVG and CSS, no script, nothing fetched at
view time) and CSV files of every number.

Sections (each a ``<section id=...>``): summary, role map, heatmaps (one per role), validation,
significance rules, overlaps, configs and versions.
"""

from __future__ import annotations

import csv
import dataclasses
import html
import io
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from headscope.engine.heads import Head
from headscope.results import write_text_atomic
from headscope.viz.figures import NO_ROLE, ROLE_COLOURS

if TYPE_CHECKING:  # pragma: no cover
    from headscope.atlas import Atlas
    from headscope.significance import Significance

SECTIONS = ("summary", "role-map", "heatmaps", "validation", "significance", "overlap", "configs")
# viridis at 0, 0.25, 0.5, 0.75, 1 and a blue-white-red map for signed scores
SEQUENTIAL = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))
DIVERGING = ((33, 102, 172), (146, 197, 222), (247, 247, 247), (244, 165, 130), (178, 24, 43))
CELL = 14  # pixels per head in the grids

STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 1180px;
       color: #222; line-height: 1.4; padding: 0 16px; }
h1 { font-size: 1.6em; margin-bottom: 0; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 4px; margin-top: 36px; }
.sub { color: #666; margin-top: 4px; }
table { border-collapse: collapse; font-size: 0.88em; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.yes { color: #1a7f37; font-weight: 600; } .no { color: #a40e26; }
.failed { color: #fff; background: #a40e26; padding: 1px 5px; font-weight: 600; }
.grid { display: flex; flex-wrap: wrap; gap: 18px; }
figure { margin: 0; } figcaption { font-size: 0.8em; color: #555; max-width: 300px; }
pre { background: #f7f7f7; padding: 10px; overflow-x: auto; font-size: 0.8em; }
.legend span { display: inline-block; margin-right: 14px; font-size: 0.9em; }
.legend i { display: inline-block; width: 12px; height: 12px; margin-right: 4px; vertical-align: -1px; }
"""


def write_report(atlas: "Atlas", directory: Path) -> Path:
    """Write ``report.html`` and ``role_map.svg``; returns the report's path."""
    role_svg = role_map_svg(atlas)
    write_text_atomic(directory / "role_map.svg", role_svg)
    path = directory / "report.html"
    write_text_atomic(path, render_html(atlas, role_svg))
    return path


def render_html(atlas: "Atlas", role_svg: Optional[str] = None) -> str:
    role_svg = role_svg if role_svg is not None else role_map_svg(atlas)
    body = [
        f"<h1>Head atlas — {_e(atlas.model)}</h1>",
        f"<p class='sub'>{atlas.shape[0]} layers × {atlas.shape[1]} query heads · {len(atlas.scores)} detectors · "
        f"headscope {_e(atlas.environment.get('headscope', '?'))} · {_e(atlas.environment.get('date', ''))} · "
        f"{_e(atlas.environment.get('device_name', atlas.environment.get('device', '')))}</p>",
        _section("summary", "Summary", _summary_html(atlas)),
        _section("role-map", "Role map", _role_map_html(atlas, role_svg)),
        _section("heatmaps", "Scores per role", _heatmaps_html(atlas)),
        _section("validation", "Causal validation", _validation_html(atlas)),
        _section("significance", "Significance rules", _significance_html(atlas)),
        _section("overlap", "Overlaps between roles", _overlap_html(atlas)),
        _section("configs", "Configs and versions", _configs_html(atlas)),
    ]
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>Head atlas — {_e(atlas.model)}</title><style>{STYLE}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


# ----- sections ------------------------------------------------------------------------------
def _section(anchor: str, title: str, content: str) -> str:
    return f"<section id='{anchor}'><h2>{_e(title)}</h2>\n{content}\n</section>"


def _summary_html(atlas: "Atlas") -> str:
    rows = []
    for row in atlas.summary():
        check = "—" if row["validated"] is None else (
            f"<span class='{'yes' if row['validated'] else 'no'}'>{row['difference']:+.3g} "
            f"[{row['ci'][0]:+.3g}, {row['ci'][1]:+.3g}]</span>")
        rows.append([_e(row["role"]), _e(row["detector"]), _num(row["n_significant"]), _e(", ".join(row["top"]) or "—"), check])
    rows.extend(_failed_rows(atlas))
    text = [_failure_banner(atlas), _table(["role", "detector", "significant heads", "strongest", "validation: top-k minus random-k [95% CI]"], rows)]
    text.append(_pair_sentences(atlas))
    return "\n".join(text)


def _failed_rows(atlas: "Atlas") -> list[list[str]]:
    return [[_e(name), _e(name), "—", "—",
             f"<span class='failed'>FAILED in {_e(f['stage'])}: {_e(f['error'])}: {_e(_short(f['message'], 160))}</span>"]
            for name, f in atlas.failures.items()]


def _failure_banner(atlas: "Atlas") -> str:
    if not atlas.failures:
        return ""
    return (f"<p class='failed'>{_e(atlas.failure_summary())}. Their finished stages are kept; rerun the same "
            "command to retry only what failed (each failure and its traceback is in parts/&lt;detector&gt;.failed.json)."
            "</p>")


def _pair_sentences(atlas: "Atlas") -> str:
    """The overlaps worth a sentence: every pair of roles sharing a significant head."""
    pairs = [p for p in atlas.overlap_table() if p["n_shared"]]
    if not pairs:
        return "<p>No head is significant for two roles.</p>"
    items = [f"<li><b>{_e(p['role_a'])}</b> and <b>{_e(p['role_b'])}</b> share {p['n_shared']} of "
             f"{p['n_a']} and {p['n_b']} significant heads (Jaccard {p['jaccard']:.2f}): {_e(', '.join(p['shared']))}</li>"
             for p in sorted(pairs, key=lambda p: -p["n_shared"])]
    return "<p>Heads with two roles:</p><ul>" + "".join(items) + "</ul>"


def _role_map_html(atlas: "Atlas", role_svg: str) -> str:
    return (f"<figure>{role_svg}<figcaption>Each head coloured by its strongest significant role (the role in which it "
            "sits nearest that role's best head, relative to the threshold); lighter = weaker; grey = no significant "
            "role; the legend counts the heads whose strongest role it is. Hover a head for all its roles."
            "</figcaption></figure>")


def _heatmaps_html(atlas: "Atlas") -> str:
    figures = []
    for role, sig in atlas.roles.items():
        scores = atlas.scores[sig.detector]
        values = sig.statistic if role != sig.detector else scores.values
        label = sig.statistic_name if role != sig.detector else f"{sig.detector} score"
        svg = heatmap_svg(values, sig.mask, f"{role}", label)
        figures.append(f"<figure>{svg}<figcaption><b>{_e(role)}</b>: {_e(label)}; outlined: the "
                       f"{len(sig.heads)} significant heads.</figcaption></figure>")
    unassigned = [name for name in atlas.scores if not atlas.significance.get(name)]
    for name in unassigned:
        svg = heatmap_svg(atlas.scores[name].values, None, name, f"{name} score")
        figures.append(f"<figure>{svg}<figcaption><b>{_e(name)}</b> (no significance rule)</figcaption></figure>")
    return "<div class='grid'>" + "\n".join(figures) + "</div>"


def _validation_html(atlas: "Atlas") -> str:
    rows = []
    for name, result in atlas.validations.items():
        if result is None:
            continue
        rows.append([_e(name), _e(result.metric_name), _e(f"{result.method}, k={result.k}"), _num(result.clean),
                     _num(result.top_k), _num(result.random_k), _num(result.difference),
                     f"[{result.ci_low:+.4g}, {result.ci_high:+.4g}]",
                     f"<span class='{'yes' if result.significant else 'no'}'>{'yes' if result.significant else 'no'}</span>",
                     _num(result.n_examples), _e(", ".join(result.top_heads))])
    if not rows:
        return "<p>Not validated (the atlas ran with validate=False).</p>"
    head = ["detector", "metric", "ablation", "clean", "top-k", "random-k", "difference", "95% CI", "significant", "n",
            "top-k heads"]
    note = (f"<p>Top-k heads ablated vs {atlas.settings.n_random} random k-sets (seed {atlas.settings.seed}); the "
            "difference is (top-k − clean) − mean(random-k − clean); its 95% CI is a t-interval for the population of "
            "random k-sets (the examples' noise plus the spread between draws, Welch–Satterthwaite df). "
            "Significant when the CI excludes 0 on the side where the ablation hurts.</p>")
    return note + _table(head, rows)


def _significance_html(atlas: "Atlas") -> str:
    rows = [[_e(role), _e(sig.statistic_name), _num(sig.threshold), _e(sig.rule), _num(int(sig.above_null.sum())),
             _e(_floor_text(sig)), _e(sig.floor_rule), _num(len(sig.heads)),
             _e(", ".join(str(h) for h in sig.heads[:12]) + (" …" if len(sig.heads) > 12 else ""))]
            for role, sig in atlas.roles.items()]
    note = ("<p>A head is significant when its statistic beats the null (threshold) <em>and</em> its effect size "
            "exceeds the role's floor: beyond chance, and large enough to say the head does the role.</p>")
    return note + _table(["role", "statistic", "threshold (null)", "rule", "above null", "effect floor", "floor from",
                          "significant", "significant heads"], rows)


def _floor_text(sig: "Significance") -> str:
    return "none" if math.isinf(sig.floor) else f"{sig.effect_name} > {sig.floor:.3g}"


def _overlap_html(atlas: "Atlas") -> str:
    names, matrix = atlas.overlap()
    if not names:
        return "<p>No roles.</p>"
    k = atlas.settings.overlap_k
    rows = [[_e(p["role_a"]), _e(p["role_b"]), _num(p["n_a"]), _num(p["n_b"]), _num(p["n_shared"]),
             _num(p["jaccard"]), _e(", ".join(p["shared"]) or "—"), _num(p[f"top{k}_shared"]),
             _num(p[f"top{k}_expected_at_random"]), _num(p["spearman"])] for p in atlas.overlap_table()]
    table = _table(["role A", "role B", "sig. A", "sig. B", "shared", "Jaccard", "shared heads", f"top-{k} shared",
                    f"top-{k} at random", "Spearman"], rows)
    return (f"<figure>{jaccard_svg(names, matrix)}<figcaption>Jaccard index of the significant head sets.</figcaption>"
            f"</figure>\n<p>Per pair: significant sets, and the top-{k} heads of the two statistic maps with the "
            "overlap two random sets would have and the rank correlation over all heads.</p>" + table)


def _configs_html(atlas: "Atlas") -> str:
    configs = {name: scores.config for name, scores in atlas.scores.items()}
    timing_rows = [[_e(name)] + [_e(f"in {t['scored_with']}'s pass") if stage == "scores" and t.get("scored_with")
                                 else _num(t.get(stage)) for stage in ("scores", "significance", "validation")]
                   + ["yes" if t.get("resumed") else ""] for name, t in atlas.timings.items()]
    return (
        "<h3>Versions and device</h3>" + _pre(atlas.environment)
        + "<h3>Atlas settings</h3>" + _pre(dataclasses.asdict(atlas.settings))
        + "<h3>Seconds per stage</h3>" + _table(["detector", "scores", "significance", "validation", "resumed"], timing_rows)
        + "<h3>Detector configs</h3>" + _pre(configs)
    )


# ----- SVG -----------------------------------------------------------------------------------
def heatmap_svg(values: Float[Tensor, "n_layers n_heads"], outline: Optional[Bool[Tensor, "n_layers n_heads"]],
                title: str, label: str) -> str:
    """A layer × head grid coloured by ``values`` (viridis; blue-white-red around 0 when the
    values have both signs), ``outline`` heads framed, a colour bar with its range, and a tooltip
    per head."""
    finite = values[~torch.isnan(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 1.0)
    signed = low < 0 < high
    if signed:
        bound = max(-low, high)
        low, high = -bound, bound
    palette = DIVERGING if signed else SEQUENTIAL

    def colour(value: float) -> str:
        return "#ffffff" if math.isnan(value) else _interpolate(palette, (value - low) / (high - low or 1.0))

    tooltip = lambda layer, head, value: f"{Head(layer, head)}: {value:.4g}"  # noqa: E731
    return _grid_svg(values, colour, tooltip, outline, title, label, legend=(palette, low, high))


def role_map_svg(atlas: "Atlas") -> str:
    """The role map: each head in its strongest significant role's colour, lighter when weaker."""
    names, index, strength = atlas.role_map()
    roles = atlas.roles
    colours = {name: ROLE_COLOURS[i % len(ROLE_COLOURS)] for i, name in enumerate(names)}

    def colour_of(layer: int, head: int) -> str:
        role = int(index[layer, head])
        if role < 0:
            return NO_ROLE
        return _blend(colours[names[role]], 0.35 + 0.65 * float(strength[layer, head]))

    masks = {role: sig.mask for role, sig in roles.items()}  # each computed once, not per head

    def tooltip(layer: int, head: int, _value: float) -> str:
        held = [f"{r} ({sig.statistic[layer, head]:.3g})" for r, sig in roles.items() if masks[r][layer, head]]
        return f"{Head(layer, head)}: " + (", ".join(held) if held else "no significant role")

    grid = torch.zeros(atlas.shape)
    cells = {(l, h): colour_of(l, h) for l in range(atlas.shape[0]) for h in range(atlas.shape[1])}  # noqa: E741
    counts = {name: int((index == i).sum()) for i, name in enumerate(names)}
    legend = [(colours[name], f"{name} ({counts[name]})") for name in names] + [(NO_ROLE, "none")]
    return _grid_svg(grid, lambda v: "", tooltip, None, f"Role map — {atlas.model}", "", cells=cells, key=legend,
                     scale=2.2)


def jaccard_svg(names: Sequence[str], matrix: Float[Tensor, "roles roles"]) -> str:
    """The Jaccard matrix as a labelled grid (darker = more shared heads)."""
    size, left, top = 34, 120, 110
    n = len(names)
    width, height = left + n * size + 10, top + n * size + 10
    parts = [_svg_open(width, height, "Jaccard index of significant head sets")]
    for i, name in enumerate(names):
        y = top + i * size + size / 2 + 4
        parts.append(f"<text x='{left - 6}' y='{y:.0f}' text-anchor='end' font-size='11'>{_e(name)}</text>")
        x = left + i * size + size / 2
        parts.append(f"<text x='{x:.0f}' y='{top - 6}' font-size='11' transform='rotate(-45 {x:.0f} {top - 6})'>"
                     f"{_e(name)}</text>")
        for j in range(n):
            value = float(matrix[i, j])
            fill = "#ffffff" if math.isnan(value) else _interpolate(((247, 251, 255), (8, 48, 107)), value)
            ink = "#fff" if not math.isnan(value) and value > 0.55 else "#222"
            text = "" if math.isnan(value) else f"{value:.2f}"
            parts.append(f"<rect x='{left + j * size}' y='{top + i * size}' width='{size}' height='{size}' fill='{fill}' "
                         f"stroke='#ccc'><title>{_e(name)} / {_e(names[j])}: {text or 'no heads'}</title></rect>")
            parts.append(f"<text x='{left + j * size + size / 2:.0f}' y='{top + i * size + size / 2 + 4:.0f}' "
                         f"text-anchor='middle' font-size='10' fill='{ink}'>{text}</text>")
    parts.append("</svg>")
    return "".join(parts)


def _grid_svg(values: Tensor, colour, tooltip, outline: Optional[Tensor], title: str, label: str,
              legend: Optional[tuple] = None, cells: Optional[dict] = None, key: Optional[list] = None,
              scale: float = 1.0) -> str:
    n_layers, n_heads = values.shape
    cell = CELL * scale
    left, top = 34, 30
    bar_height = 46 if legend else 0
    key_height = 18 * ((len(key) + 1) // 2) + 6 if key else 0
    width = max(left + n_heads * cell + 16, 260 if key else 210)
    height = top + n_layers * cell + 24 + bar_height + key_height
    parts = [_svg_open(width, height, title), f"<text x='{left}' y='16' font-size='12' font-weight='600'>{_e(title)}</text>"]
    for head in range(n_heads):
        parts.append(f"<text x='{left + head * cell + cell / 2:.1f}' y='{top - 4}' text-anchor='middle' font-size='9'>{head}</text>")
    for layer in range(n_layers):
        if layer % max(1, round(5 / scale)) == 0:
            parts.append(f"<text x='{left - 4}' y='{top + layer * cell + cell * 0.75:.1f}' text-anchor='end' "
                         f"font-size='9'>L{layer}</text>")
        for head in range(n_heads):
            value = float(values[layer, head])
            fill = cells[(layer, head)] if cells is not None else colour(value)
            framed = outline is not None and bool(outline[layer, head])
            stroke = "stroke='#000' stroke-width='1.6'" if framed else "stroke='#fff' stroke-width='0.5'"
            parts.append(f"<rect x='{left + head * cell:.1f}' y='{top + layer * cell:.1f}' width='{cell:.1f}' "
                         f"height='{cell:.1f}' fill='{fill}' {stroke}><title>{_e(tooltip(layer, head, value))}</title></rect>")
    y = top + n_layers * cell + 14
    parts.append(f"<text x='{left + n_heads * cell / 2:.1f}' y='{y}' text-anchor='middle' font-size='9'>head</text>")
    if legend:
        palette, low, high = legend
        parts.append(_colour_bar(left, y + 8, n_heads * cell, palette, low, high, label))
    if key:
        for i, (fill, text) in enumerate(key):
            kx, ky = left + (i % 2) * 130 - 24, y + 12 + (i // 2) * 18
            parts.append(f"<rect x='{kx}' y='{ky}' width='12' height='12' fill='{fill}'/>"
                         f"<text x='{kx + 16}' y='{ky + 10}' font-size='11'>{_e(text)}</text>")
    parts.append("</svg>")
    return "".join(parts)


def _colour_bar(x: float, y: float, width: float, palette, low: float, high: float, label: str) -> str:
    steps = 24
    parts = [f"<rect x='{x + i * width / steps:.1f}' y='{y}' width='{width / steps + 0.5:.1f}' height='8' "
             f"fill='{_interpolate(palette, i / (steps - 1))}'/>" for i in range(steps)]
    parts.append(f"<text x='{x}' y='{y + 19}' font-size='9'>{low:.3g}</text>")
    parts.append(f"<text x='{x + width}' y='{y + 19}' font-size='9' text-anchor='end'>{high:.3g}</text>")
    parts.append(f"<text x='{x}' y='{y + 31}' font-size='9'>{_e(_short(label))}</text>")
    return "".join(parts)


def _svg_open(width: float, height: float, title: str) -> str:
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{width:.0f}' height='{height:.0f}' "
            f"viewBox='0 0 {width:.0f} {height:.0f}' font-family='Helvetica, Arial, sans-serif' role='img' "
            f"aria-label='{_e(title)}'>")


def _interpolate(palette: Sequence[tuple[int, int, int]], t: float) -> str:
    t = min(max(t, 0.0), 1.0) * (len(palette) - 1)
    i = min(int(t), len(palette) - 2)
    frac = t - i
    rgb = [round(a + (b - a) * frac) for a, b in zip(palette[i], palette[i + 1], strict=True)]
    return "#%02x%02x%02x" % tuple(rgb)


def _blend(hex_colour: str, amount: float) -> str:
    """``hex_colour`` mixed with white: amount 1 = the colour, 0 = white."""
    rgb = [int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)]
    return "#%02x%02x%02x" % tuple(round(255 + (c - 255) * amount) for c in rgb)


# ----- CSV -----------------------------------------------------------------------------------
def write_csv_files(atlas: "Atlas", directory: Path) -> None:
    """``heads.csv`` (one row per head), ``validation.csv``, ``significance.csv``, ``overlap.csv``,
    and ``failures.csv`` when a detector failed."""
    _write_csv(directory / "heads.csv", atlas.head_rows())
    _write_csv(directory / "validation.csv", [
        {key: (json.dumps(value) if isinstance(value, (list, dict)) else value) for key, value in v.to_dict().items()}
        for v in atlas.validations.values() if v is not None])
    _write_csv(directory / "significance.csv", [
        {"role": role, "detector": sig.detector, "statistic": sig.statistic_name, "threshold": sig.threshold,
         "rule": sig.rule, "n_above_null": int(sig.above_null.sum()), "effect": sig.effect_name,
         "floor": None if math.isinf(sig.floor) else sig.floor, "floor_rule": sig.floor_rule, "n_heads": len(sig.heads), "heads": " ".join(str(h) for h in sig.heads),
         "details": json.dumps({k: v for k, v in sig.details.items() if not isinstance(v, list)})}
        for role, sig in atlas.roles.items()])
    _write_csv(directory / "overlap.csv", [
        {key: (" ".join(value) if isinstance(value, list) else value) for key, value in row.items()}
        for row in atlas.overlap_table()])
    failures = directory / "failures.csv"
    if atlas.failures:
        _write_csv(failures, [{"detector": name, **failure} for name, failure in atlas.failures.items()])
    else:
        failures.unlink(missing_ok=True)  # a rerun that succeeded leaves no stale list


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, text.getvalue())


# ----- small helpers -------------------------------------------------------------------------
def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _num(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "<td class='num'>—</td>"
    if isinstance(value, int):
        return f"<td class='num'>{value}</td>"
    return f"<td class='num'>{value:.4g}</td>"


def _pre(value: Any) -> str:
    return f"<pre>{_e(json.dumps(value, indent=1, default=str))}</pre>"


def _short(text: str, limit: int = 38) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)
