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
construction (``get_detector("induction", block_len=50)``) and recorded in the results.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, Callable, ClassVar, Literal, Optional, Union

import torch
from jaxtyping import Float
from torch import Tensor

from headscope.engine.tokens import TokenBatch
from headscope.errors import EmptyResultError, SettingError, UnknownDetectorError
from headscope.models import model_name
from headscope.results import HeadScores
from headscope.significance import Significance

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


def setting(default: Any, help: str = "", choices: Optional[tuple] = None, min: Optional[float] = None,
            max: Optional[float] = None) -> Any:
    """A config field with what a user needs to set it: ``help`` (one line), and the allowed
    ``choices`` or ``min``/``max`` range (inclusive) that are checked before any work starts::

        @dataclass
        class MyConfig(DetectorConfig):
            n_sequences: int = setting(32, "sequences scored", min=1)
            format: str = setting("plain", "prompt format", choices=("plain", "chat"))
    """
    metadata = {"help": help, "choices": choices, "min": min, "max": max}
    if isinstance(default, (list, dict, set)):
        raise TypeError("setting() defaults must be immutable (use a tuple).")
    return dataclasses.field(default=default, metadata=metadata)


DATA_SETTING = "data"  # the config field, in every detector that takes one, naming the user's own data file
RECORD_ONLY_KEYS = ("data_sha256",)  # keys config_record adds to a saved config that are not settings


class _Mismatch(Exception):
    """Raised inside :func:`conform` when a value does not fit a type hint."""


def setting_fields(config_class: type) -> dict[str, dataclasses.Field]:
    """The settings of a detector config dataclass, by name."""
    return {f.name: f for f in dataclasses.fields(config_class)}


@functools.lru_cache(maxsize=None)
def setting_types(config_class: type) -> dict[str, Any]:
    """Each setting's resolved type hint (``Any`` when the annotations cannot be resolved); cached
    per class, so treat the dict as read-only."""
    try:
        hints = typing.get_type_hints(config_class)
    except Exception:  # an annotation naming something not importable: check no types rather than fail
        hints = {}
    return {name: hints.get(name, Any) for name in setting_fields(config_class)}


def setting_default(field: dataclasses.Field) -> Any:
    """The field's default value (``None`` when it has none)."""
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def changed_settings(config: Any) -> dict[str, Any]:
    """The fields of a config instance whose values differ from their defaults."""
    return {
        name: getattr(config, name)
        for name, field in setting_fields(type(config)).items()
        if getattr(config, name) != setting_default(field)
    }


def type_name(hint: Any) -> str:
    """A short, readable name of a type hint: ``int``, ``int or None``, ``list of float``, ``[int, int]``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return "None"
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(arm) for arm in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if origin in (tuple, list):
        if origin is list or (len(args) == 2 and args[1] is Ellipsis):
            return f"list of {type_name(args[0]) if args else 'values'}"
        return "[" + ", ".join(type_name(arg) for arg in args) + "]"
    if isinstance(hint, type):
        return "path" if issubclass(hint, PurePath) else hint.__name__
    return str(hint).replace("typing.", "")


def conform(value: Any, hint: Any) -> Any:
    """``value`` if it fits the type hint ``hint``, with JSON lists turned into tuples where the hint
    is a tuple; raises ``_Mismatch`` otherwise. ``bool`` is not an ``int``; a ``float`` setting
    accepts an ``int`` (kept as given) but not NaN or infinity; unknown typing constructs pass."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return _conform_union(value, args)
    if origin is Literal:
        if any(value == arg and type(value) is type(arg) for arg in args):
            return value
        raise _Mismatch
    if origin in (tuple, list):
        return _conform_sequence(value, origin, args)
    if hint is Any or hint is object or origin is not None:
        return value if origin is None or isinstance(value, origin) else _raise_mismatch()
    return _conform_plain(value, hint)


def _conform_union(value: Any, arms: tuple) -> Any:
    for arm in arms:
        try:
            return conform(value, arm)
        except _Mismatch:
            continue
    raise _Mismatch


def _conform_sequence(value: Any, origin: type, args: tuple) -> Any:
    if not isinstance(value, (list, tuple)):
        raise _Mismatch
    if origin is list or not args or (len(args) == 2 and args[1] is Ellipsis):
        items = [conform(item, args[0]) if args else item for item in value]
    elif len(value) != len(args):
        raise _Mismatch
    else:
        items = [conform(item, arg) for item, arg in zip(value, args)]
    return list(items) if origin is list else tuple(items)


def _conform_plain(value: Any, hint: Any) -> Any:
    if hint is type(None):
        ok = value is None
    elif hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    elif isinstance(hint, type) and issubclass(hint, PurePath):
        ok = isinstance(value, (str, PurePath))
    elif isinstance(hint, type):
        ok = isinstance(value, hint)
    else:
        ok = True
    if not ok:
        raise _Mismatch
    return value


def _raise_mismatch() -> Any:
    raise _Mismatch


def check_settings(detector: str, config_class: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` checked against ``config_class``: every name a field, every value of the field's
    type and within its ``choices``/``min``/``max`` (from :func:`setting`). Returns the values,
    JSON lists made tuples where the field is a tuple.

    Raises:
        SettingError: naming the detector, the setting, the value given and what is allowed.
    """
    fields = setting_fields(config_class)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise SettingError(unknown_settings_message(detector, unknown, sorted(fields)))
    types_by_name = setting_types(config_class)
    return {name: check_setting(detector, fields[name], types_by_name[name], value) for name, value in values.items()}


def unknown_settings_message(detector: str, unknown: list[str], known: list[str]) -> str:
    """One sentence for settings a detector does not have, with the closest real name."""
    close = difflib.get_close_matches(unknown[0], known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return (
        f"The {detector} detector has no setting {', '.join(unknown)}.{hint} Its settings: "
        f"{', '.join(known)} ('headscope detectors {detector}' describes them)."
    )


def check_setting(detector: str, field: dataclasses.Field, hint: Any, value: Any) -> Any:
    """One setting's value checked against its type hint and its field's choices and range."""
    where = f"The {field.name!r} setting of the {detector} detector"
    default = f"(default {setting_default(field)!r}; 'headscope detectors {detector}' lists every setting)"
    try:
        value = conform(value, hint)
    except _Mismatch:
        finite = " (finite)" if _has_non_finite(value) else ""
        raise SettingError(
            f"{where} must be of type {type_name(hint)}{finite}; got {value!r} ({type(value).__name__}). Give a value "
            f"of that type {default}."
        ) from None
    problem = _bounds_problem(value, field.metadata)
    if problem:
        raise SettingError(f"{where} must be {problem}; got {value!r}. Give a value in that range {default}.")
    return value


def _has_non_finite(value: Any) -> bool:
    """Whether ``value`` is, or holds, a NaN or infinite float."""
    items = value if isinstance(value, (tuple, list)) else (value,)
    return any(isinstance(item, float) and not math.isfinite(item) for item in items)


def _bounds_problem(value: Any, metadata: Mapping[str, Any]) -> Optional[str]:
    """What the allowed values are, when ``value`` (or an item of it) breaks the field's
    ``choices``/``min``/``max``; None when it keeps them (or the field declares none)."""
    items = value if isinstance(value, (tuple, list)) else (value,)
    choices, low, high = metadata.get("choices"), metadata.get("min"), metadata.get("max")
    for item in items:
        if item is None:
            continue
        if choices is not None and item not in choices:
            close = difflib.get_close_matches(str(item), [str(c) for c in choices], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            return f"one of {', '.join(repr(c) for c in choices)}{hint}"
        if not isinstance(item, (int, float)) or isinstance(item, bool):
            continue
        if (low is not None and item < low) or (high is not None and item > high):
            return range_text(low, high)
    return None


def range_text(low: Optional[float], high: Optional[float]) -> str:
    """``at least 1``, ``at most 0.5`` or ``between 0 and 1``."""
    if low is not None and high is not None:
        return f"between {low} and {high}"
    return f"at least {low}" if low is not None else f"at most {high}"


def describe_settings(config_class: type) -> list[dict[str, Any]]:
    """Each setting of a detector config as a dict (name, type, default, choices, min, max, help):
    what ``headscope detectors`` prints."""
    types_by_name = setting_types(config_class)
    rows = []
    for name, field in setting_fields(config_class).items():
        meta = field.metadata
        default = setting_default(field)
        rows.append({
            "name": name, "type": type_name(types_by_name[name]),
            "default": list(default) if isinstance(default, tuple) else default,
            "choices": list(meta["choices"]) if meta.get("choices") is not None else None,
            "min": meta.get("min"), "max": meta.get("max"), "help": meta.get("help", ""),
        })
    return rows


@dataclass
class DetectorConfig:
    """Base of detector configs: every field needs a default."""

    seed: int = setting(0, "seed of every random choice (same seed, same scores)")


class Detector(ABC):
    """One head role: scores every head and knows how to check causally that it matters."""

    name: ClassVar[str]
    Config: ClassVar[type] = DetectorConfig
    summary: ClassVar[str] = ""
    cost: ClassVar[str] = ""  # rough time of one score() on a stated model and machine, for 'headscope detectors'

    def __init__(self, config: Optional[Any] = None, **overrides: Any) -> None:
        """``config``: a ``Config`` instance, a dict of settings (e.g. a saved result's config) or
        None (the defaults); ``overrides`` set single settings on top of it. Every value given is
        checked against the ``Config`` field's type, choices and range (:func:`check_settings`)
        before any work, raising :class:`~headscope.errors.SettingError`."""
        base, given = self._split_config(config)
        checked = check_settings(self.name, self.Config, {**given, **overrides})
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
        from headscope import __version__

        check_not_empty(self.name, values, (metadata or {}).get("nan_reason"))

        info = {"headscope_version": __version__, "summary": self.summary}
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


def get_detector(detector: Union[str, Detector, type[Detector]], config: Any = None, **overrides: Any) -> Detector:
    """A detector instance from a name, a class or an instance (overrides applied)."""
    if isinstance(detector, Detector):
        return type(detector)(detector.config, **overrides) if overrides or config else detector
    if isinstance(detector, type) and issubclass(detector, Detector):
        return detector(config, **overrides)
    if detector not in _REGISTRY:
        close = difflib.get_close_matches(str(detector), list(_REGISTRY), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownDetectorError(
            f"Unknown detector {detector!r}.{hint} Known detectors: {', '.join(list_detectors())}. "
            f"Register your own with @headscope.register_detector."
        )
    return _REGISTRY[detector](config, **overrides)
