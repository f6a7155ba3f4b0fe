"""Detector settings: the ``setting()`` field helper and the checks every value goes through.

A config field made with :func:`setting` carries one line of help and its allowed ``choices`` or
``min``/``max`` range. :func:`check_settings` holds each value a user gives (from Python, a
``--config`` file or a saved result) against the field's type hint and those bounds before any
work starts, raising :class:`~headscope.errors.SettingError` that names the detector, the setting,
the value and what it must be. :func:`describe_settings` is what ``headscope detectors`` prints.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any, Literal, Optional, Union

from headscope.errors import SettingError

def setting(default: Any, help: str = "", choices: Optional[tuple] = None, min: Optional[float] = None,
            max: Optional[float] = None, exclusive: bool = False, path: bool = False) -> Any:
    """A config field with what a user needs to set it: ``help`` (one line), and the allowed
    ``choices`` or ``min``/``max`` range (inclusive; both bounds excluded with ``exclusive``) that
    are checked before any work starts. ``path=True``: a file path, given as ``str`` or
    ``pathlib.Path`` (kept as ``str``), never empty::

        @dataclass
        class MyConfig(DetectorConfig):
            n_sequences: int = setting(32, "sequences scored", min=1)
            format: str = setting("plain", "prompt format", choices=("plain", "chat"))
            data: Optional[str] = setting(None, "your own data file", path=True)
    """
    metadata = {"help": help, "choices": choices, "min": min, "max": max, "exclusive": exclusive, "path": path}
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
    return (
        f"The {detector} detector has no setting {', '.join(unknown)}.{suggest(unknown[0], known)} Its settings: "
        f"{', '.join(known)} ('headscope detectors {detector}' describes them)."
    )


def check_setting(detector: str, field: dataclasses.Field, hint: Any, value: Any) -> Any:
    """One setting's value checked against its type hint and its field's choices and range."""
    where = f"The {field.name!r} setting of the {detector} detector"
    default = f"(default {setting_default(field)!r}; 'headscope detectors {detector}' lists every setting)"
    if field.metadata.get("path"):
        value = _path_value(where, value)
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


def _path_value(where: str, value: Any) -> Any:
    """A path setting's value as ``str`` (a ``Path`` is converted); an empty one is refused, since
    an unset path (``None``) means the shipped data and ``""`` would silently mean the same."""
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, str) and not value.strip():
        raise SettingError(f"{where} is an empty path: give the path of your file, or leave it unset (None) for the "
                           f"shipped data.")
    return value


def closest(word: Any, candidates: Any) -> Optional[str]:
    """The candidate spelled most like ``word`` (difflib), or None when none is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1)
    return close[0] if close else None


def suggest(word: Any, candidates: Any) -> str:
    """`` Did you mean 'x'?`` for the candidate closest to ``word``, or ``""``."""
    match = closest(word, candidates)
    return f" Did you mean {match!r}?" if match else ""


def _has_non_finite(value: Any) -> bool:
    """Whether ``value`` is, or holds, a NaN or infinite float."""
    items = value if isinstance(value, (tuple, list)) else (value,)
    return any(isinstance(item, float) and not math.isfinite(item) for item in items)


def _bounds_problem(value: Any, metadata: Mapping[str, Any]) -> Optional[str]:
    """What the allowed values are, when ``value`` (or an item of it) breaks the field's
    ``choices``/``min``/``max``; None when it keeps them (or the field declares none)."""
    items = value if isinstance(value, (tuple, list)) else (value,)
    choices, low, high = metadata.get("choices"), metadata.get("min"), metadata.get("max")
    exclusive = bool(metadata.get("exclusive"))
    for item in items:
        if item is None:
            continue
        if choices is not None and item not in choices:
            match = closest(item, choices)
            return f"one of {', '.join(repr(c) for c in choices)}" + (f" (did you mean {match!r}?)" if match else "")
        if not isinstance(item, (int, float)) or isinstance(item, bool):
            continue
        below = low is not None and (item <= low if exclusive else item < low)
        above = high is not None and (item >= high if exclusive else item > high)
        if below or above:
            return range_text(low, high, exclusive)
    return None


def range_text(low: Optional[float], high: Optional[float], exclusive: bool = False) -> str:
    """``at least 1``, ``at most 0.5``, ``between 0 and 1``; with ``exclusive``: ``above 0``,
    ``strictly between 0 and 1``."""
    if low is not None and high is not None:
        return f"{'strictly ' if exclusive else ''}between {low} and {high}"
    if low is not None:
        return f"{'above' if exclusive else 'at least'} {low}"
    return f"{'below' if exclusive else 'at most'} {high}"


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
            "min": meta.get("min"), "max": meta.get("max"), "exclusive": bool(meta.get("exclusive")),
            "help": meta.get("help", ""),
        })
    return rows
