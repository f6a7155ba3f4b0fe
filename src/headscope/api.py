"""``detect`` and ``scan``: run registered detectors on a model."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional, Union

from headscope.detectors.base import Detector, get_detector, plain_config
from headscope.engine.heads import check_head_hooks
from headscope.models import model_name
from headscope.results import HeadScores

DetectorLike = Union[str, Detector, type]


def detect(
    model: Any,
    detector: DetectorLike,
    config: Any = None,
    batch_size: Optional[int] = None,
    progress: Optional[bool] = None,
    **overrides: Any,
) -> HeadScores:
    """Score every head of ``model`` with one detector (by name, class or instance).

    ``overrides`` set config fields, e.g. ``detect(model, "induction", block_len=50, n_repeats=2)``.
    """
    check_head_hooks(model)
    return get_detector(detector, config, **overrides).score(model, batch_size=batch_size, progress=progress)


def scan(
    model: Any,
    detectors: Iterable[DetectorLike],
    out: Optional[Union[str, Path]] = None,
    resume: bool = True,
    batch_size: Optional[int] = None,
    progress: Optional[bool] = None,
    top_k: int = 10,
) -> dict[str, HeadScores]:
    """Run several detectors; with ``out``, each result is saved (``<out>/<name>.json``) as soon as
    it is done, and with ``resume`` a detector whose file exists for this model is loaded, not
    recomputed — an interrupted scan loses nothing that had finished."""
    check_head_hooks(model)
    instances = [get_detector(d) for d in detectors]  # fail on an unknown name before any work
    results: dict[str, HeadScores] = {}
    for detector in instances:
        path = Path(out) / f"{detector.name}.json" if out is not None else None
        if path is not None and resume and path.is_file():
            saved = HeadScores.load(path)
            if saved.model == model_name(model) and saved.config == plain_config(detector):
                results[detector.name] = saved
                continue
        scores = detector.score(model, batch_size=batch_size, progress=progress)
        if path is not None:
            scores.save(path, top_k=top_k)
        results[detector.name] = scores
    return results
