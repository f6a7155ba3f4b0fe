"""Installed library versions against the ranges headscope was tested with."""

from __future__ import annotations

import re
import warnings

import pytest

import headscope.versions as versions
from headscope.cli import main


def test_the_tested_ranges_are_the_installed_requirements():
    ranges = versions.tested_ranges()
    assert set(ranges) == set(versions.CORE_PACKAGES)
    assert all("<" in spec and ">=" in spec for spec in ranges.values())  # every core library has an upper bound
    assert all(row.in_range for row in versions.package_versions())  # the lock installs tested versions


def test_info_prints_the_versions_without_loading_a_model(capsys):
    assert main(["info", "--versions-only"]) == 0
    out = capsys.readouterr().out
    assert "transformers" in out and "transformer-lens" in out and "outside" not in out


def test_a_version_outside_the_range_is_flagged_and_warned_once(monkeypatch, capsys):
    real_version = versions.version
    monkeypatch.setattr(versions, "version", lambda name: "5.99.0" if name == "transformers" else real_version(name))
    monkeypatch.setattr(versions, "_warned", False)
    assert [row.name for row in versions.untested()] == ["transformers"]
    assert main(["info", "--versions-only"]) == 1
    assert "5.99.0" in capsys.readouterr().out
    tested = versions.tested_ranges()["transformers"]
    with pytest.warns(RuntimeWarning, match=re.escape(f"not tested with transformers 5.99.0 (tested {tested})")):
        versions.warn_if_untested()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        versions.warn_if_untested()  # once per process
