"""``HeadScores``: one detector's score for every head of a model, and how to read it."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from jaxtyping import Float
from torch import Tensor

from headscope.engine.heads import Head, HeadScore
from headscope.errors import ArgumentError, ResultFileError, ScoresMismatchError
from headscope.files import atomic_write_text
from headscope.viz.figures import axes_for, finish, head_figsize, head_heatmap

FORMAT_VERSION = 1


@dataclass
class HeadScores:
    """Scores ``values[layer, head]`` (float32, CPU; higher = more of the role; NaN = not scored).

    Attributes:
        values: the detector's main score per head.
        detector: the registered detector name.
        model: the model's name.
        config: the detector's configuration, as plain JSON-able values.
        extras: further per-head scores of the same shape (e.g. ``"copying"``).
        metadata: anything else worth keeping: library version, example counts, and, where a
            value is NaN, the reason.
    """

    values: Float[Tensor, "n_layers n_heads"]
    detector: str
    model: str
    config: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Float[Tensor, "n_layers n_heads"]] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.values = torch.as_tensor(self.values, dtype=torch.float32).detach().cpu()
        if self.values.ndim != 2:
            raise ValueError(f"values must be [n_layers, n_heads], got shape {tuple(self.values.shape)}.")
        for name, extra in list(self.extras.items()):
            extra = torch.as_tensor(extra, dtype=torch.float32).detach().cpu()
            if extra.shape != self.values.shape:
                raise ValueError(f"extra {name!r} has shape {tuple(extra.shape)}, not {tuple(self.values.shape)}.")
            self.extras[name] = extra

    @property
    def n_layers(self) -> int:
        return int(self.values.shape[0])

    @property
    def n_heads(self) -> int:
        return int(self.values.shape[1])

    def __getitem__(self, head: Union[Head, tuple[int, int], str]) -> float:
        layer, index = Head.parse(head)
        return float(self.values[layer, index])

    def top(self, k: int = 10, extra: Optional[str] = None) -> list[HeadScore]:
        """The ``k`` best heads as ``(layer, head, score)`` tuples, best first; NaN never ranks."""
        values = self.values if extra is None else self.extras[extra]
        flat = values.flatten()
        finite = torch.nonzero(~torch.isnan(flat)).flatten()
        order = finite[torch.argsort(flat[finite], descending=True, stable=True)][: max(k, 0)]
        return [HeadScore(int(i) // self.n_heads, int(i) % self.n_heads, float(flat[i])) for i in order]

    def top_heads(self, k: int = 10, extra: Optional[str] = None) -> list[Head]:
        """The ``k`` best heads as ``Head`` objects, best first."""
        return [Head(row.layer, row.head) for row in self.top(k, extra)]

    def above(self, threshold: float) -> list[Head]:
        """Every head scoring above ``threshold``, best first."""
        return [Head(r.layer, r.head) for r in self.top(self.values.numel()) if r.score > threshold]

    def to_frame(self):
        """A pandas DataFrame with one row per head: layer, head, score and each extra."""
        try:
            import pandas as pd
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("to_frame needs pandas: pip install pandas") from exc
        rows = []
        for layer in range(self.n_layers):
            for head in range(self.n_heads):
                row = {"layer": layer, "head": head, "score": float(self.values[layer, head])}
                row.update({name: float(extra[layer, head]) for name, extra in self.extras.items()})
                rows.append(row)
        return pd.DataFrame(rows)

    def to_dict(self, top_k: int = 10) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "detector": self.detector,
            "model": self.model,
            "shape": [self.n_layers, self.n_heads],
            "values": to_json_matrix(self.values),
            "top_heads": [row._asdict() for row in self.top(top_k)],
            "config": self.config,
            "extras": {name: to_json_matrix(extra) for name, extra in self.extras.items()},
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HeadScores":
        return cls(
            values=from_json_matrix(data["values"]),
            detector=data["detector"],
            model=data["model"],
            config=data.get("config", {}),
            extras={name: from_json_matrix(v) for name, v in data.get("extras", {}).items()},
            metadata=data.get("metadata", {}),
        )

    def save(self, path: Union[str, Path], top_k: int = 10) -> Path:
        """Write JSON (values, top heads, config, model, version). NaN is written as null."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(self.to_dict(top_k), indent=1))
        return path

    @classmethod
    def load(cls, path: Union[str, Path]) -> "HeadScores":
        """Scores saved by :meth:`save`. Raises ``ResultFileError`` naming the file when it is
        missing, not JSON (e.g. cut off) or not a saved ``HeadScores``."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ResultFileError(f"Cannot read the scores file {path} ({type(exc).__name__}: {exc.strerror or exc}); "
                                  "pass the path of a file written by HeadScores.save or 'headscope scan'.") from exc
        try:
            return cls.from_dict(json.loads(text))
        except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
            raise ResultFileError(f"The scores file {path} is not a complete HeadScores file ({_reason(exc)}); "
                                  "it may be cut off or another kind of file: write it again with "
                                  "HeadScores.save or 'headscope scan'.") from exc

    def check_model(self, model: Any, *, argument: str = "scores", check_name: bool = True) -> None:
        """Raise ``ScoresMismatchError`` unless these scores fit ``model``: the same
        ``[n_layers, n_heads]`` and, with ``check_name``, the same model name."""
        check_scores_model(model, self, argument=argument, check_name=check_name)

    def plot(self, ax: Any = None, path: Optional[Union[str, Path]] = None, extra: Optional[str] = None,
             cmap: str = "viridis") -> Any:
        """Heatmap of the scores: layer on the y axis, every head ticked on the x axis, a colour bar
        labelled with what the values are (the detector's score name, or ``extra``'s name).

        Args:
            ax: matplotlib axes to draw on (default: a new figure; matplotlib's backend is never
                switched, see :mod:`headscope.viz.figures`).
            path: save the figure there too (PNG, SVG, PDF: the suffix decides), atomically.
            extra: draw this extra score instead of the main one.
            cmap: a matplotlib colour map name.

        Returns:
            The matplotlib ``Figure``.
        """
        if extra is not None and extra not in self.extras:
            raise ArgumentError(f"The {self.detector} scores have no extra {extra!r}; their extras are "
                             f"{', '.join(map(repr, self.extras)) or 'none'}: pass one of them or extra=None.")
        values = self.values if extra is None else self.extras[extra]
        label = extra if extra is not None else self.metadata.get("score", f"{self.detector} score")
        figure, ax = axes_for(ax, head_figsize(self.n_layers, self.n_heads))
        title = f"{self.detector}{'' if extra is None else ' · ' + extra} — {self.model}"
        head_heatmap(ax, values, label=str(label), title=title, cmap=cmap)
        return finish(figure, path)

    def __repr__(self) -> str:
        best = ", ".join(f"{Head(r.layer, r.head)}={r.score:.3f}" for r in self.top(3))
        return (
            f"HeadScores(detector={self.detector!r}, model={self.model!r}, "
            f"shape={tuple(self.values.shape)}, top=[{best}])"
        )


def write_text_atomic(path: Path, text: str) -> None:
    """Write through a private temporary file and rename it: never a half-written file, and safe
    with several processes writing the same name (:func:`headscope.files.atomic_write_text`)."""
    atomic_write_text(path, text)


def check_scores_model(model: Any, scores: "HeadScores", *, argument: str = "scores", check_name: bool = True) -> None:
    """Raise ``ScoresMismatchError`` when ``scores`` were computed on another model: a different
    ``[n_layers, n_heads]`` shape, or (with ``check_name``) a different model name."""
    from headscope.engine.heads import model_shape
    from headscope.models import model_name

    shape = model_shape(model)
    expected, got = (shape.n_layers, shape.n_heads), (scores.n_layers, scores.n_heads)
    name = model_name(model)
    if got != expected:
        raise ScoresMismatchError(
            f"The {argument!r} argument holds {scores.detector} scores of a model with {got[0]} layers x {got[1]} "
            f"heads ({scores.model}), but the model {name} has {expected[0]} x {expected[1]}: score this model "
            f"first, e.g. hs.detect(model, {scores.detector!r}).")
    if check_name and scores.model != name:
        raise ScoresMismatchError(
            f"The {argument!r} argument holds {scores.detector} scores of the model {scores.model!r}, but the model "
            f"is {name!r}: score this model first, e.g. hs.detect(model, {scores.detector!r}), or pass "
            "check_model=False if the two names are the same model (or you mean to transfer its heads).")


def _reason(exc: Exception) -> str:
    """A short description of why a JSON file did not parse into a result."""
    if isinstance(exc, json.JSONDecodeError):
        return f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
    if isinstance(exc, KeyError):
        return f"missing the key {exc.args[0]!r}"
    return f"{type(exc).__name__}: {exc}"


def to_json_matrix(values: Tensor) -> list[list[Optional[float]]]:
    """A ``[rows, cols]`` tensor as nested lists, NaN as ``None`` (JSON null)."""
    return [[None if math.isnan(x) else float(x) for x in row] for row in values.tolist()]


def from_json_matrix(rows: list[list[Optional[float]]]) -> Tensor:
    """Inverse of :func:`to_json_matrix`."""
    return torch.tensor([[math.nan if x is None else x for x in row] for row in rows], dtype=torch.float32)


def ranking_agreement(a: Tensor, b: Tensor, k: int) -> dict[str, float]:
    """Spearman correlation over all heads and overlap of the top-``k`` heads of two score maps."""
    ranks = [torch.argsort(torch.argsort(x.flatten())).float() for x in (a, b)]
    top = [set(torch.argsort(x.flatten(), descending=True)[:k].tolist()) for x in (a, b)]
    return {"spearman": float(torch.corrcoef(torch.stack(ranks))[0, 1]), f"top{k}_overlap": len(top[0] & top[1])}


def role_overlap(a: HeadScores, b: HeadScores, k: int = 10) -> dict[str, Any]:
    """How two detectors' top-``k`` heads coincide: shared heads, Jaccard index, the number of
    shared heads two random ``k``-sets would have on average (``k^2 / n_heads``), and the
    Spearman correlation of the two score maps over all heads (NaN scores ranked lowest)."""
    if a.values.shape != b.values.shape:
        raise ValueError(f"Scores of different models: {tuple(a.values.shape)} vs {tuple(b.values.shape)}.")
    top_a, top_b = set(a.top_heads(k)), set(b.top_heads(k))
    shared = top_a & top_b
    clean = [torch.nan_to_num(x.values.float(), nan=float("-inf")) for x in (a, b)]
    return {
        "k": k,
        "shared": sorted(str(h) for h in shared),
        "n_shared": len(shared),
        "jaccard": len(shared) / len(top_a | top_b),
        "expected_shared_at_random": k * k / a.values.numel(),
        "spearman": ranking_agreement(clean[0], clean[1], k)["spearman"],
    }

