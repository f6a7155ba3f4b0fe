"""Readers for the researcher's own data files, shared by every detector's ``data`` setting.

Every reader names the file, and the line where a line is at fault, in the :class:`DataError`
it raises; :func:`file_sha256` is what a result records so that a changed file is never
mistaken for the one a saved result was computed on.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence, Union

from headscope.errors import DataError

PathLike = Union[str, Path]


def data_file(path: PathLike, what: str = "data") -> Path:
    """``path`` as a readable file, or a :class:`DataError` that says what is wrong."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"No {what} file at {path}: give the path of an existing file.")
    if not path.is_file():
        raise DataError(f"{path} is a folder, not a {what} file: give the path of a file.")
    try:
        with path.open("rb"):
            pass
    except OSError as error:
        raise DataError(f"Cannot read the {what} file {path}: {error.strerror}.") from None
    return path


def read_text(path: PathLike, what: str = "data") -> str:
    """The whole file as UTF-8 text."""
    path = data_file(path, what)
    try:
        return path.read_text(encoding="utf-8-sig")  # a byte-order mark (Excel, Notepad) is no data
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise DataError(f"{path}, line {line}: not UTF-8 text ({error.reason}). Save the file as UTF-8.") from None


def read_jsonl(path: PathLike, required: Sequence[str], example: str, what: str = "data") -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line of a JSON-lines file whose objects hold
    every key in ``required``. ``example`` (one valid line) goes into each error message."""
    path = data_file(path, what)
    rows = []
    for number, line in enumerate(read_text(path, what).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}, line {number}: not JSON ({error.msg}). Each line must be one JSON object "
                            f"like {example}") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}, line {number}: a JSON {type(row).__name__}, not an object. Each line must be "
                            f"like {example}")
        missing = [key for key in required if key not in row]
        if missing:
            raise DataError(f"{path}, line {number}: no {', '.join(repr(k) for k in missing)}. Each line must be "
                            f"like {example}")
        rows.append((number, row))
    if not rows:
        raise DataError(f"{path} holds no {what}: it is empty. Each line must be like {example}")
    return rows


def line_error(path: PathLike, number: int, problem: str, example: str) -> DataError:
    """The error for a line that parsed but holds something unusable."""
    return DataError(f"{path}, line {number}: {problem}. Each line must be like {example}")


def file_sha256(path: PathLike) -> str:
    """Hex SHA-256 of the file's bytes."""
    digest = hashlib.sha256()
    with data_file(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
