"""Successor head studies (Gould et al. 2023), built on the ``successor`` detector
(``headscope.detectors.successor``). Mod-10 features: directions in numeric tokens' effective
embeddings that encode a number's value mod 10.

``numeric_tokens(model)`` collects every single-token numeral the tokenizer offers (bare digits,
number words and ordinals in their forms, Roman numerals) with its value. ``mod10_probe`` fits a
nearest-centroid linear probe: the feature of class ``k`` is the mean effective embedding of the
tokens whose value is ``k`` mod 10, minus the mean over all tokens (unit-normed), and a token is
classified by its largest cosine with the features. Accuracy is measured leave-one-out (the
token's own class mean is recomputed without it) and leave-one-family-out (the features are
fitted without the token's whole family, e.g. digits classified by features fitted on words),
against the chance of guessing the most common class.

``mod10_edits(model, head)`` is the paper's vector arithmetic: in a numeral's effective embedding,
swap its mod-10 feature ``f_a`` for ``f_b`` (``e - f_a + f_b``; features are the class means minus
the grand mean, fitted without the edited token) and pass it through the successor head's OV
circuit. An edit succeeds when the head's top output among the token's family becomes the
successor of the edited value (units digit a → b); the control adds a random direction of the
same norm as ``f_b - f_a`` and is scored against the same target.

``ov_scores(model, config)`` is the detector's pooled effective-OV score alone (no forward runs),
to compare conventions (``embedding``, ``head_input_norm``, ``unembed_norm``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from jaxtyping import Float
from torch import Tensor

from headscope.detectors.successor import (
    SuccessorConfig,
    SuccessorDetector,
    _pooled,
    effective_embeddings,
    head_ov_logits,
    ov_success_by_task,
    task_unembed,
)
from headscope.engine.heads import check_head
from headscope.interventions import swap_feature
from headscope.stats import cluster_bootstrap_ci
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


def _class_offsets(embedded: Tensor, classes: Tensor, keep: Tensor) -> tuple[dict[int, Tensor], Tensor]:
    """Per mod-10 class present among the rows in ``keep``: its mean minus the grand mean (the
    feature f_k), and the grand mean."""
    center = embedded[keep].mean(dim=0)
    offsets = {k: embedded[keep & (classes == k)].mean(dim=0) - center for k in range(10) if (keep & (classes == k)).any()}
    return offsets, center


def _centroid_features(embedded: Tensor, classes: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """Unit-normed features ``[10, d_model]`` (zero rows for absent classes), and the grand mean."""
    offsets, center = _class_offsets(embedded, classes, keep)
    features = torch.zeros(10, embedded.shape[1])
    for k, offset in offsets.items():
        features[k] = offset
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


def ov_scores(model: Any, config: Optional[SuccessorConfig] = None) -> Float[Tensor, "n_layers n_heads"]:
    """The pooled effective-OV score alone (no forward runs), e.g. to compare conventions."""
    detector = SuccessorDetector(config)
    return _pooled(ov_success_by_task(model, detector.tasks(model), detector.config))


@dataclass
class EditResult:
    """How often swapping mod-10 features moves a head's top output to the edited value's successor."""

    head: str
    n_edits: int
    success_rate: float  # top output = successor of the edited value
    control_rate: float  # same target, a random direction of equal norm added instead
    unedited_rate: float  # the head's top output on unedited tokens is their successor
    difference_ci: tuple[float, float] = (float("nan"), float("nan"))  # 95% CI of success - control, by token
    per_family: dict[str, float] = field(default_factory=dict)


def mod10_edits(model: Any, head: Any, embedding: str = "mlp0_residual", seed: int = 0) -> EditResult:
    """Swap each numeral's mod-10 feature for every other class where the edited value's successor
    exists in its family; score through ``head``'s OV circuit against a random-direction control."""
    target_head = check_head(model, head)
    tokens = numeric_tokens(model)
    embedded = effective_embeddings(model, [t.token_id for t in tokens], embedding).cpu()
    classes = torch.tensor([t.value % 10 for t in tokens])
    generator = torch.Generator().manual_seed(seed)
    by_family: dict[str, dict[int, int]] = {}
    for index, token in enumerate(tokens):
        by_family.setdefault(token.family, {})[token.value] = index
    outcomes: dict[str, list[tuple[bool, bool, int]]] = {}  # (success, control, edited token's index)
    unedited = []
    for family, members in by_family.items():
        column = {value: c for c, value in enumerate(members)}
        unembed = task_unembed(model, [tokens[i].token_id for i in members.values()]).cpu()

        def top_is(vectors: list[Tensor], values: list[int], unembed=unembed, column=column) -> list[bool]:
            logits = head_ov_logits(model, target_head.layer, [target_head.head], torch.stack(vectors), unembed)[0]
            return [int(top) == column[v] for top, v in zip(logits.argmax(dim=-1).tolist(), values, strict=True)]

        for value, index in members.items():
            if value + 1 in members:
                unedited += top_is([embedded[index]], [value + 1])
            edits = _feature_swaps(embedded, classes, index, value, set(members), generator)
            if edits:
                edited, controls, targets = (list(part) for part in zip(*edits, strict=True))
                pairs = zip(top_is(edited, targets), top_is(controls, targets), [index] * len(edited), strict=True)
                outcomes.setdefault(family, []).extend(pairs)
    pairs = [pair for family_pairs in outcomes.values() for pair in family_pairs]
    return EditResult(
        head=str(target_head), n_edits=len(pairs), success_rate=_mean([p[0] for p in pairs]),
        control_rate=_mean([p[1] for p in pairs]), unedited_rate=_mean(unedited),
        difference_ci=_paired_bootstrap_ci(pairs, seed),
        per_family={family: _mean([p[0] for p in family_pairs]) for family, family_pairs in outcomes.items()},
    )


def _feature_swaps(embedded, classes, index, value, values_present, generator) -> list[tuple[Tensor, Tensor, int]]:
    """(edited vector, control vector, edited value's successor) for each other units digit whose
    edited value has a successor in the family; features fitted without the edited token."""
    keep = torch.ones(len(classes), dtype=torch.bool)
    keep[index] = False
    means, _ = _class_offsets(embedded, classes, keep)
    a, swaps = value % 10, []
    for b in sorted(means):
        new_value = value - a + b
        if b == a or a not in means or new_value < 1 or new_value + 1 not in values_present:
            continue
        shift = means[b] - means[a]
        direction = torch.randn(shift.shape, generator=generator)
        control = embedded[index] + direction / direction.norm() * shift.norm()
        swaps.append((swap_feature(embedded[index], means[a], means[b]), control, new_value + 1))
    return swaps


def _paired_bootstrap_ci(pairs: list[tuple[bool, bool, int]], seed: int, n_bootstrap: int = 2000) -> tuple[float, float]:
    """95% CI of mean(success - control) over edits, resampling tokens: the up to nine edits of
    one token share its embedding and are not independent."""
    differences = torch.tensor([float(a) - float(b) for a, b, _ in pairs])
    return cluster_bootstrap_ci(differences, torch.tensor([token for *_, token in pairs], dtype=torch.long),
                                n_bootstrap, seed)
