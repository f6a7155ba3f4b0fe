"""``detect`` and ``scan``: run registered detectors on a model."""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from headscope.detectors.base import Detector, get_detector, plain_config
from headscope.engine.heads import check_head_hooks, model_shape
from headscope.engine.runner import progress_note
from headscope.errors import IdentityMismatchError, ResultFileError, ResultFileWarning
from headscope.identity import ModelIdentity, model_identity
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

    ``overrides`` set config fields, e.g. ``detect(model, "induction", block_len=50, n_repeats=2)``
    or ``data="book.txt"`` (your own data file); a keyword that the detector's ``score`` takes
    instead (``items=`` of memory_context, ``samples=`` of retrieval, ``prompts=`` of select_copy:
    objects you built in Python) goes to ``score``.
    """
    check_head_hooks(model)
    takes = score_inputs(get_detector(detector))
    inputs = {key: overrides.pop(key) for key in list(overrides) if key in takes}
    return get_detector(detector, config, **overrides).score(model, batch_size=batch_size, progress=progress, **inputs)


def score_inputs(detector: Detector) -> set[str]:
    """The keywords of ``detector.score`` beyond the model, batch size and progress: data the
    caller hands over as Python objects."""
    skip = {"model", "batch_size", "progress"}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    parameters = inspect.signature(detector.score).parameters.items()
    return {name for name, parameter in parameters if name not in skip and parameter.kind in kinds}


def scan(
    model: Any,
    detectors: Iterable[DetectorLike],
    out: Optional[Union[str, Path]] = None,
    resume: bool = True,
    batch_size: Optional[int] = None,
    progress: Optional[bool] = None,
    top_k: int = 10,
) -> dict[str, HeadScores]:
    """Run several detectors; with ``out``, each result is saved (``<out>/<name>.json``, with the
    model's identity in its metadata) as soon as it is done, and with ``resume`` a detector whose
    file exists for this model is loaded, not recomputed — an interrupted scan loses nothing that
    had finished. Each reused file is named in a "resumed" line on stderr (unless
    ``progress=False``); a saved file that cannot be read is named in a ``ResultFileWarning`` and
    recomputed, one of other settings is recomputed, and one written for another model identity
    (another model, other weights, other library versions) is refused with an
    ``IdentityMismatchError``."""
    check_head_hooks(model)
    instances = [get_detector(d) for d in detectors]  # fail on an unknown name before any work
    identity = model_identity(model) if out is not None else None
    reusable = saved_scores(model, instances, out, identity) if out is not None and resume else {}  # refusals first
    results: dict[str, HeadScores] = {}
    for detector in instances:
        path, saved = (Path(out) / f"{detector.name}.json" if out is not None else None), reusable.get(detector.name)
        if saved is not None:
            progress_note(f"resumed {detector.name}: its scores for {saved.model} are read from {path} (pass "
                          "resume=False, or --no-resume, to recompute)", progress)
            results[detector.name] = saved
            continue
        scores = detector.score(model, batch_size=batch_size, progress=progress)
        if path is not None:
            scores.metadata["identity"] = identity.to_dict()
            scores.save(path, top_k=top_k)
        results[detector.name] = scores
    return results


def saved_scores(model: Any, detectors: Iterable[DetectorLike], out: Union[str, Path],
                 identity: Optional[ModelIdentity] = None) -> dict[str, HeadScores]:
    """The scores in ``out`` that ``scan(..., out=out)`` would reuse, by detector name: checks
    every ``<out>/<name>.json`` of the run at once, so that a file of another model is refused
    before any detector runs. ``identity``: the model's, when the caller has hashed it already.

    Raises:
        IdentityMismatchError: a file was written for another model identity, or records none.
    """
    identity = identity or model_identity(model)
    found = {}
    for detector in (get_detector(d) for d in detectors):
        saved = _saved_scores(model, identity, detector, Path(out) / f"{detector.name}.json")
        if saved is not None:
            found[detector.name] = saved
    return found


def _saved_scores(model: Any, identity: ModelIdentity, detector: Detector, path: Path) -> Optional[HeadScores]:
    """The scores saved at ``path`` when they are this model identity's with this detector's
    settings; None when there are none, or they are another settings' (recomputed), or the file
    cannot be read (named in a warning, recomputed and overwritten).

    Raises:
        IdentityMismatchError: the file was written for another model identity, or records none.
    """
    if not path.is_file():
        return None
    try:
        saved = HeadScores.load(path)
    except ResultFileError as exc:
        warnings.warn(f"{exc} Computing {detector.name} again.", ResultFileWarning, stacklevel=3)
        return None
    shape = model_shape(model)
    try:
        identity.check_matches(saved.metadata.get("identity"), source=f"The saved scores {path}",
                               fix="pass resume=False (--no-resume) to compute them again, or another out folder")
    except IdentityMismatchError:
        raise
    except ResultFileError as exc:  # a damaged identity record: the file cannot be read
        warnings.warn(f"The saved scores {path} cannot be read: {exc} Computing {detector.name} again.",
                      ResultFileWarning, stacklevel=3)
        return None
    if saved.config != plain_config(detector):
        return None
    if (saved.n_layers, saved.n_heads) != (shape.n_layers, shape.n_heads):
        warnings.warn(f"The saved scores {path} are labelled {saved.model} but have {saved.n_layers} x {saved.n_heads} "
                      f"heads, not {shape.n_layers} x {shape.n_heads}; computing {detector.name} again.",
                      ResultFileWarning, stacklevel=3)
        return None
    return saved
