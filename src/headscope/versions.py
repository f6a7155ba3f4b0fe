"""Which library versions headscope was tested with, and whether the installed ones are among them.

The tested ranges are headscope's own requirements (``pyproject.toml``: each upper bound is the
newest release tested with ``scripts/check-versions.sh``), read back from the installed package's
metadata, so there is one list to keep. ``headscope info`` prints the table; ``load_model`` warns
once per process when a core library is outside its range.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, requires, version
from typing import Optional

HEADSCOPE_VERSION = "0.1.0"  # this release (``headscope.__version__``; the same as pyproject.toml's)
# The libraries whose releases change what a forward pass, a cache or a checkpoint does.
CORE_PACKAGES = ("torch", "transformers", "transformer-lens", "gguf")
_warned = False


@dataclass(frozen=True)
class PackageVersion:
    """One library: the installed version, the tested range, and whether it falls inside."""

    name: str
    installed: Optional[str]
    tested: str

    @property
    def in_range(self) -> bool:
        from packaging.specifiers import SpecifierSet

        return self.installed is not None and SpecifierSet(self.tested).contains(self.installed, prereleases=True)


def tested_ranges() -> dict[str, str]:
    """``{package: specifier}`` for headscope's core dependencies, from the installed metadata."""
    from packaging.requirements import Requirement

    try:
        declared = [Requirement(line) for line in requires("headscope") or []]
    except PackageNotFoundError:  # running from a source tree that was never installed
        return {}
    return {req.name: _lower_bound_first(req.specifier) for req in declared
            if req.name in CORE_PACKAGES and req.marker is None}


def _lower_bound_first(specifier) -> str:
    return ",".join(sorted((str(s) for s in specifier), key=lambda s: not s.startswith(">")))


def installed_version(name: str) -> Optional[str]:
    """The installed version of the distribution ``name``, or None when it is not installed."""
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def package_versions() -> list[PackageVersion]:
    """The core libraries as installed, each with the range headscope was tested with."""
    ranges = tested_ranges()
    return [PackageVersion(name, installed_version(name), ranges.get(name, "")) for name in CORE_PACKAGES]


def untested() -> list[PackageVersion]:
    """Core libraries installed outside (or missing from) their tested range."""
    return [row for row in package_versions() if not row.in_range]


def warn_if_untested() -> None:
    """One warning per process naming each library outside its tested range."""
    global _warned
    outside = untested()
    if _warned or not outside:
        return
    _warned = True
    listed = ", ".join(f"{row.name} {row.installed or 'missing'} (tested {row.tested})" for row in outside)
    warnings.warn(
        f"headscope was not tested with {listed}; results may be wrong without an error. Install the "
        "locked versions (bash scripts/install.sh, or pip install -r requirements/cpu.lock).",
        RuntimeWarning,
        stacklevel=3,
    )
