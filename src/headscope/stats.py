"""Statistics for head roles: family-wise rules, Student t, bootstrap intervals, permutation
tests and random head sets. Nothing here touches a model (a model is only asked for its heads).

Every function that draws random numbers takes an explicit ``seed`` and its own
``torch.Generator``, so equal seeds give equal results.

- **Family-wise rules** (Bonferroni over all heads of the model, ``DEFAULT_ALPHA``):
  :func:`bonferroni_z`, :func:`bonferroni_t` (with :func:`satterthwaite_df` for Welch's test),
  :func:`binomial_critical_accuracy` (exact one-sided binomial test of an accuracy).
- **Student t without scipy**: :func:`student_t_quantile`, :func:`student_t_sf`, both from
  :func:`log_incomplete_beta`.
- **Bootstrap intervals**, all percentile intervals (:func:`percentile_interval`) over replicates
  drawn by one resampler (:func:`resample`): :func:`paired_bootstrap_ci` (mean of paired
  differences, one value per unit), :func:`cluster_bootstrap_ci` (whole clusters resampled
  together), :func:`bootstrap_difference_ci` (top-k effect beyond random k-sets; examples and
  draws resampled, or the default t-interval :func:`difference_t_interval`).
- **Permutation tests**: :func:`paired_permutation_p` (sign flips), :func:`permutation_null_maxima`
  (the best head's accuracy when each task's labels are relabelled at random).
- **Random head sets**: :func:`random_head_sets`, the control sets of a top-k ablation.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from headscope.engine.heads import Head, all_heads
from headscope.errors import ArgumentError, InputError

DEFAULT_ALPHA = 0.05  # family-wise error rate over all heads of the model


def standard_error(values: Float[Tensor, "n ..."], dim: int = 0) -> Float[Tensor, "..."]:
    """Standard error of the mean along ``dim``: the sample standard deviation (n - 1) over
    ``sqrt(n)`` (NaN stays NaN). The t-tests of memory_context, name_mover and function_vector."""
    n = values.shape[dim]
    return values.std(dim=dim) / max(n, 1) ** 0.5


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


def resample(n_units: int, n_bootstrap: int, generator: torch.Generator) -> Int[Tensor, "n_bootstrap n_units"]:
    """The bootstrap's draws: ``n_bootstrap`` rows of ``n_units`` unit indices drawn uniformly with
    replacement (one ``torch.randint`` call on ``generator``; every bootstrap here uses it)."""
    return torch.randint(n_units, (n_bootstrap, n_units), generator=generator)


def percentile_interval(replicates: Float[Tensor, " n_bootstrap"], level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of bootstrap replicates: their ``(1 - level) / 2`` and
    ``(1 + level) / 2`` quantiles (linear interpolation, ``torch.quantile``)."""
    tail = (1 - level) / 2
    return float(torch.quantile(replicates, tail)), float(torch.quantile(replicates, 1 - tail))


def paired_bootstrap_ci(differences: Float[Tensor, " n"], n_bootstrap: int = 2000, seed: int = 0,
                        level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of the mean of paired per-question differences (the one-sample bootstrap:
    questions resampled with replacement; means in float32, generator seeded with ``seed``)."""
    generator = torch.Generator().manual_seed(seed)
    samples = resample(len(differences), n_bootstrap, generator)
    means = differences.float()[samples].mean(dim=1)
    return percentile_interval(means, level)


def cluster_bootstrap_ci(
    values: Float[Tensor, " n"],
    clusters: Int[Tensor, " n"],
    n_bootstrap: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap CI of ``mean(values)`` that resamples whole clusters (e.g. every edit
    of one token) with replacement, so values that share a cluster are not counted as independent.

    Each replicate draws as many clusters as there are and takes ``sum of their values / number of
    their values`` (clusters may differ in size). With one value per cluster it is the ordinary
    bootstrap of the mean (in float64, generator seeded with ``seed + 1``, so not the same numbers
    as :func:`paired_bootstrap_ci`). Returns ``(nan, nan)`` without values.

    Args:
        values: one number per unit, e.g. success minus control per edit.
        clusters: ``[n]`` labels (any integers); units with the same label are resampled together.
    """
    if values.numel() == 0:
        return float("nan"), float("nan")
    labels, members = torch.unique(torch.as_tensor(clusters), return_inverse=True)
    sums = torch.zeros(len(labels), dtype=torch.float64).index_add_(0, members, values.double())
    counts = torch.bincount(members, minlength=len(labels)).double()
    generator = torch.Generator().manual_seed(seed + 1)
    drawn = resample(len(labels), n_bootstrap, generator)
    means = sums[drawn].sum(dim=1) / counts[drawn].sum(dim=1)
    return percentile_interval(means, level)


def bootstrap_difference_ci(
    clean: Float[Tensor, " n"],
    top: Float[Tensor, " n"],
    random: Float[Tensor, "draws n"],
    n_bootstrap: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    *,
    method: str = "t",
) -> tuple[float, float]:
    """Interval for ``mean_n[(top - clean) - mean_draws(random - clean)]``, the top-k effect
    beyond the effect of a random k-set.

    Args:
        clean, top: the metric per example, clean and with the top-k heads ablated.
        random: the metric per random draw and example.
        method: ``"t"`` (default), :func:`difference_t_interval`: the estimand is the expected
            effect of a *random* k-set, so the interval counts the spread between draws (with
            ``draws - 1`` degrees of freedom) as well as the examples' noise; needs 2 draws;
            covers 92% with 3 draws, 94% with 5, 95% with 10-20 in simulation (nominal 95%).
            ``"percentile"``: the earlier percentile bootstrap resampling examples and draws
            (``n_bootstrap`` replicates, ``seed``); it undercovers with few draws (77% with 3,
            87% with 5, 93% with 20).

    Returns:
        ``(low, high)`` at ``level``.
    """
    if method == "t":
        low, high = difference_t_interval(clean, top, random, level)
        return float(low), float(high)
    if method != "percentile":
        raise InputError(f"The 'method' parameter of bootstrap_difference_ci must be 't' or 'percentile'; got {method!r}.")
    generator = torch.Generator().manual_seed(seed + 1)
    n_examples, n_draws = clean.numel(), random.shape[0]
    examples = resample(n_examples, n_bootstrap, generator)
    draws = resample(n_draws, n_bootstrap, generator)
    effect_top = (top - clean)[examples].mean(dim=1)  # [boot]
    effect_random = random - clean[None]  # [draws, n]
    # For each bootstrap replicate: mean over resampled draws and examples.
    per_draw = effect_random[:, examples]  # [draws, boot, n]
    per_draw = per_draw.mean(dim=2).T  # [boot, draws]
    random_mean = per_draw.gather(1, draws).mean(dim=1)
    return percentile_interval(effect_top - random_mean, level)


def difference_t_interval(
    clean: Float[Tensor, "*batch n"],
    top: Float[Tensor, "*batch n"],
    random: Float[Tensor, "*batch draws n"],
    level: float = 0.95,
) -> tuple[Float[Tensor, " *batch"], Float[Tensor, " *batch"]]:
    """t-interval of the top-k effect beyond a random k-set's, for the population of random sets.

    With ``r[d, i] = random[d, i] - clean[i]`` (draw ``d``'s effect on example ``i``),
    ``y[i] = (top[i] - clean[i]) - mean_d r[d, i]`` and ``R[d] = mean_i r[d, i]``::

        difference = mean_i y[i]
        variance   = var_i(y) / n  +  var_d(R) / draws      (examples' noise + spread between draws)
        df         = Welch–Satterthwaite of the two, with n - 1 and draws - 1 degrees of freedom
        interval   = difference ± t_{df}((1 + level) / 2) · sqrt(variance)

    ``var_d(R)`` also holds the examples' noise of each draw's mean, which ``var_i(y)`` counts
    already: a small overstatement, kept because the exact split undercovers with few draws.
    Vectorised over leading ``batch`` dimensions (the coverage simulation computes thousands).
    """
    n, draws = clean.shape[-1], random.shape[-2]
    if draws < 2 or n < 2:
        raise InputError(f"The t-interval needs at least 2 random draws and 2 examples; got {draws} draws and {n} "
                         "examples. Draw more random sets (n_random), or pass method='percentile'.")
    effect_random = random.double() - clean.double()[..., None, :]  # [*batch, draws, n]
    per_example = (top.double() - clean.double()) - effect_random.mean(dim=-2)  # [*batch, n]
    difference = per_example.mean(dim=-1)
    examples_part = per_example.var(dim=-1) / n
    draws_part = effect_random.mean(dim=-1).var(dim=-1) / draws
    df = satterthwaite_df([examples_part, draws_part], [n - 1, draws - 1])
    half = student_t_quantile(torch.full_like(df, (1 + level) / 2), df) * (examples_part + draws_part).sqrt()
    return difference - half, difference + half


def paired_permutation_p(differences: Float[Tensor, " n"], n_permutations: int = 5000, seed: int = 0) -> float:
    """Two-sided sign-flip permutation test of mean(differences) = 0 (swapping the two methods'
    results within each question)."""
    generator = torch.Generator().manual_seed(seed + 1)
    signs = torch.randint(0, 2, (n_permutations, len(differences)), generator=generator).float() * 2 - 1
    observed = differences.float().mean().abs()
    permuted = (signs * differences.float()).mean(dim=1).abs()
    return float(((permuted >= observed - 1e-12).sum() + 1) / (n_permutations + 1))


def permutation_null_maxima(
    predictions: list[tuple[Tensor, Tensor]], n_items: list[int], n_permutations: int = 200, seed: int = 0
) -> Float[Tensor, " permutations"]:
    """The best pooled accuracy any head reaches when each task's successor map is replaced by a
    random permutation of its tokens (targets ``t -> sigma(t)``), once per permutation.

    Generic: ``predictions`` holds, per task, each head's predicted class ``[pairs, n_layers,
    n_heads]`` and the true classes ``[pairs]`` (indices below the task's ``n_items``); each
    permutation relabels every task's classes at random, and the maximum over heads of the
    pooled accuracy is the family-wise null (its ``1 - alpha`` quantile a threshold)."""
    generator = torch.Generator().manual_seed(seed)
    maxima = []
    for _ in range(n_permutations):
        hits = [pred == torch.randperm(n, generator=generator)[targets][:, None, None]
                for (pred, targets), n in zip(predictions, n_items, strict=True)]
        maxima.append(torch.cat(hits).float().mean(dim=0).max())
    return torch.stack(maxima)


def random_head_sets(model: Any, exclude: list[Head], k: int, n_draws: int, seed: int) -> list[list[Head]]:
    """``n_draws`` sets of ``k`` distinct heads, none of them in ``exclude``."""
    pool = [head for head in all_heads(model) if head not in set(exclude)]
    if len(pool) < k:
        raise ArgumentError(f"Only {len(pool)} heads remain outside the {len(exclude)} excluded ones; cannot draw "
                            f"random sets of k={k}: pass a smaller k.")
    generator = torch.Generator().manual_seed(seed)
    return [[pool[i] for i in torch.randperm(len(pool), generator=generator)[:k].tolist()] for _ in range(n_draws)]
