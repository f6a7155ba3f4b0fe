"""headscope.stats against references: scipy where it has the function, exact enumeration for the
permutation tests, a loop over replicates for the vectorised bootstrap, and simulations for
coverage and family-wise error.

Simulation tolerances: a simulated rate from ``N`` independent datasets is Binomial(N, p) / N. A
test accepts the count inside the central 99.9% of Binomial(N, nominal), so it fails by chance
once in a thousand runs at most if the rule is exact (it never flakes here: the seeds are fixed).
"""

from __future__ import annotations

import itertools
import math
import types

import numpy as np
import pytest
import torch
from scipy import special
from scipy import stats as sps

from headscope.engine.heads import Head
from headscope.errors import ArgumentError
from headscope.stats import (
    DEFAULT_ALPHA,
    binomial_critical_accuracy,
    bonferroni_t,
    bonferroni_z,
    bootstrap_difference_ci,
    cluster_bootstrap_ci,
    difference_t_interval,
    log_incomplete_beta,
    paired_bootstrap_ci,
    paired_permutation_p,
    percentile_interval,
    permutation_null_maxima,
    random_head_sets,
    resample,
    satterthwaite_df,
    student_t_quantile,
    student_t_sf,
)


def acceptance(n: int, p: float, tail: float = 0.0005) -> tuple[int, int]:
    """Counts out of ``n`` that a Binomial(n, p) stays within with probability ``1 - 2 tail``."""
    return int(sps.binom.ppf(tail, n, p)), int(sps.binom.isf(tail, n, p))


def doubles(*shape: int, seed: int) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- Student t and the incomplete beta against scipy ----------------------------------------------


def test_student_t_quantile_matches_scipy():
    p = torch.cat([doubles(200, seed=0), torch.tensor([1e-12, 1e-6, 0.5, 1 - 1e-6], dtype=torch.float64)])
    df = torch.cat([doubles(200, seed=1) * 60 + 0.3, torch.tensor([1.0, 2.5, 7.0, 400.0], dtype=torch.float64)])
    expected = sps.t.ppf(p.numpy(), df.numpy())
    np.testing.assert_allclose(student_t_quantile(p, df).numpy(), expected, rtol=1e-9, atol=1e-12)


def test_student_t_sf_matches_scipy():
    t = (doubles(300, seed=2) - 0.5) * 20
    df = doubles(300, seed=3) * 40 + 0.5
    np.testing.assert_allclose(student_t_sf(t, df).numpy(), sps.t.sf(t.numpy(), df.numpy()), rtol=1e-9, atol=1e-15)


def test_log_incomplete_beta_matches_scipy_betainc():
    a, b = doubles(300, seed=4) * 30 + 0.05, doubles(300, seed=5) * 30 + 0.05
    x = doubles(300, seed=6)
    expected = np.log(special.betainc(a.numpy(), b.numpy(), x.numpy()))
    np.testing.assert_allclose(log_incomplete_beta(a, b, x).numpy(), expected, rtol=1e-9, atol=1e-12)
    far = log_incomplete_beta(*torch.tensor([50.0, 0.5, 1e-3], dtype=torch.float64))  # I ~ 1e-151: no underflow
    assert float(far) == pytest.approx(math.log(special.betainc(50.0, 0.5, 1e-3)), rel=1e-9)
    edges = log_incomplete_beta(torch.tensor([2.0, 2.0, -1.0]), torch.tensor([3.0, 3.0, 1.0]), torch.tensor([0.0, 1.0, 0.5]))
    assert edges[0] == -math.inf and edges[1] == 0.0 and math.isnan(edges[2])


# --- family-wise rules ----------------------------------------------------------------------------


def test_bonferroni_z_and_t_match_scipy():
    for n_tests, alpha in ((1, 0.05), (144, 0.05), (270, 0.01)):
        assert bonferroni_z(n_tests, alpha) == pytest.approx(sps.norm.isf(alpha / n_tests / 2), rel=1e-10)
        assert bonferroni_z(n_tests, alpha, two_sided=False) == pytest.approx(sps.norm.isf(alpha / n_tests), rel=1e-10)
        for df in (2.0, 7.5, 30.0):
            assert bonferroni_t(n_tests, df, alpha) == pytest.approx(sps.t.isf(alpha / n_tests / 2, df), rel=1e-9)
    per_test = bonferroni_t(50, torch.tensor([3.0, 12.0, 80.0]), two_sided=False)
    np.testing.assert_allclose(per_test.numpy(), sps.t.isf(DEFAULT_ALPHA / 50, [3.0, 12.0, 80.0]), rtol=1e-9)


def test_satterthwaite_df_is_welchs_degrees_of_freedom():
    generator = torch.Generator().manual_seed(7)
    for n1, n2, scale in ((6, 11, 1.0), (25, 4, 3.0), (9, 9, 0.2)):
        a = torch.randn(n1, generator=generator, dtype=torch.float64)
        b = scale * torch.randn(n2, generator=generator, dtype=torch.float64)
        df = satterthwaite_df([a.var() / n1, b.var() / n2], [n1 - 1, n2 - 1])
        assert float(df) == pytest.approx(sps.ttest_ind(a.numpy(), b.numpy(), equal_var=False).df, rel=1e-12)


@pytest.mark.parametrize("n, chance, n_tests", [(1, 0.5, 1), (20, 0.25, 1), (50, 0.25, 144), (200, 0.1, 270), (37, 0.5, 30)])
def test_binomial_critical_accuracy_matches_scipy_binom(n, chance, n_tests):
    level = DEFAULT_ALPHA / n_tests
    tails = sps.binom.sf(np.arange(n + 1) - 1, n, chance)  # P(X >= c) for c = 0..n
    smallest = int(np.flatnonzero(tails <= level)[0]) if (tails <= level).any() else n + 1
    assert binomial_critical_accuracy(n, chance, n_tests) == pytest.approx((smallest - 1) / n)
    with pytest.raises(ValueError, match="at least one question"):
        binomial_critical_accuracy(0, chance, n_tests)


FAMILIES, N_TESTS = 4000, 50


def test_bonferroni_rules_keep_the_family_wise_error_at_alpha_on_null_data():
    """Every test of a family is null; a family errs when any test rejects. Bonferroni bounds the
    rate by alpha (exactly 1 - (1 - alpha / m)^m = 0.0488 for independent tests)."""
    generator = torch.Generator().manual_seed(11)
    _, most = acceptance(FAMILIES, DEFAULT_ALPHA)
    z = torch.randn(FAMILIES, N_TESTS, generator=generator, dtype=torch.float64)
    samples = torch.randn(FAMILIES, N_TESTS, 8, generator=generator, dtype=torch.float64)
    t = samples.mean(dim=-1) / (samples.std(dim=-1) / math.sqrt(8))
    guessed = torch.from_numpy(np.random.default_rng(12).binomial(40, 0.25, size=(FAMILIES, N_TESTS)) / 40)
    errors = {
        "z two-sided": (z.abs() > bonferroni_z(N_TESTS)).any(dim=1),
        "z one-sided": (z > bonferroni_z(N_TESTS, two_sided=False)).any(dim=1),
        "t two-sided": (t.abs() > bonferroni_t(N_TESTS, 7.0)).any(dim=1),
        "t one-sided": (t > bonferroni_t(N_TESTS, 7.0, two_sided=False)).any(dim=1),
        "binomial": (guessed > binomial_critical_accuracy(40, 0.25, N_TESTS)).any(dim=1),
    }
    for rule, erred in errors.items():
        assert int(erred.sum()) <= most, f"{rule}: family-wise error {float(erred.double().mean()):.4f}"
    assert int(errors["z two-sided"].sum()) > 0.6 * DEFAULT_ALPHA * FAMILIES  # the rule is not vacuous


# --- bootstrap ------------------------------------------------------------------------------------


def test_resample_and_percentile_interval():
    draws = resample(7, 1000, torch.Generator().manual_seed(0))
    assert draws.shape == (1000, 7) and int(draws.min()) == 0 and int(draws.max()) == 6
    assert torch.equal(draws, torch.randint(7, (1000, 7), generator=torch.Generator().manual_seed(0)))
    replicates = torch.randn(999, generator=torch.Generator().manual_seed(1))
    assert percentile_interval(replicates, 0.9) == pytest.approx(tuple(np.percentile(replicates.numpy(), [5, 95])), rel=1e-6)


def scipy_percentile_interval(data: tuple, statistic, seed: int, paired: bool = False) -> tuple[float, float]:
    result = sps.bootstrap(data, statistic, n_resamples=20_000, method="percentile", paired=paired,
                           vectorized=True, rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def test_paired_and_clustered_bootstraps_match_scipy_percentile_intervals():
    """Same percentile interval as scipy's, up to Monte Carlo error: for 30 unit-variance values the
    bootstrap mean has sd 0.18 and its 2.5% quantile a Monte Carlo sd of 0.0034 with 20 000
    replicates, so two independent runs differ by 0.005 (sd); the tolerance is 0.02 (4 sd)."""
    values = torch.randn(30, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    reference = scipy_percentile_interval((values.numpy(),), np.mean, seed=0)
    assert paired_bootstrap_ci(values, n_bootstrap=20_000) == pytest.approx(reference, abs=0.02)
    assert cluster_bootstrap_ci(values, torch.arange(30), n_bootstrap=20_000) == pytest.approx(reference, abs=0.02)
    clusters = torch.arange(30) // 3 + (torch.arange(30) >= 24)  # sizes 3, ..., 3, 1, 3, 2
    labels, members = torch.unique(clusters, return_inverse=True)
    sums = torch.zeros(len(labels), dtype=torch.float64).index_add_(0, members, values).numpy()
    counts = torch.bincount(members).double().numpy()
    ratio = lambda s, c, axis=-1: s.sum(axis=axis) / c.sum(axis=axis)  # noqa: E731
    reference = scipy_percentile_interval((sums, counts), ratio, seed=1, paired=True)
    assert cluster_bootstrap_ci(values, clusters, n_bootstrap=20_000) == pytest.approx(reference, abs=0.03)


def test_the_percentile_difference_bootstrap_equals_a_loop_over_replicates():
    """The vectorised two-way bootstrap (examples and draws resampled) against one replicate at a
    time from the same generator: the same numbers up to float rounding."""
    generator = torch.Generator().manual_seed(5)
    clean, top, random = (torch.randn(*shape, generator=generator, dtype=torch.float64) for shape in ((12,), (12,), (4, 12)))
    replay = torch.Generator().manual_seed(9 + 1)  # seed + 1, as the function does
    examples, draws = resample(12, 300, replay), resample(4, 300, replay)
    replicates = torch.tensor([float((top - clean)[examples[b]].mean()
                                     - torch.stack([(random[d] - clean)[examples[b]].mean() for d in draws[b]]).mean())
                               for b in range(300)], dtype=torch.float64)
    expected = percentile_interval(replicates, 0.9)
    got = bootstrap_difference_ci(clean, top, random, n_bootstrap=300, seed=9, level=0.9, method="percentile")
    assert got == pytest.approx(expected, rel=1e-12)


def test_the_difference_t_interval_matches_a_hand_computation_with_scipy():
    generator = torch.Generator().manual_seed(6)
    clean, top, random = (torch.randn(*shape, generator=generator, dtype=torch.float64) for shape in ((15,), (15,), (5, 15)))
    effect_random = (random - clean).numpy()
    y = (top - clean).numpy() - effect_random.mean(axis=0)
    v_examples, v_draws = y.var(ddof=1) / 15, effect_random.mean(axis=1).var(ddof=1) / 5
    df = (v_examples + v_draws) ** 2 / (v_examples**2 / 14 + v_draws**2 / 4)
    half = sps.t.ppf(0.975, df) * math.sqrt(v_examples + v_draws)
    low, high = difference_t_interval(clean, top, random)
    assert (float(low), float(high)) == pytest.approx((y.mean() - half, y.mean() + half), rel=1e-10)


COVERAGE_T, COVERAGE_BOOTSTRAP, N = 4000, 300, 40


def test_t_and_bootstrap_intervals_cover_the_mean_of_normal_data(one_thread):
    """Nominal 95% intervals for the mean of N(mu, 1) samples of 40. The t-interval is exact, so its
    coverage count must lie in the 99.9% acceptance region of Binomial(4000, 0.95), 0.938-0.961.
    The percentile bootstrap of a mean is known to run a little short of nominal (about 0.94 at
    n = 40: its spread uses 1/n and normal, not t, quantiles); 300 datasets test it against the
    99.9% region of Binomial(300, 0.95), 0.903-0.987 (0.94 sits 2.7 Monte Carlo sd of 0.014
    above its lower end; these seeds give 0.952 for the t and 0.923 for the bootstrap)."""
    generator = torch.Generator().manual_seed(21)
    data = 2.0 + torch.randn(COVERAGE_T, N, generator=generator, dtype=torch.float64)
    half = student_t_quantile(0.975, N - 1) * data.std(dim=1) / math.sqrt(N)
    t_hits = int(((data.mean(dim=1) - half <= 2.0) & (2.0 <= data.mean(dim=1) + half)).sum())
    low, high = acceptance(COVERAGE_T, 0.95)
    assert low <= t_hits <= high, t_hits / COVERAGE_T
    intervals = [paired_bootstrap_ci(row, 1000, seed) for seed, row in enumerate(data[:COVERAGE_BOOTSTRAP])]
    boot_hits = sum(lo <= 2.0 <= hi for lo, hi in intervals)
    low, high = acceptance(COVERAGE_BOOTSTRAP, 0.95)
    assert low <= boot_hits <= high, boot_hits / COVERAGE_BOOTSTRAP


def test_bootstraps_are_reproducible_per_seed():
    values = torch.randn(25, generator=torch.Generator().manual_seed(8))
    clusters = torch.arange(25) % 6
    for interval in (lambda seed: paired_bootstrap_ci(values, 500, seed),
                     lambda seed: cluster_bootstrap_ci(values, clusters, 500, seed)):
        assert interval(3) == interval(3) and interval(3) != interval(4)
    assert all(math.isnan(v) for v in cluster_bootstrap_ci(torch.tensor([]), torch.tensor([], dtype=torch.long)))


# --- permutation tests ----------------------------------------------------------------------------


def exact_sign_flip_p(differences: torch.Tensor) -> float:
    """Share of all 2^n sign flips whose |mean| reaches the observed one."""
    observed = abs(float(differences.double().mean()))
    flips = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=len(differences))), dtype=torch.float64)
    return float(((flips * differences.double()).mean(dim=1).abs() >= observed - 1e-12).double().mean())


@pytest.mark.parametrize("differences", [
    [1.0, 1.0, 1.0, 0.0, 1.0, -1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0],  # paired right/wrong answers
    [0.3, -0.2, 0.9, 0.4, 1.1, -0.5, 0.2, 0.7, 0.05, 0.6],
    [0.5, -0.5, 0.25, -0.25, 0.0, 0.1, -0.1, 0.0],  # a symmetric sample: p = 1
])
def test_paired_permutation_p_matches_the_exact_sign_flip_test(differences):
    """Monte Carlo p with 20 000 flips against all 2^n: within 4 Monte Carlo sd plus 1/20 001
    (the +1 in ``(count + 1) / (n + 1)``)."""
    values = torch.tensor(differences)
    exact = exact_sign_flip_p(values)
    estimate = paired_permutation_p(values, n_permutations=20_000, seed=0)
    assert estimate == pytest.approx(exact, abs=4 * math.sqrt(exact * (1 - exact) / 20_000) + 1 / 20_001)
    assert paired_permutation_p(values, 500, seed=1) == paired_permutation_p(values, 500, seed=1)


def test_permutation_null_maxima_matches_the_exact_null_over_all_relabellings():
    """Two heads predicting four items of one task: the null of the best head's accuracy over all
    4! relabellings, against its Monte Carlo estimate from 4000 permutations (mean within 4 sd)."""
    targets = torch.tensor([0, 1, 2, 3, 0, 1])
    predictions = torch.tensor([[0, 1], [1, 1], [2, 0], [0, 3], [0, 2], [1, 1]]).reshape(6, 1, 2)
    exact = torch.tensor([float((predictions == torch.tensor(sigma)[targets][:, None, None]).float().mean(dim=0).max())
                          for sigma in itertools.permutations(range(4))], dtype=torch.float64)
    maxima = permutation_null_maxima([(predictions, targets)], [4], n_permutations=4000, seed=0).double()
    assert float(maxima.mean()) == pytest.approx(float(exact.mean()), abs=4 * float(exact.std()) / math.sqrt(4000))
    assert set(maxima.unique().tolist()) <= set(exact.unique().tolist())
    again = permutation_null_maxima([(predictions, targets)], [4], n_permutations=50, seed=3)
    assert torch.equal(again, permutation_null_maxima([(predictions, targets)], [4], n_permutations=50, seed=3))


# --- random head sets -----------------------------------------------------------------------------


def fake_model(n_layers: int = 3, n_heads: int = 4) -> types.SimpleNamespace:
    """What ``random_head_sets`` reads of a model: its config's shape."""
    return types.SimpleNamespace(cfg=types.SimpleNamespace(n_layers=n_layers, n_heads=n_heads, d_head=8, d_model=32,
                                                           d_vocab=10, n_ctx=16))


def test_random_head_sets_exclude_the_given_heads_have_size_k_and_repeat_per_seed():
    model, exclude = fake_model(), [Head(0, 1), Head(2, 3), Head(1, 0)]
    sets = random_head_sets(model, exclude, k=4, n_draws=30, seed=5)
    assert len(sets) == 30
    for heads in sets:
        assert len(heads) == 4 and len(set(heads)) == 4
        assert not set(heads) & set(exclude)
        assert all(0 <= h.layer < 3 and 0 <= h.head < 4 for h in heads)
    assert sets == random_head_sets(model, exclude, k=4, n_draws=30, seed=5)
    assert sets != random_head_sets(model, exclude, k=4, n_draws=30, seed=6)
    assert len({h for heads in sets for h in heads}) == 12 - 3  # every other head gets drawn
    assert sorted(random_head_sets(model, exclude, k=9, n_draws=1, seed=0)[0]) == sorted(
        h for h in (Head(layer, head) for layer in range(3) for head in range(4)) if h not in exclude)
    with pytest.raises(ArgumentError, match="Only 9 heads remain outside the 3 excluded ones"):
        random_head_sets(model, exclude, k=10, n_draws=1, seed=0)
