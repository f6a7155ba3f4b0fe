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
from headscope.detectors import (  # noqa: F401  (registers)
    attention_sink,
    copy_suppression,
    duplicate_token,
    function_vector,
    induction,
    memory_context,
    name_mover,
    previous_token,
    retrieval,
    safety,
    select_copy,
    successor,
    truthfulness,
)

__all__ = [
    "Detector",
    "DetectorConfig",
    "ValidationTask",
    "get_detector",
    "list_detectors",
    "register_detector",
    "unregister_detector",
]
