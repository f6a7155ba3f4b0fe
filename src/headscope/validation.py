"""Causal validation: does ablating a detector's top-k heads hurt more than ablating k random heads?

``validate(model, scores, k)`` measures the detector's own behavioural metric (for induction: loss
on repeated tokens) per example for the clean model, with the top-k heads ablated, and with
each of ``n_random`` draws of k other heads ablated. The reported difference is
``(top-k - clean) - mean over draws (random-k - clean)``, averaged over examples, with a 95%
interval (:func:`headscope.stats.bootstrap_difference_ci`) for the population of random k-sets, not only the
drawn ones: a t-interval whose variance adds the spread between draws to the example noise, with
Welch–Satterthwaite degrees of freedom. In a simulation (``tests/unit/test_validation_coverage.py``:
32 examples, sets that differ more than the noise) it covers 94.3% of the time with 5 draws, 94.8%
with 10 and 92.2% with 3, where the earlier percentile bootstrap covered 87%, 91% and 77%.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union

import torch
from jaxtyping import Float
from torch import Tensor

from headscope.detectors.base import MetricFn, ValidationTask, detector_of_scores
from headscope.engine.heads import Head, model_shape
from headscope.engine.partial import check_forward_from_layer, resid_pre_name
from headscope.engine.runner import Halving, auto_batch_size, model_device, model_dtype, progress_step, run_batched
from headscope.engine.tokens import as_token_batch
from headscope.errors import ArgumentError, EmptyResultError, UnsupportedModelError
from headscope.identity import metric_identity, model_identity
from headscope.interventions import ablate, head_output_sums, means_from_sums, output_mean_hooks
from headscope.results import HeadScores, check_scores_model
from headscope.stats import bootstrap_difference_ci, random_head_sets
from headscope.viz.figures import axes_for, difference_bars, finish


@dataclass
class ValidationResult:
    """Means of the metric per condition and the top-vs-random difference with its 95% CI."""

    detector: str
    model: str
    metric_name: str
    method: str
    k: int
    top_heads: list[str]
    random_heads: list[list[str]]
    clean: float
    top_k: float
    random_k: float
    random_k_per_draw: list[float]
    difference: float
    ci_low: float
    ci_high: float
    n_examples: int
    ablation_hurts_when: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def significant(self) -> bool:
        """True when the CI excludes 0 on the side where the ablation hurts."""
        if self.ablation_hurts_when == "increases":
            return self.ci_low > 0
        return self.ci_high < 0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["significant"] = self.significant
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ValidationResult":
        """Inverse of ``to_dict`` (derived keys such as ``significant`` are recomputed)."""
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})

    def plot(self, ax: Any = None, path: Optional[Union[str, Path]] = None) -> Any:
        """The metric clean, with the top-``k`` heads ablated and with random ``k``-sets ablated
        (each draw a dot, their mean a bar); on the top-``k`` bar the top-minus-random difference
        with its 95% CI as an error bar drawn from the random mean (dashed): the interval misses
        the dashed line when the difference is significant, as the title says.

        Args:
            ax: matplotlib axes to draw on (default: a new figure; the backend is never switched).
            path: save the figure there too (the suffix picks the format), atomically.

        Returns:
            The matplotlib ``Figure``.
        """
        figure, ax = axes_for(ax, (4.6, 4.0))
        conditions = [("clean", self.clean), (f"top-{self.k}", self.top_k), (f"random-{self.k}\n(mean)", self.random_k)]
        difference_bars(ax, conditions, reference=self.random_k, compared=1, difference=self.difference,
                        ci=(self.ci_low, self.ci_high), draws=self.random_k_per_draw, draws_at=2,
                        ylabel=self.metric_name, reference_label=f"random-{self.k} mean")
        verdict = "significant" if self.significant else "not significant"
        ax.set_title(f"{self.detector}: {self.method} ablation of {self.k} heads — {verdict}\n{self.model}, "
                     f"{self.n_examples} examples", fontsize=9)
        return finish(figure, path)

    def __str__(self) -> str:
        return (
            f"{self.detector} on {self.model}: {self.metric_name}, {self.method} ablation of k={self.k}\n"
            f"  clean      {self.clean:9.4f}\n"
            f"  top-{self.k:<6} {self.top_k:9.4f}   heads {', '.join(self.top_heads)}\n"
            f"  random-{self.k:<3} {self.random_k:9.4f}   ({len(self.random_k_per_draw)} draws: "
            f"{', '.join(f'{v:.3f}' for v in self.random_k_per_draw)})\n"
            f"  difference (top - random effect) {self.difference:+.4f}, 95% CI "
            f"[{self.ci_low:+.4f}, {self.ci_high:+.4f}], n={self.n_examples}"
            f"{' — significant' if self.significant else ' — not significant'}"
        )


def validate(
    model: Any,
    scores: HeadScores,
    k: int = 5,
    metric: Optional[MetricFn] = None,
    task: Optional[ValidationTask] = None,
    n_random: int = 5,
    method: Optional[str] = None,
    seed: int = 0,
    n_bootstrap: int = 2000,
    batch_size: Optional[int] = None,
    progress: Optional[bool] = None,
    cache: Optional[dict] = None,
    *,
    check_model: bool = True,
    skip_layers: bool = True,
) -> ValidationResult:
    """Ablate the top-``k`` heads of ``scores`` vs ``n_random`` draws of ``k`` other heads.

    Args:
        scores: a detector's ``HeadScores``; its detector gives the default task and metric.
        metric: ``metric(logits, chunk) -> [batch]`` replacing the detector's metric.
        task: a ``ValidationTask`` replacing the detector's data and metric.
        method: ablation method of ``hs.ablate`` (the mean is taken over the task's own data);
            by default the task's ``default_method`` (``"mean"`` for the forward-pass detectors).
        cache: a dict shared by several ``validate`` calls (the atlas passes one): tasks with the
            same tokens on the same model share the head-output means, and the clean run when
            their metric has a ``cache_key`` (``headscope.identity.metric_identity``; a metric
            without one is run again). Entries are keyed by the model's identity, so a model
            whose weights changed since never gets another's values.
        progress: a bar per run: means, clean, top-k, each random set (the rule of
            :mod:`headscope.engine.runner`).
        check_model: refuse scores labelled with another model's name (``False``: use them
            anyway, e.g. the same model loaded under another name). Scores of another shape are
            always refused.
        skip_layers: start each ablated forward run at the lowest ablated layer from the clean
            run's residual stream there (the same numbers with less work; ``False``: full runs,
            e.g. to time the difference). Decoding tasks (``measure``) always run whole.

    Raises:
        ArgumentError: ``k`` below 1 or too large for the model, ``n_random`` below 2.
        ScoresMismatchError: ``scores`` of another model (shape, or name with ``check_model``).
        DataError: ``scores`` computed on a data file that is gone or has changed since.
    """
    check_scores_model(model, scores, check_name=check_model)
    check_counts(model, k, n_random)
    if task is None:
        task = detector_of_scores(scores).validation_task(model)
    if metric is not None:
        if task.measure is not None:
            raise ValueError(f"The {scores.detector} task measures by decoding; pass a ValidationTask, not a metric.")
        task = ValidationTask(task.data, metric, getattr(metric, "__name__", "custom metric"), task.ablation_hurts_when)  # all positions
    method = method or task.default_method
    top = scores.top_heads(k)
    if len(top) < k:
        raise ArgumentError(f"The 'k' argument of validate is {k}, but only {len(top)} heads of the {scores.detector} "
                            f"scores have a value (the rest are NaN); pass k <= {len(top)}.")
    draws = random_head_sets(model, exclude=top, k=k, n_draws=n_random, seed=seed)
    if task.measure is not None:
        with progress_step(f"validate {scores.detector}: {len(draws) + 2} decoding runs (clean, top-{k}, "
                           f"{len(draws)} random {k}-sets)", progress):
            values = task.measure(model, [None, top, *draws], method).float().cpu()
    else:
        values = _measure_forward(model, task, [None, top, *draws], method, batch_size, progress, cache,
                                  label=f"validate {scores.detector}: ", skip_layers=skip_layers)
    if not bool(torch.isfinite(values).all()):
        bad = int((~torch.isfinite(values)).sum())
        raise EmptyResultError(
            f"Validating {scores.detector}: {bad} of {values.numel()} metric values are NaN or infinite "
            f"({task.metric_name}); the ablated runs gave no usable measurement. Check the task's data "
            "and the model's logits (run 'headscope info' for the library versions)."
        )
    clean, top_values, random_values = values[0], values[1], values[2:]  # random: [draws, examples]
    low, high = bootstrap_difference_ci(clean, top_values, random_values, n_bootstrap, seed)
    random_means = (random_values.mean(dim=1)).tolist()
    return ValidationResult(
        detector=scores.detector,
        model=scores.model,
        metric_name=task.metric_name,
        method=method,
        k=k,
        top_heads=[str(h) for h in top],
        random_heads=[[str(h) for h in draw] for draw in draws],
        clean=float(clean.mean()),
        top_k=float(top_values.mean()),
        random_k=float(random_values.mean()),
        random_k_per_draw=random_means,
        difference=float((top_values - random_values.mean(dim=0)).mean()),
        ci_low=low,
        ci_high=high,
        n_examples=int(clean.numel()),
        ablation_hurts_when=task.ablation_hurts_when,
    )


def check_counts(model: Any, k: Any, n_random: Any) -> None:
    """``k`` heads ablated and ``n_random`` random sets: what the comparison needs (the atlas
    checks them before any detector runs).

    Raises:
        ArgumentError: ``k`` below 1 or above ``(heads - 1) // 2``; ``n_random`` below 2.
    """
    n_heads = model_shape(model).n_total_heads
    largest = (n_heads - 1) // 2  # the random k-sets are drawn from more than k heads outside the top k
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= largest:
        raise ArgumentError(
            f"The 'k' argument of validate must be an integer from 1 to {largest} for this model's {n_heads} heads "
            f"(the top k are compared with random k-sets drawn from the other {n_heads} - k heads, which must be "
            f"more than k); got {k!r}.")
    if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 2:
        raise ArgumentError(f"The 'n_random' argument of validate must be an integer >= 2 (the interval counts the "
                            f"spread between random sets; 5 is the default); got {n_random!r}.")


PREFIX_METHODS = ("zero", "mean", "uniform")  # act only at the ablated heads' own layers, by stateless hooks
PREFIX_MEMORY = 2 * 2**30  # bytes of clean residual streams kept to start the ablated runs mid-model


def _measure_forward(
    model: Any,
    task: ValidationTask,
    head_sets: list[Optional[list[Head]]],
    method: str,
    batch_size: Optional[int],
    progress: Optional[bool],
    cache: Optional[dict] = None,
    label: str = "",
    skip_layers: bool = True,
) -> Float[Tensor, "sets examples"]:
    """The task's per-example metric in one batched forward run per head set: ``[clean, top-k,
    random sets...]`` as ``validate`` passes them (``label`` starts each progress line).

    Less work, same numbers: ablating heads of layers ``>= l`` leaves the residual stream entering
    layer ``l`` as it is in the clean run, so the clean run keeps it at each set's lowest ablated
    layer (within ``PREFIX_MEMORY``) and each ablated run starts there (``engine.partial``;
    ``skip_layers=False``: full runs); the same clean run sums the head outputs for mean ablation
    (one pass, not two). Chunks are the same in every run (unless one runs out of CUDA memory and
    is halved: rows are then matched by their index, positions by the chunk's width)."""
    if head_sets[0] is not None or not all(head_sets[1:]):
        raise ValueError("_measure_forward takes [None (clean), then one or more non-empty head sets].")
    data = as_token_batch(model, task.data)
    size = batch_size or auto_batch_size(model, data.tokens.shape[1])
    logits = "last" if task.last_position else "all"
    shared = _Shared(cache, model, data, task)
    ablated = [[Head.parse(h) for h in heads] for heads in head_sets if heads]
    starts = [min(h.layer for h in heads) for heads in ablated]
    keep = _layers_to_keep(model, data, starts) if skip_layers and method in PREFIX_METHODS else []
    mean_layers: list[int] = []
    if method == "mean" and ablated and shared.means is None:
        mean_layers = list(range(model_shape(model).n_layers)) if cache is not None else sorted(
            {h.layer for heads in ablated for h in heads})  # with a cache: every layer, for any later task
    desc = f"{label}clean" + (" and mean head outputs" if mean_layers else "")
    clean, means, residuals = _clean_sweep(model, data, task, size, logits, mean_layers, keep,
                                           shared.clean is None, progress, desc)
    shared.store(clean, means)
    reduce = lambda logits, cache, chunk: task.metric(logits, chunk).float().cpu()  # noqa: E731
    rows = [shared.clean]  # head_sets[0] is the clean run
    for index, (heads, lowest) in enumerate(zip(head_sets[1:], starts, strict=True), start=1):
        what = f"top-{len(heads)}" if index == 1 else f"random {len(heads)}-set {index - 1}/{len(head_sets) - 2}"
        start = max((layer for layer in keep if layer <= lowest), default=None)
        with ablate(model, heads, method=method, reference=data, batch_size=batch_size, means=shared.means,
                    progress=progress):
            rows.append(run_batched(model, data, reduce, batch_size=size, progress=progress,
                                    desc=f"{label}{what} ablated", logits=logits,
                                    start_at=None if start is None else (start, residuals[start])))
    return torch.stack(rows)


class _Shared:
    """The clean metric and the head-output means of a task's tokens, from the ``validate`` cache
    shared across calls when there is one (keyed by the model's identity and the tokens; the clean
    metric only when the metric can be identified, ``headscope.identity.metric_identity``)."""

    def __init__(self, cache: Optional[dict], model: Any, data: Any, task: ValidationTask) -> None:
        self.cache = cache
        identity = model_identity(model) if cache is not None else None
        data_key = _tokens_key(data)
        metric_key = metric_identity(task.metric)  # None: the metric cannot be identified, never cached
        self.means_key = ("means", identity, data_key)
        self.clean_key = None if metric_key is None else ("clean", identity, data_key, metric_key, task.last_position)
        self.means = self._get(self.means_key)
        self.clean = self._get(self.clean_key)

    def _get(self, key: Optional[tuple]) -> Any:
        return None if self.cache is None or key is None else self.cache.get(key)

    def store(self, clean: Optional[Tensor], means: Optional[dict[int, Tensor]]) -> None:
        """Keep what a clean pass computed, here and in the shared cache."""
        if clean is not None:
            self.clean = self._put(self.clean_key, clean)
        if means is not None:
            self.means = self._put(self.means_key, means)

    def _put(self, key: Optional[tuple], value: Any) -> Any:
        if self.cache is not None and key is not None:
            self.cache[key] = value
        return value


def _layers_to_keep(model: Any, data: Any, starts: list[int]) -> list[int]:
    """The layers whose clean residual stream is kept: each set's lowest ablated layer (none at 0,
    where nothing is skipped), as many as ``PREFIX_MEMORY`` holds, those that skip most first; none
    for a model that cannot be run from a layer (``check_forward_from_layer``)."""
    candidates = sorted({layer for layer in starts if layer > 0})
    if not candidates or not _runs_from_layer(model, data):
        return []
    shape = model_shape(model)
    one_layer = data.tokens.numel() * shape.d_model * torch.finfo(model_dtype(model)).bits // 8
    fits = PREFIX_MEMORY // max(one_layer, 1)
    ranked = sorted(candidates, key=lambda layer: -layer * starts.count(layer))
    return sorted(ranked[:fits])


def _runs_from_layer(model: Any, data: Any) -> bool:
    first = data.select(slice(0, 2)).to(model_device(model))
    mask = first.forward_mask
    try:
        check_forward_from_layer(model, first.tokens, mask)
    except UnsupportedModelError:
        return False
    return True


def _clean_sweep(
    model: Any, data: Any, task: ValidationTask, size: int, logits: str, mean_layers: list[int], keep: list[int],
    clean_needed: bool, progress: Optional[bool], desc: str,
) -> tuple[Optional[Tensor], Optional[dict[int, Tensor]], dict[int, Tensor]]:
    """One clean pass over the task's tokens for whatever is still missing: the metric, the sums
    for the head-output means of ``mean_layers``, the residual streams entering ``keep``."""
    if not clean_needed and not mean_layers:
        return None, None, _clean_residuals(model, data, size, keep, progress)
    sums_of = output_mean_hooks(mean_layers)
    names = sums_of + [resid_pre_name(layer) for layer in keep]
    width = data.tokens.shape[1]

    def reduce(logits: Tensor, cache: dict, chunk: Any) -> dict[str, Tensor]:
        out = head_output_sums(cache, chunk, sums_of) if mean_layers else {}
        out.update({resid_pre_name(layer): _full_width(cache[resid_pre_name(layer)], width) for layer in keep})
        if clean_needed:
            out["metric"] = task.metric(logits, chunk).float().cpu()
        return out

    swept = run_batched(model, data, reduce, names, batch_size=size, progress=progress, desc=desc, logits=logits)
    means = means_from_sums(swept, mean_layers) if mean_layers else None
    return swept.get("metric"), means, {layer: swept[resid_pre_name(layer)] for layer in keep}


def _clean_residuals(model: Any, data: Any, size: int, keep: list[int], progress: Optional[bool]) -> dict[int, Tensor]:
    """The residual streams entering ``keep``, each chunk's run stopped after the highest."""
    if not keep:
        return {}
    names = [resid_pre_name(layer) for layer in keep]
    stop = max(keep) + 1 if max(keep) + 1 < model_shape(model).n_layers else None
    device = model_device(model)

    def run(rows: slice) -> dict[str, Tensor]:
        chunk = data.select(rows).to(device)
        mask = chunk.forward_mask
        _output, found = model.run_with_cache(chunk.tokens, attention_mask=mask, names_filter=names,
                                              stop_at_layer=stop, return_cache_object=False)
        return {name: _full_width(found[name], data.tokens.shape[1]) for name in names}

    with torch.no_grad():
        parts = Halving("clean residual streams", progress=progress).map(len(data), size, run)
    return {layer: torch.cat([part[name] for part in parts]) for layer, name in zip(keep, names, strict=True)}


def _full_width(residual: Float[Tensor, "rows pos d_model"], width: int) -> Float[Tensor, "rows width d_model"]:
    """A chunk's residual stream padded with zeros to the data's width (a chunk is as wide as its
    longest row; the chunks are concatenated, and each run reads back its own width)."""
    return torch.nn.functional.pad(residual, (0, 0, 0, width - residual.shape[1]))


def _tokens_key(data: Any) -> str:
    """A digest of a batch's tokens and mask (tasks on the same tokens share runs)."""
    digest = hashlib.sha1(data.tokens.cpu().numpy().tobytes())
    digest.update(data.attention_mask.cpu().numpy().tobytes())
    return f"{tuple(data.tokens.shape)}:{digest.hexdigest()}"
