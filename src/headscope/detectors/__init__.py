"""Head detectors: one module per role, all registered by name."""

from headscope.detectors.base import (
    Detector,
    DetectorConfig,
    ValidationTask,
    get_detector,
    list_detectors,
    register_detector,
    unregister_detector,
)
from headscope.detectors import duplicate_token, induction, memory_context, previous_token  # noqa: F401  (registers)

__all__ = [
    "Detector",
    "DetectorConfig",
    "ValidationTask",
    "get_detector",
    "list_detectors",
    "register_detector",
    "unregister_detector",
]
