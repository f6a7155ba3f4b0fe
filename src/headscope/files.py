"""Writing result files safely: whole or not at all, also with several processes at once.

Every results, checkpoint and part file headscope writes goes through :func:`atomic_write`: the
content is written to a temporary file with a name no other writer uses
(``.<name>.<pid>.<random>.tmp``, in the same folder, so the rename stays on one file system),
flushed to disk, and renamed over the target in one step (``os.replace``). A reader sees the old
file or the new one, never a torn one; two processes saving the same name both succeed and the
last rename wins. On any failure the temporary file is removed.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import IO, Any, Callable, Union

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
    return path


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
