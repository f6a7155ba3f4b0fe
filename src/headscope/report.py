"""The atlas's report: self-contained HTML pages (inline SVG, CSS and script; nothing fetched at
view time) and CSV files of every number.

``report.html`` has the sections (each a ``<section id=...>``) summary, role map, heatmaps (one per
role, under the role's explanation), validation, significance rules, overlaps, configs and
versions. Every head significant in some role has its own page, ``heads/L18H6.html``: its scores
in every role with the thresholds and verdicts, its detectors' validation, its attention patterns
on the detectors' examples and on a natural sentence (interactive views, inline script), its KV
group and its neighbours. The role map and the heatmaps link each such head to its page.
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
from headscope.errors import UnknownDetectorError
from headscope.results import write_text_atomic
from headscope.viz.figures import NO_ROLE, number_format, role_colours, role_shade

if TYPE_CHECKING:  # pragma: no cover
    from headscope.atlas import Atlas
    from headscope.significance import Significance

SECTIONS = ("summary", "role-map", "heatmaps", "validation", "significance", "overlap", "configs")
# viridis at 0, 0.25, 0.5, 0.75, 1 and a blue-white-red map for signed scores
SEQUENTIAL = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))
DIVERGING = ((33, 102, 172), (146, 197, 222), (247, 247, 247), (244, 165, 130), (178, 24, 43))
CELL = 26  # pixels per head in the heatmaps (the role map's are larger), fewer when a model has many heads
GRID_WIDTH = 1040  # the widest a grid gets: cells shrink to fit it, never below MIN_CELL
MIN_CELL = 9
KEY_COLUMN = 160  # pixels per column of the role map's key

STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 1180px;
       color: #222; line-height: 1.4; padding: 0 16px; }
h1 { font-size: 1.6em; margin-bottom: 0; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 4px; margin-top: 36px; }
h3 { font-size: 1.05em; margin: 0 0 4px 0; }
a { color: #1f4e8c; }
.sub { color: #666; margin-top: 4px; }
table { border-collapse: collapse; font-size: 0.88em; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.yes { color: #1a7f37; font-weight: 600; } .no { color: #a40e26; } .weak { color: #8a6d00; }
.failed { color: #fff; background: #a40e26; padding: 1px 5px; font-weight: 600; }
.grid { display: flex; flex-wrap: wrap; gap: 22px; align-items: flex-start; }
figure { margin: 0; } figcaption { font-size: 0.82em; color: #555; max-width: 420px; margin-top: 4px; }
figure.role { border: 1px solid #e2e2e2; border-radius: 4px; padding: 10px 12px; min-width: 300px; }
figure.role figcaption { max-width: none; }
p.explain { font-size: 0.86em; color: #333; margin: 0 0 8px 0; }
pre { background: #f7f7f7; padding: 10px; overflow-x: auto; font-size: 0.8em; }
nav { font-size: 0.9em; color: #555; margin-bottom: 10px; } nav a { margin-right: 4px; }
.prompt-note { font-size: 0.82em; color: #666; margin: 0 0 2px 0; }
.view { border-left: 3px solid #dde6f2; padding-left: 10px; margin: 12px 0 18px 0; }
svg a rect:hover { stroke: #d62728; stroke-width: 2; }
"""


def write_report(atlas: "Atlas", directory: Path) -> Path:
    """Write ``report.html``, ``role_map.svg`` and a page per significant head in ``heads/``
    (pages of heads no longer significant are removed); returns the report's path."""
    role_svg = role_map_svg(atlas)
    write_text_atomic(directory / "role_map.svg", role_svg)
    write_head_pages(atlas, directory / "heads")
    path = directory / "report.html"
    write_text_atomic(path, render_html(atlas, role_svg))
    return path


def write_head_pages(atlas: "Atlas", folder: Path) -> list[Path]:
    """``<folder>/L18H6.html`` for every head significant in some role; returns their paths."""
    heads = atlas.significant_anywhere()
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {f"{head}.html" for head in heads}
    for stale in folder.glob("L*H*.html"):
        if stale.name not in wanted:
            stale.unlink(missing_ok=True)
    paths = []
    pages = set(heads)
    for head in heads:
        path = folder / f"{head}.html"
        write_text_atomic(path, render_head_page(atlas, head, pages))
        paths.append(path)
    return paths


def render_html(atlas: "Atlas", role_svg: Optional[str] = None) -> str:
    role_svg = role_svg if role_svg is not None else role_map_svg(atlas)
    pages = set(atlas.significant_anywhere())
    body = [
        f"<h1>Head atlas — {_e(atlas.model)}</h1>",
        f"<p class='sub'>{atlas.shape[0]} layers × {atlas.shape[1]} query heads · {len(atlas.scores)} detectors · "
        f"headscope {_e(atlas.environment.get('headscope', '?'))} · {_e(atlas.environment.get('date', ''))} · "
        f"{_e(atlas.environment.get('device_name', atlas.environment.get('device', '')))}</p>",
        _section("summary", "Summary", _summary_html(atlas, pages)),
        _section("role-map", "Role map", _role_map_html(atlas, role_svg)),
        _section("heatmaps", "Scores per role", _heatmaps_html(atlas, pages)),
        _section("validation", "Causal validation", _validation_html(atlas)),
        _section("significance", "Significance rules", _significance_html(atlas)),
        _section("overlap", "Overlaps between roles", _overlap_html(atlas)),
        _section("configs", "Configs and versions", _configs_html(atlas)),
    ]
    return _page(f"Head atlas — {atlas.model}", body)


def _page(title: str, body: Sequence[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


# ----- sections ------------------------------------------------------------------------------
def _section(anchor: str, title: str, content: str) -> str:
    return f"<section id='{anchor}'><h2>{_e(title)}</h2>\n{content}\n</section>"


def _summary_html(atlas: "Atlas", pages: set[Head]) -> str:
    rows = []
    for row in atlas.summary():
        check = "—" if row["validated"] is None else (
            f"<span class='{'yes' if row['validated'] else 'no'}'>{row['difference']:+.3g} "
            f"[{row['ci'][0]:+.3g}, {row['ci'][1]:+.3g}]</span>")
        top = ", ".join(_head_link(Head.parse(h), pages, "heads/") for h in row["top"]) or "—"
        rows.append([_role_link(row["role"]), _e(row["detector"]), _num(row["n_significant"]), top, check])
    rows.extend(_failed_rows(atlas))
    text = [_failure_banner(atlas), _table(["role", "detector", "significant heads", "strongest", "validation: top-k minus random-k [95% CI]"], rows)]
    if pages:
        text.append(f"<p>Each of the {len(pages)} heads significant in some role has a page (linked from the role map "
                    "and the heatmaps): its scores, validation, attention patterns, KV group and neighbours.</p>")
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
    background = [role for role, sig in atlas.roles.items() if sig.background]
    note = (f" Background role{'s' * (len(background) > 1)} ({', '.join(background)}: held by most heads) colour only "
            "heads with no other significant role." if background else "")
    return (f"<figure>{role_svg}<figcaption>Each head coloured by its strongest significant role (the role in which it "
            "sits nearest that role's best head, relative to the threshold); lighter = weaker; grey = no significant "
            f"role; the legend counts the heads whose strongest role it is.{_e(note)} Hover a head for all its roles; "
            "click a coloured head for its page.</figcaption></figure>")


def _heatmaps_html(atlas: "Atlas", pages: set[Head]) -> str:
    figures = []
    for role, sig in atlas.roles.items():
        scores = atlas.scores[sig.detector]
        values = sig.statistic if role != sig.detector else scores.values
        label = sig.statistic_name if role != sig.detector else f"{sig.detector} score"
        svg = heatmap_svg(values, sig.mask, f"{role}", label, pages)
        explain = role_explanation(atlas, sig.detector, role)
        figures.append(f"<figure class='role' id='role-{_e(role)}' style='max-width: {_card_width(svg)}px'>"
                       f"<h3>{_e(role)}</h3><p class='explain'>{_e(explain)}</p>{svg}<figcaption><b>{_e(role)}</b>: {_e(label)}; "
                       f"outlined: the {len(sig.heads)} significant heads.</figcaption></figure>")
    unassigned = [name for name in atlas.scores if not atlas.significance.get(name)]
    for name in unassigned:
        svg = heatmap_svg(atlas.scores[name].values, None, name, f"{name} score", pages)
        figures.append(f"<figure class='role' id='role-{_e(name)}' style='max-width: {_card_width(svg)}px'>"
                       f"<h3>{_e(name)}</h3>{svg}<figcaption><b>{_e(name)}"
                       "</b> (no significance rule)</figcaption></figure>")
    return "<div class='grid'>" + "\n".join(figures) + "</div>"


def _card_width(svg: str) -> int:
    """A role's card is as wide as its heatmap, and wide enough to read its explanation."""
    width = int(svg.split("width='", 1)[1].split("'", 1)[0])
    return max(width, 340)


def role_explanation(atlas: "Atlas", detector: str, role: str) -> str:
    """The role in plain words: the detector's ``explanation`` of it, else its one-line summary (a
    detector not registered where the report is written)."""
    from headscope.detectors.base import detector_class

    try:
        explained = detector_class(detector).explanation.get(role)
    except UnknownDetectorError:
        explained = None
    scores = atlas.scores.get(detector)
    return explained or (str(scores.metadata.get("summary") or "") if scores is not None else "")


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
    stages = ("scores", "significance", "validation", "patterns")
    timing_rows = [[_e(name)] + [_e(f"in {t['scored_with']}'s pass") if stage == "scores" and t.get("scored_with")
                                 else _num(t.get(stage)) for stage in stages]
                   + ["yes" if t.get("resumed") else ""] for name, t in atlas.timings.items()]
    return (
        "<h3>Versions and device</h3>" + _pre(atlas.environment)
        + "<h3>Atlas settings</h3>" + _pre(dataclasses.asdict(atlas.settings))
        + "<h3>Seconds per stage</h3>" + _table(["detector (or step)", *stages, "resumed"], timing_rows)
        + "<h3>Detector configs</h3>" + _pre(configs)
    )


# ----- head pages ----------------------------------------------------------------------------
def render_head_page(atlas: "Atlas", head: Head, pages: Optional[set[Head]] = None) -> str:
    """The page of one head (``heads/<head>.html``): scores and verdicts in every role, its
    detectors' validation, its attention patterns, its KV group and neighbours. ``pages``: the
    heads that have a page (default: every head significant in some role)."""
    pages = set(atlas.significant_anywhere()) if pages is None else pages
    held = _roles_of(atlas, head)
    kv, group = atlas.kv_group(head)
    body = [
        _head_nav(atlas, head, pages),
        f"<h1>{head} — {_e(atlas.model)}</h1>",
        f"<p class='sub'>layer {head.layer} of {atlas.shape[0]}, query head {head.head} of {atlas.shape[1]} · "
        f"{f'KV head {kv} · ' if atlas.n_kv_heads is not None else ''}significant for "
        f"{', '.join(_role_link(r, '../report.html') for r in held) or 'no role'}</p>",
        _section("scores", "Scores in every role", _head_scores_html(atlas, head)),
        _section("validation", "Validation of its detectors' top heads", _head_validation_html(atlas, head, held)),
        _section("patterns", "Attention patterns", _head_patterns_html(atlas, head)),
        _section("neighbours", "KV group and neighbours", _head_neighbours_html(atlas, head, kv, group, pages)),
    ]
    return _page(f"{head} — {atlas.model}", body)


def _head_nav(atlas: "Atlas", head: Head, pages: set[Head]) -> str:
    ordered = sorted(pages)
    at = ordered.index(head) if head in ordered else -1
    links = ["<a href='../report.html'>← atlas report</a>", "<a href='../report.html#role-map'>role map</a>"]
    if at > 0:
        links.append(f"previous significant head: {_head_link(ordered[at - 1], pages)}")
    if 0 <= at < len(ordered) - 1:
        links.append(f"next: {_head_link(ordered[at + 1], pages)}")
    return "<nav>" + " · ".join(links) + "</nav>"


def _head_scores_html(atlas: "Atlas", head: Head) -> str:
    rows = []
    for role, sig in atlas.roles.items():
        value = float(sig.statistic[head.layer, head.head])
        effect = float(sig.effect_size[head.layer, head.head])
        if bool(sig.mask[head.layer, head.head]):
            verdict = "<span class='yes'>significant</span>"
        elif bool(sig.above_null[head.layer, head.head]):
            verdict = "<span class='weak'>above the null, not above the floor</span>"
        else:
            verdict = "<span class='no'>below the null</span>"
        effect_cell = _num(effect) if sig.effect is not None else "<td>the statistic</td>"
        floor = _num(sig.floor) if not math.isinf(sig.floor) else "<td>none</td>"
        rows.append([_role_link(role, "../report.html"), _e(sig.detector), _e(sig.statistic_name), _num(value),
                     f"<td class='num'>{_rank(sig.statistic, value)}</td>", _num(sig.threshold), effect_cell, floor,
                     verdict])
    for name in (n for n in atlas.scores if not atlas.significance.get(n)):
        value = float(atlas.scores[name].values[head.layer, head.head])
        rows.append([_e(name), _e(name), _e(f"{name} score"), _num(value), _e(_rank(atlas.scores[name].values, value)),
                     "—", "—", "—", "no significance rule"])
    return ("<p>Significant = the statistic above the threshold (the null) and the effect (the statistic itself "
            "unless named) above the role's floor; rank 1 is the highest of all heads. The rules are in the report's "
            "<a href='../report.html#significance'>significance section</a>.</p>"
            + _table(["role", "detector", "statistic", "this head", "rank", "threshold", "effect", "floor",
                      "verdict"], rows))


def _rank(values: Float[Tensor, "n_layers n_heads"], value: float) -> str:
    finite = values[~torch.isnan(values)]
    if math.isnan(value):
        return "—"
    return f"{int((finite > value).sum()) + 1} of {finite.numel()}"


def _head_validation_html(atlas: "Atlas", head: Head, held: list[str]) -> str:
    detectors = list(dict.fromkeys(atlas.roles[role].detector for role in held))
    rows = []
    for name in detectors:
        result = atlas.validations.get(name)
        if result is None:
            rows.append([_e(name), "not validated"] + ["—"] * 6)
            continue
        tops = [Head.parse(h) for h in result.top_heads]
        inside = (f"<span class='yes'>yes</span>, {tops.index(head) + 1} of {len(tops)}" if head in tops
                  else f"<span class='no'>no</span> (top-{len(tops)}: {_e(', '.join(map(str, tops)))})")
        rows.append([_e(name), _e(result.metric_name), inside, _num(result.clean), _num(result.top_k),
                     _num(result.random_k), f"{result.difference:+.4g} [{result.ci_low:+.4g}, {result.ci_high:+.4g}]",
                     f"<span class='{'yes' if result.significant else 'no'}'>{'yes' if result.significant else 'no'}"
                     "</span>"])
    if not rows:
        return "<p>This head is significant in no role.</p>"
    note = ("<p>Each detector's validation ablates its top-k heads together and compares with random k-sets: the "
            "effect belongs to the set, and this head shares it only when it is in the top-k.</p>")
    return note + _table(["detector", "metric", "this head in the top-k", "clean", "top-k ablated",
                          "random-k ablated", "difference [95% CI]", "significant"], rows)


def _head_patterns_html(atlas: "Atlas", head: Head) -> str:
    parts = []
    for key, views in atlas.patterns_of(head).items():
        parts.append(f"<h3>{_e(f'On {key} examples' if key in atlas.scores else 'On a natural sentence')}</h3>")
        parts += [f"<div class='view'>{view.to_html(view_id=f'view-{len(parts)}-{n}')}{_prompt_note(view)}</div>"
                  for n, view in enumerate(views)]
    if not parts:
        failed = any(f.get("stage") == "patterns" for f in atlas.failures.values())
        why = (" (drawing them failed: see the report's summary)" if failed else
               " (none were drawn: an atlas saved before the report drew them, or examples the model cannot run)")
        return f"<p>No attention patterns of this head{why}.</p>"
    intro = ("<p>Each token is shaded by how much the outlined query token attends to it (darker = more); the query "
             "is the last token at first. Hover or tap a token to make it the query.</p>")
    return intro + "\n".join(parts)


def _prompt_note(view: Any) -> str:
    """How the prompt was given: token ids are shown as the tokens they stand for."""
    ids = isinstance(view.notes.get("prompt"), list)
    return f"<p class='prompt-note'>{len(view.tokens)} tokens{', given as token ids' if ids else ' of text'}</p>"


def _head_neighbours_html(atlas: "Atlas", head: Head, kv: int, group: list[Head], pages: set[Head]) -> str:
    n_layers, n_heads = atlas.shape
    shared = [h for h in group if h != head]
    kv_text = (f"<p>It reads keys and values from KV head {kv} of layer {head.layer}, shared with "
               f"{', '.join(_head_link(h, pages) for h in shared)} (grouped-query attention: an ablation of keys "
               "or values acts on the whole group).</p>" if shared else
               f"<p>It has its own keys and values (KV head {kv}; no grouped-query attention).</p>")
    if atlas.n_kv_heads is None:
        kv_text = "<p>Its KV group is not recorded (an atlas saved before headscope recorded it).</p>"
    around = [("previous head", Head(head.layer, head.head - 1)), ("next head", Head(head.layer, head.head + 1)),
              ("same head, layer below", Head(head.layer - 1, head.head)),
              ("same head, layer above", Head(head.layer + 1, head.head))]
    relations: dict[Head, list[str]] = {}
    for what, other in around + [("same KV group", other) for other in shared]:
        if 0 <= other.layer < n_layers and 0 <= other.head < n_heads:
            relations.setdefault(other, []).append(what)
    rows = [[_e(", ".join(what)), _head_link(other, pages), _e(", ".join(_roles_of(atlas, other)) or "none")]
            for other, what in relations.items()]
    return kv_text + _table(["neighbour", "head", "significant for"], rows)


def _roles_of(atlas: "Atlas", head: Head) -> list[str]:
    return [role for role, sig in atlas.roles.items() if bool(sig.mask[head.layer, head.head])]


def _head_link(head: Head, pages: set[Head], folder: str = "") -> str:
    """The head's name, linked to its page when it has one (``folder``: where pages are, relative)."""
    return f"<a href='{folder}{head}.html'>{head}</a>" if head in pages else _e(head)


def _role_link(role: str, page: str = "") -> str:
    return f"<a href='{page}#role-{_e(role)}'>{_e(role)}</a>"


# ----- SVG -----------------------------------------------------------------------------------
def heatmap_svg(values: Float[Tensor, "n_layers n_heads"], outline: Optional[Bool[Tensor, "n_layers n_heads"]],
                title: str, label: str, pages: Optional[set[Head]] = None) -> str:
    """A layer × head grid coloured by ``values`` (viridis; blue-white-red around 0 when the
    values have both signs), ``outline`` heads framed, a colour bar with its range, a tooltip per
    head, and each head of ``pages`` linked to ``heads/<head>.html``."""
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
    return _grid_svg(values, colour, tooltip, outline, title, label, legend=(palette, low, high), link=_linker(pages))


def role_map_svg(atlas: "Atlas") -> str:
    """The role map: each head in its strongest significant role's colour, lighter when weaker;
    a head significant in some role links to its page."""
    role_map = atlas.role_map()
    names, index, strength = role_map
    roles = atlas.roles
    colours = role_colours(names, role_map.background)

    def colour_of(layer: int, head: int) -> str:
        role = int(index[layer, head])
        return NO_ROLE if role < 0 else role_shade(colours[names[role]], float(strength[layer, head]))

    masks = {role: sig.mask for role, sig in roles.items()}  # each computed once, not per head

    def tooltip(layer: int, head: int, _value: float) -> str:
        held = [f"{r} ({sig.statistic[layer, head]:.3g})" for r, sig in roles.items() if masks[r][layer, head]]
        return f"{Head(layer, head)}: " + (", ".join(held) if held else "no significant role")

    grid = torch.zeros(atlas.shape)
    cells = {(l, h): colour_of(l, h) for l in range(atlas.shape[0]) for h in range(atlas.shape[1])}  # noqa: E741
    counts = {name: int((index == i).sum()) for i, name in enumerate(names)}
    legend = [(colours[name], f"{name} ({counts[name]})") for name in names] + [(NO_ROLE, "none")]
    return _grid_svg(grid, lambda v: "", tooltip, None, f"Role map — {atlas.model}", "", cells=cells, key=legend,
                     scale=1.25, link=_linker(set(atlas.significant_anywhere())))


def _linker(pages: Optional[set[Head]]):
    """``link(layer, head)``: the relative address of the head's page, or None."""
    return lambda layer, head: f"heads/{Head(layer, head)}.html" if pages and Head(layer, head) in pages else None


def jaccard_svg(names: Sequence[str], matrix: Float[Tensor, "roles roles"]) -> str:
    """The Jaccard matrix as a labelled grid (darker = more shared heads); the margins fit the
    longest role name, written across on the left and at 45° above."""
    size, font = 40, 12
    n = len(names)
    longest = max((_text_width(name, font) for name in names), default=0.0)
    slant = longest * 0.71  # a label at 45° rises and runs this far
    left, top = longest + 14, slant + 16
    width, height = left + n * size + slant + 10, top + n * size + 10
    parts = [_svg_open(width, height, "Jaccard index of significant head sets")]
    for i, name in enumerate(names):
        y = top + i * size + size / 2 + 4
        parts.append(f"<text x='{left - 6:.0f}' y='{y:.0f}' text-anchor='end' font-size='{font}'>{_e(name)}</text>")
        x = left + i * size + size / 2
        parts.append(f"<text x='{x:.0f}' y='{top - 6:.0f}' font-size='{font}' "
                     f"transform='rotate(-45 {x:.0f} {top - 6:.0f})'>{_e(name)}</text>")
        for j in range(n):
            value = float(matrix[i, j])
            fill = "#ffffff" if math.isnan(value) else _interpolate(((247, 251, 255), (8, 48, 107)), value)
            ink = "#fff" if not math.isnan(value) and value > 0.55 else "#222"
            text = "" if math.isnan(value) else f"{value:.2f}"
            parts.append(f"<rect x='{left + j * size:.0f}' y='{top + i * size:.0f}' width='{size}' height='{size}' "
                         f"fill='{fill}' stroke='#ccc'><title>{_e(name)} / {_e(names[j])}: {text or 'no heads'}</title>"
                         "</rect>")
            parts.append(f"<text x='{left + j * size + size / 2:.0f}' y='{top + i * size + size / 2 + 4:.0f}' "
                         f"text-anchor='middle' font-size='11' fill='{ink}'>{text}</text>")
    parts.append("</svg>")
    return "".join(parts)


def _text_width(text: str, font_size: float) -> float:
    """About how wide ``text`` is in a sans-serif font (for margins that fit their labels)."""
    return len(text) * font_size * 0.6


def _cell_size(n_heads: int, scale: float) -> float:
    """Pixels per head: ``CELL`` (times ``scale``), larger for a few heads (a grid at least ~180 px
    wide), smaller for many (at most ``GRID_WIDTH``), never below ``MIN_CELL``."""
    cell = CELL * scale
    if n_heads * cell < 180:
        cell = min(1.6 * cell, 180 / max(n_heads, 1))
    return max(MIN_CELL, min(cell, GRID_WIDTH / max(n_heads, 1)))


def _grid_svg(values: Tensor, colour, tooltip, outline: Optional[Tensor], title: str, label: str,
              legend: Optional[tuple] = None, cells: Optional[dict] = None, key: Optional[list] = None,
              scale: float = 1.0, link=None) -> str:
    """A layer × head grid: a tick per layer and per head (fewer when the cells are small), the axis
    names, a tooltip per cell, a link per cell where ``link(layer, head)`` gives one, and a colour
    bar (``legend``) or a key of colours (``key``) below."""
    n_layers, n_heads = values.shape
    cell = _cell_size(n_heads, scale)
    tick = min(12.0, max(8.0, cell * 0.45))
    left, top = 30 + _text_width(f"L{n_layers - 1}", tick), 46
    grid_width = n_heads * cell
    columns = max(1, int(max(grid_width, 300) // KEY_COLUMN)) if key else 1
    bar_height = 58 if legend else 0
    key_height = 20 * math.ceil(len(key) / columns) + 8 if key else 0
    key_width = columns * KEY_COLUMN if key else 0
    width = max(left + grid_width + 16, left + 200, left + key_width, left + _text_width(title, 13) + 12)
    height = top + n_layers * cell + 10 + bar_height + key_height
    parts = [_svg_open(width, height, title),
             f"<text x='{left:.0f}' y='17' font-size='13' font-weight='600'>{_e(title)}</text>",
             f"<text x='{left - 6:.0f}' y='{top - 7}' text-anchor='end' font-size='{tick:.0f}' fill='#555'>head</text>",
             f"<text x='12' y='{top + n_layers * cell / 2:.0f}' font-size='{tick:.0f}' fill='#555' text-anchor='middle' "
             f"transform='rotate(-90 12 {top + n_layers * cell / 2:.0f})'>layer</text>"]
    head_step, layer_step = math.ceil(16 / cell), math.ceil(13 / cell)
    for head in range(0, n_heads, head_step):
        parts.append(f"<text x='{left + head * cell + cell / 2:.1f}' y='{top - 7}' text-anchor='middle' "
                     f"font-size='{tick:.0f}'>{head}</text>")
    for layer in range(n_layers):
        if layer % layer_step == 0:
            parts.append(f"<text x='{left - 5:.0f}' y='{top + layer * cell + cell / 2 + tick * 0.35:.1f}' "
                         f"text-anchor='end' font-size='{tick:.0f}'>L{layer}</text>")
        for head in range(n_heads):
            parts.append(_cell_svg(values, colour, tooltip, outline, cells, link, layer, head, left, top, cell))
    y = top + n_layers * cell + 10
    if legend:
        palette, low, high = legend
        parts.append(_colour_bar(left, y, max(grid_width, 180), palette, low, high, label))
    if key:
        for i, (fill, text) in enumerate(key):
            kx, ky = left + (i % columns) * KEY_COLUMN, y + 4 + (i // columns) * 20
            parts.append(f"<rect x='{kx:.0f}' y='{ky}' width='13' height='13' fill='{fill}' stroke='#bbb' "
                         f"stroke-width='0.5'/><text x='{kx + 18:.0f}' y='{ky + 11}' font-size='12'>{_e(text)}</text>")
    parts.append("</svg>")
    return "".join(parts)


def _cell_svg(values, colour, tooltip, outline, cells, link, layer: int, head: int, left: float, top: float,
              cell: float) -> str:
    """One head's square, with its tooltip, framed when outlined, inside a link when it has a page."""
    value = float(values[layer, head])
    fill = cells[(layer, head)] if cells is not None else colour(value)
    framed = outline is not None and bool(outline[layer, head])
    stroke = "stroke='#000' stroke-width='2'" if framed else "stroke='#fff' stroke-width='0.6'"
    rect = (f"<rect x='{left + head * cell:.1f}' y='{top + layer * cell:.1f}' width='{cell:.1f}' height='{cell:.1f}' "
            f"fill='{fill}' {stroke}><title>{_e(tooltip(layer, head, value))}</title></rect>")
    address = link(layer, head) if link is not None else None
    return f"<a href='{_e(address)}'>{rect}</a>" if address else rect


def _colour_bar(x: float, y: float, width: float, palette, low: float, high: float, label: str) -> str:
    steps = 32
    parts = [f"<rect x='{x + i * width / steps:.1f}' y='{y}' width='{width / steps + 0.5:.1f}' height='10' "
             f"fill='{_interpolate(palette, i / (steps - 1))}'/>" for i in range(steps)]
    shown = number_format(low, high)
    parts.append(f"<text x='{x:.0f}' y='{y + 23}' font-size='11'>{shown.format(low)}</text>")
    parts.append(f"<text x='{x + width:.0f}' y='{y + 23}' font-size='11' text-anchor='end'>{shown.format(high)}</text>")
    parts.append(f"<text x='{x:.0f}' y='{y + 39}' font-size='11' fill='#444'>"
                 f"{_e(_short(label, max(24, int(width / 6.2))))}</text>")
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
