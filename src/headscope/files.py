"""Writing result files safely: whole or not at all, also with several processes at once.

Every results, checkpoint and part file headscope writes whole goes through :func:`atomic_write`: the
content is written to a temporary file with a name no other writer uses
(``.<name>.<pid>.<random>.tmp``, in the same folder, so the rename stays on one file system),
flushed to disk, and renamed over the target in one step (``os.replace``), and the folder is
flushed too (where the file system allows), so the rename itself outlives a crash. A reader sees
the old file or the new one, never a torn one; two processes saving the same name both succeed
and the last rename wins. On any failure the temporary file is removed.

A file that grows a line at a time (the retrieval detector's needle checkpoint) goes through
:func:`append_line`: each line is written under an exclusive lock on the file (``flock``, where
the system has it), so the lines of concurrent writers never interleave, and a line torn by a
writer that was killed mid-line is ended before the next one starts.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Optional, Union

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: appends are not locked there
    fcntl = None  # type: ignore[assignment]

PathLike = Union[str, "os.PathLike[str]"]
TEMP_SUFFIX = ".tmp"


def temporary_name(path: Path) -> Path:
    """A private temporary path beside ``path``: hidden, unique per process and call."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}")


def atomic_write(path: PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(handle)`` on a binary handle of a private temporary file beside ``path``,
    fsync it and rename it to ``path``. Creates the parent folder. Returns ``path``.

    Example::

        atomic_write("out/scores.json", lambda handle: handle.write(data))
        atomic_write("scan.pt", lambda handle: torch.save(state, handle))
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_name(path)
    try:
        with open(temporary, "xb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _flush_folder(path.parent)
    return path


def _flush_folder(folder: Path) -> None:
    """fsync a folder, making a rename in it durable; best effort (some systems refuse it)."""
    if os.name != "posix":  # pragma: no cover
        return
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_torch_save(path: PathLike, state: Any) -> Path:
    """``torch.save(state)`` to ``path`` atomically (see :func:`atomic_write`)."""
    import torch

    return atomic_write(path, lambda handle: torch.save(state, handle))


def atomic_savefig(figure: Any, path: PathLike, **options: Any) -> Path:
    """``figure.savefig(path, **options)`` atomically (see :func:`atomic_write`); the format comes
    from the file's suffix, as with ``savefig``."""
    suffix = Path(path).suffix.lstrip(".").lower() or "png"
    return atomic_write(path, lambda handle: figure.savefig(handle, format=suffix, **options))


def append_line(path: PathLike, line: str, check: Optional[Callable[[bytes], None]] = None) -> Path:
    """Append ``line`` and a newline to ``path`` (created with its folder when missing) under an
    exclusive lock, fsynced: lines of concurrent writers never interleave. When the file ends in
    a torn line (a writer killed mid-line), a newline ends it first, so the new line stays whole.

    Args:
        check: called under the lock with the file's first line (``b""`` for an empty file); it
            may raise to refuse the append (e.g. a file written for another model).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = line.encode("utf-8") + b"\n"
    with open(path, "a+b") as handle, _locked(handle):
        handle.seek(0)
        if check is not None:
            check(handle.readline())
        end = handle.seek(0, os.SEEK_END)
        if end > 0:
            handle.seek(end - 1)
            if handle.read(1) != b"\n":
                data = b"\n" + data
        handle.write(data)  # "a" mode: at the end whatever the position
        handle.flush()
        os.fsync(handle.fileno())
    return path


@contextlib.contextmanager
def _locked(handle: IO[bytes]) -> Iterator[None]:
    """An exclusive ``flock`` on an open file for the block (nothing where there is no ``fcntl``)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
