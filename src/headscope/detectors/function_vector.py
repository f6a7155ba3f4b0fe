"""Function-vector heads — Todd, Li, Sen Sharma, Mueller, Wallace, Bau 2024, "Function Vectors in
Large Language Models" (ICLR 2024, arXiv 2310.15213).

Data: in-context-learning tasks shipped as small word-pair lists (``headscope.tasks.icl``:
antonym, present → past, capitalize, country → language, lowercase → uppercase letter, and
country → capital on request), kept where the answer (with its leading space) is one token.
Prompts are ``"x1: y1\\n...\\nx5: y5\\nxq:"`` (``n_shots`` demonstrations). Each task's pairs are
split by query word (seeded, ``held_out_share``): the scored half gives every prompt that scoring
reads (queries and demonstrations), the held-out half every prompt of validation.

Score (``values``), the paper's average indirect effect at the last position::

    mean_h^t  = mean over correct clean prompts p of task t of z_h(p)[last]      (the "task mean")
    IE_h(p~)  = P(answer | p~, z_h[last] := mean_h^t) - P(answer | p~)
    AIE_h     = mean over the scored prompts p~ of every task of IE_h(p~)

``z_h`` is head ``h``'s output (``hook_z``, before the output projection); ``p~`` a prompt of the
task with its demonstration labels shuffled (a cyclic permutation: every label moves); P the
model's probability of the answer's token. As in the paper's code, only prompts whose clean
version the model answers correctly (top-1) are used, for the means and for the effects
(``only_correct``; a task left with fewer than 2 of either is dropped, and recorded). The mean set
(``n_mean_prompts`` per task) and the scored set (``n_prompts`` per task) are built from two
disjoint halves of the task's scored pairs: no query or demonstration is in both. The
patching is exact (``headscope.scans.final_position_patch_scan``: every other position from a KV
cache, one cached step per head). ``extras``: ``standard_error`` (over prompts), ``control`` (the
AIE of the control below), ``aie:<task>`` (each task's own AIE).

Significance: one-sided t-test of the AIE over the scored prompts (t = AIE / SE, ``n - 1`` df;
prompts of every task pooled, so task-to-task differences widen the SE), Bonferroni over all heads
(family-wise 5%). Effect-size floor, a
control without the task: the largest pooled AIE any head gives when the mean patched in is taken
over the *shuffled* versions of the mean prompts (same format and label set, no task shown), on the
first ``n_control_prompts`` scored prompts of each task.

Validation metric (through ``hs.validate``, ``measure=``): on the held-out prompts (shuffled
labels; kept where the clean version is answered, as in scoring), P(answer token) with the head
set's task means patched in at the last position (row ``None``: the shuffled prompt unpatched). The
means are the scored half's. **Sign convention:** patching function-vector heads *raises* the
metric, so ``ablation_hurts_when="increases"``: validate calls the heads significant when the top
k raise P(answer) more than random k-sets (CI of top minus random above 0).
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
from headscope.engine.heads import hook_name, model_shape
from headscope.engine.runner import run_batched
from headscope.engine.tokens import TokenBatch, tokenize
from headscope.engine.unembed import last_position_z
from headscope.errors import EmptyResultError, InputError
from headscope.results import HeadScores
from headscope.scans import final_position_patch_scan, final_position_patch_sets
from headscope.significance import Significance
from headscope.stats import DEFAULT_ALPHA, bonferroni_t, standard_error
from headscope.tasks.icl import TASKS, ICLPrompt, ICLTask, build_prompts, icl_task, shuffled, split_pairs

DEFAULT_TASKS = ("antonym", "present_past", "capitalize", "country_language", "letter_upper")
MIN_PROMPTS = 2  # prompts a task needs in each set (a mean, a standard error)


@dataclass
class FunctionVectorConfig(DetectorConfig):
    tasks: tuple[str, ...] = setting(DEFAULT_TASKS, "in-context tasks (shipped word pairs)", choices=TASKS)
    n_shots: int = setting(5, "demonstrations per prompt", min=2)
    n_prompts: int = setting(6, "shuffled-label prompts per task whose indirect effects are averaged", min=2)
    n_mean_prompts: int = setting(10, "clean prompts per task whose last-position head outputs are averaged", min=2)
    n_control_prompts: int = setting(1, "scored prompts per task also patched with the shuffled-prompt mean "
                                     "(the effect-size floor's control)", min=1)
    n_validation_prompts: int = setting(10, "held-out prompts per task for validation", min=1)
    held_out_share: float = setting(0.5, "share of each task's pairs held out for validation", min=0.0, max=1.0,
                                    exclusive=True)
    only_correct: bool = setting(True, "keep only prompts whose clean version the model answers (the paper's "
                                 "filter)")


@dataclass
class TaskData:
    """One task for one model: kept pairs split into scored and held-out halves."""

    task: ICLTask
    scored: list
    held_out: list


@register_detector
class FunctionVectorDetector(Detector):
    name = "function_vector"
    atlas_order = 75
    Config = FunctionVectorConfig
    atlas_defaults = {"n_validation_prompts": 8}
    summary = "average indirect effect of the task-mean head output on shuffled-label ICL prompts (Todd et al. 2024)"
    cost = "score 39 s, significance 0 s, validation 10 s (the atlas validates on 8 held-out prompts a task)"
    explanation = {"function_vector": (
        "A function-vector head carries the task an in-context prompt demonstrates (antonyms, past tense, "
        "capitals) from the examples to the answer position (Todd et al. 2024, 'Function Vectors in Large Language "
        "Models'). headscope patches each head's mean output on correct prompts of a task into prompts whose "
        "example labels are shuffled and measures how much the probability of the right answer rises (the average "
        "indirect effect), and validates on held-out words by patching the top heads together against random ones.")}

    def task_data(self, model: Any) -> list[TaskData]:
        """The configured tasks kept for ``model``'s tokenizer, each split by query word."""
        if not has_tokenizer(model):
            raise InputError("The function_vector detector reads text prompts: this model has no tokenizer.")
        out = []
        for index, name in enumerate(self.config.tasks):
            task = icl_task(model, name)
            scored, held_out = split_pairs(task.pairs, self.config.held_out_share, self.config.seed + index)
            out.append(TaskData(task, scored, held_out))
        return out

    def prompts(self, model: Any, split: str) -> list[ICLPrompt]:
        """Clean prompts of every task: ``"held_out"`` from the held-out pairs; ``"mean"`` and
        ``"score"`` from the two halves of the scored pairs (a seeded split), so that no query or
        demonstration of a scored prompt is in a prompt the means are taken over; before the
        correctness filter."""
        sizes = {"mean": self.config.n_mean_prompts, "score": self.config.n_prompts,
                 "held_out": self.config.n_validation_prompts}
        if split not in sizes:
            raise InputError(f"The 'split' parameter of prompts must be one of {', '.join(map(repr, sizes))}; "
                             f"got {split!r}.")
        out = []
        for data in self.task_data(model):
            score_pairs, mean_pairs = split_pairs(data.scored, 0.5, f"{self.config.seed}:{data.task.name}:means")
            pairs = {"held_out": data.held_out, "mean": mean_pairs, "score": score_pairs}[split]
            out += build_prompts(data.task, pairs, sizes[split], self.config.n_shots,
                                 f"{self.config.seed}:{data.task.name}:{split}")
        return out

    def examples(self, model: Any) -> list[Example]:
        """A clean prompt of each of the first two tasks that this tokenizer leaves enough
        single-token answers for, then the first one with its labels shuffled (what the heads'
        means are patched into); scored pairs only, none without a tokenizer."""
        if not has_tokenizer(model):
            return []
        clean = []
        for data in self.task_data(model):
            if len(data.scored) > self.config.n_shots and len(clean) < 2:
                clean += build_prompts(data.task, data.scored, 1, self.config.n_shots,
                                       f"{self.config.seed}:{data.task.name}:mean")
        examples = [(f"{p.task}: '{p.query}' -> '{p.answer}'", p.text) for p in clean]
        if clean:
            examples.append((f"{clean[0].task}, labels shuffled: still '{clean[0].answer}'?",
                             shuffled(clean[0], self.config.seed).text))
        return examples

    def task_means(self, model: Any, batch_size: Optional[int] = None, progress: Optional[bool] = None,
                   control: bool = True) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Any]]:
        """Per task: the mean last-position ``hook_z`` ``[n_layers, n_heads, d_head]`` over the mean
        prompts kept, the same over their shuffled versions (the control; empty without
        ``control``), and counts."""
        prompts = self.prompts(model, "mean")
        clean = last_position_run(model, prompts, batch_size, progress)
        keep = clean["correct"] if self.config.only_correct else torch.ones(len(prompts), dtype=torch.bool)
        kept = [p for p, k in zip(prompts, keep.tolist(), strict=True) if k]
        shuffled_kept = [shuffled(p, _row_seed(self.config.seed, i)) for i, p in enumerate(kept)]
        control_run = last_position_run(model, shuffled_kept, batch_size, progress) if kept and control else None
        means, control_means, info = {}, {}, {}
        for name in dict.fromkeys(p.task for p in prompts):
            rows = [i for i, p in enumerate(prompts) if p.task == name and keep[i]]
            kept_rows = [i for i, p in enumerate(kept) if p.task == name]
            info[name] = {"mean_prompts": sum(p.task == name for p in prompts), "mean_kept": len(rows),
                          "clean_accuracy": float(clean["correct"][[i for i, p in enumerate(prompts)
                                                                    if p.task == name]].float().mean())}
            if len(rows) >= MIN_PROMPTS:
                means[name] = clean["z"][rows].mean(dim=0)
                if control_run is not None:
                    control_means[name] = control_run["z"][kept_rows].mean(dim=0)
        return means, control_means, info

    def score(self, model: Any, batch_size: Optional[int] = None, progress: Optional[bool] = None) -> HeadScores:
        means, control_means, info = self.task_means(model, batch_size, progress)
        clean_prompts = self.prompts(model, "score")
        clean = last_position_run(model, clean_prompts, batch_size, progress, with_z=False)
        keep = clean["correct"] if self.config.only_correct else torch.ones(len(clean_prompts), dtype=torch.bool)
        rows = [shuffled(p, _row_seed(self.config.seed, i)) for i, p in enumerate(clean_prompts)
                if keep[i] and p.task in means]
        for name in info:
            info[name]["prompts_kept"] = sum(p.task == name for p in rows)
        rows = [p for p in rows if info[p.task]["prompts_kept"] >= MIN_PROMPTS]
        if not rows:
            raise EmptyResultError(_no_task_message(info, self.config))
        control_rows = [p for name in dict.fromkeys(p.task for p in rows)
                        for p in [q for q in rows if q.task == name][: self.config.n_control_prompts]]
        replacements = torch.stack([means[p.task] for p in rows] + [control_means[p.task] for p in control_rows])
        scan = final_position_patch_scan(model, tokenize(model, [p.text for p in rows + control_rows]), replacements,
                                         AnswerProbability([p.answer_id for p in rows + control_rows]),
                                         progress=progress)
        effects = scan.effects  # [n_layers, n_heads, rows + control rows]
        tasks = [p.task for p in rows]
        values, standard_error, per_task = pooled_mean(effects[..., : len(rows)], tasks)
        extras = {"standard_error": standard_error, "control": effects[..., len(rows):].mean(dim=-1)}
        extras.update({f"aie:{name}": value for name, value in per_task.items()})
        shuffled_probability = scan.clean[: len(rows)]
        for name in info:
            picked = torch.tensor([t == name for t in tasks])
            if bool(picked.any()):
                info[name]["shuffled_answer_probability"] = float(shuffled_probability[picked].mean())
        metadata = {"tasks": info, "n_prompts": len(rows), "n_control_prompts": len(control_rows),
                    "tasks_scored": sorted(set(tasks)), "n_shots": self.config.n_shots}
        return self.result(model, values, extras, metadata)

    def significance(
        self, model: Any, scores: HeadScores, batch_size: Optional[int] = None, progress: Optional[bool] = None
    ) -> list[Significance]:
        """One-sided t-test of the AIE over the scored prompts (t = AIE / SE, ``n_prompts - 1``
        df) at the Bonferroni critical value over all heads, and the control floor: the largest
        AIE any head gives with the mean of shuffled prompts patched in (no task shown)."""
        for key in ("standard_error", "control"):
            if key not in scores.extras:
                raise InputError(f"These function_vector scores have no '{key}' (saved by an older headscope); "
                                 "rescore them.")
        t = scores.values / scores.extras["standard_error"].clamp(min=1e-12)
        n_prompts = int(scores.metadata.get("n_prompts") or 0)
        if n_prompts < 2:
            raise InputError(f"The function_vector significance test needs at least 2 scored prompts; these scores "
                             f"have {n_prompts}. Score with more n_prompts.")
        df = n_prompts - 1
        critical = float(bonferroni_t(scores.values.numel(), df, two_sided=False))
        floor = float(torch.nan_to_num(scores.extras["control"], nan=-float("inf")).max())
        details = {"t_critical": critical, "df": df, "n_prompts": n_prompts,
                   "alpha": DEFAULT_ALPHA, "floor_probability": floor}
        rule = (f"one-sided t-test of the AIE over the scored prompts of all tasks ({df} df), Bonferroni over all "
                f"heads (family-wise {DEFAULT_ALPHA})")
        floor_rule = ("a control without the task: above the largest AIE any head gives when the mean patched in "
                      f"comes from shuffled-label prompts ({floor:.3g})")
        return [Significance(self.name, self.name, t, critical, "t of the average indirect effect", rule, details,
                             effect=scores.values, floor=floor, floor_rule=floor_rule,
                             effect_name="average indirect effect (rise of P(answer))")]

    def validation_task(self, model: Any) -> ValidationTask:
        """P(answer) on held-out shuffled prompts with the head set's task means patched in."""
        config = self.config
        means, _, _ = self.task_means(model, control=False)
        prompts = [p for p in self.prompts(model, "held_out") if p.task in means]
        if config.only_correct and prompts:
            correct = last_position_run(model, prompts, with_z=False)["correct"]
            prompts = [p for p, ok in zip(prompts, correct.tolist(), strict=True) if ok]
        if not prompts:
            raise EmptyResultError("The function_vector detector has no held-out prompt to validate on: the model "
                                   "answers none of the held-out clean prompts of the tasks it was scored on. Use "
                                   "only_correct=False, more tasks or more n_validation_prompts.")
        rows = [shuffled(p, _row_seed(config.seed + 1, i)) for i, p in enumerate(prompts)]

        def measure(model: Any, head_sets: list, method: str) -> Tensor:
            if method != "task_mean":
                raise InputError(f"The function_vector validation patches the heads' task means into shuffled "
                                 f"prompts (method 'task_mean'); got method {method!r}. Leave the method unset.")
            table = torch.stack([means[p.task] for p in rows])
            return final_position_patch_sets(model, tokenize(model, [p.text for p in rows]), table,
                                             AnswerProbability([p.answer_id for p in rows]), head_sets)

        return ValidationTask(rows, None, "P(answer) on held-out shuffled-label prompts, task means patched in at "
                              "the last position", ablation_hurts_when="increases", measure=measure,
                              default_method="task_mean")


def _row_seed(seed: int, index: int) -> str:
    return f"{seed}:shuffle:{index}"


def _no_task_message(info: dict[str, Any], config: FunctionVectorConfig) -> str:
    counts = "; ".join(f"{name}: clean accuracy {v['clean_accuracy']:.2f}, {v['mean_kept']} mean prompts and "
                       f"{v.get('prompts_kept', 0)} scored prompts kept" for name, v in info.items())
    return (f"The function_vector detector found no task this model does in context ({counts}); each task needs "
            f"{MIN_PROMPTS} correctly answered clean prompts in each set. Use more prompts (n_prompts, "
            "n_mean_prompts), other tasks, or only_correct=False to score on every prompt.")


class AnswerProbability:
    """``metric(logits, examples)``: the softmax probability of each example's answer token."""

    def __init__(self, answer_ids: list[int]) -> None:
        self.answer_ids = torch.tensor(answer_ids, dtype=torch.long)

    def __call__(self, logits: Tensor, examples: Tensor) -> Tensor:
        answers = self.answer_ids.to(logits.device)[examples]
        return logits.float().softmax(dim=-1).gather(1, answers[:, None])[:, 0]


def last_position_run(
    model: Any, prompts: list[ICLPrompt], batch_size: Optional[int] = None, progress: Optional[bool] = None,
    with_z: bool = True,
) -> dict[str, Tensor]:
    """Per prompt: whether the answer is the top-1 next token (``correct``), its probability, and
    with ``with_z`` every head's output at the last position ``z`` ``[prompts, n_layers, n_heads, d_head]``."""
    layers = range(model_shape(model).n_layers) if with_z else range(0)
    names = [hook_name(layer, "z") for layer in layers]
    answers = torch.tensor([p.answer_id for p in prompts])

    def reduce(logits: Tensor, cache: dict, chunk: TokenBatch, rows: slice) -> dict[str, Tensor]:
        index = torch.arange(len(chunk), device=logits.device)
        answer = answers[rows].to(logits.device)
        out = {"correct": logits.argmax(dim=-1) == answer,
               "probability": logits.float().softmax(dim=-1)[index, answer]}
        if with_z:
            out["z"] = last_position_z(model, cache, chunk.last_positions, layers)
        return {key: value.cpu() for key, value in out.items()}

    return run_batched(model, tokenize(model, [p.text for p in prompts]), reduce, names,
                       batch_size, progress, desc="function_vector prompts", logits="last")


def pooled_mean(
    effects: Float[Tensor, "n_layers n_heads prompts"], tasks: list[str]
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """The mean effect over every scored prompt of every task, its standard error over prompts
    (``std / sqrt(n)``), and each task's mean."""
    per_task = {name: effects[..., torch.tensor([t == name for t in tasks])].mean(dim=-1)
                for name in dict.fromkeys(tasks)}
    return effects.mean(dim=-1), standard_error(effects, dim=-1), per_task


__all__ = ["FunctionVectorConfig", "FunctionVectorDetector"]
