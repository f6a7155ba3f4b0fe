"""HeadScores: ranking, NaN handling, files, frames and plots."""

import math

import pytest
import torch

import headscope as hs
from headscope.engine import HeadScore


def scores():
    values = torch.tensor([[0.1, 0.9, float("nan")], [0.5, 0.2, 0.7]])
    return hs.HeadScores(
        values=values, detector="toy", model="m", config={"a": 1},
        extras={"other": -values}, metadata={"nan_reason": "head (0, 2) not scored"},
    )


def test_top_ranks_best_first_and_skips_nan():
    result = scores()
    assert result.top(3) == [HeadScore(0, 1, pytest.approx(0.9)), HeadScore(1, 2, pytest.approx(0.7)), HeadScore(1, 0, pytest.approx(0.5))]
    assert len(result.top(10)) == 5
    assert result.top_heads(2) == [hs.Head(0, 1), hs.Head(1, 2)]
    assert result.top(1, extra="other")[0][:2] == (0, 0)
    assert result[(1, 2)] == pytest.approx(0.7) and result["L0H1"] == pytest.approx(0.9)
    assert result.above(0.6) == [hs.Head(0, 1), hs.Head(1, 2)]


def test_save_and_load_round_trip_keeps_everything(tmp_path):
    result = scores()
    path = result.save(tmp_path / "toy.json")
    loaded = hs.HeadScores.load(path)
    assert torch.equal(torch.isnan(loaded.values), torch.isnan(result.values))
    torch.testing.assert_close(loaded.values.nan_to_num(), result.values.nan_to_num())
    torch.testing.assert_close(loaded.extras["other"].nan_to_num(), result.extras["other"].nan_to_num())
    assert (loaded.detector, loaded.model, loaded.config, loaded.metadata) == ("toy", "m", {"a": 1}, result.metadata)
    assert math.isnan(loaded[(0, 2)])


def test_to_frame_has_one_row_per_head():
    frame = scores().to_frame()
    assert list(frame.columns) == ["layer", "head", "score", "other"] and len(frame) == 6


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "toy.png"
    scores().plot(path=path)
    assert path.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.wrong_type  # headscope's own shape check (the annotation's would come first)
def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="n_layers, n_heads"):
        hs.HeadScores(values=torch.zeros(3), detector="d", model="m")
    with pytest.raises(ValueError, match="extra 'x'"):
        hs.HeadScores(values=torch.zeros(2, 2), detector="d", model="m", extras={"x": torch.zeros(3, 3)})
