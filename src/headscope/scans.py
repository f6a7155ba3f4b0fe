"""Per-head ablation effects for every head: exact and fast (``ablation_scan``), or first-order
(``attribution_scan``).

``ablation_scan`` gives, for each head, the mean over examples of
``metric(ablated logits) - metric(clean logits)``, the same numbers as one full forward pass per
head under ``hs.ablate`` (tested against that naive loop), with less work:

* the clean run is done once per chunk of examples, caching the residual stream entering each
  layer; a head of layer ``l`` is then run from layer ``l`` on (``engine.partial``);
* several heads of one layer run as one batch: the chunk is repeated once per head and copy
  ``g`` ablates head ``g`` through a single indexed assignment (no Python loop over heads);
* the group size follows a memory budget and halves on CUDA out-of-memory, keeping every
  finished group; at one head per group, the chunk's examples halve (``engine.runner.Halving``);
  results stay on the device until the end;
* an optional checkpoint file is written after each (chunk, layer) unit, so an interrupted
  scan resumes where it stopped.

``attribution_scan`` estimates the same effects from one forward and one backward pass per chunk:
``sum over positions of grad(metric) . (a_ablated - a_clean)`` at each head's ``hook_z`` (or
``hook_q`` for uniform attention), the attribution-patching approximation.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import einops
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from headscope.engine.architecture import head_hook
from headscope.engine.devices import layer_device, output_device
from headscope.engine.heads import Head, all_heads, check_heads, heads_by_layer, model_shape
from headscope.engine.partial import check_forward_from_layer, forward_from_layer, resid_pre_name
from headscope.engine.runner import (Halving, auto_batch_size, bar_disabled, last_position_states, model_device,
                                     progress_note, run_batched)
from headscope.engine.tokens import TokenBatch, as_token_batch, iter_batches
from headscope.errors import ArgumentError, IdentityMismatchError, InputError, ResultFileError
from headscope.files import atomic_torch_save
from headscope.identity import ModelIdentity, metric_identity, model_identity, tensor_digest
from headscope.interventions import DEFAULT_UNIFORM_EPSILON, ablate, head_output_means
from headscope.models import model_name
from headscope.results import HeadScores

ScanMetric = Callable[[Float[Tensor, "batch pos vocab"], TokenBatch], Float[Tensor, " batch"]]
# read(run, chunk): what a scan keeps of one run (``run()`` does the forward pass; ``chunk`` is the
# un-repeated batch, whose rows a run repeats once per ablated head).
Reader = Callable[[Callable[[], Tensor], TokenBatch], Tensor]
SCAN_METHODS = ("zero", "mean", "resample", "uniform", "scale")
RESAMPLE_CHUNKS = ("resample ablation takes each head's output from the next example of the same chunk, so a chunk "
                   "cannot be split; pass a smaller batch_size (at least 2)")


def ablation_scan(
    model: Any,
    tokens: Any,
    metric: ScanMetric,
    method: str = "zero",
    heads: Optional[Sequence[Any]] = None,
    batch_size: Optional[int] = None,
    reference: Any = None,
    factor: Optional[float] = None,
    skip_layers: bool = True,
    checkpoint: Optional[Union[str, Path]] = None,
    progress: Optional[bool] = None,
    positions: Optional[Sequence[int]] = None,
) -> HeadScores:
    """Exact per-head ablation effects: ``values[l, h] = mean_examples(metric(ablated) - metric(clean))``.

    Args:
        tokens: prompts, a token tensor, id lists or a ``TokenBatch``.
        metric: ``metric(logits, batch) -> [batch]``; ``batch.tokens`` and ``batch.attention_mask``
            are the (repeated) inputs the logits came from.
        method: ``"zero"``, ``"mean"`` (mean head output over ``reference``, default the scanned
            data itself), ``"resample"`` (output from the next example of the same chunk),
            ``"uniform"`` (pre-RoPE query x ``factor``, default 1e-5) or ``"scale"`` (output x
            ``factor``).
        heads: heads to scan (default all); the others are NaN.
        batch_size: examples per chunk (default from memory).
        skip_layers: run each head's layer onwards only (False: a full forward per head group).
        checkpoint: a file to save progress to and resume from. It records the model's
            identity (``headscope.identity``): a checkpoint of another model or other weights is
            refused (``IdentityMismatchError``). The metric needs a ``cache_key`` attribute (a
            string that changes whenever what it computes changes): a function's name does not
            say which metric a saved scan measured.
        positions: the positions whose logits ``metric`` reads (default all). The unembedding
            is then computed only there and the logits elsewhere are zero: on a large vocabulary
            the unembedding is a large share of each run.
    """
    _check_method(method, factor)
    metric_key = _checkpointed_metric(metric, checkpoint, "ablation_scan")  # before any work
    batch = as_token_batch(model, tokens)
    selected = _scanned_heads(model, heads)
    shape = model_shape(model)
    device = model_device(model)
    chunk_size = batch_size or auto_batch_size(model, batch.tokens.shape[1])
    if method == "resample" and (len(batch) < 2 or chunk_size < 2 or len(batch) % chunk_size == 1):
        raise InputError(
            "Resample ablation takes each head's output from the next example of the same chunk, so "
            "every chunk needs at least 2 examples; change batch_size or the number of examples."
        )
    identity = model_identity(model) if checkpoint is not None else None
    saved = _read_checkpoint(checkpoint, identity)  # another model's is refused before any work
    means = _means_for(model, method, selected, batch if reference is None else reference, chunk_size, progress)
    read = _logits_reader(model, positions)
    signature = _signature(batch, (metric_key, method, factor, chunk_size, positions), selected, means)
    fresh = {"signature": signature, "identity": _identity_record(identity), "done": [],
             "sums": torch.zeros(shape.n_layers, shape.n_heads), "counts": torch.zeros(shape.n_layers, shape.n_heads)}
    state = _resumed(saved, fresh, checkpoint, progress)
    sums, counts = state["sums"].to(device), state["counts"].to(device)
    layer_heads = heads_by_layer(selected)
    done = {tuple(unit) for unit in state["done"]}
    n_units = -(-len(batch) // chunk_size) * len(layer_heads)
    disable = bar_disabled(progress)
    rows_halving, heads_halving = _halvings("ablation scan", method, progress)
    with torch.no_grad(), tqdm(total=n_units - len(done), desc="ablation scan", unit="layer", disable=disable) as bar:
        for index, (_rows, chunk) in enumerate(iter_batches(batch, chunk_size)):
            layers = [layer for layer in layer_heads if (index, layer) not in done]
            if not layers:
                continue
            cleans = CleanRuns(model, chunk.to(device), layers, skip_layers, read)
            for layer in layers:

                def effects_of(span: slice, layer: int = layer) -> Tensor:
                    sub, clean, residuals = cleans.of(span)
                    return _layer_effects(model, sub, clean, residuals.get(layer), layer, layer_heads[layer], metric,
                                          method, factor, means, skip_layers, read, heads_halving)

                effects = torch.cat(rows_halving.map(len(chunk), len(chunk), effects_of), dim=1)
                sums[layer, layer_heads[layer]] += effects.sum(dim=1).to(device)  # logits: the last layer's device
                counts[layer, layer_heads[layer]] += effects.shape[1]
                state["done"].append([index, layer])
                _save_checkpoint(checkpoint, dict(state, sums=sums.cpu(), counts=counts.cpu()))
                bar.update(1)
    values = (sums / counts).float().cpu()
    return HeadScores(
        values=values,
        detector=f"ablation_scan:{method}",
        model=model_name(model),
        config={"method": method, "factor": factor, "metric": _metric_name(metric), "n_heads_scanned": len(selected)},
        metadata={"n_examples": len(batch), "nan": "heads not scanned" if len(selected) < shape.n_total_heads else None},
    )


@dataclass
class ReadoutScan:
    """Final normalised hidden states at each example's last position, clean and per ablated head.

    ``clean[n]`` is example ``n``'s state (the unembedding's input); ``ablated[l, h, n]`` the same
    with head ``(l, h)`` ablated (NaN for heads not scanned). ``logits()`` maps states through the
    unembedding.
    """

    clean: Float[Tensor, "examples d_model"]
    ablated: Float[Tensor, "layers heads examples d_model"]
    heads: list[Head]
    method: str
    factor: Optional[float]

    def logits(self, model: Any, states: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch d_vocab"]:
        """Logits of states of shape ``[..., d_model]`` (the unembedding, chunked)."""
        flat, batch_shape = einops.pack([states], "* d_model")
        with torch.no_grad():
            out = torch.cat([model.unembed(part.to(output_device(model))[:, None])[:, 0].float().cpu()
                             for part in flat.split(256)])
        return einops.unpack(out, batch_shape, "* d_vocab")[0]


def readout_scan(
    model: Any,
    tokens: Any,
    method: str = "uniform",
    heads: Optional[Sequence[Any]] = None,
    factor: Optional[float] = None,
    batch_size: Optional[int] = None,
    background: Optional[Callable[[Any], Any]] = None,
    skip_layers: bool = True,
    checkpoint: Optional[Union[str, Path]] = None,
    progress: Optional[bool] = None,
) -> ReadoutScan:
    """Every example's last-position final state with each head ablated in turn: the raw material
    of the sweeps that compare distributions or subspaces rather than average a per-example
    metric (Ships' KL, dataset-level Ships, Sahara).

    Same engine as ``ablation_scan`` (clean run once per chunk, each head's layer onwards only,
    several heads per batched run, checkpointing). ``background``: a context-manager factory
    entered around the whole scan (clean runs included), e.g. the heads a greedy search already
    chose; the clean states are then those of the background alone.
    """
    _check_method(method, factor)
    if background is not None and checkpoint is not None:
        raise InputError("readout_scan cannot checkpoint a scan with a background intervention; drop one of them.")
    batch = as_token_batch(model, tokens)
    selected = _scanned_heads(model, heads)
    shape = model_shape(model)
    chunk_size = batch_size or auto_batch_size(model, batch.tokens.shape[1])
    identity = model_identity(model) if checkpoint is not None else None
    saved = _read_checkpoint(checkpoint, identity)  # another model's is refused before any work
    means = _means_for(model, method, selected, batch, chunk_size, progress)
    signature = _signature(batch, ("readout", method, factor, chunk_size), selected, means)
    fresh = {"signature": signature, "identity": _identity_record(identity), "done": [],
             "clean": torch.zeros(len(batch), shape.d_model),
             "ablated": torch.full((shape.n_layers, shape.n_heads, len(batch), shape.d_model), math.nan)}
    state = _resumed(saved, fresh, checkpoint, progress)
    layer_heads = heads_by_layer(selected)
    done = {tuple(unit) for unit in state["done"]}
    read = lambda run, chunk: last_position_states(model, chunk, run)  # noqa: E731
    disable = bar_disabled(progress)
    n_units = -(-len(batch) // chunk_size) * len(layer_heads)
    outer = background(model) if background is not None else contextlib.nullcontext()
    rows_halving, heads_halving = _halvings("readout scan", method, progress)
    with torch.no_grad(), outer, tqdm(total=n_units - len(done), desc="readout scan", unit="layer", disable=disable) as bar:
        for index, (rows, chunk) in enumerate(iter_batches(batch, chunk_size)):
            layers = [layer for layer in layer_heads if (index, layer) not in done]
            if not layers:
                continue
            cleans = CleanRuns(model, chunk.to(model_device(model)), layers, skip_layers, read)
            for layer in layers:

                def states_of(span: slice, layer: int = layer) -> Tensor:
                    sub, _clean, residuals = cleans.of(span)
                    return _layer_states(model, sub, residuals.get(layer), layer, layer_heads[layer], method, factor,
                                         means, skip_layers, read, heads_halving)

                head_index = torch.tensor(layer_heads[layer])
                state["ablated"][layer, head_index, rows] = torch.cat(rows_halving.map(len(chunk), len(chunk), states_of),
                                                                      dim=1)
                state["clean"][rows] = cleans.clean().float().cpu()
                state["done"].append([index, layer])
                _save_checkpoint(checkpoint, state)
                bar.update(1)
    return ReadoutScan(state["clean"], state["ablated"], selected, method, factor)


def _layer_states(
    model, chunk, residual, layer, layer_heads, method, factor, means, skip_layers, read, halving
) -> Float[Tensor, "n_heads_in_layer batch d_model"]:
    """Last-position final states of the chunk with each listed head of one layer ablated."""

    def states(heads: list[int]) -> Tensor:
        out, _ = _run_group(model, chunk, residual, layer, heads, method, factor, means, skip_layers, read)
        return einops.rearrange(out.float().cpu(), "(copies batch) d_model -> copies batch d_model",
                                copies=len(heads), batch=len(chunk))

    return torch.cat(_in_groups(model, chunk, layer_heads, states, halving))


def _scanned_heads(model: Any, heads: Optional[Sequence[Any]]) -> list[Head]:
    """Every head (``heads=None``) or the checked list, which must not be empty."""
    if heads is None:
        return all_heads(model)
    selected = check_heads(model, heads)
    if not selected:
        raise ArgumentError("The 'heads' argument of the scan is empty, so nothing would be scanned; pass None for "
                            "every head or at least one head, e.g. [(0, 1)].")
    return selected


def _check_method(method: str, factor: Optional[float]) -> None:
    if method not in SCAN_METHODS:
        raise ArgumentError(f"Unknown ablation method {method!r}; choose one of {', '.join(SCAN_METHODS)}.")
    if method == "scale" and factor is None:
        raise ArgumentError("method='scale' needs factor=... (the multiplier of the head's output).")
    if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float))):
        raise ArgumentError(f"The 'factor' parameter of the scan must be a number; got {factor!r}.")
    if factor is not None and not math.isfinite(float(factor)):
        raise ArgumentError(f"The 'factor' parameter of the scan must be a finite number; got {factor!r}.")
    if method == "uniform" and factor is not None and float(factor) <= 0:
        raise ArgumentError(f"The 'factor' parameter of a uniform-attention scan scales queries and must be a small "
                            f"positive number; got {factor!r}. Leave it out for the default {DEFAULT_UNIFORM_EPSILON}.")


def _means_for(model, method, heads, reference, batch_size, progress: Optional[bool] = None) -> dict[int, Tensor]:
    if method != "mean":
        return {}
    return head_output_means(model, {h.layer for h in heads}, reference, batch_size, progress)


def _clean_run(
    model: Any, chunk: TokenBatch, layers: list[int], skip_layers: bool, read: Reader
) -> tuple[Tensor, dict[int, Tensor]]:
    """``read(run)`` of the chunk's clean forward, and the residual stream entering each listed layer."""
    mask = chunk.forward_mask
    if skip_layers:
        check_forward_from_layer(model, chunk.tokens, mask)
    names = [resid_pre_name(layer) for layer in layers] if skip_layers else []
    cache: dict = {}

    def run() -> Tensor:
        logits, found = model.run_with_cache(chunk.tokens, attention_mask=mask, names_filter=names, return_cache_object=False)
        cache.update(found)
        return logits

    output = read(run, chunk)
    return output, {layer: cache[resid_pre_name(layer)] for layer in layers if skip_layers}


def _logits_reader(model: Any, positions: Optional[Sequence[int]]) -> Reader:
    return lambda run, chunk: _logits_at(model, run, positions, chunk.tokens.shape[1])


def _logits_at(model: Any, run: Callable[[], Tensor], positions: Optional[Sequence[int]], width: int) -> Tensor:
    """``run()``'s logits, computing the unembedding only at ``positions`` (zeros elsewhere)."""
    if positions is None:
        return run()
    index = torch.as_tensor(list(positions), dtype=torch.long, device=output_device(model))
    with model.hooks(fwd_hooks=[("unembed.hook_in", lambda residual, hook: residual[:, index.to(residual.device)])]):
        selected = run()
    logits = selected.new_zeros(selected.shape[0], width, selected.shape[-1])
    logits[:, index.to(selected.device)] = selected
    return logits


def _layer_effects(
    model, chunk, clean_logits, residual, layer, layer_heads, metric, method, factor, means, skip_layers, read, halving
) -> Float[Tensor, "n_heads_in_layer batch"]:
    """metric(ablated) - metric(clean) for each listed head of one layer, per example."""
    clean_metric = metric(clean_logits, chunk).float()
    rows = chunk.tokens.shape[0]

    def effects(heads: list[int]) -> Tensor:
        logits, repeated = _run_group(model, chunk, residual, layer, heads, method, factor, means, skip_layers, read)
        per_copy = einops.rearrange(metric(logits, repeated).float(), "(copies batch) -> copies batch",
                                    copies=len(heads), batch=rows)
        return per_copy - clean_metric[None]

    return torch.cat(_in_groups(model, chunk, layer_heads, effects, halving))


def _in_groups(
    model: Any, chunk: TokenBatch, layer_heads: list[int], run: Callable[[list[int]], Tensor], halving: Halving
) -> list[Tensor]:
    """``run(heads)`` over groups of heads sized to the memory budget; a group that runs out of
    CUDA memory is retried at half the size (``halving``, shared by the whole scan), keeping every
    finished group."""
    return halving.map(len(layer_heads), _group_size(model, *chunk.tokens.shape), lambda span: run(layer_heads[span]))


def _halvings(desc: str, method: str, progress: Optional[bool]) -> tuple[Halving, Halving]:
    """A scan's two chunk sizes that halve on CUDA out-of-memory: examples per run (outer; fixed
    for resample ablation, which reads the chunk's other examples) and heads per batched run
    (inner; at one head, the examples halve)."""
    fixed = RESAMPLE_CHUNKS if method == "resample" else None
    return Halving(desc, "examples", progress, fixed=fixed), Halving(desc, "heads", progress)


class CleanRuns:
    """The clean run of a chunk, or of each row slice of it once a scan halved its rows: computed
    once per slice and kept while that slicing holds (a slice overlapping a new one is dropped)."""

    def __init__(self, model: Any, chunk: TokenBatch, layers: list[int], skip_layers: bool, read: Reader) -> None:
        self.model, self.chunk, self.layers, self.skip_layers, self.read = model, chunk, layers, skip_layers, read
        self.runs: dict[tuple[int, int], tuple[TokenBatch, Tensor, dict[int, Tensor]]] = {}

    def of(self, span: slice) -> tuple[TokenBatch, Tensor, dict[int, Tensor]]:
        """``(rows, read output of their clean run, residual entering each layer)`` for ``span``."""
        key = (span.start, span.stop)
        if key not in self.runs:
            for old in [old for old in self.runs if old[0] < key[1] and key[0] < old[1]]:
                del self.runs[old]
            sub = self.chunk if key == (0, len(self.chunk)) else self.chunk.select(span)
            self.runs[key] = (sub, *_clean_run(self.model, sub, self.layers, self.skip_layers, self.read))
        return self.runs[key]

    def clean(self) -> Tensor:
        """The read output of the clean run of every row, in order (the slices held tile the chunk)."""
        return torch.cat([self.runs[key][1] for key in sorted(self.runs)])


def _group_size(model: Any, rows: int, width: int) -> int:
    """Heads per batched run: as many chunk copies as the memory budget allows."""
    return max(1, auto_batch_size(model, width) // rows)


def _run_group(model, chunk, residual, layer, heads, method, factor, means, skip_layers, read) -> tuple[Tensor, TokenBatch]:
    """One batched run where copy g of the chunk ablates ``heads[g]``: ``read``'s output (rows in
    copy-major order) and the repeated batch it came from."""
    copies = len(heads)
    repeated = TokenBatch(chunk.tokens.repeat(copies, 1), chunk.attention_mask.repeat(copies, 1))
    mask = repeated.forward_mask
    name, heads_view = head_hook(model, layer, "q" if method == "uniform" else "z")
    hook = _batched_ablation_hook(heads, chunk.tokens.shape[0], method, factor, means.get(layer),
                                  layer_device(model, layer), heads_view)

    def run() -> Tensor:
        if skip_layers:
            return forward_from_layer(model, residual.repeat(copies, 1, 1), layer, mask)
        return model(repeated.tokens, attention_mask=mask)

    with model.hooks(fwd_hooks=[(name, hook)]):
        return read(run, chunk), repeated


def _batched_ablation_hook(
    heads: list[int], rows: int, method: str, factor: Optional[float], mean: Optional[Tensor], device: torch.device,
    heads_view: Callable[[Tensor], Tensor],
):
    """A hook that edits head ``heads[g]`` in copy ``g`` of ``[copies*rows, ...]`` (``heads_view``
    gives the activation's ``[batch, pos, n_heads, d_head]`` view). Index tensors live on the
    layer's device: no host-device copy inside the run."""
    copy_index = torch.arange(len(heads), device=device)
    head_index = torch.tensor(heads, device=device)
    mean = None if mean is None else mean.to(device)
    scale = DEFAULT_UNIFORM_EPSILON if method == "uniform" and factor is None else (0.0 if method == "zero" else factor)

    def hook(activation: Tensor, hook: Any) -> Tensor:
        out = activation.clone()
        per_head = heads_view(out)
        # a view (splitting an axis never copies), so the assignment below edits ``out``
        view = einops.rearrange(per_head, "(copies batch) pos n_heads d_head -> copies batch pos n_heads d_head",
                                copies=len(heads), batch=rows)
        copies, chosen_heads = copy_index.to(out.device), head_index.to(out.device)  # no-ops on the layer's device
        chosen = view[copies, :, :, chosen_heads]  # [copies, batch, pos, d_head]
        if method == "mean":
            replacement = mean[chosen_heads].to(view)[:, None, None, :].expand_as(chosen)
        elif method == "resample":
            replacement = chosen.roll(1, dims=1)
        else:  # zero, scale, uniform (query x epsilon)
            replacement = chosen * scale
        view[copies, :, :, chosen_heads] = replacement
        return out

    return hook


def naive_ablation_scan(
    model: Any,
    tokens: Any,
    metric: ScanMetric,
    method: str = "zero",
    heads: Optional[Sequence[Any]] = None,
    batch_size: Optional[int] = None,
    reference: Any = None,
    factor: Optional[float] = None,
    progress: Optional[bool] = None,
) -> HeadScores:
    """The reference loop: one full forward pass per head under ``hs.ablate`` / ``hs.scale_*``.

    Slow on purpose; ``ablation_scan`` must give the same numbers. Kept for tests and benchmarks.
    """
    from headscope.interventions import scale_output, scale_query

    _check_method(method, factor)
    batch = as_token_batch(model, tokens)
    selected = _scanned_heads(model, heads)
    size = batch_size or auto_batch_size(model, batch.tokens.shape[1])
    reference = batch if (method == "mean" and reference is None) else reference
    values = torch.full((model_shape(model).n_layers, model_shape(model).n_heads), math.nan)

    def run() -> Tensor:
        return run_batched(model, batch, lambda logits, cache, chunk: metric(logits, chunk).float(), batch_size=size)

    clean = run()
    for head in tqdm(selected, desc="naive scan", disable=bar_disabled(progress)):
        if method == "scale":
            context = scale_output(model, [head], factor)
        elif method == "uniform" and factor is not None:
            context = scale_query(model, [head], factor)
        else:
            context = ablate(model, [head], method=method, reference=reference, batch_size=size, progress=False)
        with context:
            values[head.layer, head.head] = float((run() - clean).mean())
    return HeadScores(values=values, detector=f"naive_ablation_scan:{method}", model=model_name(model),
                      config={"method": method, "factor": factor, "metric": _metric_name(metric)})


def attribution_scan(
    model: Any,
    tokens: Any,
    metric: ScanMetric,
    method: str = "zero",
    batch_size: Optional[int] = None,
    reference: Any = None,
    factor: Optional[float] = None,
    progress: Optional[bool] = None,
) -> HeadScores:
    """First-order estimate of ``ablation_scan``'s values from one forward and one backward pass
    per chunk: ``mean_examples sum_pos grad_a(metric) . (a_ablated - a)`` with ``a`` each head's
    ``hook_z`` (``hook_q`` for ``"uniform"``). ``"resample"`` uses the next example's activation.
    Parameters get no ``.grad``; the model is unchanged afterwards."""
    _check_method(method, factor)
    batch = as_token_batch(model, tokens)
    shape = model_shape(model)
    size = batch_size or max(1, auto_batch_size(model, batch.tokens.shape[1]) // 2)
    means = _means_for(model, method, all_heads(model), batch if reference is None else reference, size)
    kind = "q" if method == "uniform" else "z"
    scale = {"zero": 0.0, "uniform": DEFAULT_UNIFORM_EPSILON if factor is None else factor, "scale": factor}.get(method)
    totals = torch.zeros(shape.n_layers, shape.n_heads, device=model_device(model))
    halving = Halving("attribution scan", "examples", progress, fixed=RESAMPLE_CHUNKS if method == "resample" else None)
    with tqdm(total=len(batch), desc="attribution scan", unit="example", disable=bar_disabled(progress)) as bar:

        def chunk_totals(span: slice) -> Tensor:
            chunk = batch.select(span).to(model_device(model))
            found = torch.stack([_attribution(grad, _change(clean, method, means.get(layer), scale), chunk).to(totals.device)
                                 for layer, (clean, grad) in enumerate(_activations_and_gradients(model, chunk, kind, metric))])
            bar.update(len(chunk))
            return found

        for part in halving.map(len(batch), size, chunk_totals):
            totals += part
    return HeadScores(
        values=(totals / len(batch)).float().cpu(),
        detector=f"attribution_scan:{method}",
        model=model_name(model),
        config={"method": method, "factor": factor, "metric": _metric_name(metric)},
        metadata={"n_examples": len(batch), "estimate": "first-order (attribution patching)"},
    )


def _change(clean: Tensor, method: str, mean: Optional[Tensor], scale: Optional[float]) -> Tensor:
    """``a_ablated - a`` for each head's activation ``clean`` ``[batch, pos, n_heads, d_head]``."""
    if method == "mean":
        return mean.to(clean)[None, None] - clean
    if method == "resample":
        return clean.roll(1, dims=0) - clean
    return clean * (scale - 1.0)


def _attribution(grad: Tensor, change: Tensor, chunk: TokenBatch) -> Float[Tensor, " n_heads"]:
    """``sum over rows and real positions of grad . change``, per head."""
    valid = einops.rearrange(chunk.attention_mask, "batch pos -> batch pos 1 1").to(change)
    return einops.reduce(grad * change * valid, "batch pos n_heads d_head -> n_heads", "sum")


def _activations_and_gradients(model: Any, chunk: TokenBatch, kind: str, metric: ScanMetric) -> list[tuple[Tensor, Tensor]]:
    """Per layer: the per-head activation of ``kind`` (``engine.architecture.head_hook``) and the
    gradient of ``sum(metric)`` with respect to it, both ``[batch, pos, n_heads, d_head]``. A zero
    tensor requiring grad is added at each hook, so no path is cut and parameters get no ``.grad``."""
    hooks = [head_hook(model, layer, kind) for layer in range(model_shape(model).n_layers)]
    names = [name for name, _ in hooks]
    activations: dict[str, Tensor] = {}
    deltas: dict[str, Tensor] = {}

    def capture(name: str):
        def hook(activation: Tensor, hook: Any) -> Tensor:
            delta = torch.zeros_like(activation, requires_grad=True)  # d metric/d delta = d metric/d a
            activations[name], deltas[name] = activation.detach(), delta
            return activation + delta

        return hook

    mask = chunk.forward_mask
    with torch.enable_grad(), model.hooks(fwd_hooks=[(name, capture(name)) for name in names]):
        total = metric(model(chunk.tokens, attention_mask=mask), chunk).float().sum()
        grads = torch.autograd.grad(total, [deltas[name] for name in names])
    return [(view(activations[name]), view(grad)) for (name, view), grad in zip(hooks, grads, strict=True)]


def _metric_name(metric: Union[Callable, str]) -> str:
    """The metric's name in the results' config (its ``name`` attribute first): a label, not an
    identity (see :func:`headscope.identity.metric_identity`)."""
    return (getattr(metric, "name", None) or getattr(metric, "__qualname__", None) or getattr(metric, "__name__", None)
            or type(metric).__name__)


def _checkpointed_metric(metric: Callable, checkpoint: Optional[Union[str, Path]], caller: str) -> str:
    """The metric's identity for the checkpoint's signature (``""`` without a checkpoint).

    Raises:
        ArgumentError: a checkpoint asked for a metric without a ``cache_key``.
    """
    if checkpoint is None:
        return ""
    key = metric_identity(metric)
    if key is None:
        raise ArgumentError(
            f"{caller}(checkpoint=...) must know which metric a saved scan measured, and the metric "
            f"{_metric_name(metric)!r} has no 'cache_key' (a name does not identify a function: two closures share "
            f"one). Give it a cache_key, a string you change whenever what the metric computes changes, e.g. "
            f"`metric.cache_key = \"mean-loss-v1\"`, or drop checkpoint=.")
    return key


def _identity_record(identity: Optional[ModelIdentity]) -> Optional[dict[str, str]]:
    return identity.to_dict() if identity is not None else None


def _signature(batch: TokenBatch, settings: tuple, heads: list[Head], means: Optional[dict[int, Tensor]]) -> str:
    """What a checkpoint must match to be resumed (the model is checked apart: its identity): the
    inputs, the settings (metric key, method, factor, chunk size: the saved units are (chunk,
    layer) pairs, positions) and the mean outputs a mean ablation writes in."""
    digest = hashlib.sha256()
    digest.update(batch.tokens.cpu().numpy().tobytes())
    digest.update(batch.attention_mask.cpu().numpy().tobytes())
    digest.update(repr((settings, [tuple(h) for h in heads])).encode())
    for layer, mean in sorted((means or {}).items()):
        digest.update(f"means {layer}".encode())
        digest.update(tensor_digest(mean).encode())
    return digest.hexdigest()


def _read_checkpoint(path: Optional[Union[str, Path]], identity: Optional[ModelIdentity]) -> Optional[dict]:
    """The state saved at ``path`` when it is this model identity's, else None (no file, or one
    that does not load or holds no readable identity: named in a warning, the scan starts over
    and overwrites it). The state is tensors, lists, numbers and strings, so it loads with
    ``weights_only=True`` (no pickled code).

    Raises:
        IdentityMismatchError: the checkpoint was written for another model, other weights (also
            this model before a weight edit) or other library versions.
    """
    if path is None or identity is None or not Path(path).is_file():
        return None
    try:
        saved = torch.load(path, weights_only=True)
        if not isinstance(saved, dict):
            raise ResultFileError("not a scan checkpoint")
        identity.check_matches(saved.get("identity"), source=f"The scan checkpoint {path}",
                               fix=f"pass another checkpoint path, or delete {path} to start the scan over")
    except IdentityMismatchError:
        raise
    except Exception as exc:  # noqa: BLE001 - cut off, not a checkpoint, holding other objects, a damaged identity
        warnings.warn(f"The scan checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); starting the scan "
                      "over (it is overwritten as the scan goes).", stacklevel=3)
        return None
    return saved


def _resumed(saved: Optional[dict], fresh: dict, path: Optional[Union[str, Path]], progress: Optional[bool]) -> dict:
    """``saved`` when it is a checkpoint of this very scan (same signature), else ``fresh``: a
    checkpoint of another scan of this model is overwritten as the scan goes."""
    if saved is not None and saved.get("signature") == fresh["signature"]:
        progress_note(f"resumed: {len(saved.get('done', []))} finished (chunk, layer) units from the scan checkpoint "
                      f"{path}", progress)
        return saved
    return fresh


def _save_checkpoint(path: Optional[Union[str, Path]], state: dict) -> None:
    if path is not None:
        atomic_torch_save(path, state)  # never half-written, also with two writers


PatchMetric = Callable[[Float[Tensor, "rows d_vocab"], Tensor], Float[Tensor, " rows"]]
DEFAULT_ROWS_PER_STEP = 64  # patched heads per cached step (one row each); the KV cache is repeated that often


@dataclass
class PatchScan:
    """The metric of each example clean and with one head's last-position output replaced.

    ``clean[n]``: example ``n`` unpatched; ``patched[l, h, n]``: with head ``(l, h)``'s output
    (``hook_z``) at the example's last position set to ``replacements[n, l, h]`` (NaN for heads not
    scanned). ``effects`` is their difference.
    """

    clean: Float[Tensor, " examples"]
    patched: Float[Tensor, "n_layers n_heads examples"]
    heads: list[Head]

    @property
    def effects(self) -> Float[Tensor, "n_layers n_heads examples"]:
        """``patched - clean`` per head and example."""
        return self.patched - self.clean[None, None]


def final_position_patch_scan(
    model: Any,
    tokens: Any,
    replacements: Float[Tensor, "examples n_layers n_heads d_head"],
    metric: PatchMetric,
    *,
    heads: Optional[Sequence[Any]] = None,
    rows_per_step: int = DEFAULT_ROWS_PER_STEP,
    progress: Optional[bool] = None,
) -> PatchScan:
    """Exact per-head activation patching at each example's last position: the metric with head
    ``(l, h)``'s output there set to ``replacements[n, l, h]``, for every head and example.

    The patch changes nothing before the last position (attention is causal), so each example's
    other positions run once, into a KV cache (:class:`headscope.engine.decoding.Prefix`, checked
    once per model against a plain forward), and every patched run is one cached step of the last
    token: ``rows_per_step`` heads at a time, each row of the step patching its own head at its own
    layer. The numbers equal one full forward per head and example with the patch hooked in at the
    last position (tested against that loop).

    Args:
        tokens: prompts, a token tensor, id lists or a ``TokenBatch`` (each row at least 2 tokens).
        replacements: per example, the ``hook_z`` value each head takes at the last position.
        metric: ``metric(logits, examples) -> [rows]`` from the next-token logits ``[rows, d_vocab]``
            of a step and the example index of each row (all rows of a step share one example).
        heads: heads to scan (default all); the others are NaN.
        rows_per_step: patched heads per cached step.

    Returns:
        A :class:`PatchScan` (tensors on the CPU, float32).

    Raises:
        ArgumentError: ``replacements`` of the wrong shape, or ``rows_per_step`` below 1.
    """
    from headscope.engine.decoding import Prefix

    batch = as_token_batch(model, tokens)
    selected = _scanned_heads(model, heads)
    shape = model_shape(model)
    _check_replacements(model, batch, replacements, "final_position_patch_scan")
    if isinstance(rows_per_step, bool) or not isinstance(rows_per_step, int) or rows_per_step < 1:
        raise ArgumentError(f"The 'rows_per_step' argument of final_position_patch_scan must be a positive integer; "
                            f"got {rows_per_step!r}.")
    clean = torch.zeros(len(batch))
    patched = torch.full((shape.n_layers, shape.n_heads, len(batch)), math.nan)
    groups = [selected[start: start + rows_per_step] for start in range(0, len(selected), rows_per_step)]
    with torch.no_grad():
        for example in tqdm(range(len(batch)), desc="last-position patch scan", disable=bar_disabled(progress)):
            prefix = Prefix(model, batch.tokens[example, : int(batch.lengths[example])])
            clean[example] = _patched_step(model, prefix, example, [[]], replacements, metric)[0]
            for group in groups:
                values = _patched_step(model, prefix, example, [[h] for h in group], replacements, metric)
                patched[[h.layer for h in group], [h.head for h in group], example] = values
    return PatchScan(clean, patched, selected)


def final_position_patch_sets(
    model: Any,
    tokens: Any,
    replacements: Float[Tensor, "examples n_layers n_heads d_head"],
    metric: PatchMetric,
    head_sets: Sequence[Optional[Sequence[Any]]],
    *,
    progress: Optional[bool] = None,
) -> Float[Tensor, "sets examples"]:
    """The metric of each example with every head of ``head_sets[i]`` patched together at the last
    position (``replacements[n, l, h]``, as in :func:`final_position_patch_scan`; ``None`` or an
    empty set: unpatched): one cached step per example, one row per set.

    Raises:
        ArgumentError: ``replacements`` of the wrong shape, or no head set.
    """
    from headscope.engine.decoding import Prefix

    batch = as_token_batch(model, tokens)
    _check_replacements(model, batch, replacements, "final_position_patch_sets")
    if len(head_sets) == 0:
        raise ArgumentError("The 'head_sets' argument of final_position_patch_sets is empty; pass at least one head "
                            "set (None for the unpatched run).")
    rows = [check_heads(model, heads) if heads else [] for heads in head_sets]
    out = torch.zeros(len(rows), len(batch))
    with torch.no_grad():
        for example in tqdm(range(len(batch)), desc="last-position patches", disable=bar_disabled(progress)):
            prefix = Prefix(model, batch.tokens[example, : int(batch.lengths[example])])
            out[:, example] = _patched_step(model, prefix, example, rows, replacements, metric)
    return out


def _check_replacements(model: Any, batch: TokenBatch, replacements: Tensor, caller: str) -> None:
    shape = model_shape(model)
    expected = (len(batch), shape.n_layers, shape.n_heads, shape.d_head)
    if tuple(replacements.shape) != expected:
        raise ArgumentError(f"The 'replacements' argument of {caller} must have shape [examples, n_layers, n_heads, "
                            f"d_head] = {list(expected)}; got {list(replacements.shape)}.")


def _patched_step(
    model: Any, prefix: Any, example: int, row_heads: list[list[Head]], replacements: Tensor, metric: PatchMetric
) -> Float[Tensor, " rows"]:
    """``metric`` of one cached step of the example's last token, row ``r`` patching every head
    of ``row_heads[r]`` (an empty list: no patch); the cache is rewound afterwards."""
    from headscope.engine.kv_cache import cache_kwarg_alias

    device = model_device(model)
    patches = [(row, h) for row, heads in enumerate(row_heads) for h in heads]
    hooks = []
    for layer in sorted({h.layer for _, h in patches}):
        at_layer = [(row, h.head) for row, h in patches if h.layer == layer]
        row_index = torch.tensor([row for row, _ in at_layer], device=device)
        head_index = torch.tensor([head for _, head in at_layer])
        values = replacements[example, layer, head_index].to(device)  # [patches at layer, d_head]
        name, heads_view = head_hook(model, layer, "z")
        hooks.append((name, _last_position_patch(heads_view, row_index, head_index.to(device), values)))
    rows = len(row_heads)
    prefix.expand(rows)
    try:
        with cache_kwarg_alias(model), model.hooks(fwd_hooks=hooks):
            logits, _ = model(prefix.last_tokens(rows), return_type="logits_and_cache", past_key_values=prefix.cache)
    finally:
        prefix.rewind()
    examples = torch.full((rows,), example, dtype=torch.long, device=logits.device)
    return metric(logits[:, -1], examples).float().cpu()


def _last_position_patch(heads_view: Callable[[Tensor], Tensor], rows: Tensor, heads: Tensor, values: Tensor):
    """A hook setting head ``heads[i]`` of batch row ``rows[i]`` to ``values[i]`` at the last position."""

    def hook(activation: Tensor, hook: Any) -> Tensor:
        out = activation.clone()
        view = heads_view(out)  # [rows, pos, n_heads, d_head], a view of ``out``
        view[rows.to(out.device), -1, heads.to(out.device)] = values.to(view)
        return out

    return hook
