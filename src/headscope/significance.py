"""Which heads a detector calls significant, and by what rule.

A :class:`Significance` is one role's per-head *statistic* (a score, a held-out accuracy, a
z-value), the *threshold* a head must exceed, and the *rule* that set the threshold, in words: a
threshold from the paper, or a null distribution (scores on inputs without the role's
structure, a family-wise test over all heads). Detectors give theirs with
``Detector.significance(model, scores)``; the atlas collects them.

The tests behind the thresholds (Bonferroni over the model's heads, Student t, the exact binomial
test, permutation nulls) live in :mod:`headscope.stats`, so every detector states its rule the same way.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from jaxtyping import Float
from torch import Tensor

from headscope.engine.heads import Head
from headscope.results import HeadScores, from_json_matrix, to_json_matrix
from headscope.viz.figures import axes_for, finish, head_figsize, head_heatmap, outline_heads

@dataclass
class Significance:
    """One role's significant heads: ``statistic[layer, head] > threshold`` (beyond chance) and
    ``effect[layer, head] > floor`` (large enough to say the head *does* the role, not merely
    that it is above zero).

    Attributes:
        detector: the detector that gave the statistic.
        role: the role's name (a detector may define several, e.g. memory and context heads).
        statistic: per-head value the rule thresholds (higher = more of the role).
        threshold: heads strictly above it are significant.
        statistic_name: what ``statistic`` holds, in words.
        rule: how the threshold was set, in words (paper, null distribution, test and level).
        details: numbers behind the rule (null maximum, critical values, sample sizes).
        effect: per-head effect size the floor applies to (None: the statistic itself, as for
            attention shares; a z-test's effect is its mean, not its z); read ``effect_size``.
        floor: the effect size a head must exceed (``-inf``: no floor).
        effect_name: what ``effect`` holds, in words.
        floor_rule: where the floor comes from (a paper's value, the role's definition, or what
            heads do on inputs without the structure).
        background: a role that most heads hold (attention sinks: 201 of SmolLM2's 270 heads),
            which would otherwise cover the rarer roles: the role map gives it only to heads with
            no other significant role (``Atlas.role_map``); its heads are significant all the same.
    """

    detector: str
    role: str
    statistic: Float[Tensor, "n_layers n_heads"]
    threshold: float
    statistic_name: str
    rule: str
    details: dict[str, Any] = field(default_factory=dict)
    effect: Optional[Float[Tensor, "n_layers n_heads"]] = None
    floor: float = -math.inf
    effect_name: str = ""
    floor_rule: str = "no effect-size floor"
    background: bool = False

    def __post_init__(self) -> None:
        self.statistic = torch.as_tensor(self.statistic, dtype=torch.float32).detach().cpu()
        self.threshold = float(self.threshold)
        self.floor = float(self.floor)
        self.effect_name = self.effect_name or self.statistic_name
        if self.effect is None:
            return
        self.effect = torch.as_tensor(self.effect, dtype=torch.float32).detach().cpu()
        if self.effect.shape != self.statistic.shape:
            raise ValueError(f"{self.role}: effect shape {tuple(self.effect.shape)} differs from the statistic's "
                             f"{tuple(self.statistic.shape)}")

    @property
    def effect_size(self) -> Float[Tensor, "n_layers n_heads"]:
        """The per-head effect the floor applies to: ``effect``, or the statistic when none was given."""
        return self.statistic if self.effect is None else self.effect

    @property
    def above_null(self) -> torch.Tensor:
        """``[n_layers, n_heads]`` booleans: the statistic beats the null (NaN never does)."""
        return torch.nan_to_num(self.statistic, nan=-math.inf) > self.threshold

    @property
    def above_floor(self) -> torch.Tensor:
        """``[n_layers, n_heads]`` booleans: the effect size exceeds the floor (NaN never does)."""
        return torch.nan_to_num(self.effect_size, nan=-math.inf) > self.floor

    @property
    def mask(self) -> torch.Tensor:
        """``[n_layers, n_heads]`` booleans: True where the head is significant — above the null
        and above the effect-size floor."""
        return self.above_null & self.above_floor

    @property
    def heads(self) -> list[Head]:
        """Significant heads, strongest statistic first."""
        mask = self.mask
        return [head for head in self.as_scores().above(self.threshold) if mask[head.layer, head.head]]

    def as_scores(self, model: str = "") -> HeadScores:
        """The statistic as a ``HeadScores`` of this role (for top-k, overlaps, plots)."""
        return HeadScores(self.statistic, self.role, model)

    def strength(self) -> Float[Tensor, "n_layers n_heads"]:
        """Where each significant head sits between the threshold (0) and the role's strongest
        head (1); 0 for heads that are not significant. Comparable across roles whose statistics
        have different units — the role map colours a head by its largest strength."""
        top = float(torch.nan_to_num(self.statistic, nan=-math.inf).max())
        span = top - self.threshold
        if not math.isfinite(span) or span <= 0:
            return torch.zeros_like(self.statistic)
        relative = ((self.statistic - self.threshold) / span).clamp(min=0.0, max=1.0)
        # a head exactly at the top has strength 1; the least significant one just above 0
        return torch.where(self.mask, relative.clamp(min=1e-6), torch.zeros_like(relative))

    def plot(self, ax: Any = None, path: Optional[Union[str, Path]] = None, cmap: str = "viridis") -> Any:
        """The role's statistic as a heatmap with the significant heads outlined; the colour bar
        is labelled with the statistic and marks the threshold (a red line), the title gives the
        count and the rule's numbers (threshold, and the effect-size floor when there is one).

        Args:
            ax: matplotlib axes to draw on (default: a new figure; the backend is never switched).
            path: save the figure there too (the suffix picks the format), atomically.
            cmap: a matplotlib colour map name.

        Returns:
            The matplotlib ``Figure``.
        """
        figure, ax = axes_for(ax, head_figsize(*self.statistic.shape))
        n = len(self.heads)
        floor = "" if math.isinf(self.floor) else f", {'statistic' if self.effect is None else 'effect'} > {self.floor:.3g}"
        rule = f"statistic > {self.threshold:.3g}{floor}"
        title = f"{self.role}: {n} significant head{'s' if n != 1 else ''} (outlined)\n{rule}"
        label = textwrap.fill(f"{self.statistic_name} (threshold {self.threshold:.3g})", 42)
        bar = head_heatmap(ax, self.statistic, label=label, title=title, cmap=cmap)
        low, high = bar.ax.get_ylim()
        if low <= self.threshold <= high:
            bar.ax.axhline(self.threshold, color="#d50000", linewidth=1.5)
        outline_heads(ax, self.mask)
        return finish(figure, path)

    def to_dict(self) -> dict[str, Any]:
        return {
            "detector": self.detector,
            "role": self.role,
            "statistic": to_json_matrix(self.statistic),
            "threshold": self.threshold,
            "statistic_name": self.statistic_name,
            "rule": self.rule,
            "details": self.details,
            "effect": None if self.effect is None else to_json_matrix(self.effect),
            "floor": None if math.isinf(self.floor) else self.floor,
            "effect_name": self.effect_name,
            "floor_rule": self.floor_rule,
            "background": self.background,
            "n_above_null": int(self.above_null.sum()),
            "heads": [str(h) for h in self.heads],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Significance":
        effect = data.get("effect")
        floor = data.get("floor")
        return cls(data["detector"], data["role"], from_json_matrix(data["statistic"]), data["threshold"], data["statistic_name"],
                   data["rule"], data.get("details", {}), effect=None if effect is None else from_json_matrix(effect),
                   floor=-math.inf if floor is None else floor, effect_name=data.get("effect_name", ""),
                   floor_rule=data.get("floor_rule", "no effect-size floor"),
                   background=bool(data.get("background", False)))

    def __repr__(self) -> str:
        heads = ", ".join(str(h) for h in self.heads[:8]) + (" …" if len(self.heads) > 8 else "")
        floor = "" if math.isinf(self.floor) else f", {self.effect_name} > {self.floor:.3g}"
        return (f"Significance({self.role}: {len(self.heads)} heads [{heads}], {self.statistic_name} > "
                f"{self.threshold:.3g}{floor})")
