"""The head atlas: every detector on one model in one run, validated, with significant heads,
role overlaps and a role map — the library's main job.

    atlas = hs.atlas(model)                 # all registered detectors
    atlas.significant_heads("induction")    # [Head(18, 6), ...]
    atlas.overlap()                         # Jaccard matrix of the roles' significant heads
    atlas.save("atlas/")                    # report.html, heads/*.html, atlas.json, CSV files, ...

After the detectors, the atlas draws the attention patterns of the significant heads
(``Atlas.patterns``): each detector's heads on its own examples (``Detector.examples``) and every
significant head on a natural sentence, a few short forward runs.

With ``out``, each detector's scores, significance and validation are written to
``<out>/parts/`` as soon as each is done, and the patterns as ``parts/attention_patterns.patterns.json``;
a rerun with ``resume=True`` (the default) loads every part whose model and settings match and
computes only what is missing.

Spread over many processes, GPUs or nodes by a scheduler (a SLURM job array, Ray): each process runs
some of the atlas's units into one shared ``out`` and writes their parts, nothing else, and a last
run assembles the atlas from the parts (:func:`atlas_units`)::

    hs.atlas(model, out="atlas/", shard="2/4")      # the second of four shards (numbered from 1)
    hs.atlas(model, out="atlas/", only=["safety", "induction.validation"])
    hs.atlas(model, out="atlas/", assemble=True)    # every part present: the whole atlas, patterns drawn

A unit is a detector with all its stages, or the detectors scored in one pass (``score_together``:
induction, previous_token and duplicate_token), which a shard never splits. ``only`` also takes a
single stage, ``detector.stage``; a stage after ``scores`` run alone reads the detector's scores
part and, when it is missing, fails before any work naming the unit to run first. Parts are
written atomically under names no other writer uses, so shards never see a torn part; a failed
detector is recorded as ``<detector>.failed.json`` without ending the others, and the assembled
atlas records it as a sequential run does. The assembled atlas equals a sequential run's
(:meth:`Atlas.results_json`, byte for byte).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import inspect
import json
import math
import os
import platform
import re
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from headscope.detectors.base import (
    Detector,
    detector_class,
    get_detector,
    has_tokenizer,
    list_detectors,
    plain_config,
)
from headscope.engine.heads import Head, check_head_hooks, kv_group_of, kv_head_of, model_shape
from headscope.engine.runner import bar_disabled, progress_note
from headscope.errors import (
    ArgumentError,
    IdentityMismatchError,
    MissingPartsError,
    PromptTooLongError,
    ResultFileError,
    ResultFileWarning,
    SettingError,
    UnknownDetectorError,
)
from headscope.identity import ModelIdentity, model_identity, weights_digest
from headscope.models import model_name
from headscope.results import HeadScores, role_overlap, write_text_atomic
from headscope.significance import Significance
from headscope.validation import ValidationResult, check_counts, validate
from headscope.versions import HEADSCOPE_VERSION, installed_version
from headscope.viz.figures import axes_for, finish, head_figsize, role_map_image
from headscope.viz.patterns import NATURAL_SENTENCE, AttentionPatterns, attention_patterns

ATLAS_FORMAT_VERSION = 1
STAGES = ("scores", "significance", "validation")


def stages_run(validate: bool) -> tuple[str, ...]:
    """The stages an atlas runs: all of :data:`STAGES`, or without the validation."""
    return STAGES if validate else STAGES[:2]
PATTERNS_STEP = "attention_patterns"  # the step after the detectors: its part, failure and timings go by this name
NATURAL = "natural_sentence"  # the key in Atlas.patterns of the natural sentence over every significant head
PATTERN_TOKENS = 128  # the longest example drawn (examples are ~60 tokens; a byte-level tokenizer needs more)
VOLATILE = ("environment", "timings")  # what differs between two runs of one atlas (dates, versions, seconds)
UNIT_SECONDS = 30.0  # the weight of a detector whose ``cost`` names no seconds, when balancing shards


class _RoleMapFields(NamedTuple):
    names: list[str]
    index: Int[Tensor, "n_layers n_heads"]
    strength: Float[Tensor, "n_layers n_heads"]


class RoleMap(_RoleMapFields):
    """Each head's strongest significant role (:meth:`Atlas.role_map`); unpacks as
    ``names, index, strength = atlas.role_map()``.

    Attributes:
        names: the roles, in the atlas's order (``index`` points into it).
        index: ``[n_layers, n_heads]``, each head's role (-1: no significant role).
        strength: ``[n_layers, n_heads]``, where the head sits between its role's threshold (0)
            and the role's strongest head (1) (:meth:`Significance.strength`).
        background: the background roles among ``names`` (``Significance.background``), drawn
            in a quiet grey; not unpacked.
    """

    def __new__(cls, names: list[str], index: Tensor, strength: Tensor, background: Sequence[str] = ()) -> "RoleMap":
        role_map = super().__new__(cls, names, index, strength)
        role_map.background = tuple(background)
        return role_map

    def plot(self, ax: Any = None, path: Optional[Union[str, Path]] = None, title: str = "role map") -> Any:
        """The layer x head grid, each head in its role's colour (the report's palette), lighter
        when weaker, grey with none; the legend gives each role's number of heads.

        Args:
            ax: matplotlib axes to draw on (default: a new figure; the backend is never switched).
            path: save the figure there too (the suffix picks the format), atomically.
            title: the axes' title (e.g. the model's name).

        Returns:
            The matplotlib ``Figure``.
        """
        n_layers, n_heads = self.index.shape
        figure, ax = axes_for(ax, head_figsize(n_layers, n_heads, extra_width=2.2))
        role_map_image(ax, self.names, self.index, self.strength, title=title, background=self.background)
        return finish(figure, path)


@dataclass
class AtlasSettings:
    """How an atlas was made (recorded in the report; part files are reused only when equal).

    Attributes:
        detectors: detector names, in the order they ran.
        validate: whether each detector's top-``k`` heads were validated causally.
        k: heads ablated by the validation; n_random: random ``k``-sets it compares against.
        seed: seed of the random head sets.
        settings: config overrides per detector, e.g. ``{"retrieval": {"lengths": [300]}}``, on top
            of each detector's ``atlas_defaults`` (:func:`detector_settings`).
        overlap_k: top-``k`` used for the score-map overlaps beside the significant-set overlaps.
    """

    detectors: list[str]
    validate: bool = True
    k: int = 5
    n_random: int = 5
    seed: int = 0
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    overlap_k: int = 10


@dataclass
class Atlas:
    """Every detector's scores, significant heads (with rules) and validation on one model.

    Attributes:
        model: the model's name; shape: ``(n_layers, n_heads)``.
        scores: ``HeadScores`` per detector.
        significance: per detector, one :class:`Significance` per role it defines.
        validations: per detector, its top-k vs random-k ``ValidationResult`` (None if not run).
        settings: the :class:`AtlasSettings`; environment: library versions, device, date.
        timings: seconds per detector and stage; a resumed stage keeps the time it first took.
        failures: per detector that raised, ``{"stage", "error", "message"}``; its stages before the
            failing one are kept, the rest are missing. Empty when every detector finished. A failed
            patterns step is kept under ``PATTERNS_STEP``.
        patterns: attention patterns of the significant heads: per detector with significant heads,
            one :class:`~headscope.viz.patterns.AttentionPatterns` per example of the detector over
            those heads, and under ``NATURAL`` one over every significant head on
            ``NATURAL_SENTENCE`` (with a tokenizer). Saved as ``patterns.json`` beside ``atlas.json``.
        n_kv_heads: key/value heads per layer (fewer than the query heads with grouped-query
            attention; None: as many, or not recorded).
    """

    model: str
    shape: tuple[int, int]
    scores: dict[str, HeadScores]
    significance: dict[str, list[Significance]]
    validations: dict[str, Optional[ValidationResult]]
    settings: AtlasSettings
    environment: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: dict[str, dict[str, str]] = field(default_factory=dict)
    patterns: dict[str, list[AttentionPatterns]] = field(default_factory=dict)
    n_kv_heads: Optional[int] = None

    # ----- reading the atlas -------------------------------------------------------------
    def kv_group(self, head: Head) -> tuple[int, list[Head]]:
        """The KV head ``head`` reads its keys and values from, and every query head of its layer
        that shares it (``engine.heads.kv_head`` / ``kv_group``, from the recorded ``n_kv_heads``)."""
        size = self.shape[1] // (self.n_kv_heads or self.shape[1])
        kv = kv_head_of(head, size)
        return kv, kv_group_of(head.layer, kv, size)

    def patterns_of(self, head: Union[Head, str, tuple[int, int]]) -> dict[str, list[AttentionPatterns]]:
        """The attention patterns drawn of ``head``, each cut to that head alone: per key of
        :attr:`patterns` (its detectors, then ``NATURAL``) that shows it."""
        head = Head.parse(head)
        found = {key: [p.subset([head]) for p in drawn if head in p.heads] for key, drawn in self.patterns.items()}
        return {key: views for key, views in found.items() if views}

    def significant_anywhere(self) -> list[Head]:
        """Every head significant in some role, in layer-major order."""
        return sorted({head for sig in self.roles.values() for head in sig.heads})
    @property
    def roles(self) -> dict[str, Significance]:
        """Every role with its significance, in detector order (a detector may define several)."""
        return {sig.role: sig for name in self.scores for sig in self.significance.get(name, [])}

    def significant_heads(self, role: str) -> list[Head]:
        """Heads called significant for ``role``, strongest first."""
        roles = self.roles
        if role not in roles:
            raise KeyError(f"No role {role!r} in this atlas; its roles are {', '.join(roles)}.")
        return roles[role].heads

    def overlap(self) -> tuple[list[str], Float[Tensor, "roles roles"]]:
        """Role names and the Jaccard index of every pair's significant head sets (NaN when both
        sets are empty)."""
        names = list(self.roles)
        sets = [set(self.roles[name].heads) for name in names]
        matrix = torch.full((len(names), len(names)), math.nan)
        for i, a in enumerate(sets):
            for j, b in enumerate(sets):
                if a or b:
                    matrix[i, j] = len(a & b) / len(a | b)
        return names, matrix

    def overlap_table(self) -> list[dict[str, Any]]:
        """One row per pair of roles: significant heads in each, shared heads, Jaccard, and the
        top-``overlap_k`` overlap of the two statistic maps with what random sets would share."""
        roles = self.roles
        names = list(roles)
        rows = []
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                set_a, set_b = set(roles[a].heads), set(roles[b].heads)
                union = set_a | set_b
                top = role_overlap(roles[a].as_scores(self.model), roles[b].as_scores(self.model), self.settings.overlap_k)
                rows.append({
                    "role_a": a, "role_b": b, "n_a": len(set_a), "n_b": len(set_b),
                    "shared": [str(h) for h in sorted(set_a & set_b)], "n_shared": len(set_a & set_b),
                    "jaccard": len(set_a & set_b) / len(union) if union else None,
                    f"top{self.settings.overlap_k}_shared": top["n_shared"],
                    f"top{self.settings.overlap_k}_expected_at_random": top["expected_shared_at_random"],
                    "spearman": top["spearman"],
                })
        return rows

    def role_map(self) -> RoleMap:
        """Each head's strongest significant role: a :class:`RoleMap` of the role names,
        ``index[layer, head]`` into them (-1: no significant role) and the strength (0..1, see
        ``Significance.strength``); ``atlas.role_map().plot()`` draws it. A background role
        (``Significance.background``: attention sinks, held by most heads) goes only to heads
        with no other significant role."""
        names = list(self.roles)
        if not names:
            return RoleMap(names, torch.full(self.shape, -1, dtype=torch.long), torch.zeros(self.shape))
        strengths = torch.stack([self.roles[name].strength() for name in names])  # [roles, L, H]
        background = torch.tensor([self.roles[name].background for name in names])
        has_other_role = (strengths[~background] > 0).any(dim=0)  # [L, H]
        strengths[background] = torch.where(has_other_role, 0.0, strengths[background])
        best, index = strengths.max(dim=0)
        index = torch.where(best > 0, index, torch.full_like(index, -1))
        return RoleMap(names, index, best, [name for name in names if self.roles[name].background])

    def summary(self) -> list[dict[str, Any]]:
        """One row per role: detector, number of significant heads, the strongest ones, the rule,
        and the detector's validation (difference and CI)."""
        rows = []
        for role, sig in self.roles.items():
            check = self.validations.get(sig.detector)
            rows.append({
                "role": role, "detector": sig.detector, "n_significant": len(sig.heads),
                "top": [str(h) for h in sig.heads[:5]], "rule": sig.rule,
                "validated": None if check is None else check.significant,
                "difference": None if check is None else check.difference,
                "ci": None if check is None else [check.ci_low, check.ci_high],
            })
        return rows

    def to_frame(self):
        """A pandas DataFrame, one row per head: every detector's score, every role's statistic and
        significance, and the role map's role."""
        import pandas as pd

        return pd.DataFrame(self.head_rows())

    def head_rows(self) -> list[dict[str, Any]]:
        """One dict per head (``layer``, ``head``, ``name``, then the columns of :meth:`to_frame`),
        in layer-major order: what ``heads.csv`` holds."""
        names, index, strength = self.role_map()
        roles = self.roles
        masks = {role: sig.mask for role, sig in roles.items()}  # each computed once, not per head
        nulls = {role: sig.above_null for role, sig in roles.items()}
        rows = []
        for layer in range(self.shape[0]):
            for head in range(self.shape[1]):
                row: dict[str, Any] = {"layer": layer, "head": head, "name": str(Head(layer, head))}
                row.update({name: _number(s.values[layer, head]) for name, s in self.scores.items()})
                for role, sig in roles.items():
                    row[f"{role}:statistic"] = _number(sig.statistic[layer, head])
                    if sig.effect is not None:
                        row[f"{role}:effect"] = _number(sig.effect[layer, head])
                    row[f"{role}:above_null"] = bool(nulls[role][layer, head])
                    row[f"{role}:significant"] = bool(masks[role][layer, head])
                role_index = int(index[layer, head])
                row["role"] = names[role_index] if role_index >= 0 else ""
                row["role_strength"] = round(float(strength[layer, head]), 4)
                rows.append(row)
        return rows

    # ----- saving and loading -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        names, matrix = self.overlap()
        return {
            "format_version": ATLAS_FORMAT_VERSION,
            "model": self.model,
            "shape": list(self.shape),
            "settings": dataclasses.asdict(self.settings),
            "environment": self.environment,
            "timings": self.timings,
            "summary": self.summary(),
            "scores": {name: s.to_dict() for name, s in self.scores.items()},
            "significance": {name: [sig.to_dict() for sig in sigs] for name, sigs in self.significance.items()},
            "validations": {name: (v.to_dict() if v is not None else None) for name, v in self.validations.items()},
            "failures": self.failures,
            "n_kv_heads": self.n_kv_heads,
            "overlap": {"roles": names, "jaccard": [[_number(x) for x in row] for row in matrix.tolist()],
                        "pairs": self.overlap_table()},
        }

    def results_dict(self) -> dict[str, Any]:
        """What the atlas found, without what differs between two runs of it: :meth:`to_dict` less
        ``environment`` (date, versions, device) and ``timings``, plus the attention patterns."""
        data = {key: value for key, value in self.to_dict().items() if key not in VOLATILE}
        data["patterns"] = _encode("patterns", self.patterns)
        return data

    def results_json(self) -> str:
        """:meth:`results_dict` as JSON with sorted keys: equal atlases give equal bytes, e.g. one
        assembled from parts made in parallel and one sequential run."""
        return json.dumps(self.results_dict(), sort_keys=True, indent=1)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Atlas":
        return cls(
            model=data["model"],
            shape=tuple(data["shape"]),
            scores={name: HeadScores.from_dict(s) for name, s in data["scores"].items()},
            significance={name: [Significance.from_dict(s) for s in sigs] for name, sigs in data["significance"].items()},
            validations={name: (ValidationResult.from_dict(v) if v else None) for name, v in data["validations"].items()},
            settings=AtlasSettings(**data["settings"]),
            environment=data.get("environment", {}),
            timings=data.get("timings", {}),
            failures=data.get("failures", {}),
            n_kv_heads=data.get("n_kv_heads"),
        )

    def save(self, directory: Union[str, Path]) -> Path:
        """Write ``report.html`` (self-contained) with a page per significant head in ``heads/``,
        ``role_map.svg``, ``atlas.json``, ``patterns.json`` (:attr:`patterns`) and CSV files
        (``heads.csv``, ``validation.csv``, ``significance.csv``, ``overlap.csv``) to ``directory``;
        returns the report's path."""
        from headscope.report import write_csv_files, write_report

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_text_atomic(directory / "atlas.json", json.dumps(self.to_dict(), indent=1))
        write_text_atomic(directory / "patterns.json", json.dumps(_encode("patterns", self.patterns)))
        write_csv_files(self, directory)
        return write_report(self, directory)

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Atlas":
        """An atlas from a folder written by ``save`` (or its ``atlas.json``), with the patterns of
        the ``patterns.json`` beside it when there is one."""
        path = Path(path)
        if path.is_dir():
            path = path / "atlas.json"
        if not path.is_file():
            raise FileNotFoundError(f"No atlas at {path}: pass a folder written by Atlas.save or its atlas.json.")
        try:
            atlas = cls.from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
            raise ResultFileError(f"The atlas file {path} is not a complete atlas ({type(exc).__name__}: {exc}); it may "
                                  "be cut off or another kind of file: run the atlas again to rewrite it.") from exc
        atlas.patterns = _load_patterns(path.with_name("patterns.json"), atlas)
        return atlas

    def failure_summary(self) -> str:
        """One line naming each failed detector (and a failed patterns step), its stage and error
        ('' when none failed)."""
        def listed(failures: dict[str, dict[str, str]]) -> str:
            return "; ".join(f"{name} in {f['stage']}: {f['error']}: {_first_line(f['message'])}"
                             for name, f in failures.items())

        detectors = {name: f for name, f in self.failures.items() if name != PATTERNS_STEP}
        parts = ([f"{len(detectors)} of {len(self.settings.detectors)} detectors failed ({listed(detectors)})"]
                 if detectors else [])
        if PATTERNS_STEP in self.failures:
            parts.append(f"the attention patterns failed ({listed({PATTERNS_STEP: self.failures[PATTERNS_STEP]})})")
        return "; ".join(parts)

    def __repr__(self) -> str:
        parts = [f"{role}={len(sig.heads)}" for role, sig in self.roles.items()]
        failed = f", failed: {list(self.failures)}" if self.failures else ""
        return (f"Atlas(model={self.model!r}, detectors={list(self.scores)}, significant heads: "
                f"{', '.join(parts)}{failed})")

    def __str__(self) -> str:
        lines = [f"Head atlas of {self.model} ({self.shape[0]} layers x {self.shape[1]} heads)"]
        for row in self.summary():
            check = "not validated" if row["validated"] is None else (
                f"validation {row['difference']:+.3f} [{row['ci'][0]:+.3f}, {row['ci'][1]:+.3f}]"
                f"{' significant' if row['validated'] else ' not significant'}")
            lines.append(f"  {row['role']:<16} {row['n_significant']:>3} heads  {', '.join(row['top']):<34} {check}")
        for name, failure in self.failures.items():
            lines.append(f"  {name:<16} FAILED in {failure['stage']}: {failure['error']}: {_first_line(failure['message'])}")
        return "\n".join(lines)


def atlas(
    model: Any,
    detectors: Union[str, Sequence[str]] = "all",
    validate: bool = True,
    k: int = 5,
    n_random: int = 5,
    settings: Optional[dict[str, dict[str, Any]]] = None,
    out: Optional[Union[str, Path]] = None,
    resume: bool = True,
    seed: int = 0,
    batch_size: Optional[int] = None,
    progress: Optional[bool] = None,
    on_error: str = "record",
    only: Optional[Union[str, Sequence[str]]] = None,
    shard: Optional[Union[str, tuple[int, int]]] = None,
    assemble: bool = False,
) -> Atlas:
    """Run every detector (``"all"`` or a list of names) on ``model``: scores, the heads each
    calls significant (its own rule, see ``Detector.significance``), and, with ``validate``, the
    causal check of its top-``k`` heads against ``n_random`` random ``k``-sets.

    Detectors that can share forward runs share them: those whose ``Detector.pass_key`` is equal
    are scored in one pass by their class's ``score_together`` (the attention-template detectors
    score in one pass over their repeated-token task). With ``out``, each stage of each
    detector is saved under ``<out>/parts/`` when done; with ``resume``, saved stages whose model
    and settings match are loaded instead of recomputed. ``progress`` shows a bar per detector.

    A detector that raises does not stop the atlas (``on_error="record"``, the default): its
    failure (stage, error, message) is kept in ``Atlas.failures`` and, with ``out``, saved as
    ``<out>/parts/<detector>.failed.json``; the other detectors run, and a rerun computes only
    what failed or is missing. ``on_error="raise"`` re-raises at once.

    Last, the attention patterns of every significant head are drawn on its detectors' examples
    and on a natural sentence (``Atlas.patterns``, a few short forward runs; saved as a part and
    reused on resume, a failure recorded under ``PATTERNS_STEP`` like a detector's).

    Spread over processes (each needs ``out``, one folder for all, and the same other arguments):

    - ``only``: run just these units into ``<out>/parts`` — ``"detector"`` (every stage) or
      ``"detector.stage"`` (a list, or one string separated by commas) — and return an atlas of
      them alone: no attention patterns, no report. A stage after ``scores`` reads the scores part
      and, when there is none, raises :class:`MissingPartsError` before any work.
    - ``shard``: ``"i/n"`` or ``(i, n)``, ``1 <= i <= n``: the i-th of n shards of
      :func:`atlas_units`, balanced by rough cost; the same list on every node. Then as ``only``.
    - ``assemble``: compute nothing but the attention patterns: the atlas from the parts, equal to
      a sequential run's. A failed unit (``<detector>.failed.json``) is recorded as a failure, as a
      sequential run records it.

    Raises:
        MissingPartsError: with ``assemble``, a unit not yet run (all are named, with the ``only``
            that makes them).
    """
    if on_error not in ("record", "raise"):
        raise ArgumentError(f"on_error must be 'record' or 'raise', got {on_error!r}.")
    names = _detector_names(detectors)
    _check_distributed(out, only, shard, assemble, resume)
    select = (parse_only(only, names, validate) if only is not None else
              _shard_selection(names, validate, shard) if shard is not None else None)
    check_head_hooks(model)
    if validate:
        check_counts(model, k, n_random)  # before any detector runs, not in each validation stage
    unknown_settings = sorted(set(settings or {}) - set(names))
    if unknown_settings:
        raise SettingError(f"settings given for {', '.join(unknown_settings)}, which this atlas does not run "
                           f"({', '.join(names)}): add the detector to the run or drop its settings.")
    settings = detector_settings(names, settings)
    instances = [get_detector(name, **settings.get(name, {})) for name in names]  # fail before any work
    config = AtlasSettings(detectors=[d.name for d in instances], validate=validate, k=k, n_random=n_random,
                           seed=seed, settings=settings)
    shape = model_shape(model)
    store = (_PartStore(Path(out) / "parts", model_identity(model), read=resume, shape=(shape.n_layers, shape.n_heads))
             if out is not None else None)
    if store is not None:
        store.check_identity()  # parts of another model or other weights: refused before any work
    builder = _Builder(model, instances, config, store, batch_size, progress, on_error == "raise", select, assemble)
    return builder.run()


def _detector_names(detectors: Union[str, Sequence[str]]) -> list[str]:
    return all_detectors() if detectors == "all" else ([detectors] if isinstance(detectors, str) else list(detectors))


def _check_distributed(out: Any, only: Any, shard: Any, assemble: bool, resume: bool) -> None:
    """Raise ``ArgumentError`` for ``only``, ``shard`` and ``assemble`` given together or without ``out``."""
    given = [name for name, value in (("only", only is not None), ("shard", shard is not None),
                                      ("assemble", assemble)) if value]
    if len(given) > 1:
        raise ArgumentError(f"{' and '.join(given)} were given together: give one (a run of some units, or the "
                            "assembly of their parts).")
    if given and out is None:
        raise ArgumentError(f"{given[0]} needs out=: the folder whose parts/ the units are written to and "
                            "assembled from (the same folder for every run).")
    if assemble and not resume:
        raise ArgumentError("assemble=True reads the saved parts, and resume=False would ignore them: drop resume=False.")


# ----- units: an atlas spread over processes -------------------------------------------------


@dataclass(frozen=True)
class AtlasUnit:
    """A piece of an atlas that one process runs on its own into the shared ``out``: a detector
    with every stage, or the detectors scored in one pass (the same ``score_together``), which
    no shard splits.

    Attributes:
        detectors: the detector names, in the atlas's order; ``list(unit.detectors)`` is the
            ``only=`` that runs the unit, ``str(unit)`` the ``--only`` value.
        weight: rough seconds (from each detector's ``cost``, see :func:`rough_seconds`): what
            :func:`shard_units` balances.
    """

    detectors: tuple[str, ...]
    weight: float

    def __str__(self) -> str:
        return ",".join(self.detectors)


def atlas_units(detectors: Union[str, Sequence[str]] = "all", validate: bool = True) -> list[AtlasUnit]:
    """The units of an atlas of ``detectors`` (``"all"`` or names), in the atlas's order, without a
    model: what a scheduler fans out, one task per unit (``hs.atlas(model, out=..., only=list(unit.detectors))``),
    before one ``hs.atlas(model, out=..., assemble=True)``.

    Detectors whose class shares a ``score_together`` (other than the default) go in one unit,
    so their shared scoring pass is never split (whether they share it is decided at run time
    by ``pass_key``)."""
    groups: list[list[str]] = []
    for name in _detector_names(detectors):
        family = _family(detector_class(name))
        home = next((group for group in groups if family is not None and _family(detector_class(group[0])) is family), None)
        if home is None:
            groups.append([name])
        else:
            home.append(name)
    return [AtlasUnit(tuple(group), sum(rough_seconds(detector_class(name).cost, validate) for name in group))
            for group in groups]


def _family(cls: type) -> Any:
    """The function behind ``cls.score_together`` when it is not the default (scoring alone)."""
    scorer = getattr(cls.score_together, "__func__", cls.score_together)
    default = getattr(Detector.score_together, "__func__", Detector.score_together)
    return None if scorer is default else scorer


def rough_seconds(cost: str, validate: bool = True) -> float:
    """The seconds a detector's ``cost`` text names, added up (``"score 8 s, validation 51 s"``:
    59), leaving out remarks in parentheses and, without ``validate``, the validation clause;
    ``UNIT_SECONDS`` when it names none. Only relative sizes matter (balancing shards)."""
    clauses = re.sub(r"\([^)]*\)", "", cost).split(",")
    seconds = [float(number) for clause in clauses if validate or not clause.strip().startswith("validation")
               for number in re.findall(r"(\d+(?:\.\d+)?)\s*s\b", clause)]
    return sum(seconds) if seconds else UNIT_SECONDS


def shard_units(units: Sequence[AtlasUnit], index: int, count: int) -> list[AtlasUnit]:
    """The units of shard ``index`` of ``count`` (numbered from 1): the heaviest unit first to the
    lightest shard so far (ties: the lower shard), the same on every node; in the atlas's order.
    A shard may be empty when there are more shards than units."""
    index, count = parse_shard((index, count))
    loads = [0.0] * count
    owner: dict[int, int] = {}
    for position in sorted(range(len(units)), key=lambda i: (-units[i].weight, i)):
        lightest = min(range(count), key=lambda shard: (loads[shard], shard))
        owner[position] = lightest
        loads[lightest] += units[position].weight
    return [unit for position, unit in enumerate(units) if owner[position] == index - 1]


def parse_shard(shard: Union[str, tuple[int, int]], argument: str = "shard") -> tuple[int, int]:
    """``"i/n"`` or ``(i, n)`` as ``(i, n)``; shards are numbered from 1 (``--array=1-n`` in SLURM).
    ``argument``: how messages name it (the CLI's ``--shard``).

    Raises:
        ArgumentError: not two whole numbers, or not ``1 <= i <= n``.
    """
    text = shard if isinstance(shard, str) else "/".join(str(part) for part in shard)
    match = re.fullmatch(r"\s*(-?\d+)\s*/\s*(-?\d+)\s*", text)
    if match is None:
        raise ArgumentError(f"{argument} {text!r} is not I/N: give the shard's number and the number of shards, "
                            "e.g. 2/4 (numbered from 1, as a SLURM array --array=1-4 gives $SLURM_ARRAY_TASK_ID).")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or not 1 <= index <= count:
        raise ArgumentError(f"{argument} {text!r} is out of range: I/N needs 1 <= I <= N (shards are numbered from 1, "
                            f"as a SLURM array --array=1-N gives $SLURM_ARRAY_TASK_ID), e.g. 1/{max(count, 1)}.")
    return index, count


def parse_only(only: Union[str, Sequence[str]], detectors: Sequence[str], validate: bool = True,
               argument: str = "only") -> dict[str, tuple[str, ...]]:
    """The stages to run per detector, in the atlas's order, from ``only`` entries ``"detector"``
    (every stage) or ``"detector.stage"`` (a list, or one string separated by commas);
    ``argument``: how messages name it (the CLI's ``--only``).

    Raises:
        UnknownDetectorError: a name that is not registered (with the nearest name).
        ArgumentError: no entry, a stage that does not exist (or ``validation`` without
            ``validate``), or a detector this atlas does not run.
    """
    entries = [entry.strip() for entry in (only.split(",") if isinstance(only, str) else only)]
    if not entries or not all(entries):
        raise ArgumentError(f"{argument} {only!r} names no unit: give detector names or detector.stage, separated by commas, "
                            "e.g. 'induction,safety.scores'.")
    stages = stages_run(validate)
    chosen: dict[str, set[str]] = {}
    for entry in entries:
        name, _, stage = entry.partition(".")
        try:
            detector_class(name)
        except UnknownDetectorError as error:  # with the nearest name
            raise UnknownDetectorError(f"{argument} {entry!r}: {error}") from None
        if name not in detectors:
            raise ArgumentError(f"{argument} {entry!r}: not in this atlas, whose detectors are {', '.join(detectors)}: "
                                "add it to the atlas's detectors or drop it.")
        if stage and stage not in stages:
            extra = " (validation is not run with validate=False / --no-validate)" if stage in STAGES else ""
            raise ArgumentError(f"{argument} {entry!r} names no stage of the atlas{extra}: the stages are "
                                f"{', '.join(stages)} (e.g. '{name}.{stages[-1]}'), or give '{name}' for all of them.")
        chosen.setdefault(name, set()).update([stage] if stage else stages)
    return {name: tuple(s for s in stages if s in chosen[name]) for name in detectors if name in chosen}


def _shard_selection(names: Sequence[str], validate: bool, shard: Union[str, tuple[int, int]]) -> dict[str, tuple[str, ...]]:
    index, count = parse_shard(shard)
    stages = stages_run(validate)
    return {name: stages for unit in shard_units(atlas_units(names, validate), index, count) for name in unit.detectors}


def missing_parts(out: Union[str, Path], detectors: Union[str, Sequence[str]] = "all", *, validate: bool = True,
                  k: int = 5, n_random: int = 5, seed: int = 0,
                  settings: Optional[dict[str, dict[str, Any]]] = None) -> list[tuple[str, str]]:
    """The ``(detector, stage)`` parts an assembly of ``out`` lacks, found without a model by the
    parts' settings and code (the model's identity is checked when the atlas is assembled): each
    stage with neither a part nor a recorded failure (:func:`_walk_parts`)."""
    names = _detector_names(detectors)
    settings = detector_settings(names, settings)
    config = AtlasSettings(detectors=names, validate=validate, k=k, n_random=n_random, seed=seed, settings=settings)
    folder = Path(out) / "parts"
    stages = stages_run(validate)
    missing: list[tuple[str, str]] = []
    for name in names:
        detector = get_detector(name, **settings.get(name, {}))
        keys = {stage: part_key(detector, stage, config) for stage in stages}
        absent, _ = _walk_parts(stages, lambda stage: _record_key(folder / f"{name}.{stage}.json") == keys[stage],
                               lambda stage: _record_key(folder / f"{name}.failed.json", stage) == keys[stage] or None)
        missing += [(name, stage) for stage in absent]
    return missing


def _walk_parts(stages: Sequence[str], present: Callable[[str], bool],
               failed: Callable[[str], Any]) -> tuple[list[str], Any]:
    """How an assembly reads a detector's stages: each with a part (``present``) is kept; the first
    without one that has a recorded failure (``failed`` not None) ends the detector, as the failure
    ended it in the run that recorded it; the others are missing. Returns the missing stages and
    the failure (None)."""
    missing = []
    for stage in stages:
        if present(stage):
            continue
        failure = failed(stage)
        if failure is not None:
            return missing, failure
        missing.append(stage)
    return missing, None


def _nothing_run(folder: Union[str, Path]) -> bool:
    parts = Path(folder) / "parts"
    return not parts.is_dir() or not any(parts.glob("*.json"))


def _record_key(path: Path, stage: Optional[str] = None) -> Any:
    """The ``key`` of a part (or, with ``stage``, of a failure record of that stage); None when
    there is none or it cannot be read."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or (stage is not None and record.get("stage") != stage):
        return None
    return record.get("key")


def missing_message(missing: Sequence[tuple[str, str]], folder: Union[str, Path], validate: bool = True) -> str:
    """One line naming the missing units of an assembly and the ``only`` run that makes them."""
    stages = stages_run(validate)
    if missing and _nothing_run(folder):
        return (f"The atlas in {folder} has no parts yet: run its units first, with the same model and options "
                f"('headscope atlas --shard I/N ...' for every I from 1 to N, or '--only UNIT,...'; "
                f"hs.atlas(model, ..., shard=..., only=...)), then assemble.")
    by_name: dict[str, list[str]] = {}
    for name, stage in missing:
        by_name.setdefault(name, []).append(stage)
    units = [name if tuple(done) == stages else ",".join(f"{name}.{stage}" for stage in done)
             for name, done in by_name.items()]
    return (f"The atlas in {folder} lacks {len(missing)} part(s) of {len(by_name)} detector(s): {', '.join(units)}. "
            f"Run them first, with the same model and options: 'headscope atlas --only {','.join(units)} ...' "
            f"(hs.atlas(model, ..., only=[...])), or the shards that hold them; then assemble again.")


def all_detectors() -> list[str]:
    """Every registered detector in the atlas's order: those with an ``atlas_order`` by it (lower
    first), then the rest by name."""

    def position(name: str) -> tuple[bool, int, str]:
        order = detector_class(name).atlas_order
        return order is None, order or 0, name

    return sorted(list_detectors(), key=position)


def detector_settings(names: Sequence[str],
                      settings: Optional[dict[str, dict[str, Any]]] = None) -> dict[str, dict[str, Any]]:
    """The settings the atlas gives each of ``names``: the detector's ``atlas_defaults`` with
    ``settings[name]`` on top, for each detector that has either (the others run on defaults).

    Raises:
        UnknownDetectorError: a name that is not registered.
    """
    given = settings or {}
    merged = {name: {**detector_class(name).atlas_defaults, **given.get(name, {})} for name in names}
    return {name: values for name, values in merged.items() if detector_class(name).atlas_defaults or name in given}


class _Builder:
    """Runs the stages of each detector in turn, with a progress bar per detector; with ``select``
    (``{detector: stages}``) only those, without patterns; with ``assemble`` none: every stage
    is read from its part (a missing one collected in ``missing``)."""

    def __init__(self, model: Any, detectors: list[Detector], config: AtlasSettings, store: Optional["_PartStore"],
                 batch_size: Optional[int], progress: Optional[bool], raise_errors: bool = False,
                 select: Optional[dict[str, tuple[str, ...]]] = None, assemble: bool = False) -> None:
        self.model, self.detectors, self.config, self.store = model, detectors, config, store
        self.batch_size, self.progress, self.raise_errors = batch_size, progress, raise_errors
        self.select, self.assemble = select, assemble
        self.missing: list[tuple[str, str]] = []  # (detector, stage) parts an assembly lacks
        self.failures: dict[str, dict[str, str]] = {}
        self.scores: dict[str, HeadScores] = {}
        self.significance: dict[str, list[Significance]] = {}
        self.validations: dict[str, Optional[ValidationResult]] = {}
        self.timings: dict[str, dict[str, Any]] = {}
        self.shared_scores: dict[str, tuple[HeadScores, str]] = {}  # scored in another detector's pass: (scores, its name)
        self.validation_cache: dict = {}  # clean runs and head means shared by validations on the same tokens
        self.resumed: dict[str, list[str]] = {}  # stages loaded from saved parts, per detector

    def run(self) -> Atlas:
        if self.select is not None:
            return self._run_units()
        for detector in self.detectors:
            if self.assemble:
                self._assemble_detector(detector)
            else:
                self._run_detector(detector)
        if self.missing:
            raise MissingPartsError(missing_message(self.missing, self.store.folder.parent, self.config.validate))
        return self._atlas(self.config, self._patterns())

    def _atlas(self, config: AtlasSettings, patterns: dict[str, list[AttentionPatterns]]) -> Atlas:
        shape = model_shape(self.model)
        return Atlas(model_name(self.model), (shape.n_layers, shape.n_heads), self.scores, self.significance,
                     self.validations, config, environment(self.model), self.timings, self.failures, patterns,
                     shape.n_kv_heads)

    def _run_units(self) -> Atlas:
        """Run the selected stages (reading the scores part of a detector whose scores are not
        selected first: all missing ones raise ``MissingPartsError`` before any work); an atlas
        of the selected detectors alone, without patterns."""
        chosen = [d for d in self.detectors if d.name in self.select]
        needed = [d for d in chosen if "scores" not in self.select[d.name]]
        lacking = [(d.name, "scores") for d in needed if not self._load(d, "scores", always=True)]
        if lacking:
            names = [name for name, _ in lacking]
            needs = ", ".join(f"{name}.{stage}" for name in names for stage in self.select[name])
            raise MissingPartsError(
                f"{needs} need(s) the scores part of {', '.join(names)}, not yet in {self.store.folder}: run "
                f"'headscope atlas --only {','.join(f'{name}.scores' for name in names)} ...' (hs.atlas(model, ..., "
                "only=[...])) first, with the same model and options, or these detectors whole.")
        for detector in chosen:
            self._run_detector(detector, self.select[detector.name])
        names = [d.name for d in chosen]
        config = dataclasses.replace(self.config, detectors=names,
                                     settings={n: v for n, v in self.config.settings.items() if n in names})
        return self._atlas(config, {})

    def _assemble_detector(self, detector: Detector) -> None:
        """Read every stage of ``detector`` from its part (:func:`_walk_parts`): a stage without one
        is missing unless a failure of it is recorded (``<name>.failed.json`` of that stage and
        key), which is kept as a sequential run keeps it."""
        name = detector.name
        self.timings[name] = {}
        missing, failure = _walk_parts(self._stages(), lambda stage: self._load(detector, stage),
                                      lambda stage: self.store.read_failure(name, stage, self._key(detector, stage)))
        self.missing += [(name, stage) for stage in missing]
        if failure is not None:
            self.failures[name] = failure
            self.timings[name]["failed"] = failure["stage"]

    def _stages(self) -> tuple[str, ...]:
        return stages_run(self.config.validate)

    def _patterns(self) -> dict[str, list[AttentionPatterns]]:
        """The attention patterns of the significant heads (:attr:`Atlas.patterns`), one forward run
        per example: loaded from the part when the heads, examples and drawing code are unchanged.
        A failure (an example the model cannot run, say) is recorded under ``PATTERNS_STEP`` like a
        detector's, keeping the patterns drawn; it ends the atlas only with ``on_error="raise"``."""
        self.timings[PATTERNS_STEP] = {}
        patterns: dict[str, list[AttentionPatterns]] = {}
        key: dict[str, Any] = {}
        started = time.time()
        try:
            requests = self._pattern_requests()
            key = {"requests": hashlib.sha256(json.dumps(requests).encode()).hexdigest()[:16],
                   "code": patterns_fingerprint()}
            saved = self.store.read(PATTERNS_STEP, "patterns", key) if self.store is not None and requests else None
            if saved is not None:
                self.timings[PATTERNS_STEP] = {"patterns": saved.seconds, "resumed": True}
                self.store.clear_failure(PATTERNS_STEP)
                return saved.value
            skipped = self._draw(requests, patterns)
        except Exception as error:  # noqa: BLE001 - the patterns illustrate; they must not end the atlas
            self._fail(PATTERNS_STEP, "patterns", error, key)
            return patterns
        if not requests:
            del self.timings[PATTERNS_STEP]
            return patterns
        seconds = round(time.time() - started, 2)
        self.timings[PATTERNS_STEP] = {"patterns": seconds, **({"skipped": skipped} if skipped else {})}
        if self.store is not None:
            self.store.write(PATTERNS_STEP, "patterns", key, _encode("patterns", patterns), seconds)
            self.store.clear_failure(PATTERNS_STEP)
        return patterns

    def _draw(self, requests: list[dict[str, Any]], patterns: dict[str, list[AttentionPatterns]]) -> list[str]:
        """Draw each request into ``patterns``; an example longer than ``PATTERN_TOKENS`` tokens is
        left out with a note (its title and length are returned), never cut or fatal."""
        skipped = []
        for request in requests:
            try:
                drawn = attention_patterns(self.model, request["prompt"], request["heads"], title=request["title"],
                                           max_tokens=PATTERN_TOKENS)
            except PromptTooLongError as error:
                skipped.append(f"{request['key']}: {request['title']}")
                progress_note(f"atlas: attention patterns: left out the {request['key']} example "
                              f"{request['title']!r}: {error}", self.progress)
                continue
            drawn.notes.update(detector=request["key"], prompt=request["prompt"])
            patterns.setdefault(request["key"], []).append(drawn)
        return skipped

    def _pattern_requests(self) -> list[dict[str, Any]]:
        """What :meth:`_patterns` draws: each detector's examples over its significant heads (of all
        its roles), then ``NATURAL_SENTENCE`` over every significant head when the model has a
        tokenizer; each ``{"key", "title", "prompt", "heads"}``."""
        requests: list[dict[str, Any]] = []
        every: set[Head] = set()
        for detector in self.detectors:
            heads = sorted({head for sig in self.significance.get(detector.name, []) for head in sig.heads})
            if not heads:
                continue
            every.update(heads)
            names = [str(head) for head in heads]
            requests += [{"key": detector.name, "title": title, "prompt": prompt, "heads": names}
                         for title, prompt in detector.examples(self.model)]
        if every and has_tokenizer(self.model):
            requests.append({"key": NATURAL, "title": "a natural sentence", "prompt": NATURAL_SENTENCE,
                             "heads": [str(head) for head in sorted(every)]})
        return requests

    def _run_detector(self, detector: Detector, stages: Optional[Sequence[str]] = None) -> None:
        name = detector.name
        self.timings.setdefault(name, {})
        stages = stages or self._stages()
        with tqdm(total=len(stages), desc=f"{name:>16}", unit="stage", disable=bar_disabled(self.progress),
                  bar_format="{desc} {bar:12} {n_fmt}/{total_fmt} stages [{elapsed}]{postfix}") as bar:
            for stage in stages:
                bar.set_postfix_str(stage)
                try:
                    self._stage(detector, stage)
                except Exception as error:  # noqa: BLE001 - one detector's failure must not end the atlas
                    self._fail(detector.name, stage, error, self._key(detector, stage))
                    bar.set_postfix_str(f"FAILED in {stage}: {type(error).__name__}")
                    return
                bar.update(1)
            if self.store is not None:
                self.store.clear_failure(name, stages)
            spent = sum(t for t in self.timings[name].values() if isinstance(t, float))
            bar.set_postfix_str(f"done ({spent:.0f} s{', resumed' if self.timings[name].get('resumed') else ''})")
        self._note_resumed(name)

    def _note_resumed(self, name: str) -> None:
        """One line naming the stages of ``name`` loaded from saved parts, and where from."""
        reused = self.resumed.get(name)
        if reused and self.store is not None:
            progress_note(f"atlas: {name}: resumed {', '.join(reused)} from {self.store.folder}/{name}.<stage>.json "
                          "(pass resume=False, or --no-resume, to recompute)", self.progress)

    def _fail(self, name: str, stage: str, error: Exception, key: dict[str, Any]) -> None:
        """Record the failure of detector (or step) ``name`` in ``stage`` (and save it beside the
        parts, with the ``key`` of the stage); re-raise when asked to."""
        if self.raise_errors:
            raise error
        failure = {"stage": stage, "error": type(error).__name__, "message": str(error)}
        self.failures[name] = failure
        self.timings[name]["failed"] = stage
        if self.store is not None:
            self.store.write_failure(name, key, failure, "".join(traceback.format_exception(error)))

    def _stage(self, detector: Detector, stage: str) -> None:
        name = detector.name
        key = self._key(detector, stage)
        if stage == "scores" and name in self.shared_scores:  # scored (and saved) in another detector's pass
            scores, owner = self.shared_scores.pop(name)
            self._keep(name, stage, scores)
            self.timings[name].update(scores=0.0, scored_with=owner)
            return
        if self._load(detector, stage):
            return
        started = time.time()
        value = self._compute(detector, stage)
        seconds = round(time.time() - started, 2)
        self._keep(name, stage, value)
        self.timings[name][stage] = seconds
        if self.store is not None:
            self.store.write(name, stage, key, _encode(stage, value), seconds)

    def _load(self, detector: Detector, stage: str, always: bool = False) -> bool:
        """Keep the saved part of ``stage`` when there is one for this model and key (with
        ``always`` also under ``resume=False``: a prerequisite is read, never recomputed)."""
        if self.store is None:
            return False
        saved = self.store.read(detector.name, stage, self._key(detector, stage), always=always)
        if saved is None:
            return False
        name = detector.name
        self._keep(name, stage, saved.value)
        timings = self.timings.setdefault(name, {})
        timings[stage] = saved.seconds
        if saved.scored_with is not None:
            timings["scored_with"] = saved.scored_with
        self.resumed.setdefault(name, []).append(stage)
        timings["resumed"] = True
        return True

    def _compute(self, detector: Detector, stage: str) -> Any:
        name = detector.name
        if stage == "scores":
            return self._score(detector)
        if stage == "significance":
            return detector.significance(self.model, self.scores[name], self.batch_size, self.progress)
        return validate(self.model, self.scores[name], k=self.config.k, n_random=self.config.n_random,
                        seed=self.config.seed, task=detector.validation_task(self.model), batch_size=self.batch_size,
                        progress=self.progress, cache=self.validation_cache)

    def _score(self, detector: Detector) -> HeadScores:
        """One detector's scores; a detector with a :meth:`~Detector.pass_key` scores every
        not-yet-scored detector that shares its pass (:func:`shares_pass`) in that pass."""
        if detector.pass_key(self.model) is not None:
            group = [d for d in self.detectors if shares_pass(self.model, d, detector)
                     and d.name not in self.scores and not self._saved(d, "scores")]
            results = type(detector).score_together(self.model, group, self.batch_size, self.progress)
            for other in group:  # kept, and saved at once: an interrupt loses none of the shared pass
                if other.name != detector.name:
                    self.shared_scores[other.name] = (results[other.name], detector.name)
                    if self.store is not None:
                        self.store.write(other.name, "scores", self._key(other, "scores"),
                                         _encode("scores", results[other.name]), 0.0, scored_with=detector.name)
            return results[detector.name]
        return detector.score(self.model, batch_size=self.batch_size, progress=self.progress)

    def _saved(self, detector: Detector, stage: str) -> bool:
        return self.store is not None and self.store.read(detector.name, stage, self._key(detector, stage)) is not None

    def _keep(self, name: str, stage: str, value: Any) -> None:
        {"scores": self.scores, "significance": self.significance, "validation": self.validations}[stage][name] = value

    def _key(self, detector: Detector, stage: str) -> dict[str, Any]:
        return part_key(detector, stage, self.config)


def part_key(detector: Detector, stage: str, config: AtlasSettings) -> dict[str, Any]:
    """What a saved stage must match to be reused: the detector's settings, the code that
    computes the stage (:func:`code_fingerprint`), and for the validation the atlas's k,
    n_random and seed."""
    key: dict[str, Any] = {"config": plain_config(detector), "code": code_fingerprint(detector, stage)}
    if stage == "validation":
        key.update(k=config.k, n_random=config.n_random, seed=config.seed)
    return key


def shares_pass(model: Any, detector: Detector, other: Detector) -> bool:
    """Whether ``detector`` can be scored in ``other``'s pass: equal pass keys (not None) and the
    same ``score_together``."""
    key = other.pass_key(model)
    return key is not None and detector.pass_key(model) == key and _shared_scorer(detector) is _shared_scorer(other)


def _shared_scorer(detector: Detector) -> Any:
    """The function behind the class's ``score_together`` (one per detector family)."""
    scorer = type(detector).score_together
    return getattr(scorer, "__func__", scorer)


def code_fingerprint(detector: Detector, stage: str) -> str:
    """A short hash of the source files that compute ``stage`` for ``detector``: the modules of
    its class and base classes, plus ``significance.py`` or ``validation.py`` and ``stats.py`` for
    those stages. A saved part made by other code (a new significance rule, a fixed bug) is recomputed."""
    import headscope.significance
    import headscope.stats
    import headscope.validation

    sources = [cls for cls in type(detector).__mro__ if cls.__module__.startswith("headscope.") or cls is type(detector)]
    sources += {"significance": [headscope.significance, headscope.stats],
                "validation": [headscope.validation, headscope.stats]}.get(stage, [])
    return _sources_digest(sources)


def patterns_fingerprint() -> str:
    """A short hash of the code that draws the atlas's attention patterns (``viz/patterns.py``): a
    saved patterns part drawn by other code is drawn again."""
    import headscope.viz.patterns

    return _sources_digest([headscope.viz.patterns])


def _sources_digest(sources: Sequence[Any]) -> str:
    """A short hash of the source files of ``sources`` (modules or classes), in path order."""
    digest = hashlib.sha256()
    for path in sorted({_source_file(source) for source in sources if source is not None} - {None}):
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16]


def _source_file(source: Any) -> Optional[str]:
    try:
        path = inspect.getsourcefile(source)
    except TypeError:  # a built-in
        return None
    return path if path and Path(path).is_file() else None  # a class typed into a notebook has no file


class _PartStore:
    """``<parts>/<detector>.<stage>.json``, each written atomically when its stage finishes, with
    the model's identity (``headscope.identity``: name, weights hash, dtype, library versions).

    A part written for another identity (another model, the same model before a weight edit,
    other library versions) is refused with ``IdentityMismatchError`` on resume: never reused.
    With ``resume=False`` every part is computed again and overwritten. A part of other settings
    or code (its ``key``) is computed again. A part that cannot be used (not JSON, cut off, the
    wrong shape) is named in a ``ResultFileWarning``, moved aside to ``<part>.damaged`` and
    computed again."""

    def __init__(self, folder: Path, identity: ModelIdentity, read: bool = True,
                 shape: Optional[tuple[int, int]] = None) -> None:
        self.folder, self.identity, self.reading, self.shape = folder, identity, read, shape

    def path(self, name: str, stage: str) -> Path:
        return self.folder / f"{name}.{stage}.json"

    def check_identity(self) -> None:
        """Refuse the folder when a part in it was written for another identity (with ``resume``
        only: without it every part is recomputed and overwritten).

        Raises:
            IdentityMismatchError: naming the part, the fields that differ and the fix.
        """
        if not self.reading or not self.folder.is_dir():
            return
        for path in sorted(self.folder.glob("*.json")):
            if path.name.endswith(".failed.json"):
                continue
            try:
                saved = json.loads(path.read_text())
                if isinstance(saved, dict) and {"model", "key", "value"} <= saved.keys():
                    self._check(path, saved)
            except IdentityMismatchError:
                raise
            except (OSError, ValueError):
                continue  # damaged or gone: read() sets it aside when the stage is needed

    def _check(self, path: Path, saved: dict[str, Any]) -> None:
        self.identity.check_matches(
            saved.get("identity"), source=f"The atlas part {path}",
            fix=f"write this model's atlas to another folder (out=..., --out), or recompute every part in "
                f"{self.folder.parent} with resume=False (--no-resume)")

    def read(self, name: str, stage: str, key: dict[str, Any], always: bool = False) -> Optional["_Saved"]:
        """The decoded value, its seconds and the detector whose pass scored it, when the part
        exists for this model and ``key`` (with ``always`` also when not resuming).

        Raises:
            IdentityMismatchError: the part was written for another model identity.
        """
        path = self.path(name, stage)
        saved = self._load(path) if self.reading or always else None
        if saved is None:
            return None
        self._check(path, saved)
        if saved["key"] != key:
            return None  # another settings' or code's part: recomputed and overwritten
        try:
            value = _decode(stage, saved["value"])
            _check_part(stage, value, self.shape)
        except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
            self._set_aside(path, exc)
            return None
        seconds, owner = saved.get("seconds"), saved.get("scored_with")
        return _Saved(value, float(seconds) if isinstance(seconds, (int, float)) else None,
                      owner if isinstance(owner, str) else None)

    def _load(self, path: Path) -> Optional[dict[str, Any]]:
        """The part's record; None when there is none or it is damaged (then set aside)."""
        try:
            saved = json.loads(path.read_text())
            if not isinstance(saved, dict) or not {"model", "key", "value"} <= saved.keys():
                raise ResultFileError("not a part record: a JSON object with 'model', 'key' and 'value'")
            if saved.get("identity") is not None:
                ModelIdentity.from_dict(saved["identity"])  # a malformed identity is damage, not another model
            return saved
        except FileNotFoundError:  # not written yet, or moved aside by another process
            return None
        except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
            self._set_aside(path, exc)
            return None

    def _set_aside(self, path: Path, exc: Exception) -> None:
        """Warn naming the damaged part and rename it to ``<part>.damaged`` (one step)."""
        aside = path.with_name(path.name + ".damaged")
        try:
            os.replace(path, aside)
            where = f"moved to {aside.name}"
        except OSError:
            where = "left in place"
        warnings.warn(f"The atlas part {path} cannot be used ({type(exc).__name__}: {exc}); {where}, and the stage "
                      "is computed again.", ResultFileWarning, stacklevel=2)

    def write(self, name: str, stage: str, key: dict[str, Any], value: Any, seconds: float,
              scored_with: Optional[str] = None) -> None:
        """Write the part atomically (a private temporary file renamed over it: concurrent
        writers never tear it); ``scored_with``: the detector whose pass scored it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {"model": self.identity.model, "identity": self.identity.to_dict(), "key": key, "seconds": seconds,
                  **({"scored_with": scored_with} if scored_with else {}), "value": value}
        write_text_atomic(self.path(name, stage), json.dumps(record))

    def failure_path(self, name: str) -> Path:
        return self.folder / f"{name}.failed.json"

    def write_failure(self, name: str, key: dict[str, Any], failure: dict[str, str], trace: str) -> None:
        """``<name>.failed.json``: the failed stage, the error and its traceback (never read back as
        a result: a rerun recomputes the stage)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {"model": self.identity.model, "identity": self.identity.to_dict(), "key": key, **failure,
                  "traceback": trace}
        write_text_atomic(self.failure_path(name), json.dumps(record, indent=1))

    def read_failure(self, name: str, stage: str, key: dict[str, Any]) -> Optional[dict[str, str]]:
        """The recorded failure of ``name`` in ``stage`` (``{"stage", "error", "message"}``) when
        it was recorded for this model and ``key``; None otherwise."""
        try:
            record = json.loads(self.failure_path(name).read_text())
            if not isinstance(record, dict) or record.get("stage") != stage or record.get("key") != key:
                return None
            self.identity.check_matches(record.get("identity"), source=str(self.failure_path(name)), fix="")
        except (OSError, ValueError, TypeError, KeyError, AttributeError, IdentityMismatchError):
            return None
        return {field: str(record.get(field, "")) for field in ("stage", "error", "message")}

    def clear_failure(self, name: str, stages: Optional[Sequence[str]] = None) -> None:
        """Remove ``name``'s failure record (with ``stages``: only when it failed in one of them,
        a stage that has now been done)."""
        path = self.failure_path(name)
        if stages is not None:
            try:
                if json.loads(path.read_text()).get("stage") not in stages:
                    return
            except (OSError, ValueError, AttributeError):
                pass  # none, or unreadable: removed
        path.unlink(missing_ok=True)


class _Saved(NamedTuple):
    """A part read back: its value, the seconds it took, the detector whose pass scored it."""

    value: Any
    seconds: Optional[float]
    scored_with: Optional[str]


def _encode(stage: str, value: Any) -> Any:
    if stage == "patterns":
        return {key: [p.to_dict() for p in drawn] for key, drawn in value.items()}
    if stage == "scores":
        return value.to_dict()
    if stage == "significance":
        return [sig.to_dict() for sig in value]
    return value.to_dict() if value is not None else None


def _check_part(stage: str, value: Any, shape: Optional[tuple[int, int]]) -> None:
    """Raise ``ResultFileError`` when a decoded part does not fit the model or is not usable."""
    if stage == "scores" and shape is not None and tuple(value.values.shape) != shape:
        raise ResultFileError(f"scores of shape {tuple(value.values.shape)}, but the model has {shape}")
    if stage == "significance":
        for sig in value:
            if shape is not None and tuple(sig.statistic.shape) != shape:
                raise ResultFileError(f"a statistic of shape {tuple(sig.statistic.shape)}, but the model has {shape}")
            float(sig.threshold)
    if stage == "patterns" and shape is not None:
        for drawn in (p for group in value.values() for p in group):
            outside = [str(h) for h in drawn.heads if not (h.layer < shape[0] and h.head < shape[1])]
            if outside:
                raise ResultFileError(f"patterns of {', '.join(outside)}, which the model of shape {shape} lacks")
    if stage == "validation" and value is not None:
        for number in (value.clean, value.top_k, value.random_k, value.difference, value.ci_low, value.ci_high):
            float(number)
        if not isinstance(value.top_heads, list) or value.ablation_hurts_when not in ("increases", "decreases"):
            raise ResultFileError("a validation without its top heads or direction")


def _decode(stage: str, value: Any) -> Any:
    decoders: dict[str, Callable[[Any], Any]] = {
        "scores": HeadScores.from_dict,
        "significance": lambda sigs: [Significance.from_dict(s) for s in sigs],
        "validation": lambda v: ValidationResult.from_dict(v) if v is not None else None,
        "patterns": lambda groups: {key: [AttentionPatterns.from_dict(p) for p in drawn] for key, drawn in groups.items()},
    }
    return decoders[stage](value)


def _load_patterns(path: Path, atlas: Atlas) -> dict[str, list[AttentionPatterns]]:
    """The patterns saved beside an atlas; none (with a ``ResultFileWarning``) when the file is
    damaged or was drawn of another model or of heads the atlas lacks. They illustrate the
    atlas, so a bad file never makes it unloadable."""
    if not path.is_file():
        return {}
    try:
        patterns = _decode("patterns", json.loads(path.read_text()))
        _check_part("patterns", patterns, atlas.shape)
        others = sorted({p.model for group in patterns.values() for p in group} - {atlas.model})
        if others:
            raise ResultFileError(f"patterns of {', '.join(others)}, not of {atlas.model}")
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
        warnings.warn(ResultFileWarning(f"{path} is left out ({type(exc).__name__}: {exc}): the atlas loads without "
                                        "attention patterns; run the atlas again (or save it) to redraw them."),
                      stacklevel=3)
        return {}
    return patterns


def environment(model: Any) -> dict[str, Any]:
    """Versions, device and weights (their XXH3-128, as in ``headscope.identity``) an atlas was
    made with."""
    from headscope.engine.devices import placement_counts
    from headscope.engine.runner import model_device, model_dtype

    device = model_device(model)
    return {
        "headscope": HEADSCOPE_VERSION,
        "torch": torch.__version__,
        **{package: installed_version(package) or "not installed" for package in ("transformer-lens", "transformers")},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(model_dtype(model)),
        **({"device_map": split} if (split := placement_counts(model)) else {}),  # a split model: modules per place
        "weights": weights_digest(model),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def _number(value: Any) -> Optional[float]:
    value = float(value)
    return None if math.isnan(value) else value


