"""The import contracts of pyproject.toml ([tool.importlinter]: the layers, the engine kept at the
bottom, no import circles) hold, and catch what they forbid; the workflow layer (atlas, report,
compare) names no detector."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import headscope as hs
from headscope.detectors.base import Detector, detector_class

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "headscope"
LINT = ("import sys; from importlinter.cli import lint_imports; "
        "sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True, no_logo=True))")


def lint_imports(config: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on ``config`` with this interpreter, this checkout's source first on the path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", LINT, str(config)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_the_import_contracts_hold():
    result = lint_imports(ROOT / "pyproject.toml")
    assert result.returncode == 0, f"lint-imports found a broken import contract:\n{result.stdout}{result.stderr}"
    assert "0 broken" in result.stdout


def test_a_layers_contract_catches_an_upward_import(tmp_path):
    """The check is no formality: the engine imports headscope.errors, so errors above the engine breaks."""
    config = tmp_path / "upside_down.toml"
    config.write_text('[tool.importlinter]\nroot_package = "headscope"\n\n[[tool.importlinter.contracts]]\n'
                      'name = "upside down"\ntype = "layers"\ncontainers = ["headscope"]\nlayers = ["errors", "engine"]\n')
    result = lint_imports(config)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "upside down BROKEN" in result.stdout and "headscope.engine is not allowed to import headscope.errors" in result.stdout


def _code_names(path: Path) -> set[str]:
    """Every identifier, imported module and string constant in ``path``'s code (docstrings left out)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.alias):
            names.update(node.name.split("."))
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.update(node.module.split("."))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            names.update(word for word in node.value.replace(".", " ").split())
    return names


def test_the_atlas_report_and_compare_name_no_detector():
    """What the atlas knows of a detector it reads from the Detector interface (atlas_order,
    atlas_defaults, pass_key, score_together): no name, class or module of one is in their code."""
    classes = {detector_class(name) for name in hs.list_detectors()}
    forbidden = set(hs.list_detectors()) | {
        cls.__name__ for detector in classes for cls in detector.__mro__
        if issubclass(cls, Detector) and cls is not Detector
    } | {cls.__module__.rsplit(".", 1)[1] for detector in classes for cls in detector.__mro__
         if cls.__module__.startswith("headscope.detectors.") and cls is not Detector}
    for module in ("atlas.py", "report.py", "compare.py"):
        named = _code_names(PACKAGE / module) & forbidden
        assert not named, f"{module} names {sorted(named)}"
