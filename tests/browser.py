"""Open a report in headless Chromium (Debian's package) through Playwright and report what a
reader would see: which sections are visible, console messages, page errors and requests.

Chromium is at ``/usr/bin/chromium`` (``apt-get install chromium``; ``scripts/install.sh`` installs
it when it can). Without it the browser tests skip locally and fail under ``CI=true``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import pytest

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-quic"]


def chromium_path() -> str:
    """The Chromium binary, or skip (fail under CI, where install.sh must have provided it)."""
    path = os.environ.get("HEADSCOPE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    missing = []
    if path is None:
        missing.append("Chromium (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("playwright (pip install playwright; no browser download needed)")
    if missing:
        message = f"the browser test needs {' and '.join(missing)}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + ": scripts/install.sh should have installed it.")
        pytest.skip(message)
    return path


def open_report(path: Path, sections: Sequence[str], screenshot: Optional[Path] = None) -> dict[str, Any]:
    """Load ``path`` and describe it: ``visible[section]``, ``figures[section]`` (SVG count),
    ``tables[section]``, ``console`` ([type, text]), ``errors`` (uncaught page errors), ``requests``
    (every URL the page asked for) and the page's height."""
    seen: dict[str, Any] = {"figures": {}, "tables": {}}
    with opened_page(path, seen) as page:
        for section in sections:
            locator = page.locator(f"section#{section}")
            seen["visible"][section] = locator.count() == 1 and locator.is_visible()
            box = locator.bounding_box() if locator.count() == 1 else None
            seen["visible"][section] = seen["visible"][section] and box is not None and box["height"] > 40
            seen["figures"][section] = page.locator(f"section#{section} svg").count()
            seen["tables"][section] = page.locator(f"section#{section} table").count()
        seen["height"] = page.evaluate("document.body.scrollHeight")
        if screenshot is not None:
            page.screenshot(path=str(screenshot), full_page=True)
    return seen


@contextlib.contextmanager
def opened_page(path: Path, seen: dict[str, Any]) -> Iterator[Any]:
    """``path`` loaded in headless Chromium (a 1280 × 900 viewport), recording into ``seen`` every
    ``console`` message ([type, text]), uncaught page error (``errors``) and requested URL
    (``requests``); ``visible`` starts empty. The browser is closed on leaving."""
    from playwright.sync_api import sync_playwright

    seen.update(console=[], errors=[], requests=[], visible={})
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda message: seen["console"].append([message.type, message.text]))
            page.on("pageerror", lambda error: seen["errors"].append(str(error)))
            page.on("request", lambda request: seen["requests"].append(request.url))
            page.goto(Path(path).resolve().as_uri(), wait_until="load")
            yield page
        finally:
            browser.close()


HEAD_SECTIONS = ("scores", "validation", "patterns", "neighbours")


def open_head_page(path: Path, screenshot: Optional[Path] = None) -> dict[str, Any]:
    """Load a head page (``heads/L18H6.html``) and describe it as :func:`open_report` does, plus
    ``views``: per attention pattern view, its ``tokens`` (the text of its token spans) and the
    token colours before and after hovering its first token (``before``, ``after``), and
    ``links``: every href on the page."""
    seen: dict[str, Any] = {"views": []}
    with opened_page(path, seen) as page:
        for section in HEAD_SECTIONS:
            locator = page.locator(f"section#{section}")
            seen["visible"][section] = locator.count() == 1 and locator.is_visible()
        views = page.locator(".hs-pv")
        for index in range(views.count()):
            tokens = views.nth(index).locator(".hs-tok")
            colours = "els => els.map(e => e.style.background)"
            view = {"tokens": tokens.all_inner_texts(), "before": tokens.evaluate_all(colours)}
            tokens.first.hover()
            view["after"] = tokens.evaluate_all(colours)
            seen["views"].append(view)
        seen["links"] = page.eval_on_selector_all("a", "els => els.map(e => e.getAttribute('href'))")
        if screenshot is not None:
            page.mouse.move(0, 0)
            page.screenshot(path=str(screenshot), full_page=True)
    return seen
