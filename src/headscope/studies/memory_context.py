"""Memory and context head studies — Yu, Merullo, Pavlick 2023; Jin et al. 2024: workflows on
the ``memory_context`` detector's heads (``headscope.detectors.memory_context``).

``sweep`` (answer rates at each scale of chosen heads' values or outputs), ``steer`` (heads and
scale picked on dev items, applied to held-out items, against random heads with a bootstrap CI),
``transfer_table`` (heads from one relation or format applied to others).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor

from headscope.detectors.memory_context import MemoryContextDetector
from headscope.engine.generation import final_states
from headscope.engine.tokens import tokenize
from headscope.interventions import scale_output, scale_values
from headscope.results import HeadScores
from headscope.stats import bootstrap_difference_ci, random_head_sets
from headscope.tasks.conflicts import ConflictItem
from headscope.viz.figures import axes_for, difference_bars, finish


@dataclass
class SweepResult:
    """Answer rates at each scale of the chosen heads' values (or outputs)."""

    heads: list[str]
    scales: list[float]
    context_rate: list[float]  # top-1 token is the context answer's first token
    memory_rate: list[float]  # top-1 token is the memorised answer's first token
    prefers_context: list[float]  # logit(context) > logit(memorised)
    extra: dict[str, Any] = field(default_factory=dict)

    def plot(self, ax: Any = None, path: Optional[Union[str, Path]] = None) -> Any:
        """The sweep as curves: each rate (top-1 context answer, top-1 memorised answer, context
        preferred by logit) against the scale, with scale 1 (the clean model) dotted.

        Args:
            ax: matplotlib axes to draw on (default: a new figure; the backend is never switched).
            path: save the figure there too (the suffix picks the format), atomically.

        Returns:
            The matplotlib ``Figure``.
        """
        figure, ax = axes_for(ax, (5.0, 3.6))
        for rates, label, marker in ((self.context_rate, "top-1 is the context answer", "o"),
                                     (self.memory_rate, "top-1 is the memorised answer", "s"),
                                     (self.prefers_context, "logit prefers the context answer", "^")):
            ax.plot(self.scales, rates, marker=marker, markersize=4, label=label)
        if min(self.scales) <= 1.0 <= max(self.scales):
            ax.axvline(1.0, color="#9e9e9e", linestyle=":", linewidth=1, label="scale 1 (clean)")
        ax.set_xlabel(f"scale of the heads' {self.extra.get('kind', 'values')}")
        ax.set_ylabel("share of items")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(f"answer rates as {', '.join(self.heads)} are scaled", fontsize=9)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False)
        return finish(figure, path)


def answer_rates(
    model: Any, items: list[ConflictItem], heads: Optional[list] = None, scale: float = 1.0, kind: str = "values",
    batch_size: Optional[int] = None,
) -> dict[str, Tensor]:
    """Per item: top-1 is the context answer, top-1 is the memorised answer, and the logit
    difference; with ``heads``, measured with their values (``kind="values"``, Yu et al.) or
    outputs (``"output"``, PH3 pruning at 0) multiplied by ``scale``."""

    context = torch.tensor([i.context_token for i in items])
    memory = torch.tensor([i.memory_token for i in items])

    batch = tokenize(model, [i.prompt for i in items])
    if heads is None:
        final = final_states(model, batch, batch_size).float()  # unembeds the last position only
    else:
        with {"values": scale_values, "output": scale_output}[kind](model, heads, scale):
            final = final_states(model, batch, batch_size).float()
    top = final.argmax(dim=-1)
    rows = torch.arange(len(items))
    return {"context": (top == context).float(), "memory": (top == memory).float(),
            "logit_diff": final[rows, context] - final[rows, memory]}


def prefers_context(model: Any, items: list[ConflictItem], heads: Optional[list] = None, scale: float = 1.0,
                    kind: str = "values") -> Tensor:
    """Per item: 1 where logit(context answer) > logit(memorised answer), under the scaling."""
    return (answer_rates(model, items, heads, scale, kind)["logit_diff"] > 0).float()


def sweep(model: Any, items: list[ConflictItem], heads: list, scales: list[float], kind: str = "values",
          batch_size: Optional[int] = None) -> SweepResult:
    """Context and memorised answer rates with the heads' values (Yu et al.) or outputs (PH3
    pruning at 0) multiplied by each scale."""
    rates: dict[str, list[float]] = {"context": [], "memory": [], "prefers": []}
    for scale in scales:
        result = answer_rates(model, items, heads, scale, kind, batch_size)
        rates["context"].append(float(result["context"].mean()))
        rates["memory"].append(float(result["memory"].mean()))
        rates["prefers"].append(float((result["logit_diff"] > 0).float().mean()))
    return SweepResult([str(h) for h in heads], list(scales), rates["context"], rates["memory"], rates["prefers"],
                       extra={"kind": kind})


@dataclass
class SteerResult:
    """A head set and scale chosen on dev items, applied to held-out items, against random heads."""

    steer_to: str
    heads: list[str]
    scale: float
    kind: str
    clean_rate: float  # share of held-out items preferring the context answer, clean
    steered_rate: float
    random_rate: float  # mean over random head sets of the same size, same scale
    difference: float  # (steered - clean) - (random - clean), in rate points / 100
    ci_low: float
    ci_high: float
    n_items: int
    dev_sweep: SweepResult

    def plot(self, ax: Any = None, path: Optional[Union[str, Path]] = None) -> Any:
        """The held-out share preferring the context answer, clean, steered and with random heads
        at the same scale, and the steered-minus-random difference with its 95% CI as an error bar
        from the random rate (``dev_sweep.plot()`` draws how the scale was chosen).

        Args:
            ax: matplotlib axes to draw on (default: a new figure; the backend is never switched).
            path: save the figure there too (the suffix picks the format), atomically.

        Returns:
            The matplotlib ``Figure``.
        """
        figure, ax = axes_for(ax, (4.6, 4.0))
        conditions = [("clean", self.clean_rate), ("steered", self.steered_rate), ("random heads", self.random_rate)]
        difference_bars(ax, conditions, reference=self.random_rate, compared=1, difference=self.difference,
                        ci=(self.ci_low, self.ci_high), ylabel="share preferring the context answer",
                        reference_label="random heads")
        low, high = ax.get_ylim()
        ax.set_ylim(min(0.0, low), max(1.0, high))  # a share, unless the interval reaches past it
        ax.set_title(f"steer to {self.steer_to}: {', '.join(self.heads)} {self.kind} x {self.scale:g}\n"
                     f"{self.n_items} held-out items", fontsize=9)
        return finish(figure, path)


def split_items(items: list[ConflictItem], dev_fraction: float = 0.5, seed: int = 0) -> tuple[list, list]:
    """Split by subject, so no fact is in both halves."""
    subjects = sorted({(i.relation, i.subject) for i in items})
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(subjects), generator=generator).tolist()
    dev_subjects = {subjects[i] for i in order[: int(len(subjects) * dev_fraction)]}
    dev = [i for i in items if (i.relation, i.subject) in dev_subjects]
    return dev, [i for i in items if (i.relation, i.subject) not in dev_subjects]


def steer(
    model: Any, dev: list[ConflictItem], test: list[ConflictItem], steer_to: str = "context", k: int = 1,
    scales: tuple[float, ...] = (-2.0, -1.0, 0.0, 0.5, 1.5, 2.0, 3.0), kind: str = "values", n_random: int = 5,
    seed: int = 0, scale: Optional[float] = None,
) -> SteerResult:
    """Pick the ``k`` strongest memory heads on ``dev`` (by ``memory_context`` attribution) and the
    scale of their values that best moves dev items towards ``steer_to`` (or use ``scale``), then
    measure held-out ``test`` items: clean, steered, and the same scale on ``n_random`` random sets
    of ``k`` heads, with a bootstrap CI of the steered-minus-random change."""

    if steer_to not in ("context", "memory"):
        raise ValueError(f"steer_to must be 'context' or 'memory', got {steer_to!r}.")
    scores = MemoryContextDetector().score(model, items=dev)
    heads = HeadScores(-scores.values, "memory", scores.model).top_heads(k)
    dev_sweep = sweep(model, dev, heads, list(scales), kind)
    if scale is None:
        target = dev_sweep.prefers_context if steer_to == "context" else [1 - r for r in dev_sweep.prefers_context]
        scale = dev_sweep.scales[max(range(len(scales)), key=target.__getitem__)]
    clean, steered = prefers_context(model, test), prefers_context(model, test, heads, scale, kind)
    random_sets = random_head_sets(model, exclude=heads, k=k, n_draws=n_random, seed=seed)
    random = torch.stack([prefers_context(model, test, head_set, scale, kind) for head_set in random_sets])
    low, high = bootstrap_difference_ci(clean, steered, random, seed=seed)
    return SteerResult(
        steer_to=steer_to, heads=[str(h) for h in heads], scale=float(scale), kind=kind,
        clean_rate=float(clean.mean()), steered_rate=float(steered.mean()), random_rate=float(random.mean()),
        difference=float((steered - random.mean(dim=0)).mean()), ci_low=low, ci_high=high, n_items=len(test),
        dev_sweep=dev_sweep,
    )


def transfer_table(
    model: Any, sources: dict[str, list[ConflictItem]], targets: dict[str, list[ConflictItem]], k: int = 1,
    scale: float = 0.0, kind: str = "values", n_random: int = 3, seed: int = 0,
) -> list[dict[str, Any]]:
    """Do memory heads found on one relation or format work on others? For each source, take its
    top-``k`` memory heads; for each target, the share of items preferring the context answer,
    clean and with those heads' values (or outputs) x ``scale``, beside the mean change from
    ``n_random`` random sets of ``k`` heads."""

    def rate(items: list[ConflictItem], heads: Optional[list] = None) -> float:
        return float(prefers_context(model, items, heads, scale, kind).mean())

    clean = {name: rate(items) for name, items in targets.items()}
    measured: dict[tuple, dict[str, tuple[float, float]]] = {}  # sources that agree on heads share runs
    rows = []
    for source, source_items in sources.items():
        scores = MemoryContextDetector().score(model, items=source_items)
        heads = HeadScores(-scores.values, "memory", scores.model).top_heads(k)
        if tuple(heads) not in measured:
            draws = random_head_sets(model, exclude=heads, k=k, n_draws=n_random, seed=seed)
            measured[tuple(heads)] = {
                target: (rate(items, heads), sum(rate(items, d) for d in draws) / n_random)
                for target, items in targets.items()
            }
        for target, (steered, random_rate) in measured[tuple(heads)].items():
            rows.append({"source": source, "target": target, "heads": [str(h) for h in heads],
                         "clean": clean[target], "steered": steered, "change": steered - clean[target],
                         "random_change": random_rate - clean[target], "n_items": len(targets[target])})
    return rows
