"""Do safety heads hold on requests the detector never saw? Zhou et al. 2024's heads (Ships,
Sahara) and Arditi et al. 2024's refusal direction, tested side by side on held-out request sets,
built on the ``safety`` detector (``headscope.detectors.safety``).

:func:`held_out_attack` runs, on each held-out request set (e.g. the test split and
``refusal.load_elsewhere()``), one batched greedy decode per set with every condition as a block
of rows: clean, each named head group ablated (uniform attention, as the detector scores), random
head groups (the control), and optionally the refusal direction removed from the residual stream
(``hs.ablate_direction``). Every set is first checked disjoint from the requests the heads were
selected on (``safety.check_held_out``). The result gives each condition's attack success rate
and its effect beyond random groups (clean-paired, ``stats.bootstrap_difference_ci``: a t
interval over requests and random draws), as a table and a figure. On harmless requests the same
rate reads as "answered".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor

from headscope.detectors.safety import attack_success
from headscope.engine.heads import Head
from headscope.errors import InputError
from headscope.interventions import ablate_direction
from headscope.stats import bootstrap_difference_ci
from headscope.viz.figures import ROLE_COLOURS, axes_for, finish

CLEAN = "clean"
RANDOM = "random groups"
DIRECTION = "refusal direction ablated"


@dataclass
class HeldOutAttack:
    """Complied (1) or not (0) for every request of every set under every condition.

    Attributes:
        complied: ``complied[set][condition]`` is ``[requests]`` (``[draws, requests]`` for the
            random groups).
        generations: the greedy responses, indexed the same way (a list per random draw).
        conditions: each condition's heads (None: clean; the direction condition: None too).
        random_sets: the random head groups drawn.
    """

    complied: dict[str, dict[str, Tensor]]
    generations: dict[str, dict[str, Any]]
    conditions: dict[str, Optional[list[Head]]]
    random_sets: list[list[Head]] = field(default_factory=list)

    def rate(self, request_set: str, condition: str) -> float:
        """The share of the set's requests that complied under the condition."""
        return float(self.complied[request_set][condition].mean())

    def effect_ci(self, request_set: str, condition: str) -> tuple[float, float]:
        """95% interval of the condition's effect on the rate beyond the random groups' effect."""
        runs = self.complied[request_set]
        return bootstrap_difference_ci(runs[CLEAN], runs[condition], runs[RANDOM])

    def table(self) -> list[dict[str, Any]]:
        """One row per (set, condition): rate, change from clean, effect beyond random with its CI."""
        rows = []
        for request_set, runs in self.complied.items():
            clean = float(runs[CLEAN].mean())
            random_effect = float(runs[RANDOM].mean()) - clean
            for condition, values in runs.items():
                row = {"set": request_set, "condition": condition, "n": int(values.shape[-1]),
                       "rate": round(float(values.mean()), 3), "change": round(float(values.mean()) - clean, 3)}
                if condition not in (CLEAN, RANDOM):
                    low, high = self.effect_ci(request_set, condition)
                    row.update(beyond_random=round(float(values.mean()) - clean - random_effect, 3),
                               ci=(round(low, 3), round(high, 3)))
                if condition == RANDOM:
                    row["draws"] = [round(float(v), 3) for v in values.mean(dim=1)]
                rows.append(row)
        return rows

    def __str__(self) -> str:
        lines = [f"{'set':<12} {'condition':<28} {'n':>3} {'rate':>6} {'change':>7}  beyond random [95% CI]"]
        for row in self.table():
            extra = (f"{row['beyond_random']:+.3f} [{row['ci'][0]:+.3f}, {row['ci'][1]:+.3f}]" if "ci" in row
                     else ("draws " + ", ".join(f"{v:.3f}" for v in row["draws"]) if "draws" in row else ""))
            lines.append(f"{row['set']:<12} {row['condition']:<28} {row['n']:>3} {row['rate']:>6.3f} "
                         f"{row['change']:>+7.3f}  {extra}")
        return "\n".join(lines)

    def plot(self, ax: Any = None, path: Optional[Union[str, Path]] = None, ylabel: str = "attack success rate") -> Any:
        """Grouped bars: each set's rate under each condition, the random groups' draws as dots, and
        each ablation's 95% interval of its effect beyond random as an error bar around the clean
        rate plus the random effect (it misses the random bar's top exactly when it excludes 0)."""
        sets = list(self.complied)
        conditions = list(self.complied[sets[0]])
        figure, ax = axes_for(ax, (1.4 + 1.2 * len(sets) * len(conditions) / 3, 3.6))
        width = 0.8 / len(conditions)
        for c, condition in enumerate(conditions):
            colour = "#9e9e9e" if condition in (CLEAN, RANDOM) else ROLE_COLOURS[c % len(ROLE_COLOURS)]
            xs = [s + (c - (len(conditions) - 1) / 2) * width for s in range(len(sets))]
            ax.bar(xs, [self.rate(name, condition) for name in sets], width=width * 0.9, color=colour,
                   alpha=0.8 if condition != CLEAN else 0.45, label=condition)
            for x, name in zip(xs, sets, strict=True):
                runs = self.complied[name]
                if condition == RANDOM:
                    ax.scatter([x] * runs[RANDOM].shape[0], runs[RANDOM].mean(dim=1).tolist(), s=10, color="#424242",
                               zorder=3)
                elif condition != CLEAN:
                    low, high = self.effect_ci(name, condition)
                    base = float(runs[RANDOM].mean())
                    ax.errorbar([x], [base + (low + high) / 2], yerr=[[(high - low) / 2]], fmt="none", color="#000000",
                                capsize=3, zorder=4)
        ax.set_xticks(range(len(sets)), sets)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        ax.set_title("held-out requests; error bars: effect beyond random groups, 95% CI", fontsize=9)
        return finish(figure, path)


def held_out_attack(
    model: Any,
    request_sets: dict[str, Sequence[Any]],
    conditions: dict[str, Optional[Sequence[Any]]],
    random_sets: Sequence[Sequence[Any]],
    selection: Sequence[Any],
    direction: Optional[Union[Tensor, Any]] = None,
    max_new_tokens: int = 32,
    prompt_format: str = "chatml",
    epsilon: float = 1e-5,
) -> HeldOutAttack:
    """Attack success of each condition (``None``: clean, added when missing; else heads made to
    attend uniformly) and of the random head groups (at least 2) on each request set, checked
    disjoint from ``selection`` first; with ``direction``, also the condition with that direction
    removed from the residual stream at every layer (:data:`DIRECTION`)."""
    if len(random_sets) < 2:
        raise InputError(f"held_out_attack needs at least 2 random head groups for its interval, got {len(random_sets)}.")
    conditions = {CLEAN: None, **{name: heads for name, heads in conditions.items() if name != CLEAN}}
    head_sets = [*conditions.values(), *random_sets]
    names = list(conditions)
    complied: dict[str, dict[str, Tensor]] = {}
    generations: dict[str, dict[str, Any]] = {}
    for set_name, requests in request_sets.items():
        values, outputs = attack_success(model, requests, head_sets, epsilon=epsilon, max_new_tokens=max_new_tokens,
                                         prompt_format=prompt_format, selection=selection)
        complied[set_name] = {name: values[i] for i, name in enumerate(names)}
        complied[set_name][RANDOM] = values[len(names):]
        generations[set_name] = {name: outputs[i] for i, name in enumerate(names)}
        generations[set_name][RANDOM] = outputs[len(names):]
        if direction is not None:
            removed, said = attack_success(model, requests, [None], max_new_tokens=max_new_tokens,
                                           prompt_format=prompt_format, selection=selection,
                                           intervention=lambda m: ablate_direction(m, direction))
            complied[set_name][DIRECTION], generations[set_name][DIRECTION] = removed[0], said[0]
    heads = {name: None if h is None else [Head.parse(x) for x in h] for name, h in conditions.items()}
    return HeldOutAttack(complied, generations, heads, [[Head.parse(x) for x in s] for s in random_sets])


def stored_direction(scores: Any) -> Float[Tensor, " d_model"]:
    """The refusal direction a safety detector's scores keep (``metadata["refusal_direction"]``)."""
    record = scores.metadata.get("refusal_direction") or {}
    if "direction" not in record:
        raise InputError("These safety scores keep no refusal direction (scored by an older headscope); rescore them.")
    return torch.tensor(record["direction"], dtype=torch.float32)


def selection_requests(scores: Any) -> list[str]:
    """Every request a safety detector's scores were selected on: the scored queries and both
    sides of the refusal direction (what held-out requests must avoid)."""
    direction = scores.metadata.get("refusal_direction") or {}
    texts = list(scores.metadata.get("queries", []))
    texts += direction.get("harmful_queries", []) + direction.get("harmless_queries", [])
    if not texts:
        raise InputError("These safety scores record no scored requests; rescore them with this headscope.")
    return list(dict.fromkeys(texts))
