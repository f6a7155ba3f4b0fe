"""The ``Detector`` interface, the registry, and what validation needs from a detector.

A detector is a class with a registered ``name``, a config dataclass (``Config``), a
``score(model) -> HeadScores`` and a ``validation_task(model)`` giving the behavioural metric that
``hs.validate`` measures under ablation. Register your own with ``@register_detector``::

    @hs.register_detector
    class MyDetector(hs.Detector):
        name = "my_role"
        Config = MyConfig
        def score(self, model, batch_size=None, progress=None): ...
        def validation_task(self, model): ...

Configs follow scikit-learn's habit: every setting is a keyword with a default, settable at
construction (``get_detector("induction", block_len=50)``) and recorded in the results. What the
atlas needs of a detector it reads here too: ``atlas_order``, ``atlas_defaults``, and for a family
that shares a scoring pass ``pass_key`` and ``score_together``; what the report shows of it,
``explanation`` (each role in plain words) and ``examples(model)`` (short prompts of its own data,
whose attention patterns the atlas draws for each significant head). CONTRIBUTING.md gives the
steps of adding a detector.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional, Union

import torch
from jaxtyping import Float
from torch import Tensor

from headscope.engine.tokens import TokenBatch
from headscope.detectors.settings import (  # noqa: F401  (setting is imported from here by the detectors)
    DATA_SETTING,
    RECORD_ONLY_KEYS,
    changed_settings,
    check_settings,
    setting,
    suggest,
)
from headscope.errors import DataError, EmptyResultError, SettingError, UnknownDetectorError
from headscope.models import model_name
from headscope.results import HeadScores
from headscope.significance import Significance
from headscope.versions import HEADSCOPE_VERSION

Example = tuple[str, Union[str, list[int]]]  # (title, prompt): text, or token ids for a token-level task
MetricFn = Callable[[Float[Tensor, "batch pos vocab"], TokenBatch], Float[Tensor, " batch"]]
MeasureFn = Callable[[Any, list, str], Float[Tensor, "sets examples"]]


@dataclass
class ValidationTask:
    """What ``hs.validate`` measures: a per-example metric on the task's own data.

    ``metric(logits, chunk)`` returns one number per example. ``ablation_hurts_when`` says which
    way the metric moves when heads of the role are removed: ``"increases"`` (a loss) or
    ``"decreases"`` (an accuracy, a logit).

    A task whose metric is not one forward pass (a greedy decode, a decode-only ablation) gives
    ``measure(model, head_sets, method) -> [len(head_sets), n_examples]`` instead: row ``i`` is
    the metric with ``head_sets[i]`` ablated (``None`` = clean). ``default_method`` is the
    ablation ``hs.validate`` uses when the caller names none. ``last_position=True`` says the
    metric reads only each row's last position: the runs then unembed only there and ``metric``
    gets ``[batch, vocab]`` logits (``engine.metrics.final_logits`` reads both shapes).
    """

    data: Any
    metric: Optional[MetricFn]
    metric_name: str
    ablation_hurts_when: str = "increases"
    measure: Optional[MeasureFn] = None
    default_method: str = "mean"
    last_position: bool = False


@dataclass
class DetectorConfig:
    """Base of detector configs: every field needs a default."""

    seed: int = setting(0, "seed of every random choice (same seed, same scores)")


class Detector(ABC):
    """One head role: scores every head and knows how to check causally that it matters."""

    name: ClassVar[str]
    Config: ClassVar[type] = DetectorConfig
    summary: ClassVar[str] = ""
    cost: ClassVar[str] = ""  # rough time of each stage on a stated model and machine ("score 8 s, validation 51 s"),
    # for 'headscope detectors'; the seconds it names weigh the detector in an atlas's shards (atlas.rough_seconds)
    renamed_settings: ClassVar[dict[str, str]] = {}  # old setting name -> new, still accepted with a warning
    # Where the atlas puts this detector: ordered ones by ``atlas_order`` (lower first), then those
    # without one (None) by name.
    atlas_order: ClassVar[Optional[int]] = None
    # Settings the atlas uses for this detector unless told otherwise (e.g. a smaller request set).
    atlas_defaults: ClassVar[dict[str, Any]] = {}
    # Per role the detector defines: what a head of the role does, the paper, and how headscope
    # measures it, in two or three plain sentences (shown above the role's heatmap in the report).
    explanation: ClassVar[dict[str, str]] = {}

    def __init__(self, config: Optional[Any] = None, **overrides: Any) -> None:
        """``config``: a ``Config`` instance, a dict of settings (e.g. a saved result's config) or
        None (the defaults); ``overrides`` set single settings on top of it. Every value given is
        checked against the ``Config`` field's type, choices and range (:func:`check_settings`)
        before any work, raising :class:`~headscope.errors.SettingError`."""
        base, given = self._split_config(config)
        checked = check_settings(self.name, self.Config, self._renamed({**given, **overrides}))
        self.config = dataclasses.replace(base, **checked)

    def _split_config(self, config: Any) -> tuple[Any, dict[str, Any]]:
        """The config to start from and the values in it that must be checked: a ``Config``
        instance keeps its fields (those changed from the defaults are checked); a dict or another
        dataclass is read as settings on top of the defaults (``data_sha256``, written by
        :meth:`config_record`, is a record and no setting, so it is dropped)."""
        if config is None:
            return self.Config(), {}
        if isinstance(config, self.Config):
            return config, changed_settings(config)
        if dataclasses.is_dataclass(config) and not isinstance(config, type):
            config = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        if not isinstance(config, Mapping):
            raise SettingError(
                f"The config of the {self.name} detector must be a {self.Config.__name__} or a dict of settings; "
                f"got {type(config).__name__}. Pass e.g. get_detector({self.name!r}, seed=1)."
            )
        return self.Config(), {key: value for key, value in config.items() if key not in RECORD_ONLY_KEYS}

    def _renamed(self, values: dict[str, Any]) -> dict[str, Any]:
        """``values`` with settings of an old name (``renamed_settings``) under their new one, and
        a ``DeprecationWarning`` saying so: old configs and saved results keep working."""
        for old, new in self.renamed_settings.items():
            if old in values:
                warnings.warn(f"The {self.name} setting {old!r} is now called {new!r}; rename it in your config.",
                              DeprecationWarning, stacklevel=4)
                values[new] = values.pop(old)
        return values

    def check_data(self) -> None:
        """Read the user's own data file (the ``data`` setting, when the detector has one) without a
        model, raising :class:`~headscope.errors.DataError` naming the file and line of the first
        problem. Detectors that take data override this; the CLI calls it before loading a model."""

    def data_paths(self) -> list[str]:
        """The user data files this detector's config names (their hashes go into the record)."""
        path = getattr(self.config, DATA_SETTING, None)
        return [str(path)] if path else []

    def config_record(self) -> dict[str, Any]:
        """The config as saved with results and matched on resume: the fields as they read back
        from JSON (tuples become lists), plus ``data_sha256`` (file -> SHA-256) when the config
        names data files, so a changed file is never taken for the one a result was computed on."""
        record = json.loads(json.dumps(dataclasses.asdict(self.config)))
        paths = self.data_paths()
        if paths:
            from headscope.tasks.user_data import file_sha256

            record["data_sha256"] = {path: file_sha256(path) for path in paths}
        return record

    @abstractmethod
    def score(self, model: Any, batch_size: Optional[int] = None, progress: Optional[bool] = None) -> HeadScores:
        """Score every head of ``model``."""

    def examples(self, model: Any) -> list[Example]:
        """Two or three short ``(title, prompt)`` pairs from this detector's own data or task, each
        at most about 60 tokens: text, or token ids where the task is made of ids. The atlas draws
        the attention patterns of the role's significant heads on them (``hs.attention_patterns``).
        Text needs the model's tokenizer: without one, give token ids or nothing. The default:
        none."""
        return []

    def pass_key(self, model: Any) -> Any:
        """What this detector's scoring pass over ``model`` depends on, when the pass can be shared:
        detectors whose keys are equal (``==``, never None) and whose class has the same
        :meth:`score_together` are scored in one pass by it (the atlas does). ``None``, the default:
        scored alone by :meth:`score`."""
        return None

    @classmethod
    def score_together(
        cls, model: Any, detectors: list["Detector"], batch_size: Optional[int] = None, progress: Optional[bool] = None
    ) -> dict[str, HeadScores]:
        """``{name: scores}`` of ``detectors`` (equal :meth:`pass_key`) from one shared pass; each
        must equal what its own :meth:`score` gives. The default scores each one alone."""
        return {d.name: d.score(model, batch_size=batch_size, progress=progress) for d in detectors}

    @abstractmethod
    def validation_task(self, model: Any) -> ValidationTask:
        """The data and behavioural metric used to validate this detector's top heads."""

    def significance(
        self, model: Any, scores: HeadScores, batch_size: Optional[int] = None, progress: Optional[bool] = None
    ) -> list["Significance"]:
        """The heads this detector calls significant in ``scores``, with the rule used (one
        :class:`~headscope.significance.Significance` per role). A detector without a rule
        returns ``[]``: the atlas shows its scores but puts none of its heads on the role map."""
        return []

    def result(
        self,
        model: Any,
        values: Tensor,
        extras: Optional[dict[str, Tensor]] = None,
        metadata: Optional[dict[str, Any]] = None,
    ) -> HeadScores:
        """Wrap computed values in a ``HeadScores`` with model name, config and version.

        Raises:
            EmptyResultError: every value is NaN (a result that carries nothing is an error, never
                a grid handed on); ``metadata["nan_reason"]``, if given, says why.
        """
        check_not_empty(self.name, values, (metadata or {}).get("nan_reason"))

        info = {"headscope_version": HEADSCOPE_VERSION, "summary": self.summary}
        info.update(metadata or {})
        return HeadScores(
            values=values,
            detector=self.name,
            model=model_name(model),
            config=self.config_record(),
            extras=extras or {},
            metadata=info,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


def has_tokenizer(model: Any) -> bool:
    """Whether ``model`` can turn text into tokens (text examples need it)."""
    return getattr(model, "tokenizer", None) is not None


def check_not_empty(name: str, values: Tensor, reason: Optional[str] = None) -> None:
    """Raise :class:`EmptyResultError` when ``values`` (a detector's scores) are all NaN or empty."""
    if values.numel() and not bool(torch.isnan(values).all()):
        return
    why = f" ({reason})" if reason else ""
    raise EmptyResultError(
        f"The {name} detector scored no head: every score is NaN{why}. This is not a result: check the "
        f"model and its task (a broken KV cache, a model that answers none of the prompts), and run "
        f"'headscope info' to see the library versions."
    )


def detector_of_scores(scores: HeadScores) -> Detector:
    """The detector, with the settings, that computed ``scores``; when they were computed on data
    files (``data_sha256`` in the saved config), each file must still be there and unchanged.

    Raises:
        DataError: a recorded data file that is missing or whose SHA-256 differs (names the file).
    """
    from headscope.tasks.user_data import data_file, file_sha256

    detector = get_detector(scores.detector, config=scores.config)
    for path, recorded in (scores.config.get("data_sha256") or {}).items():
        data_file(path, f"{scores.detector} data (recorded in the scores)")
        if file_sha256(path) != recorded:
            raise DataError(f"{path} changed since these {scores.detector} scores were computed on it (SHA-256 "
                            f"{recorded[:12]}... then, {file_sha256(path)[:12]}... now): score it again, or restore "
                            f"the file.")
    return detector


def plain_config(detector: Detector) -> dict[str, Any]:
    """The detector's config as it reads back from JSON (tuples become lists), with its data
    files' hashes: what saved results are matched against (:meth:`Detector.config_record`)."""
    return detector.config_record()


_REGISTRY: dict[str, type[Detector]] = {}


def register_detector(cls: type[Detector], replace: bool = False) -> type[Detector]:
    """Class decorator: make a detector available by its ``name`` everywhere (API, scan, CLI)."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__} needs a non-empty class attribute 'name' to be registered.")
    if name in _REGISTRY and _REGISTRY[name] is not cls and not replace:
        raise ValueError(f"A detector named {name!r} is already registered ({_REGISTRY[name].__name__}).")
    _REGISTRY[name] = cls
    return cls


def unregister_detector(name: str) -> None:
    _REGISTRY.pop(name, None)


def list_detectors() -> list[str]:
    """Names of every registered detector."""
    return sorted(_REGISTRY)


def detector_class(name: str) -> type[Detector]:
    """The registered class of the detector called ``name``.

    Raises:
        UnknownDetectorError: no detector of that name (with the closest registered name).
    """
    if name not in _REGISTRY:
        hint = suggest(name, _REGISTRY)
        raise UnknownDetectorError(
            f"Unknown detector {name!r}.{hint} Known detectors: {', '.join(list_detectors())}. "
            f"Register your own with @headscope.register_detector."
        )
    return _REGISTRY[name]


def get_detector(detector: Union[str, Detector, type[Detector]], config: Any = None, **overrides: Any) -> Detector:
    """A detector instance from a name, a class or an instance (overrides applied)."""
    if isinstance(detector, Detector):
        return type(detector)(detector.config, **overrides) if overrides or config else detector
    if isinstance(detector, type) and issubclass(detector, Detector):
        return detector(config, **overrides)
    return detector_class(detector)(config, **overrides)
