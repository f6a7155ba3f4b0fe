"""The studies built on detectors (``headscope.studies``) on a tiny Llama and toy data: memory-head
sweeps, steering and transfer tables measure what they claim, and needle heatmaps average the
right cells."""


import pytest
import torch

import headscope as hs
from headscope.detectors.memory_context import MemoryContextDetector
from headscope.studies.memory_context import answer_rates, prefers_context, split_items, steer, sweep, transfer_table
from headscope.studies.retrieval import _cell_means, plot_needle_heatmaps
from headscope.tasks.conflicts import ConflictItem, conflict_prompt, first_token
from headscope.tasks.haystack import HaystackSample, Needle

CLOZE = "{s} w10"


def toy_items(model, subjects=range(6), formats=("restate",)):
    """Conflict items over the tiny Llama's word tokens: subject ``w{3+i}``, memorised answer
    ``w{20+i}``, context answer ``w{40+i}`` (every item its own answers)."""
    items = []
    for i in subjects:
        subject, memory, context = f"w{3 + i}", f"w{20 + i}", f"w{40 + i}"
        for form in formats:
            prompt = conflict_prompt("toy", form, subject, context, cloze=CLOZE)
            items.append(ConflictItem("toy", form, subject, memory, context, prompt, memory_token=first_token(model, memory),
                                      context_token=first_token(model, context), cloze=CLOZE))
    return items


def test_split_items_keeps_every_subject_on_one_side(tiny_llama):
    items = toy_items(tiny_llama, formats=("restate", "according"))
    dev, test = split_items(items, dev_fraction=0.5, seed=3)
    assert {i.subject for i in dev}.isdisjoint({i.subject for i in test})
    assert len(dev) == len(test) == 6 and sorted(map(id, dev + test)) == sorted(map(id, items))


@pytest.mark.parametrize("kind", ["values", "output"])
def test_a_sweep_at_scale_one_is_the_clean_model(tiny_llama, kind):
    items = toy_items(tiny_llama)
    clean = answer_rates(tiny_llama, items)
    result = sweep(tiny_llama, items, [hs.Head(0, 1), hs.Head(1, 2)], [1.0], kind=kind)
    assert result.heads == ["L0H1", "L1H2"] and result.extra == {"kind": kind}
    assert result.context_rate == [float(clean["context"].mean())]
    assert result.memory_rate == [float(clean["memory"].mean())]
    assert result.prefers_context == [float((clean["logit_diff"] > 0).float().mean())]


def test_outputs_scaled_by_zero_are_zero_ablation(tiny_llama):
    items = toy_items(tiny_llama)
    scaled = answer_rates(tiny_llama, items, [(1, 2)], 0.0, "output")["logit_diff"]
    with hs.ablate(tiny_llama, [(1, 2)], method="zero"):
        ablated = answer_rates(tiny_llama, items)["logit_diff"]
    torch.testing.assert_close(scaled, ablated)
    assert not torch.allclose(scaled, answer_rates(tiny_llama, items)["logit_diff"])


def test_steer_takes_the_strongest_memory_head_of_dev_and_measures_held_out_items(tiny_llama):
    dev, test = toy_items(tiny_llama, range(6)), toy_items(tiny_llama, range(6, 12))
    result = steer(tiny_llama, dev, test, k=1, scales=(0.0, 1.0), n_random=2)
    values = MemoryContextDetector().score(tiny_llama, items=dev).values  # memory heads: most negative
    strongest = divmod(int(values.flatten().argmin()), values.shape[1])
    assert result.heads == [str(hs.Head(*strongest))] and result.scale in (0.0, 1.0)
    assert result.clean_rate == float(prefers_context(tiny_llama, test).mean()) and result.n_items == len(test)
    assert result.dev_sweep.scales == [0.0, 1.0] and result.ci_low <= result.ci_high


def test_a_transfer_table_has_a_row_per_source_and_target_beside_the_clean_rate(tiny_llama):
    sources = {"a": toy_items(tiny_llama, range(4)), "b": toy_items(tiny_llama, range(4, 8))}
    targets = {"c": toy_items(tiny_llama, range(8, 11)), "d": toy_items(tiny_llama, range(11, 14))}
    rows = transfer_table(tiny_llama, sources, targets, k=1, scale=0.0, n_random=2)
    assert [(r["source"], r["target"]) for r in rows] == [("a", "c"), ("a", "d"), ("b", "c"), ("b", "d")]
    for row in rows:
        clean = float(prefers_context(tiny_llama, targets[row["target"]]).mean())
        steered = float(prefers_context(tiny_llama, targets[row["target"]], row["heads"], 0.0).mean())
        assert row["clean"] == clean and row["steered"] == steered and row["change"] == steered - clean
        assert row["n_items"] == len(targets[row["target"]])


def test_needle_heatmaps_average_each_length_and_depth_cell(tmp_path):
    needle = Needle("The code is 42.", "What is the code?", "42")
    samples = [HaystackSample(torch.zeros(4, dtype=torch.long), "", needle, (0, 1), length, depth, "plain",
                              torch.zeros(1, dtype=torch.long))
               for length in (300, 550) for depth in (0, 50) for _ in range(2)]
    per_sample = torch.arange(len(samples), dtype=torch.float)  # cell (length, depth) holds two consecutive values
    grid = _cell_means(samples, per_sample, [300, 550], [0, 50])
    assert grid.tolist() == [[0.5, 4.5], [2.5, 6.5]]  # rows: depths, columns: lengths
    path = tmp_path / "heatmaps.png"
    figure = plot_needle_heatmaps(samples, {"clean": per_sample / 8, "masked": per_sample / 16}, path=path)
    assert path.exists() and len(figure.axes) == 3  # two heatmaps and their colour bar
    assert [ax.get_title().split("\n")[0] for ax in figure.axes[:2]] == ["clean", "masked"]
