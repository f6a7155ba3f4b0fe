"""Mod-10 features (Gould et al. 2023): directions in numeric tokens' effective embeddings that
encode a number's value mod 10.

``numeric_tokens(model)`` collects every single-token numeral the tokenizer offers (bare digits,
number words and ordinals in their forms, Roman numerals) with its value. ``mod10_probe`` fits a
nearest-centroid linear probe: the feature of class ``k`` is the mean effective embedding of the
tokens whose value is ``k`` mod 10, minus the mean over all tokens (unit-normed), and a token is
classified by its largest cosine with the features. Accuracy is measured leave-one-out (the
token's own class mean is recomputed without it) and leave-one-family-out (the features are
fitted without the token's whole family, e.g. digits classified by features fitted on words),
against the chance of guessing the most common class.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from headscope.detectors.successor import effective_embeddings
from headscope.tasks.succession import make_task

NUMERIC_FAMILIES = {
    "numbers": ("bare",),  # SmolLM2: only the bare digits 1-9 are single tokens
    "number_words": ("space", "bare", "space_title"),
    "ordinals": ("space", "bare", "space_title"),
    "roman_numerals": ("space", "bare"),
}


@dataclass
class NumericToken:
    text: str
    token_id: int
    value: int
    family: str  # e.g. "number_words:space"


@dataclass
class ProbeResult:
    """Held-out accuracy of the mod-10 probe, its chance level, and the fitted features."""

    n_tokens: int
    loo_accuracy: float
    loo_accuracy_above_ten: float  # on values 11-20 only, where value mod 10 differs from the value
    family_out_accuracy: dict[str, float]
    chance: float
    features: Float[Tensor, "10 d_model"]
    per_class_counts: dict[int, int] = field(default_factory=dict)


def numeric_tokens(model: Any) -> list[NumericToken]:
    """Every single-token numeral of the model's tokenizer, with its value (1-based position)."""
    seen, tokens = set(), []
    for family, forms in NUMERIC_FAMILIES.items():
        for form in forms:
            task = make_task(model, family, form)
            for index, token_id in sorted(task.token_ids.items()):
                if token_id not in seen:
                    seen.add(token_id)
                    tokens.append(NumericToken(task.texts[index], token_id, index + 1, f"{family}:{form}"))
    return tokens


def _centroid_features(embedded: Tensor, classes: Tensor, keep: Tensor) -> Tensor:
    """Unit-normed class means minus the grand mean, over the rows in ``keep``."""
    center = embedded[keep].mean(dim=0)
    features = torch.zeros(10, embedded.shape[1])
    for k in range(10):
        rows = keep & (classes == k)
        if rows.any():
            features[k] = embedded[rows].mean(dim=0) - center
    return torch.nn.functional.normalize(features, dim=1), center


def _classify(vector: Tensor, features: Tensor, center: Tensor) -> int:
    return int((torch.nn.functional.normalize(vector - center, dim=0) @ features.T).argmax())


def _mean(values: list) -> float:
    return sum(values) / len(values) if values else float("nan")


def mod10_probe(model: Any, embedding: str = "mlp0_residual") -> ProbeResult:
    """Leave-one-out and leave-one-family-out accuracy of the nearest-centroid mod-10 probe."""
    tokens = numeric_tokens(model)
    embedded = effective_embeddings(model, [t.token_id for t in tokens], embedding).cpu()
    classes = torch.tensor([t.value % 10 for t in tokens])
    everyone = torch.ones(len(tokens), dtype=torch.bool)
    correct = []
    for i in range(len(tokens)):
        keep = everyone.clone()
        keep[i] = False
        features, center = _centroid_features(embedded, classes, keep)
        correct.append(_classify(embedded[i], features, center) == int(classes[i]))
    families = sorted({t.family.split(":")[0] for t in tokens})
    family_out = {}
    for family in families:
        inside = torch.tensor([t.family.startswith(family + ":") for t in tokens])
        features, center = _centroid_features(embedded, classes, ~inside)
        hits = [_classify(embedded[i], features, center) == int(classes[i]) for i in torch.nonzero(inside)[:, 0]]
        family_out[family] = _mean(hits)
    counts = Counter(classes.tolist())
    features, _ = _centroid_features(embedded, classes, everyone)
    return ProbeResult(
        n_tokens=len(tokens), loo_accuracy=_mean(correct), family_out_accuracy=family_out,
        loo_accuracy_above_ten=_mean([c for c, t in zip(correct, tokens, strict=True) if t.value > 10]),
        chance=max(counts.values()) / len(tokens), features=features, per_class_counts=dict(sorted(counts.items())),
    )

