"""Every result's ``.plot()``: a matplotlib Figure with the labels, ticks, bars and legend entries
it promises, saved atomically as PNG and SVG, and matplotlib's backend left as the caller had it
(pyplot not even imported when the caller had not)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from matplotlib.figure import Figure

import headscope as hs
from headscope.atlas import Atlas, AtlasSettings, RoleMap
from headscope.directions import RefusalDirection
from headscope.significance import Significance
from headscope.studies.memory_context import SteerResult, SweepResult
from headscope.studies.retrieval import plot_needle_heatmaps
from headscope.studies.select_copy import MethodComparison
from headscope.tasks.haystack import HaystackSample, Needle
from headscope.validation import ValidationResult
from headscope.viz.figures import BACKGROUND_ROLE, NO_ROLE, ROLE_COLOURS, role_colours
from headscope.viz.figures import finish, layer_step, value_formatter

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def close_pyplot_figures():
    """Should anything in this process have imported pyplot, the figures it manages are closed."""
    yield
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")


def head_scores(n_layers: int = 3, n_heads: int = 4) -> hs.HeadScores:
    values = torch.linspace(0.0, 1.0, n_layers * n_heads).reshape(n_layers, n_heads)
    values[0, 0] = float("nan")
    return hs.HeadScores(values, "induction", "toy", extras={"copying": values * 1e-12},
                         metadata={"score": "prefix_matching"})


def validation(significant: bool = True) -> ValidationResult:
    low, high = (0.8, 1.4) if significant else (-0.2, 1.4)
    return ValidationResult("induction", "toy", "loss on repeated tokens", "mean", 2, ["L1H0", "L2H3"],
                            [["L0H1", "L1H1"], ["L0H2", "L2H2"], ["L0H0", "L2H1"]], clean=2.1, top_k=3.4, random_k=2.3,
                            random_k_per_draw=[2.2, 2.4, 2.3], difference=1.1, ci_low=low, ci_high=high,
                            n_examples=16, ablation_hurts_when="increases")


ROLES = ("induction", "previous_token", "duplicate_token")


def hand_atlas() -> Atlas:
    """Three roles on a 6 x 8 model, each significant where its random statistic is above 0.7."""
    generator = torch.Generator().manual_seed(0)
    stats = {role: torch.rand(6, 8, generator=generator) for role in ROLES}
    return Atlas("toy", (6, 8), {role: hs.HeadScores(v, role, "toy") for role, v in stats.items()},
                 {role: [Significance(role, role, v, 0.7, f"{role} share", "a threshold")] for role, v in stats.items()},
                 {role: None for role in ROLES}, AtlasSettings(list(ROLES)))


def significance() -> Significance:
    generator = torch.Generator().manual_seed(0)
    return Significance("induction", "induction", torch.rand(6, 8, generator=generator), 0.7, "prefix_matching share",
                        "a rule", effect=torch.rand(6, 8, generator=generator), floor=0.2)


def sweep_result() -> SweepResult:
    return SweepResult(["L1H2", "L0H3"], [-1.0, 0.0, 1.0, 2.0], [0.1, 0.3, 0.5, 0.7], [0.8, 0.6, 0.4, 0.2],
                       [0.2, 0.4, 0.6, 0.8], extra={"kind": "output"})


def steer_result() -> SteerResult:
    return SteerResult("context", ["L1H2"], 2.0, "values", clean_rate=0.4, steered_rate=0.7, random_rate=0.45,
                       difference=0.25, ci_low=0.1, ci_high=0.4, n_items=20, dev_sweep=sweep_result())


def method_comparison() -> MethodComparison:
    return MethodComparison("qk_end", "L2H1", dev_accuracy=0.8, test_accuracy=0.75, letter_accuracy=0.6,
                            difference=0.15, ci_low=0.05, ci_high=0.25, p_value=0.01, random_head_accuracy=0.3, n_test=40)


def needle_figure() -> Figure:
    needle = Needle("The code is 42.", "What is the code?", "42")
    samples = [HaystackSample(torch.zeros(4, dtype=torch.long), "", needle, (0, 1), length, depth, "plain",
                              torch.zeros(1, dtype=torch.long))
               for length in (300, 550) for depth in (0, 50)]
    values = torch.tensor([1.0, 0.5, 0.25, 0.0])
    return plot_needle_heatmaps(samples, {"clean": values, "masked": values / 2}, label="ROUGE recall")


def refusal_direction() -> RefusalDirection:
    """A direction read at layer 3 of a 10-layer model (layers 0..7 considered), the final residual
    separating perfectly (an infinite separation, drawn at the top)."""
    separations = torch.tensor([0.0, 0.5, 1.5, 3.0, 2.5, 2.0, 1.0, 0.5, 4.0, 3.0, float("inf")])
    return RefusalDirection(3, torch.nn.functional.normalize(torch.ones(8), dim=0), 2.5, separations, 16, 16, 8,
                            "separation", "toy", "0" * 32)


def every_plot() -> dict[str, Figure]:
    """One figure per kind of plot, from results built by hand (no model)."""
    return {"head_scores": head_scores().plot(), "validation": validation().plot(),
            "role_map": hand_atlas().role_map().plot(), "significance": significance().plot(),
            "sweep": sweep_result().plot(), "steer": steer_result().plot(), "select_copy": method_comparison().plot(),
            "needles": needle_figure(), "compare": hs.compare(hand_atlas(), hand_atlas()).plot(),
            "refusal_direction": refusal_direction().plot()}


def colour_bar(figure: Figure):
    """The colour bar's axes (the figure's axes that is not the heatmap's)."""
    return figure.axes[1]


def test_head_scores_plot_labels_the_colour_bar_and_ticks_every_head_and_layer():
    figure = head_scores().plot()
    assert isinstance(figure, Figure)
    heatmap = figure.axes[0]
    assert heatmap.get_xlabel() == "head" and heatmap.get_ylabel() == "layer"
    assert [t.get_text() for t in heatmap.get_xticklabels()] == ["0", "1", "2", "3"]
    assert [t.get_text() for t in heatmap.get_yticklabels()] == ["0", "1", "2"]
    assert colour_bar(figure).get_ylabel() == "prefix_matching"
    assert heatmap.get_title() == "induction — toy"


def test_head_scores_plot_of_an_extra_names_the_extra():
    figure = head_scores().plot(extra="copying")
    assert colour_bar(figure).get_ylabel() == "copying" and figure.axes[0].get_title() == "induction · copying — toy"


def test_colour_bar_ticks_never_print_a_zero_as_a_tiny_number():
    """The report's old colour bar said ``1.85e-10`` for its minimum."""
    values = torch.tensor([[1.85e-10, 0.1], [0.2, 0.3]])
    labels = [t.get_text() for t in colour_bar(hs.HeadScores(values, "d", "m").plot()).get_yticklabels()]
    assert labels[0] == "0.00" and labels[-1] in ("0.30", "0.35") and all(len(label) == 4 for label in labels)
    assert value_formatter(0.0, 0.5)(1.85e-10) == "0.00" and value_formatter(0.0, 5.0)(-1e-12) == "0.0"
    assert value_formatter(0.0, 1e-3)(1e-19) == "0.0e+00"


def test_head_scores_plot_names_the_extras_when_given_an_unknown_one():
    with pytest.raises(hs.errors.ArgumentError, match="no extra 'nope'.*'copying'"):
        head_scores().plot(extra="nope")


def test_a_deep_model_gets_a_readable_layer_step():
    assert layer_step(32) == 1 and layer_step(36) == 2 and layer_step(80) == 4
    figure = hs.HeadScores(torch.rand(36, 3), "d", "m").plot()
    assert [t.get_text() for t in figure.axes[0].get_yticklabels()][:3] == ["0", "2", "4"]


def test_the_constant_map_has_one_colour_bar_tick_saying_its_value():
    figure = hs.HeadScores(torch.zeros(2, 3), "d", "m").plot()
    assert [t.get_text() for t in colour_bar(figure).get_yticklabels()] == ["0"]


def test_plot_draws_on_given_axes_and_returns_their_figure():
    figure = Figure()
    ax = figure.add_subplot()
    assert head_scores().plot(ax=ax) is figure


def test_validation_plot_shows_clean_top_random_draws_and_the_difference_with_its_interval():
    result = validation()
    ax = validation().plot().axes[0]
    assert ax.get_ylabel() == "loss on repeated tokens"
    bars = [patch.get_height() for patch in ax.containers[0]]
    assert bars == pytest.approx([result.clean, result.top_k, result.random_k])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["clean", "top-2", "random-2\n(mean)"]
    (draws,) = ax.collections[:1]
    assert sorted(y for _, y in draws.get_offsets()) == pytest.approx(sorted(result.random_k_per_draw))
    (interval,) = [c for c in ax.containers if type(c).__name__ == "ErrorbarContainer"]
    (segment,) = interval.lines[2][0].get_segments()
    assert [y for _, y in segment] == pytest.approx([result.random_k + result.ci_low, result.random_k + result.ci_high])
    assert "— significant" in ax.get_title()
    assert len(ax.get_legend().get_texts()) == 3 and "95% CI [+0.8, +1.4]" in ax.get_legend().get_texts()[2].get_text()


def test_validation_plot_title_says_not_significant_when_the_interval_holds_zero():
    assert "not significant" in validation(significant=False).plot().axes[0].get_title()


def test_refusal_direction_plot_draws_every_layer_shades_the_unconsidered_and_marks_the_chosen_one():
    ax = refusal_direction().plot().axes[0]
    (curve,) = ax.lines[:1]
    xs, ys = curve.get_data()
    assert list(xs) == list(range(11)) and all(map(math.isfinite, ys)) and ys[10] == max(ys)
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert "direction: layer 3 (separation)" in legend and any(label.startswith("not considered") for label in legend)
    assert any(list(line.get_xdata()) == [3, 3] for line in ax.lines[1:])
    (shaded,) = ax.patches  # layers 8..10 (>= 0.8 x 10) could not be chosen
    assert shaded.get_x() == pytest.approx(7.5) and shaded.get_width() == pytest.approx(3.0)
    assert "16 harmful, 16 harmless" in ax.get_title()
    without = RefusalDirection(1, torch.ones(8) / 8**0.5, 1.0, None, 2, 2, 2, "given", "toy", "0")
    with pytest.raises(hs.ArgumentError, match="at least 4 of each"):
        without.plot()


def test_role_map_is_a_named_tuple_that_still_unpacks_in_three():
    role_map = hand_atlas().role_map()
    names, index, strength = role_map
    assert isinstance(role_map, RoleMap) and role_map.names == names == list(ROLES)
    assert role_map.index is index and role_map.strength is strength and index.shape == strength.shape == (6, 8)


def test_role_map_plot_colours_each_head_by_its_role_lighter_when_weaker_with_counts_in_the_legend():
    from matplotlib.colors import to_rgb

    role_map = hand_atlas().role_map()
    figure = role_map.plot(title="role map — toy")
    ax = figure.axes[0]
    counts = [int((role_map.index == i).sum()) for i in range(3)]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [f"{name} ({n})" for name, n in zip(ROLES, counts, strict=True)] + [f"none ({48 - sum(counts)})"]
    assert sum(counts) > 0 and 48 - sum(counts) > 0
    assert [patch.get_facecolor()[:3] for patch in ax.get_legend().get_patches()] == [
        to_rgb(c) for c in (*ROLE_COLOURS[:3], NO_ROLE)]
    cells = ax.get_images()[0].get_array()
    empty = (role_map.index < 0).nonzero()[0].tolist()
    assert tuple(cells[empty[0], empty[1]][:3]) == pytest.approx(to_rgb(NO_ROLE), abs=1e-6)
    strongest = int(role_map.strength.flatten().argmax())
    layer, head = divmod(strongest, 8)
    role = int(role_map.index[layer, head])
    assert tuple(cells[layer, head][:3]) == pytest.approx(to_rgb(ROLE_COLOURS[role]), abs=1e-6)
    weakest = min(((l, h) for l in range(6) for h in range(8) if role_map.index[l, h] >= 0),
                  key=lambda cell: float(role_map.strength[cell]))
    assert min(cells[weakest][:3]) > min(to_rgb(ROLE_COLOURS[int(role_map.index[weakest])]))  # lighter
    assert ax.get_xlabel() == "head" and ax.get_ylabel() == "layer" and ax.get_title() == "role map — toy"
    assert len(ax.get_xticks()) == 8 and len(ax.get_yticks()) == 6


def test_significance_plot_outlines_the_significant_heads_and_states_the_threshold():
    from matplotlib.patches import Rectangle

    result = significance()
    figure = result.plot()
    ax, bar = figure.axes
    outlined = {(round(r.get_y() + 0.5), round(r.get_x() + 0.5)) for r in ax.patches if isinstance(r, Rectangle)}
    assert outlined == {(h.layer, h.head) for h in result.heads} and 0 < len(outlined) < 48
    assert set(result.heads) < set(result.as_scores().above(result.threshold))  # the floor removes some
    assert ax.get_title() == f"induction: {len(outlined)} significant heads (outlined)\nstatistic > 0.7, effect > 0.2"
    assert bar.get_ylabel() == "prefix_matching share (threshold 0.7)"
    assert [line.get_ydata()[0] for line in bar.lines] == [pytest.approx(0.7)]
    assert len(ax.get_xticks()) == 8 and len(ax.get_yticks()) == 6


def test_sweep_plot_draws_one_curve_per_rate_against_the_scale():
    result = sweep_result()
    ax = result.plot().axes[0]
    curves = [line for line in ax.lines if list(line.get_xdata()) == result.scales]
    assert [list(line.get_ydata()) for line in curves] == [result.context_rate, result.memory_rate, result.prefers_context]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "top-1 is the context answer", "top-1 is the memorised answer", "logit prefers the context answer",
        "scale 1 (clean)"]
    assert ax.get_xlabel() == "scale of the heads' output" and ax.get_ylabel() == "share of items"
    assert "L1H2, L0H3" in ax.get_title()


def test_steer_and_method_comparison_plots_show_three_bars_and_the_interval():
    for result, reference, bars in ((steer_result(), 0.45, [0.4, 0.7, 0.45]), (method_comparison(), 0.6, [0.75, 0.6, 0.3])):
        ax = result.plot().axes[0]
        assert [patch.get_height() for patch in ax.containers[0]] == pytest.approx(bars)
        (interval,) = [c for c in ax.containers if type(c).__name__ == "ErrorbarContainer"]
        (segment,) = interval.lines[2][0].get_segments()
        assert [y for _, y in segment] == pytest.approx([reference + result.ci_low, reference + result.ci_high])
        assert len(ax.get_legend().get_texts()) == 2 and ax.get_ylim()[0] == 0.0 and ax.get_ylim()[1] >= 1.0


def test_needle_heatmaps_and_the_atlas_comparison_return_figures_made_without_pyplot():
    figure = needle_figure()
    assert isinstance(figure, Figure) and figure.axes[2].get_ylabel() == "ROUGE recall"
    assert [ax.get_title() for ax in figure.axes[:2]] == ["clean\nmean 0.44", "masked\nmean 0.22"]
    comparison = hs.compare(hand_atlas(), hand_atlas()).plot()
    assert isinstance(comparison, Figure) and len([ax for ax in comparison.axes if ax.axison]) == 3


@pytest.fixture(scope="module")
def tiny_atlas():
    """A real atlas of the template detectors on the tiny model (a few seconds), as test_atlas builds it."""
    from tests.conftest import tiny_model
    from tests.unit.test_atlas import small_atlas

    return small_atlas(tiny_model(), k=1, n_random=2)


def test_a_real_atlas_plots_its_role_map_scores_significance_and_validation(tiny_atlas):
    names, index, strength = tiny_atlas.role_map()
    figure = tiny_atlas.role_map().plot(title=tiny_atlas.model)
    assert isinstance(figure, Figure)
    assert len(figure.axes[0].get_legend().get_texts()) == len(names) + 1 == 4
    validation = tiny_atlas.validations["induction"]
    ax = validation.plot().axes[0]
    assert ax.get_ylabel() == validation.metric_name and len(ax.collections[0].get_offsets()) == 2
    scores = tiny_atlas.scores["induction"]
    assert scores.plot().axes[1].get_ylabel() == scores.metadata["score"] == "prefix_matching"
    for role, result in tiny_atlas.roles.items():
        heatmap, bar = result.plot().axes
        assert heatmap.get_title().startswith(f"{role}: {len(result.heads)} significant head")
        assert f"(threshold {result.threshold:.3g})" in bar.get_ylabel().replace("\n", " ")


@pytest.mark.parametrize("suffix,magic", [("png", b"\x89PNG"), ("svg", b"<?xml")])
def test_every_plot_saves_atomically_as_png_and_svg(tmp_path, suffix, magic):
    for name, figure in every_plot().items():
        path = tmp_path / name / f"plot.{suffix}"
        path.parent.mkdir()
        assert finish(figure, path) is figure
        assert path.read_bytes()[: len(magic)] == magic, name
        assert [p.name for p in path.parent.iterdir()] == [path.name], f"{name}: a temporary file was left behind"


def test_the_path_argument_of_each_plot_saves_the_figure(tmp_path):
    path = tmp_path / "scores.svg"
    figure = head_scores().plot(path=path)
    assert isinstance(figure, Figure) and b"<svg" in path.read_bytes()[:400]


CHECK = """
import json, sys
sys.path.insert(0, sys.argv[1])
import matplotlib
before = matplotlib.rcParams._get_backend_or_none()
from tests.unit.test_plots import every_plot
figures = every_plot()
seen = {"before": before, "after": matplotlib.rcParams._get_backend_or_none(),
        "pyplot": "matplotlib.pyplot" in sys.modules, "figures": sorted(figures)}
import matplotlib.pyplot as plt
matplotlib.use("svg")
managed = every_plot()
seen.update(svg_after=matplotlib.get_backend(), managed=len(plt.get_fignums()), n=len(managed))
print(json.dumps(seen))
"""


def test_plots_leave_the_backend_alone_and_import_no_pyplot():
    """In a fresh interpreter: no plot imports pyplot or picks a backend; after the caller chose
    one and imported pyplot, the plots keep it and go through pyplot (so Jupyter shows them)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HEADSCOPE_TYPECHECK": "0"}
    env.pop("MPLBACKEND", None)
    result = subprocess.run([sys.executable, "-c", CHECK, str(ROOT)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["before"] is None and seen["after"] is None and not seen["pyplot"], seen
    assert seen["figures"] == sorted(every_plot())
    assert seen["svg_after"] == "svg" and seen["managed"] == seen["n"], seen


def test_in_a_jupyter_kernel_a_plot_shows_once_without_importing_pyplot_first(tmp_path, monkeypatch):
    """Jupyter's inline display shows pyplot's figures only: in a kernel the plots go through
    pyplot (with the kernel's own backend) even when the notebook never imported it."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "src"))
    monkeypatch.setenv("HEADSCOPE_TYPECHECK", "0")
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell("import torch, headscope as hs\n"
                                                "hs.HeadScores(torch.rand(2, 3), 'd', 'm').plot();")]
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    images = [out for out in notebook.cells[0].outputs if "image/png" in out.get("data", {})]
    assert len(images) == 1, notebook.cells[0].outputs


SAVE_LOOP = """
import json, sys, warnings
sys.path.insert(0, sys.argv[1])
import matplotlib
matplotlib.use("agg")
import matplotlib.pyplot as plt
from tests.unit.test_plots import head_scores
warnings.simplefilter("error")  # matplotlib warns once more than 20 figures are open
for n in range(25):
    figure = head_scores().plot(path=sys.argv[2])
kept = head_scores().plot()
print(json.dumps({"open": plt.get_fignums(), "kept_managed": plt.fignum_exists(kept.number)}))
"""


def test_saving_plots_in_a_loop_leaves_no_pyplot_figure_open(tmp_path):
    """A script that imported pyplot and saves plots in a loop: each saved figure is closed (no
    'more than 20 figures' warning); a plot not saved stays open for plt.show()."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HEADSCOPE_TYPECHECK": "0"}
    result = subprocess.run([sys.executable, "-c", SAVE_LOOP, str(ROOT), str(tmp_path / "s.png")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(seen["open"]) == 1 and seen["kept_managed"], seen


def test_a_background_role_goes_only_to_heads_without_another_role():
    """Attention sinks are held by most heads: with ``background=True`` the role map gives the role
    only to heads significant for nothing else, while its heads stay significant and counted."""
    atlas = hand_atlas()
    first = ROLES[0]
    sig = atlas.significance[first][0]
    atlas.significance[first] = [Significance(first, first, sig.statistic, sig.threshold, sig.statistic_name, sig.rule,
                                              background=True)]
    names, index, _ = atlas.role_map()
    roles = atlas.roles
    others = torch.stack([roles[name].mask for name in names if name != first]).any(dim=0)
    assert roles[first].mask.any() and (roles[first].mask & others).any()  # the case the rule is for
    assert not (index == names.index(first))[others].any()
    assert ((index == names.index(first)) == (roles[first].mask & ~others)).all()
    assert Significance.from_dict(roles[first].to_dict()).background
    role_map = atlas.role_map()
    assert role_map.background == (first,) and len(role_map) == 3  # still unpacks in three
    colours = role_colours(names, role_map.background)
    assert colours[first] == BACKGROUND_ROLE and [colours[n] for n in names[1:]] == list(ROLE_COLOURS[:2])
    role_map.plot()
