"""Which heads a detector calls significant, and by what rule.

A :class:`Significance` is one role's per-head *statistic* (a score, a held-out accuracy, a
z-value), the *threshold* a head must exceed, and the *rule* that set the threshold, in words: a
threshold from the paper, or a null distribution (scores on inputs without the role's
structure, a family-wise test over all heads). Detectors give theirs with
``Detector.significance(model, scores)``; the atlas collects them.

Helpers for family-wise thresholds (Bonferroni over the model's heads) live here so every
detector states its rule the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from jaxtyping import Float
from torch import Tensor

from headscope.engine.heads import Head
from headscope.results import HeadScores, from_json_matrix, to_json_matrix

DEFAULT_ALPHA = 0.05  # family-wise error rate over all heads of the model


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
                   floor_rule=data.get("floor_rule", "no effect-size floor"))

    def __repr__(self) -> str:
        heads = ", ".join(str(h) for h in self.heads[:8]) + (" …" if len(self.heads) > 8 else "")
        floor = "" if math.isinf(self.floor) else f", {self.effect_name} > {self.floor:.3g}"
        return (f"Significance({self.role}: {len(self.heads)} heads [{heads}], {self.statistic_name} > "
                f"{self.threshold:.3g}{floor})")


def bonferroni_z(n_tests: int, alpha: float = DEFAULT_ALPHA, two_sided: bool = True) -> float:
    """Critical |z| of a normal test at family-wise level ``alpha`` over ``n_tests`` tests."""
    tail = alpha / n_tests / (2 if two_sided else 1)
    return float(-torch.special.ndtri(torch.tensor(tail, dtype=torch.float64)))


def bonferroni_t(n_tests: int, df: float | Tensor, alpha: float = DEFAULT_ALPHA, two_sided: bool = True) -> float | Tensor:
    """Critical |t| of a Student t test with ``df`` degrees of freedom at family-wise level
    ``alpha`` over ``n_tests`` tests (Bonferroni): the upper ``alpha / n_tests`` tail (halved when
    ``two_sided``). ``df`` a number gives a float; a tensor (one per test, e.g. Welch–Satterthwaite
    degrees of freedom per head, :func:`satterthwaite_df`) gives a float64 tensor of its shape.
    For 270 heads, one-sided at 5%: 4.6 at 15 df, 4.0 at 30, 3.56 (the normal value) as df grows."""
    tail = alpha / n_tests / (2 if two_sided else 1)
    critical = -student_t_quantile(tail, df)
    return critical if isinstance(df, Tensor) else float(critical)


def satterthwaite_df(variances: list[float | Tensor], dfs: list[float]) -> Tensor:
    """Welch–Satterthwaite degrees of freedom of a sum of independent variance estimates ``v_i``
    with ``df_i`` degrees of freedom each: ``(sum_i v_i)^2 / sum_i (v_i^2 / df_i)``, elementwise
    (float64). Welch's test: ``v_i = s_i^2 / n_i`` and ``df_i = n_i - 1``. Where every ``v_i`` is 0
    it is ``sum_i df_i`` (any value would do: the interval has zero width)."""
    parts = [torch.as_tensor(v, dtype=torch.float64) for v in variances]
    total = sum(parts)
    spread = sum(v**2 / df for v, df in zip(parts, dfs, strict=True))
    return torch.where(spread == 0, float(sum(dfs)), total**2 / spread)  # NaN stays NaN


def student_t_quantile(p: float | Tensor, df: float | Tensor, max_steps: int = 100) -> Float[Tensor, "..."]:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom, elementwise in float64
    (NaN where ``p`` is outside (0, 1) or ``df`` is not a positive number; no scipy needed).

    With ``x = df / (df + t^2)``, the tail beyond ``|t|`` is ``I_x(df/2, 1/2) / 2``
    (:func:`log_incomplete_beta`); Newton steps on ``u = log x`` (``log I`` is nearly linear in
    ``u``), from the Cornish–Fisher expansion and kept inside a bisection bracket, solve
    ``log I_x(df/2, 1/2) = log(2 min(p, 1 - p))`` to 1e-12 in the log tail (about 3 steps)."""
    p, df = torch.broadcast_tensors(torch.as_tensor(p, dtype=torch.float64), torch.as_tensor(df, dtype=torch.float64))
    valid = (p > 0) & (p < 1) & (df > 0) & torch.isfinite(df)
    p, df = torch.where(valid, p, 0.5), torch.where(valid, df, 1.0)
    a, tail = df / 2, torch.minimum(p, 1 - p)
    target = torch.log(2 * tail)
    z = -torch.special.ndtri(tail)
    guess = z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
    low, high = torch.full_like(p, math.log(1e-300)), torch.zeros_like(p)  # bracket of u; I_x rises with x
    u = torch.log(df / (df + guess**2)).clamp(min=math.log(1e-300), max=-1e-12)
    for _ in range(max_steps):
        log_i = log_incomplete_beta(a, torch.full_like(a, 0.5), u.exp())
        gap = log_i - target
        low, high = torch.where(gap < 0, u, low), torch.where(gap < 0, high, u)
        slope = (a * u - 0.5 * torch.log1p(-u.exp()) - _log_beta(a, torch.full_like(a, 0.5)) - log_i).exp()  # d log I / du
        step = u - gap / slope
        done = (gap.abs() < 1e-12) | (tail >= 0.5)
        u = torch.where(done, u, torch.where((step > low) & (step < high), step, (low + high) / 2))
        if bool(done.all()):
            break
    magnitude = torch.where(tail < 0.5, (df * -torch.expm1(u) / u.exp()).sqrt(), 0.0)
    return torch.where(valid, torch.where(p < 0.5, -magnitude, magnitude), math.nan)


def student_t_sf(t: float | Tensor, df: float | Tensor) -> Float[Tensor, "..."]:
    """Upper tail ``P(T > t)`` of Student's t with ``df`` degrees of freedom, elementwise in
    float64: ``I_{df/(df+t^2)}(df/2, 1/2) / 2`` for ``t >= 0``, one minus that below 0."""
    t, df = torch.broadcast_tensors(torch.as_tensor(t, dtype=torch.float64), torch.as_tensor(df, dtype=torch.float64))
    half = 0.5 * log_incomplete_beta(df / 2, torch.full_like(df, 0.5), df / (df + t * t)).exp()
    return torch.where(t >= 0, half, 1 - half)


def log_incomplete_beta(a: Tensor, b: Tensor, x: Tensor) -> Tensor:
    """``log I_x(a, b)``, the regularised incomplete beta function, elementwise in float64 (NaN
    where ``a, b > 0`` and ``0 <= x <= 1`` fail). Below ``x = (a + 1) / (a + b + 2)``:
    ``I_x = x^a (1 - x)^b / (a B(a, b)) * CF`` with the continued fraction ``CF`` (modified
    Lentz), in logs so far tails do not underflow; above it, ``1 - I_{1-x}(b, a)``."""
    a, b, x = torch.broadcast_tensors(*(torch.as_tensor(v, dtype=torch.float64) for v in (a, b, x)))
    valid = (a > 0) & (b > 0) & (x >= 0) & (x <= 1) & torch.isfinite(a) & torch.isfinite(b)
    a, b, x = torch.where(valid, a, 1.0), torch.where(valid, b, 1.0), torch.where(valid, x, 0.5)
    flip = x > (a + 1) / (a + b + 2)
    a, b, x = torch.where(flip, b, a), torch.where(flip, a, b), torch.where(flip, 1 - x, x)
    inside = (x > 0) & (x < 1)
    x_in = torch.where(inside, x, 0.5)
    log_value = (a * torch.log(x_in) + b * torch.log1p(-x_in) - _log_beta(a, b)
                 + torch.log(_beta_fraction(a, b, x_in) / a))
    log_value = torch.where(inside, log_value, torch.where(x >= 1, 0.0, -math.inf))
    log_value = torch.where(flip, torch.log(-torch.expm1(log_value)), log_value)
    return torch.where(valid, log_value, math.nan)


def _log_beta(a: Tensor, b: Tensor) -> Tensor:
    return torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)


def _beta_fraction(a: Tensor, b: Tensor, x: Tensor, max_terms: int = 10_000) -> Tensor:
    """The continued fraction of ``I_x(a, b)`` (Numerical Recipes' ``betacf``), to 1e-15."""
    def guard(v: Tensor) -> Tensor:  # keep Lentz's denominators away from 0
        return torch.where(v.abs() < 1e-300, 1e-300, v)

    c = torch.ones_like(x)
    d = 1 / guard(1 - (a + b) * x / (a + 1))
    fraction = d
    for m in range(1, max_terms + 1):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d, c = 1 / guard(1 + numerator * d), guard(1 + numerator / c)
            fraction = fraction * d * c
        if bool(((d * c - 1).abs() < 1e-15).all()):
            break
    return fraction


def binomial_critical_accuracy(n: int, chance: float, n_tests: int, alpha: float = DEFAULT_ALPHA) -> float:
    """The accuracy a head must *exceed* on ``n`` questions so that getting more right by guessing
    (success probability ``chance``) has probability at most ``alpha / n_tests`` (exact one-sided
    binomial test, Bonferroni over ``n_tests`` heads). Returns ``(c - 1) / n`` where ``c`` is the
    smallest count with ``P(X >= c) <= alpha / n_tests``."""
    if n < 1:
        raise ValueError("A binomial test needs at least one question.")
    level = alpha / n_tests
    tail = 0.0  # P(X >= c), summed from c = n down
    for count in range(n, -1, -1):
        with_count = tail + math.comb(n, count) * chance**count * (1 - chance) ** (n - count)
        if with_count > level:
            return count / n  # c = count + 1 is the smallest significant count
        tail = with_count
    return -1.0  # every count is significant (only when alpha / n_tests >= 1)
