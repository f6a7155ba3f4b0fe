"""Peak memory of a call: CUDA's allocator peak on a GPU, the process's peak RSS on Linux CPUs.

``peak_memory(fn)`` returns ``fn()``'s result and the bytes its run added at its peak over what
was in use when it started. On CPU it resets the kernel's high-water mark (``/proc/self/clear_refs``)
and reads ``VmHWM`` afterwards, so the figure is the true peak, not a sampled one; memory freed
earlier is first handed back to the OS (``malloc_trim``), else the allocator would serve the new
work from it unseen. Where that file is not writable (not Linux) the peak is ``None``.
"""

from __future__ import annotations

import ctypes
import gc
from pathlib import Path
from typing import Any, Callable, Optional

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _release_free_memory() -> None:
    """Hand memory freed by earlier work back to the OS (glibc), so it does not hide a new peak."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_rss_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")  # 5: reset the peak resident set size to the current one
        return True
    except OSError:
        return False


def peak_memory(fn: Callable[[], Any], device: Optional[torch.device] = None) -> tuple[Any, Optional[int]]:
    """``(fn(), peak bytes above the starting level)`` on ``device`` (CPU when not given)."""
    gc.collect()
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - start
    _release_free_memory()
    if not _reset_rss_peak():
        return fn(), None
    start = _status_kib("VmRSS")
    result = fn()
    return result, (_status_kib("VmHWM") - start) * 1024
