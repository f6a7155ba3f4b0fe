"""``hs.compare(atlas_a, atlas_b)``: which roles moved, appeared or vanished between two atlases —
two models, or one model before and after fine-tuning (the bundled model and its refusal
organism).

Two atlases of the same shape are compared head by head (kept, appeared, vanished, Spearman of
the statistics, role-map changes). Models of different shapes (SmolLM2's 30 x 9 heads, Gemma 3's
18 x 4) have no head in common, so every role is also compared by **relative depth**: a layer
``l`` of an ``L``-layer model sits at depth ``l / (L - 1)``; the depth axis is cut into
``depth_bins`` equal bins and each role's *depth profile* is the share of the heads in each bin
that are significant for it. Two profiles are compared by their peak bin and their correlation
(``depth_correlation``, Pearson over bins; None when either profile is flat), and
``AtlasComparison.plot()`` draws them side by side.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from jaxtyping import Bool
from torch import Tensor

from headscope.atlas import Atlas
from headscope.engine.heads import Head
from headscope.errors import InputError
from headscope.files import atomic_write_text
from headscope.results import ranking_agreement
from headscope.viz.figures import finish, new_figure

DEPTH_BINS = 6  # relative-depth bins of the depth profiles (fewer when a model has fewer layers)


@dataclass
class RoleChange:
    """One role in two atlases.

    ``status``: "both", "only_a" or "only_b" (the role was computed in one atlas only).
    ``kept`` / ``appeared`` / ``vanished``: significant in both / only in B / only in A (per
    head; empty when the two models' shapes differ). ``moved_score``: the heads whose detector
    score changed most, ``(head, a, b)``.
    """

    role: str
    status: str
    n_a: int = 0
    n_b: int = 0
    top_a: list[str] = field(default_factory=list)
    top_b: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    appeared: list[str] = field(default_factory=list)
    vanished: list[str] = field(default_factory=list)
    spearman: Optional[float] = None
    moved_score: list[tuple[str, float, float]] = field(default_factory=list)
    validated_a: Optional[bool] = None
    validated_b: Optional[bool] = None
    mean_depth_a: Optional[float] = None  # mean relative layer (layer / (n_layers - 1)) of the significant heads
    mean_depth_b: Optional[float] = None
    share_a: Optional[float] = None  # share of all heads that are significant
    share_b: Optional[float] = None
    depth_profile_a: list[float] = field(default_factory=list)  # per depth bin: share of its heads significant
    depth_profile_b: list[float] = field(default_factory=list)
    depth_correlation: Optional[float] = None  # Pearson r of the two profiles over bins
    same_shape: bool = True  # False: no head-by-head comparison (kept/appeared/vanished stay empty)

    @property
    def verdict(self) -> str:
        if self.status != "both":
            return "computed in A only" if self.status == "only_a" else "computed in B only"
        if self.n_a == 0 and self.n_b > 0:
            return "appeared"
        if self.n_a > 0 and self.n_b == 0:
            return "vanished"
        if not self.same_shape:
            return "in both" if self.n_a else "in neither"
        if self.appeared or self.vanished:
            return "moved" if not self.kept else "changed"
        return "unchanged"


@dataclass
class AtlasComparison:
    """Role by role differences between atlas A and atlas B, and heads whose role-map role changed."""

    model_a: str
    model_b: str
    same_shape: bool
    roles: list[RoleChange]
    role_map_changes: list[tuple[str, str, str]]  # (head, role in A, role in B); "" = none
    shape_a: tuple[int, int] = (0, 0)
    shape_b: tuple[int, int] = (0, 0)
    depth_bins: int = 0  # bins of relative depth the profiles use (bin i: depths [i/n, (i+1)/n))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for role, change in zip(out["roles"], self.roles, strict=True):
            role["verdict"] = change.verdict
        return out

    def save(self, path: Union[str, Path]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))
        return path

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame([dict(asdict(r), verdict=r.verdict) for r in self.roles])

    def plot(self, path: Optional[Union[str, Path]] = None) -> Any:
        """One panel per role computed in both atlases: the share of heads significant at each
        relative depth, A beside B (heads aligned by depth, so models of any two shapes compare).
        Saves the figure at ``path`` too (the suffix picks the format); returns the matplotlib
        ``Figure`` (matplotlib's backend is never switched)."""
        roles = [r for r in self.roles if r.status == "both"]
        columns = min(4, max(len(roles), 1))
        rows = max(1, math.ceil(len(roles) / columns))
        figure = new_figure((3.2 * columns, 2.4 * rows), layout="constrained")
        axes = figure.subplots(rows, columns, squeeze=False, sharex=True)
        centres = [(i + 0.5) / self.depth_bins for i in range(self.depth_bins)]
        width = 0.4 / self.depth_bins
        for ax, change in zip(axes.flat, roles):
            ax.bar([c - width / 2 for c in centres], change.depth_profile_a, width, label=self.model_a)
            ax.bar([c + width / 2 for c in centres], change.depth_profile_b, width, label=self.model_b)
            r = "" if change.depth_correlation is None else f", r = {change.depth_correlation:.2f}"
            ax.set_title(f"{change.role}: {change.n_a} vs {change.n_b} heads{r}", fontsize=9)
            ax.set_xlim(0, 1)
        for ax in list(axes.flat)[len(roles):]:
            ax.axis("off")
        for ax in axes[-1]:
            ax.set_xlabel("relative depth (layer / last layer)")
        for ax in axes[:, 0]:
            ax.set_ylabel("share of heads significant")
        if roles:
            axes.flat[0].legend(fontsize=7)
        return finish(figure, path)

    def depth_table(self) -> str:
        """Each role's depth profile in A and B as text, one row per role."""
        edges = " ".join(f"{i / self.depth_bins:.2f}+" for i in range(self.depth_bins))
        lines = [f"  {'share significant by depth':<28} {edges}   r"]
        for r in self.roles:
            if r.status != "both":
                continue
            for label, profile in (("A", r.depth_profile_a), ("B", r.depth_profile_b)):
                cells = " ".join(f"{v:>5.2f}" for v in profile)
                corr = "" if label == "A" or r.depth_correlation is None else f"  {r.depth_correlation:+.2f}"
                lines.append(f"  {r.role + ' ' + label:<28} {cells}{corr}")
        return "\n".join(lines)

    def __str__(self) -> str:
        lines = [f"Atlas comparison: A = {self.model_a} {_shape_text(self.shape_a)}, "
                 f"B = {self.model_b} {_shape_text(self.shape_b)}"]
        for r in self.roles:
            lines.append(f"  {r.role:<16} {r.verdict:<18} significant {r.n_a:>3} -> {r.n_b:<3} "
                         f"top {', '.join(r.top_a[:3]) or '-'} -> {', '.join(r.top_b[:3]) or '-'}")
            if r.status == "both" and not self.same_shape:
                lines.append(f"  {'':<16}   share of heads {_percent(r.share_a)} -> {_percent(r.share_b)}, "
                             f"mean depth {_number(r.mean_depth_a)} -> {_number(r.mean_depth_b)}, "
                             f"peak depth {_peak(r.depth_profile_a, self.depth_bins)} -> "
                             f"{_peak(r.depth_profile_b, self.depth_bins)}")
            for label, heads in (("appeared", r.appeared), ("vanished", r.vanished)):
                if heads:
                    lines.append(f"  {'':<16}   {label}: {', '.join(heads[:10])}{' …' if len(heads) > 10 else ''}")
        if self.role_map_changes:
            shown = ", ".join(f"{h} {a or 'none'}→{b or 'none'}" for h, a, b in self.role_map_changes[:12])
            lines.append(f"  role map: {len(self.role_map_changes)} heads changed role: {shown}"
                         f"{' …' if len(self.role_map_changes) > 12 else ''}")
        if not self.same_shape and self.depth_bins:
            lines.append(self.depth_table())
        return "\n".join(lines)


def compare(atlas_a: Union[Atlas, str, Path], atlas_b: Union[Atlas, str, Path], n_moved: int = 5,
            depth_bins: int = DEPTH_BINS) -> AtlasComparison:
    """Compare two atlases (objects or folders written by ``Atlas.save``).

    Same shape: head by head and by relative depth. Different shapes: role by role and by
    relative depth (``depth_bins`` bins, at most the smaller model's number of layers, so that
    no bin is empty)."""
    if isinstance(depth_bins, bool) or not isinstance(depth_bins, int) or depth_bins < 1:
        raise InputError(f"depth_bins must be a positive integer, got {depth_bins!r}")
    a = atlas_a if isinstance(atlas_a, Atlas) else Atlas.load(atlas_a)
    b = atlas_b if isinstance(atlas_b, Atlas) else Atlas.load(atlas_b)
    depth_bins = min(depth_bins, a.shape[0], b.shape[0])
    same_shape = tuple(a.shape) == tuple(b.shape)
    roles_a, roles_b = a.roles, b.roles
    changes = []
    for role in list(roles_a) + [r for r in roles_b if r not in roles_a]:
        if role not in roles_b or role not in roles_a:
            present = roles_a.get(role) or roles_b[role]
            changes.append(RoleChange(role, "only_a" if role in roles_a else "only_b",
                                      n_a=len(present.heads) if role in roles_a else 0,
                                      n_b=len(present.heads) if role in roles_b else 0))
            continue
        changes.append(_role_change(a, b, role, same_shape, n_moved, depth_bins))
    return AtlasComparison(a.model, b.model, same_shape, changes, _role_map_changes(a, b) if same_shape else [],
                           tuple(a.shape), tuple(b.shape), depth_bins)


def _role_change(a: Atlas, b: Atlas, role: str, same_shape: bool, n_moved: int, depth_bins: int) -> RoleChange:
    sig_a, sig_b = a.roles[role], b.roles[role]
    heads_a, heads_b = sig_a.heads, sig_b.heads
    change = RoleChange(role, "both", n_a=len(heads_a), n_b=len(heads_b), top_a=[str(h) for h in heads_a[:5]],
                        top_b=[str(h) for h in heads_b[:5]], mean_depth_a=_depth(heads_a, a.shape[0]),
                        mean_depth_b=_depth(heads_b, b.shape[0]))
    change.same_shape = same_shape
    change.share_a, change.share_b = (float(sig.mask.float().mean()) for sig in (sig_a, sig_b))
    change.depth_profile_a = depth_profile(sig_a.mask, depth_bins)
    change.depth_profile_b = depth_profile(sig_b.mask, depth_bins)
    change.depth_correlation = _pearson(change.depth_profile_a, change.depth_profile_b)
    for atlas, attr in ((a, "validated_a"), (b, "validated_b")):
        check = atlas.validations.get(sig_a.detector)
        setattr(change, attr, None if check is None else check.significant)
    if same_shape:
        set_a, set_b = set(heads_a), set(heads_b)
        change.kept = [str(h) for h in heads_b if h in set_a]
        change.appeared = [str(h) for h in heads_b if h not in set_a]
        change.vanished = [str(h) for h in heads_a if h not in set_b]
        stats = [torch.nan_to_num(s.statistic, nan=float("-inf")) for s in (sig_a, sig_b)]
        change.spearman = ranking_agreement(stats[0], stats[1], 10)["spearman"]
        change.moved_score = _moved(a.scores[sig_a.detector].values, b.scores[sig_b.detector].values, n_moved)
    return change


def _moved(values_a: torch.Tensor, values_b: torch.Tensor, n: int) -> list[tuple[str, float, float]]:
    """The ``n`` heads whose score changed most, as (head, score in A, score in B)."""
    delta = torch.nan_to_num((values_b - values_a).abs(), nan=-1.0).flatten()
    n_heads = values_a.shape[1]
    order = torch.argsort(delta, descending=True)[:n]
    return [(str(Head(int(i) // n_heads, int(i) % n_heads)), float(values_a.flatten()[i]), float(values_b.flatten()[i]))
            for i in order]


def _role_map_changes(a: Atlas, b: Atlas) -> list[tuple[str, str, str]]:
    names_a, index_a, _ = a.role_map()
    names_b, index_b, _ = b.role_map()
    label = lambda names, i: names[i] if i >= 0 else ""  # noqa: E731
    changes = []
    for layer in range(a.shape[0]):
        for head in range(a.shape[1]):
            role_a, role_b = label(names_a, int(index_a[layer, head])), label(names_b, int(index_b[layer, head]))
            if role_a != role_b:
                changes.append((str(Head(layer, head)), role_a, role_b))
    return changes


def _depth(heads: list[Head], n_layers: int) -> Optional[float]:
    if not heads:
        return None
    return sum(h.layer for h in heads) / len(heads) / max(n_layers - 1, 1)


def depth_profile(mask: Bool[Tensor, "n_layers n_heads"], n_bins: int) -> list[float]:
    """Share of the heads in each relative-depth bin that ``mask`` marks: layer ``l`` of ``L``
    sits at depth ``l / (L - 1)`` and falls in bin ``floor(depth * n_bins)`` (the last layer in
    the last bin). ``n_bins`` must not exceed ``L``, so that every bin holds a layer."""
    n_layers = mask.shape[0]
    if not 1 <= n_bins <= n_layers:
        raise InputError(f"depth profile: {n_bins} bins for {n_layers} layers; use 1 to {n_layers} bins")
    depth = torch.arange(n_layers, dtype=torch.float64) / max(n_layers - 1, 1)
    bins = (depth * n_bins).long().clamp(max=n_bins - 1)
    per_layer = mask.float().mean(dim=1).double()
    counts = torch.bincount(bins, minlength=n_bins).double()
    return (torch.bincount(bins, weights=per_layer, minlength=n_bins) / counts).tolist()


def _pearson(x: list[float], y: list[float]) -> Optional[float]:
    a, b = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    a, b = a - a.mean(), b - b.mean()
    norm = float(a.norm() * b.norm())
    return None if norm == 0 else float((a * b).sum()) / norm


def _shape_text(shape: tuple[int, int]) -> str:
    return f"({shape[0]} x {shape[1]} heads)"


def _percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1%}"


def _number(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def _peak(profile: list[float], n_bins: int) -> str:
    if not profile or max(profile) == 0:
        return "-"
    best = max(range(len(profile)), key=profile.__getitem__)
    return f"{best / n_bins:.2f}-{(best + 1) / n_bins:.2f}"
