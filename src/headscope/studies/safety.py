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

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from headscope.detectors.safety import attack_success
from headscope.directions import LastPositionCapture, RefusalDirection, considered_layers, refusal_direction
from headscope.engine.heads import Head
from headscope.errors import EmptyResultError, InputError
from headscope.interventions import ablate_direction
from headscope.stability import SelectionStability
from headscope.stats import bootstrap_difference_ci, paired_bootstrap_ci
from headscope.tasks import refusal
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
        """95% interval of a head group's effect on the rate beyond the random groups' effect; for
        the removed direction (no head group is its like), of its change from clean (paired
        bootstrap over requests)."""
        runs = self.complied[request_set]
        if condition == DIRECTION:
            return paired_bootstrap_ci(runs[DIRECTION] - runs[CLEAN])
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
                    effect = row["change"] if condition == DIRECTION else float(values.mean()) - clean - random_effect
                    row.update(effect=round(effect, 3), ci=(round(low, 3), round(high, 3)),
                               effect_of="change from clean" if condition == DIRECTION else "beyond random groups")
                if condition == RANDOM:
                    row["draws"] = [round(float(v), 3) for v in values.mean(dim=1)]
                rows.append(row)
        return rows

    def __str__(self) -> str:
        lines = [f"{'set':<12} {'condition':<28} {'n':>3} {'rate':>6} {'change':>7}  effect beyond random groups "
                 "(the direction: change from clean) [95% CI]"]
        for row in self.table():
            extra = (f"{row['effect']:+.3f} [{row['ci'][0]:+.3f}, {row['ci'][1]:+.3f}]" if "ci" in row
                     else ("draws " + ", ".join(f"{v:.3f}" for v in row["draws"]) if "draws" in row else ""))
            lines.append(f"{row['set']:<12} {row['condition']:<28} {row['n']:>3} {row['rate']:>6.3f} "
                         f"{row['change']:>+7.3f}  {extra}")
        return "\n".join(lines)

    def plot(self, ax: Any = None, path: Optional[Union[str, Path]] = None, ylabel: str = "attack success rate") -> Any:
        """Grouped bars: each set's rate under each condition, the random groups' draws as dots, and
        each head group's 95% interval of its effect beyond random as an error bar around the random
        groups' rate (it misses the random bar's top exactly when it excludes 0); the removed
        direction's interval of its change is around the clean rate."""
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
                    base = float(runs[CLEAN if condition == DIRECTION else RANDOM].mean())
                    ax.errorbar([x], [base + (low + high) / 2], yerr=[[(high - low) / 2]], fmt="none", color="#000000",
                                capsize=3, zorder=4)
        ax.set_xticks(range(len(sets)), sets)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        ax.set_title("held-out requests; error bars: 95% CI of each effect (groups: beyond random)", fontsize=9)
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


def stored_direction(scores: Any) -> RefusalDirection:
    """The refusal direction a safety detector's scores keep (``metadata["refusal_direction"]``),
    to plot (``.plot()``) or remove (``hs.ablate_direction``)."""
    record = dict(scores.metadata.get("refusal_direction") or {})
    if "skipped" in record:
        raise InputError(f"These safety scores have no refusal direction: {record['skipped']}.")
    if "direction" not in record:
        raise InputError("These safety scores keep no refusal direction (scored by an older headscope); rescore them.")
    fields = {name: record[name] for name in ("layer", "norm", "n_harmful", "n_harmless", "considered", "chosen_by",
                                              "model", "weights")}
    separations = record["separations"]
    return RefusalDirection(direction=torch.tensor(record["direction"], dtype=torch.float32),
                            separations=None if separations is None else torch.tensor(separations), **fields)


def stored_stability(scores: Any, score: str = "ships") -> SelectionStability:
    """The selection stability a safety detector's scores keep for ``score`` (``"ships"``,
    ``"dataset_ships"`` or ``"refusal_direction"``), to read or plot."""
    record = (scores.metadata.get("stability") or {}).get(score)
    skipped = (scores.metadata.get(score) or {}).get("skipped") if score == "refusal_direction" else None
    if skipped:
        raise InputError(f"These safety scores have no refusal direction, so no stability of it: {skipped}.")
    if record is None:
        raise InputError(f"These safety scores keep no selection stability of {score!r} (n_bootstrap=0, or an older "
                         "headscope): rescore them with n_bootstrap > 0.")
    return SelectionStability(score, scores.extras[f"{score}_frequency"], record["k"], record["n_resamples"],
                              record["n_items"], [Head.parse(h) for h in record["selected_on_all_items"]])


def selection_requests(scores: Any) -> list[str]:
    """Every request a safety detector's scores were selected on: the scored queries and both
    sides of the refusal direction (what held-out requests must avoid)."""
    direction = scores.metadata.get("refusal_direction") or {}
    texts = list(scores.metadata.get("queries", []))
    texts += direction.get("harmful_queries", []) + direction.get("harmless_queries", [])
    if not texts:
        raise InputError("These safety scores record no scored requests; rescore them with this headscope.")
    return list(dict.fromkeys(texts))


ARDITI_MAX_KL = 0.1  # Arditi et al. keep a direction only if removing it moves harmless next-token distributions < 0.1 nats


@dataclass
class DirectionLayerEffects:
    """What removing each layer's refusal direction does at the first response token.

    Attributes:
        layers: the residual layers whose direction was removed.
        refusal_probability: ``[layers]`` mean P(refusal opening) on the harmful prompts with it removed.
        harmless_kl: ``[layers]`` mean KL(clean ‖ removed) of the harmless prompts' next-token distributions.
        clean_refusal_probability: the harmful prompts' mean P(refusal opening), clean.
        norms: ``[layers]`` each direction's length ``||r_l||``.
    """

    layers: list[int]
    refusal_probability: list[float]
    harmless_kl: list[float]
    clean_refusal_probability: float
    norms: list[float]

    def kept(self, max_kl: float = ARDITI_MAX_KL) -> list[int]:
        """Layers whose removal leaves harmless requests nearly unchanged (Arditi et al.'s filter)."""
        return [layer for layer, kl in zip(self.layers, self.harmless_kl, strict=True) if kl < max_kl]  # NaN: never

    def __str__(self) -> str:
        rows = [f"clean P(refusal opening) on harmful prompts {self.clean_refusal_probability:.3f}",
                f"{'layer':>5} {'||r||':>7} {'P(refusal)':>10} {'harmless KL':>11}"]
        rows += [f"{layer:>5} {norm:>7.2f} {p:>10.3f} {kl:>11.3f}" for layer, norm, p, kl in
                 zip(self.layers, self.norms, self.refusal_probability, self.harmless_kl, strict=True)]
        return "\n".join(rows)

    def plot(self, ax: Any = None, path: Optional[Union[str, Path]] = None) -> Any:
        """P(refusal opening) on harmful prompts and the harmless KL against the layer whose
        direction is removed; the layers that pass Arditi et al.'s KL filter marked."""
        figure, ax = axes_for(ax, (6.4, 3.4))
        ax.plot(self.layers, self.refusal_probability, "o-", color=ROLE_COLOURS[1], label="P(refusal), harmful")
        ax.axhline(self.clean_refusal_probability, color=ROLE_COLOURS[1], linestyle=":", label="clean")
        ax.set_xlabel("layer of the removed direction")
        ax.set_ylabel("P(refusal opening)")
        ax.set_ylim(0, 1.02)
        twin = ax.twinx()
        twin.plot(self.layers, self.harmless_kl, "s--", color=ROLE_COLOURS[0], label="harmless KL")
        twin.axhline(ARDITI_MAX_KL, color=ROLE_COLOURS[0], linestyle=":", linewidth=1)
        twin.set_yscale("log")
        twin.set_ylabel("harmless KL (nats)")
        for layer in self.kept():
            ax.axvspan(layer - 0.4, layer + 0.4, color="#c8e6c9", zorder=0)
        ax.legend(fontsize=7, loc="lower left", frameon=False)
        ax.set_title("removing each layer's refusal direction (green: harmless KL < 0.1)", fontsize=9)
        return finish(figure, path)


def direction_layer_effects(
    model: Any,
    harmful: LastPositionCapture,
    harmless: LastPositionCapture,
    harmful_prompts: Sequence[str],
    harmless_prompts: Sequence[str],
    layers: Optional[Sequence[int]] = None,
) -> DirectionLayerEffects:
    """Arditi et al.'s check of each candidate direction: the difference of means of the captures
    at each layer (default: every layer the detector may choose, the first 80%), removed from the
    residual stream everywhere; on held-out prompts, how likely the harmful ones still open with a
    refusal and how far the harmless ones' next-token distributions move (one forward pass per
    layer and prompt set). A layer where the two means are equal has no direction: NaN there."""
    from headscope.engine.generation import final_states

    ids = refusal.refusal_start_token_ids(model.tokenizer)
    layers = list(range(considered_layers(harmful.n_layers))) if layers is None else list(layers)
    clean_harmful = final_states(model, list(harmful_prompts)).log_softmax(-1)
    clean_harmless = final_states(model, list(harmless_prompts)).log_softmax(-1)
    probabilities, divergences, norms = [], [], []
    for layer in layers:
        try:
            direction = refusal_direction(harmful, harmless, layer=layer)
        except EmptyResultError:  # equal means (e.g. layer 0 when every prompt ends on the same token)
            probabilities.append(math.nan), divergences.append(math.nan), norms.append(0.0)
            continue
        with ablate_direction(model, direction):
            removed_harmful = final_states(model, list(harmful_prompts)).log_softmax(-1)
            removed_harmless = final_states(model, list(harmless_prompts)).log_softmax(-1)
        probabilities.append(float(removed_harmful.exp()[:, ids].sum(-1).mean()))
        divergences.append(float((clean_harmless.exp() * (clean_harmless - removed_harmless)).sum(-1).mean()))
        norms.append(direction.norm)
    return DirectionLayerEffects(layers, probabilities, divergences, float(clean_harmful.exp()[:, ids].sum(-1).mean()),
                                 norms)
