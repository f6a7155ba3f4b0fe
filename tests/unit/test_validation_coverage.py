"""Coverage of the validation interval, measured in a simulation from a known model, and the
Student t helpers behind it (checked against table values and closed forms).

The model (issue 18, item 4): 32 examples; example ``i`` has a clean metric ``c_i`` and a
sensitivity ``b_i`` to any ablation; the top-k set adds ``TRUTH + 2 b_i`` plus noise; random set
``d`` adds ``a_d + b_i`` plus noise, where ``a_d`` (the set's own effect, sd 1) varies between
sets more than the per-example noise (sd 0.5). The estimand is the top-k effect beyond the
*expected* effect of a random set: ``E[2 b] + TRUTH - E[a + b] = TRUTH``.
"""

from __future__ import annotations

import math

import pytest
import torch

from headscope.atlas import AtlasSettings
from headscope.errors import InputError
from headscope.stats import (
    bonferroni_t,
    bonferroni_z,
    bootstrap_difference_ci,
    difference_t_interval,
    satterthwaite_df,
    student_t_quantile,
    student_t_sf,
)

N_EXAMPLES = 32
TRUTH = 1.0
REPS_T = 4000  # coverage SE ~0.35% at 95%
REPS_PERCENTILE = 500  # the bootstrap runs one dataset at a time: SE <= 2%, enough to show it fails
DRAWS = (3, 5, 10, 20)


def simulate(reps: int, draws: int, seed: int, set_sd: float = 1.0, noise_sd: float = 0.5):
    """``reps`` datasets: clean ``[reps, n]``, top ``[reps, n]``, random ``[reps, draws, n]``."""
    generator = torch.Generator().manual_seed(seed)
    normal = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
    clean = normal(reps, N_EXAMPLES)
    sensitivity = 0.5 * normal(reps, N_EXAMPLES)
    top = clean + TRUTH + 2 * sensitivity + noise_sd * normal(reps, N_EXAMPLES)
    set_effect = set_sd * normal(reps, draws, 1)
    random = clean[:, None] + sensitivity[:, None] + set_effect + noise_sd * normal(reps, draws, N_EXAMPLES)
    return clean, top, random


def t_coverage(draws: int, **kwargs) -> float:
    clean, top, random = simulate(REPS_T, draws, seed=draws, **kwargs)
    low, high = difference_t_interval(clean, top, random)
    return float(((low <= TRUTH) & (TRUTH <= high)).double().mean())


def percentile_coverage(draws: int) -> float:
    clean, top, random = simulate(REPS_PERCENTILE, draws, seed=100 + draws)
    hits = 0
    for rep in range(REPS_PERCENTILE):
        low, high = bootstrap_difference_ci(clean[rep], top[rep], random[rep], n_bootstrap=500, seed=rep,
                                            method="percentile")
        hits += low <= TRUTH <= high
    return hits / REPS_PERCENTILE


def test_the_interval_covers_at_the_atlas_default_and_the_percentile_bootstrap_did_not(one_thread):
    old = {draws: percentile_coverage(draws) for draws in DRAWS}
    new = {draws: t_coverage(draws) for draws in DRAWS}
    no_spread = {draws: t_coverage(draws, set_sd=0.0) for draws in DRAWS}
    print(f"\nnominal 95% coverage, {N_EXAMPLES} examples, between-set sd 1, noise sd 0.5 "
          f"(percentile: {REPS_PERCENTILE} datasets, t: {REPS_T})")
    print("draws  percentile  t (new)  t, no between-set spread")
    for draws in DRAWS:
        print(f"{draws:>5}  {old[draws]:>10.3f}  {new[draws]:>7.3f}  {no_spread[draws]:>8.3f}")
    default = AtlasSettings(detectors=[]).n_random
    assert default >= 5
    assert t_coverage(default) >= 0.93
    assert all(new[draws] >= 0.93 for draws in DRAWS if draws >= 5)
    assert all(0.93 <= no_spread[draws] <= 0.995 for draws in DRAWS)  # conservative, not wildly so
    assert old[3] < 0.85 and old[5] < 0.90  # what the atlas had (3 draws) undercovered


def test_the_default_method_is_the_t_interval_and_needs_two_draws():
    clean, top, random = simulate(3, 4, seed=7)
    for rep in range(3):
        low, high = difference_t_interval(clean[rep], top[rep], random[rep])
        assert bootstrap_difference_ci(clean[rep], top[rep], random[rep]) == (pytest.approx(float(low)),
                                                                              pytest.approx(float(high)))
    with pytest.raises(InputError, match="at least 2 random draws"):
        bootstrap_difference_ci(clean[0], top[0], random[0, :1])
    with pytest.raises(InputError, match="'t' or 'percentile'"):
        bootstrap_difference_ci(clean[0], top[0], random[0], method="bca")


def test_the_t_interval_by_hand_and_with_no_spread_at_all():
    clean = torch.tensor([1.0, 2.0, 4.0])
    top = torch.tensor([3.0, 3.0, 7.0])  # effects 2, 1, 3
    random = torch.tensor([[1.0, 3.0, 4.0], [2.0, 2.0, 5.0]])  # effects (0, 1, 0) and (1, 0, 1)
    y = torch.tensor([2.0, 1.0, 3.0]) - torch.tensor([0.5, 0.5, 0.5])
    v_examples, v_draws = float(y.var()) / 3, float(torch.tensor([1 / 3, 2 / 3]).var()) / 2
    df = (v_examples + v_draws) ** 2 / (v_examples**2 / 2 + v_draws**2 / 1)
    half = float(student_t_quantile(0.975, df)) * math.sqrt(v_examples + v_draws)
    assert bootstrap_difference_ci(clean, top, random) == (pytest.approx(1.5 - half), pytest.approx(1.5 + half))
    # every example and draw alike: a zero-width interval at the difference, not NaN
    assert bootstrap_difference_ci(torch.ones(4), torch.ones(4) - 2, torch.ones(3, 4) - 0.1) == (
        pytest.approx(-1.9), pytest.approx(-1.9))


# --- the Student t helpers (no scipy) ---------------------------------------------------------------

TABLE = {  # two-sided critical values from a t table
    (0.975, 1): 12.706205, (0.975, 2): 4.302653, (0.975, 5): 2.570582, (0.975, 10): 2.228139,
    (0.975, 30): 2.042272, (0.995, 15): 2.946713, (0.9995, 15): 4.072765, (0.95, 4): 2.131847,
}


def test_t_quantiles_match_the_table_and_closed_forms():
    for (p, df), value in TABLE.items():
        assert float(student_t_quantile(p, df)) == pytest.approx(value, abs=1e-6)
    for p in (0.6, 0.9, 0.999, 1 - 1e-7, 0.01):
        assert float(student_t_quantile(p, 1.0)) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)  # Cauchy
        assert float(student_t_quantile(p, 2.0)) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)
    for df in (0.7, 3.3, 17.5):  # not integers (Welch–Satterthwaite degrees of freedom)
        t = student_t_quantile(torch.tensor([0.2, 0.95, 0.9999], dtype=torch.float64), df)
        assert 1 - student_t_sf(t, df) == pytest.approx(torch.tensor([0.2, 0.95, 0.9999], dtype=torch.float64), abs=1e-12)
    assert float(student_t_quantile(0.975, 1e6)) == pytest.approx(1.959966, abs=1e-5)  # the normal limit
    assert torch.isnan(student_t_quantile(torch.tensor([0.0, 1.0, 0.5]), torch.tensor([3.0, 3.0, float("nan")]))).all()


def test_bonferroni_t_and_satterthwaite_df():
    assert bonferroni_t(1, 10.0) == pytest.approx(2.228139, abs=1e-6)
    # the safety rule over 270 heads, one-sided at 5%: 4.6 at 15 df, 4.0 at 30, the normal 3.56 in the limit
    assert bonferroni_t(270, 15.0, two_sided=False) == pytest.approx(4.5671, abs=1e-4)
    assert bonferroni_t(270, 30.0, two_sided=False) == pytest.approx(4.0111, abs=1e-4)
    assert bonferroni_t(270, 1e7, two_sided=False) == pytest.approx(bonferroni_z(270, two_sided=False), abs=1e-4)
    per_head = bonferroni_t(2, torch.tensor([[1.0, 2.0], [5.0, 10.0]]))
    assert per_head.shape == (2, 2) and float(per_head[0, 0]) == pytest.approx(25.4517, abs=1e-4)
    # Welch: s1^2 = 4, n1 = 10; s2^2 = 1, n2 = 20
    df = satterthwaite_df([4 / 10, 1 / 20], [9, 19])
    assert float(df) == pytest.approx((0.4 + 0.05) ** 2 / (0.4**2 / 9 + 0.05**2 / 19))
    assert float(satterthwaite_df([0.0, 0.0], [9, 19])) == 28.0
    assert float(satterthwaite_df([0.3, 0.0], [9, 19])) == pytest.approx(9.0)
    assert torch.isnan(satterthwaite_df([float("nan"), 0.1], [9, 19]))
