"""Memory heads and context heads — Yu, Merullo, Pavlick 2023 ("Characterizing Mechanisms for
Factual Recall in Language Models"); Jin et al. 2024 ("Cutting Off the Head Ends the Conflict").

Data: knowledge-conflict prompts (``headscope.tasks.conflicts``): a fact the model knows,
contradicted in the prompt ("The capital of France is Lima. The capital of France is").
The items are split by subject (``conflicts.split_by_subject``): the distinct subjects of the
model's items are sorted and shuffled with ``random.Random(seed)``; the first
``round(n_subjects * held_out_share)`` (default half) are held out for validation, the rest are
scored. Every item of a subject (all its relations and formats) is on one side, so validation
never sees a subject, let alone an item, that chose the heads. ``items(model, split)`` gives
``"all"``, ``"score"`` or ``"held_out"``.

Your own facts (``data="facts.jsonl"``, or ``{"memory_context": {"data": ...}}`` in a CLI config)
replace the shipped relations (``relations`` is then ignored): JSON lines, one fact a line,
``{"subject": "France", "cloze": "The capital of {s} is", "answer": "Paris", "counterfactual":
"Rome"}``, with optional ``question`` (for the ``"qa"`` format), ``context`` (the sentence stating
the counterfactual, ``{s}``/``{c}``), ``relation`` (a group name), and ``counterfactual`` itself
optional (default: another answer of the relation in the file). The same knowledge filter keeps
only the facts the model completes from memory, and the same split by subject holds out
``held_out_share`` of the subjects, so the file needs at least 2 subjects the model knows (more for
a share far from one half). ``check_data()`` reads the file without a model; every error names the
file and line (format: ``headscope.tasks.conflicts.read_conflict_facts``).

Score (``values``): direct logit attribution of each head's output at the final position,
through the final norm (its weights and the run's own RMS scale at that position), onto
``W_U[context answer] - W_U[memorised answer]``, averaged over items:

    DLA_h = (z_h W_O^h / rms_final) . diag(w_norm) . (W_U[:, c] - W_U[:, m])

Positive: the head pushes towards the context answer (context head); negative: towards the
memorised answer (memory head). ``extras["positive_share"]`` is the fraction of items where the
head's attribution is positive (sign consistency); ``extras["patched_direct"]`` is PH3's
localisation restricted to the direct path: the change of the logit difference when the head's
final-position output is patched in from the prompt where the context *agrees* with memory,
through the direct path only (``DLA(z_agree) - DLA(z_conflict)``; exact, because the direct
path is linear once the final norm's scale is held at the conflict run's value).
``metadata["patching_vs_attribution"]`` compares the two rankings (by magnitude): Spearman
correlation over all heads and the overlap of the top ``n_report`` heads.

Studies built on the detector (``sweep``, ``steer``, ``transfer_table``) are in
``headscope.studies.memory_context``.

Validation metric: the logit difference (context - memorised) at the final position, on the
held-out subjects' items; ablating the top (context) heads lowers it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from jaxtyping import Float
from torch import Tensor

from headscope.detectors.base import (
    Detector,
    DetectorConfig,
    Example,
    ValidationTask,
    has_tokenizer,
    register_detector,
    setting,
)
from headscope.engine.heads import model_shape
from headscope.engine.metrics import final_logits
from headscope.engine.runner import run_batched
from headscope.engine.tokens import TokenBatch, row_tokens, tokenize
from headscope.engine.unembed import (
    FINAL_SCALE,
    final_norm_weight,
    final_position_attributions,
    head_output_hooks,
    head_output_weights,
    unembedding,
)
from headscope.errors import DataError, EmptyResultError, InputError
from headscope.results import HeadScores, ranking_agreement  # noqa: F401  (ranking_agreement re-exported)
from headscope.significance import Significance
from headscope.stats import DEFAULT_ALPHA, bonferroni_t, standard_error
from headscope.tasks.conflicts import (
    FORMATS,
    RELATIONS,
    ConflictItem,
    conflict_items,
    conflict_prompt,
    min_subjects_for_split,
    read_conflict_facts,
    split_by_subject,
    user_conflict_items,
)

ITEM_SPLITS = ("all", "score", "held_out")


@dataclass
class MemoryContextConfig(DetectorConfig):
    relations: tuple[str, ...] = setting(("capital", "language"), "shipped relations whose known facts are "
                                         "contradicted (ignored with data)", choices=tuple(RELATIONS))
    formats: tuple[str, ...] = setting(("restate",), "prompt formats of each conflict item", choices=FORMATS)
    n_report: int = setting(5, "memory and context heads listed in the metadata", min=1)
    held_out_share: float = setting(0.5, "share of subjects kept out of scoring, for validation (strictly "
                                    "between 0 and 1)", min=0.0, max=1.0, exclusive=True)
    data: Optional[str] = setting(None, "your own facts, JSON lines of {\"subject\", \"cloze\", \"answer\", "
                                  "\"counterfactual\"}; replaces relations", path=True)


@register_detector
class MemoryContextDetector(Detector):
    name = "memory_context"
    atlas_order = 60
    Config = MemoryContextConfig
    summary = "direct logit attribution onto context answer minus memorised answer (Yu et al. 2023)"
    cost = "score 2 s, validation 7 s"
    explanation = {
        "context": (
            "A context head pushes the model towards what the prompt says when it contradicts a fact the model "
            "knows ('The capital of France is Lima. The capital of France is' -> Lima); memory heads push the other "
            "way (Yu, Merullo, Pavlick 2023; Jin et al. 2024). headscope measures each head's direct logit "
            "attribution at the last position onto the context answer minus the memorised one, tests it across "
            "items with a t-test, and validates on held-out subjects by the logit difference with the top heads "
            "ablated."),
        "memory": (
            "A memory head pushes the model towards the fact it memorised when the prompt states another answer "
            "('The capital of France is Lima. The capital of France is' -> Paris); context heads push the other "
            "way (Yu, Merullo, Pavlick 2023; Jin et al. 2024). headscope measures each head's direct logit "
            "attribution at the last position onto the memorised answer minus the context one and tests it across "
            "items with a t-test."),
    }

    def examples(self, model: Any) -> list[Example]:
        """Conflict prompts of its first two relations' first facts (or the first two facts of ``data``), in its
        first format, each fact contradicted by another answer of its relation; built from the
        facts alone, without the check of what the model knows (none without a tokenizer)."""
        if not has_tokenizer(model):
            return []
        config = self.config
        if config.data:
            facts = read_conflict_facts(config.data, config.formats)
            chosen = [(f.relation, f.subject, f.answer, f.counterfactual or next(
                (g.answer for g in facts if g.relation == f.relation and g.answer != f.answer), "something else"),
                {"cloze": f.cloze, "question": f.question, "context": f.context}) for f in facts[:2]]
        else:
            chosen = []
            for relation, index in ([(r, 0) for r in config.relations[:2]] + [(config.relations[0], 1)])[:2]:
                facts = RELATIONS[relation].facts
                subject, answer = facts[index]
                counter = next(other for _, other in facts[index + 1:] if other != answer)
                chosen.append((relation, subject, answer, counter, {}))
        return [(f"{subject}: the prompt says '{counter}', memory says '{answer}'",
                 conflict_prompt(relation, config.formats[0], subject, counter, **templates))
                for relation, subject, answer, counter, templates in chosen]

    def items(self, model: Any, split: str = "all") -> list[ConflictItem]:
        """The conflict items of the facts ``model`` knows: ``"all"`` of them, the ``"score"`` part
        or the ``"held_out"`` part (disjoint by subject; see the module docstring)."""
        if split not in ITEM_SPLITS:
            raise InputError(f"The 'split' parameter of items must be one of {', '.join(map(repr, ITEM_SPLITS))}; "
                             f"got {split!r}.")
        config = self.config
        if config.data:
            items = user_conflict_items(model, read_conflict_facts(config.data, config.formats), config.formats,
                                        seed=config.seed)
        else:
            items = conflict_items(model, tuple(config.relations), tuple(config.formats), seed=config.seed)
        if split == "all":
            return items
        scored, held_out = split_by_subject(items, config.held_out_share, config.seed)
        if config.data and not (scored and held_out):
            known = len({i.subject for i in items})
            raise EmptyResultError(
                f"{config.data}: the model knows the facts of {known} subject{'s' * (known != 1)}; the split into "
                f"scored and held-out subjects (held_out_share={config.held_out_share}) needs at least "
                f"{min_subjects_for_split(config.held_out_share)}. Add facts about other subjects that this model "
                "completes from memory."
            )
        return scored if split == "score" else held_out

    def check_data(self) -> None:
        """Read the ``data`` file without a model: a :class:`DataError` naming file and line for a bad
        line, or naming the file when it has too few subjects for the split by subject."""
        if not self.config.data:
            return
        facts = read_conflict_facts(self.config.data, self.config.formats)
        subjects = {fact.subject for fact in facts}
        needed = min_subjects_for_split(self.config.held_out_share)
        if len(subjects) < needed:
            raise DataError(
                f"{self.config.data}: facts about {len(subjects)} subject{'s' * (len(subjects) != 1)}; memory_context "
                f"needs at least {needed} (held_out_share={self.config.held_out_share} of the subjects is held out "
                "for validation, the rest scored), and more in practice: only the facts the model knows are kept. "
                "Add facts about other subjects."
            )

    def score(self, model: Any, batch_size: Optional[int] = None, progress: Optional[bool] = None,
              items: Optional[list[ConflictItem]] = None) -> HeadScores:
        """Score every head on ``items`` (default: the ``"score"`` part of the detector's items,
        whose subjects validation never uses)."""
        items = items if items is not None else self.items(model, "score")
        if not items:
            raise EmptyResultError(
                f"The memory_context detector found no conflict items: the model completes none of the "
                f"{', '.join(self.config.relations)} facts it is asked about (a model too small or not trained "
                "on them), so there is no memorised answer to set against the context. Give facts of your own "
                "(data=a JSONL file), your own items (score(model, items=...)) or other relations (relations=...)."
            )
        conflict = final_head_attributions(model, items, [i.prompt for i in items], batch_size, progress)
        agreeing = [i.restated(i.memory_answer) for i in items]
        patched = final_head_attributions(model, items, agreeing, batch_size, progress, scale_from=conflict,
                                          control=False)
        values = conflict["attribution"].mean(dim=0)
        extras = {
            "standard_error": standard_error(conflict["attribution"]),
            "positive_share": (conflict["attribution"] > 0).float().mean(dim=0),
            "patched_direct": (patched["attribution"] - conflict["attribution"]).mean(dim=0),
            "unrelated": conflict["unrelated"].mean(dim=0),
        }
        subjects = sorted({i.subject for i in items})
        metadata: dict[str, Any] = {"n_items": len(items), "subjects": subjects}
        if self.config.data:
            metadata["relations"] = sorted({i.relation for i in items})
        result = self.result(model, values, extras, metadata=metadata)
        k = self.config.n_report
        result.metadata["context_heads"] = [str(h) for h in result.top_heads(k)]
        result.metadata["memory_heads"] = [str(h) for h in HeadScores(-values, self.name, result.model).top_heads(k)]
        result.metadata["context_preferred_rate"] = float((conflict["logit_diff"] > 0).float().mean())
        result.metadata["patching_vs_attribution"] = ranking_agreement(extras["patched_direct"].abs(), values.abs(), k)
        return result

    def significance(
        self, model: Any, scores: HeadScores, batch_size: Optional[int] = None, progress: Optional[bool] = None
    ) -> list[Significance]:
        """Two roles from one test: ``t = mean attribution / its standard error over the scored
        items``; context heads have ``t`` above, memory heads below, the two-sided Student t
        critical value with ``n_items - 1`` degrees of freedom at family-wise 5% over all heads
        (Bonferroni). The normal value this replaced is too small for tens of items (for 270
        heads: 3.74 against 4.15 at 37 degrees of freedom). Both roles also need a mean attribution
        beyond :func:`unrelated_floor`, what heads give answer directions unrelated to the prompt."""
        if "standard_error" not in scores.extras:
            raise InputError("These memory_context scores have no standard errors (saved by an older headscope); rescore them.")
        n_items = int(scores.metadata.get("n_items") or 0)
        if n_items < 2:
            raise InputError(
                f"The memory_context significance test needs at least 2 scored items for a standard error; these "
                f"scores have {n_items}. Score on more items (relations=..., or a smaller held_out_share)."
            )
        t = scores.values / scores.extras["standard_error"].clamp(min=1e-12)
        critical = bonferroni_t(scores.values.numel(), n_items - 1)
        floor, floor_rule = unrelated_floor(scores)
        details = {"t_critical": critical, "df": n_items - 1, "n_items": n_items, "alpha": DEFAULT_ALPHA,
                   "floor_logits": floor}
        rule = (f"one-sample t-test of the mean attribution over items ({n_items - 1} df), two-sided, Bonferroni "
                f"over all heads (family-wise {DEFAULT_ALPHA})")
        return [
            Significance(self.name, "context", t, critical, "t of the attribution onto context minus memorised answer",
                         rule, details, effect=scores.values, floor=floor, floor_rule=floor_rule,
                         effect_name="mean attribution onto context minus memorised answer (logits)"),
            Significance(self.name, "memory", -t, critical, "-t of the attribution onto context minus memorised answer",
                         rule, details, effect=-scores.values, floor=floor, floor_rule=floor_rule,
                         effect_name="mean attribution onto memorised minus context answer (logits)"),
        ]

    def validation_task(self, model: Any) -> ValidationTask:
        """The logit difference on the held-out subjects' items (none of them scored)."""
        items = self.items(model, "held_out")
        if not items:
            raise EmptyResultError(
                "The memory_context detector has no held-out conflict items to validate on: the model knows "
                f"too few of the {', '.join(self.config.relations)} facts for a split by subject. Ask for more "
                "relations (relations=...) or a larger held_out_share."
            )
        return ValidationTask(
            data=tokenize(model, [i.prompt for i in items]),
            metric=LogitDifference(model, items),
            metric_name="logit(context answer) - logit(memorised answer) at the final position",
            ablation_hurts_when="decreases",
            last_position=True,
        )


def answer_directions(model: Any, items: list[ConflictItem]) -> Float[Tensor, "n_items d_model"]:
    """``diag(w_norm) (W_U[:, c] - W_U[:, m])`` per item."""
    unembed = unembedding(model)
    context = torch.tensor([i.context_token for i in items], device=unembed.device)
    memory = torch.tensor([i.memory_token for i in items], device=unembed.device)
    return (final_norm_weight(model).float().to(unembed.device)[:, None] * (unembed[:, context] - unembed[:, memory])).T


def unrelated_floor(scores: HeadScores) -> tuple[float, str]:
    """The effect-size floor of memory and context heads: the largest |mean attribution| any head
    gives onto :func:`unrelated_answers` (two answers of another fact, neither in the prompt) —
    what a head's output projects onto an answer direction without the conflict's structure."""
    if "unrelated" not in scores.extras:
        raise InputError("These memory_context scores have no control attributions (saved by an older headscope); "
                         "rescore them.")
    floor = float(scores.extras["unrelated"].abs().max())
    return floor, ("inputs without the structure: above the largest |mean attribution| any head gives onto the "
                   f"answers of an unrelated fact ({floor:.3g} logits)")


def unrelated_answers(items: list[ConflictItem]) -> list[ConflictItem]:
    """For each item, the nearest later item (cyclically) whose two answers are both different
    from its own: answer directions that have nothing to do with the item's prompt. Raises an
    InputError when no item qualifies (every item has the same answers)."""
    own = [{i.context_token, i.memory_token} for i in items]
    chosen = []
    for index in range(len(items)):
        others = ((index + step) % len(items) for step in range(1, len(items)))
        match = next((j for j in others if not own[j] & own[index]), None)
        if match is None:
            raise InputError("memory_context needs items with at least two different answer pairs for its "
                             "effect-size floor; add relations or subjects.")
        chosen.append(items[match])
    return chosen


def final_head_attributions(
    model: Any, items: list[ConflictItem], prompts: list[str], batch_size: Optional[int] = None,
    progress: Optional[bool] = None, scale_from: Optional[dict[str, Tensor]] = None, control: bool = True,
) -> dict[str, Tensor]:
    """Per item: every head's direct logit attribution ``[n_items, n_layers, n_heads]`` at the final
    position, with ``control`` the same onto :func:`unrelated_answers`' directions
    (``"unrelated"``), the logit difference, and the final norm's scale (``scale_from`` reuses
    another run's scale, for direct-path patching)."""
    shape = model_shape(model)
    directions = {"attribution": answer_directions(model, items)}
    if control:
        directions["unrelated"] = answer_directions(model, unrelated_answers(items))
    w_o = head_output_weights(model)
    names = [name for layer in range(shape.n_layers) for name in head_output_hooks(model, layer)] + [FINAL_SCALE]

    def reduce(logits: Tensor, cache: dict, chunk: TokenBatch, rows: slice) -> dict[str, Tensor]:
        index, rows = rows, torch.arange(len(chunk), device=logits.device)  # rows of the data; rows of the chunk
        last = chunk.last_positions
        if scale_from is None:
            final_scale = cache[FINAL_SCALE]  # on the final norm's device
            scale = final_scale[rows.to(final_scale.device), last.to(final_scale.device), 0].float().to(logits.device)
        else:
            scale = scale_from["scale"][index].to(logits.device)
        out = {name: final_position_attributions(model, cache, last, d[index].to(logits.device), scale, w_o)
               for name, d in directions.items()}
        context = torch.tensor([i.context_token for i in items[index]], device=logits.device)
        memory = torch.tensor([i.memory_token for i in items[index]], device=logits.device)
        final = logits  # [batch, vocab] at each row's last position
        return {**out, "scale": scale, "logit_diff": final[rows, context] - final[rows, memory]}

    return run_batched(model, tokenize(model, prompts), reduce, names, batch_size, progress, desc="memory_context",
                       logits="last")


class LogitDifference:
    """``metric(logits, chunk)``: logit(context answer) - logit(memorised answer) at each row's last
    position. Rows are matched to items by their tokens, so chunked and repeated batches work."""

    def __init__(self, model: Any, items: list[ConflictItem]) -> None:
        batch = tokenize(model, [i.prompt for i in items])
        self.answers = {row_tokens(batch, row): (i.context_token, i.memory_token) for row, i in enumerate(items)}

    def __call__(self, logits: Tensor, chunk: TokenBatch) -> Tensor:
        rows = torch.arange(len(chunk), device=logits.device)
        final = final_logits(logits, chunk)
        pairs = torch.tensor([self.answers[row_tokens(chunk, row)] for row in range(len(chunk))], device=logits.device)
        return final[rows, pairs[:, 0]] - final[rows, pairs[:, 1]]
