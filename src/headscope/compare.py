"""``hs.compare(atlas_a, atlas_b)``: which roles moved, appeared or vanished between two atlases —
two models, or one model before and after fine-tuning (the bundled model and its refusal
organism)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from headscope.atlas import Atlas
from headscope.engine.heads import Head
from headscope.results import ranking_agreement


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

    @property
    def verdict(self) -> str:
        if self.status != "both":
            return "computed in A only" if self.status == "only_a" else "computed in B only"
        if self.n_a == 0 and self.n_b > 0:
            return "appeared"
        if self.n_a > 0 and self.n_b == 0:
            return "vanished"
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

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for role, change in zip(out["roles"], self.roles, strict=True):
            role["verdict"] = change.verdict
        return out

    def save(self, path: Union[str, Path]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame([dict(asdict(r), verdict=r.verdict) for r in self.roles])

    def __str__(self) -> str:
        lines = [f"Atlas comparison: A = {self.model_a}, B = {self.model_b}"]
        for r in self.roles:
            lines.append(f"  {r.role:<16} {r.verdict:<18} significant {r.n_a:>3} -> {r.n_b:<3} "
                         f"top {', '.join(r.top_a[:3]) or '-'} -> {', '.join(r.top_b[:3]) or '-'}")
            for label, heads in (("appeared", r.appeared), ("vanished", r.vanished)):
                if heads:
                    lines.append(f"  {'':<16}   {label}: {', '.join(heads[:10])}{' …' if len(heads) > 10 else ''}")
        if self.role_map_changes:
            shown = ", ".join(f"{h} {a or 'none'}→{b or 'none'}" for h, a, b in self.role_map_changes[:12])
            lines.append(f"  role map: {len(self.role_map_changes)} heads changed role: {shown}"
                         f"{' …' if len(self.role_map_changes) > 12 else ''}")
        return "\n".join(lines)


def compare(atlas_a: Union[Atlas, str, Path], atlas_b: Union[Atlas, str, Path], n_moved: int = 5) -> AtlasComparison:
    """Compare two atlases (objects or folders written by ``Atlas.save``)."""
    a = atlas_a if isinstance(atlas_a, Atlas) else Atlas.load(atlas_a)
    b = atlas_b if isinstance(atlas_b, Atlas) else Atlas.load(atlas_b)
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
        changes.append(_role_change(a, b, role, same_shape, n_moved))
    return AtlasComparison(a.model, b.model, same_shape, changes, _role_map_changes(a, b) if same_shape else [])


def _role_change(a: Atlas, b: Atlas, role: str, same_shape: bool, n_moved: int) -> RoleChange:
    sig_a, sig_b = a.roles[role], b.roles[role]
    heads_a, heads_b = sig_a.heads, sig_b.heads
    change = RoleChange(role, "both", n_a=len(heads_a), n_b=len(heads_b), top_a=[str(h) for h in heads_a[:5]],
                        top_b=[str(h) for h in heads_b[:5]], mean_depth_a=_depth(heads_a, a.shape[0]),
                        mean_depth_b=_depth(heads_b, b.shape[0]))
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
