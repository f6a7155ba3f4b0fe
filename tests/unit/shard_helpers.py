"""For the tests of an atlas spread over processes: a detector that always has significant heads (so
the atlas draws attention patterns, which an assembly must redraw exactly) and a function that
builds the tiny model with that detector registered, to be called in other processes (Ray tasks).

``top_two``: previous-token scores, scored alone (a unit of its own, not in the template
detectors' shared pass), its two highest heads significant by a rule made for these tests.
Registered only by :func:`register` (and :func:`build_model`), never by importing this module.
"""

from __future__ import annotations

from typing import Any, Optional

from headscope.detectors.base import Detector, register_detector
from headscope.detectors.previous_token import PreviousTokenDetector
from headscope.results import HeadScores
from headscope.significance import Significance

SMALL = {"n_sequences": 4, "n_validation_sequences": 4, "block_len": 10, "n_repeats": 3}
TEMPLATES = ["induction", "previous_token", "duplicate_token"]
DETECTORS = TEMPLATES + ["top_two"]
SETTINGS = {name: dict(SMALL) for name in DETECTORS}


class TopTwoDetector(PreviousTokenDetector):
    name = "top_two"
    atlas_order = None
    summary = "previous-token scores, the two highest heads significant (a test detector)"
    cost = "score 1 s, validation 1 s"
    explanation = {"top_two": "The two heads that attend most to the previous token (a detector for tests)."}
    score_together = classmethod(Detector.score_together.__func__)  # scored alone: a unit of its own

    def pass_key(self, model: Any) -> None:
        return None

    def significance(self, model: Any, scores: HeadScores, batch_size: Optional[int] = None,
                     progress: Optional[bool] = None) -> list[Significance]:
        third = float(scores.values.flatten().sort(descending=True).values[2])
        return [Significance(detector=self.name, role=self.name, statistic=scores.values, threshold=third,
                             statistic_name="mean attention to the previous token",
                             rule="the two highest heads (a rule for tests)")]


def register() -> None:
    register_detector(TopTwoDetector, replace=True)


def build_model() -> Any:
    """The tiny model of the sharding tests, with ``top_two`` registered in this process."""
    from tests.conftest import tiny_model

    register()
    return tiny_model(n_layers=3, n_heads=4, d_vocab=128, n_ctx=64)
