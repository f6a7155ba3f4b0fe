"""headscope: find, score, validate and edit the attention heads of transformer language models.

    import headscope as hs
    model = hs.load_model("smollm2-135m-instruct")
    scores = hs.detect(model, "induction")
    with hs.ablate(model, scores.top_heads(5), method="mean"):
        ...
    hs.validate(model, scores, k=5)
"""

from headscope.versions import HEADSCOPE_VERSION as __version__
from headscope.api import detect, scan
from headscope.atlas import Atlas, AtlasSettings, AtlasUnit, atlas, atlas_units
from headscope.compare import AtlasComparison, compare
from headscope.detectors import (
    Detector,
    DetectorConfig,
    ValidationTask,
    get_detector,
    list_detectors,
    register_detector,
    unregister_detector,
)
from headscope.engine import Head, TokenBatch, model_shape, tokenize
from headscope.errors import (
    ArgumentError,
    CacheMismatchError,
    ConfigFileError,
    DataError,
    EmptyResultError,
    HeadIndexError,
    HeadscopeError,
    IdentityMismatchError,
    InputError,
    MissingPartsError,
    ModelNotAvailableError,
    OutputFolderError,
    PromptTooLongError,
    ResultFileError,
    ResultFileWarning,
    ScoresMismatchError,
    SettingError,
    UnknownDetectorError,
    UnsupportedModelError,
    WeightCacheError,
)
from headscope.identity import ModelIdentity, model_identity
from headscope.interventions import (
    DecodeMask,
    ablate,
    ablate_direction,
    ablate_per_row,
    add_vector,
    edit,
    mask_at_decode,
    remove_sink,
    scale_output,
    scale_query,
    scale_values,
    swap_feature,
    uniform_attention,
)
from headscope.models import DEFAULT_MODEL, load_model
from headscope.results import HeadScores, role_overlap
from headscope.scans import ablation_scan, attribution_scan, naive_ablation_scan
from headscope.significance import Significance
from headscope.validation import ValidationResult, validate
from headscope.viz.patterns import AttentionPatterns, attention_patterns

__all__ = [
    "AttentionPatterns",
    "attention_patterns",
    "Atlas",
    "AtlasComparison",
    "AtlasSettings",
    "AtlasUnit",
    "atlas_units",
    "MissingPartsError",
    "Significance",
    "atlas",
    "compare",
    "DEFAULT_MODEL",
    "DecodeMask",
    "Detector",
    "DetectorConfig",
    "Head",
    "HeadIndexError",
    "ArgumentError",
    "ConfigFileError",
    "DataError",
    "OutputFolderError",
    "ResultFileError",
    "ResultFileWarning",
    "ScoresMismatchError",
    "SettingError",
    "CacheMismatchError",
    "EmptyResultError",
    "HeadScores",
    "HeadscopeError",
    "IdentityMismatchError",
    "InputError",
    "ModelIdentity",
    "ModelNotAvailableError",
    "PromptTooLongError",
    "TokenBatch",
    "UnknownDetectorError",
    "UnsupportedModelError",
    "WeightCacheError",
    "ValidationResult",
    "ValidationTask",
    "__version__",
    "ablate",
    "ablate_direction",
    "ablate_per_row",
    "ablation_scan",
    "attribution_scan",
    "add_vector",
    "detect",
    "edit",
    "get_detector",
    "list_detectors",
    "load_model",
    "mask_at_decode",
    "model_identity",
    "model_shape",
    "naive_ablation_scan",
    "register_detector",
    "remove_sink",
    "role_overlap",
    "scale_output",
    "scale_query",
    "scale_values",
    "scan",
    "swap_feature",
    "tokenize",
    "uniform_attention",
    "unregister_detector",
    "validate",
]
