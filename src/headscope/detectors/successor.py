"""Successor heads — Gould, Ong, Ogden, Conmy 2023, "Successor Heads: Recurring, Interpretable
Attention Heads In The Wild" (arXiv 2312.09230).

Data: succession tasks (``headscope.tasks.succession``): days, months, number words, ordinals,
letters, Roman numerals, digits, ... kept where each item is one token.

Your own lists (``data="lists.txt"``, or ``{"successor": {"data": ...}}`` in a CLI config) replace
the shipped tasks (``tasks`` is then ignored): a ``.txt`` file with one ordered list per line,
items separated by commas (``Monday, Tuesday, Wednesday, Thursday``; named ``line<N>``, no wrap),
or a ``.jsonl`` file of ``{"name": "weekdays", "items": ["Monday", ...], "wraps": true}``. Items
are written without a leading space (``forms`` add it). Each list needs at least
``context_items + 1`` items (4 by default) and, for this tokenizer, a pair of neighbouring items
that are both single tokens in some form; the file needs at least 2 in-context prompts in all, one
to score and one to hold out. ``check_data()`` reads the file without a model; every error names
the file and line (``headscope.tasks.succession.read_succession_lists``).

Scores, each pooled over every pair of every task (per-task breakdowns in ``extras``):

* ``values``, the paper's weight-based *effective OV* score. For task tokens ``T`` and
  head ``h`` of layer ``l``::

      e(t)      = effective embedding of t      (``embedding``: "mlp0_residual" = E[t] +
                  MLP0(RMSNorm_0(E[t])), the residual after block 0 without attention;
                  "mlp0" = MLP0(RMSNorm_0(E[t])), the paper's; "raw" = E[t]; E = W_E times the
                  model's embedding scale, MLP0 through its post-MLP norm where it has one)
      x(t)      = RMSNorm_l(e(t)) if ``head_input_norm`` else e(t)   (the norm the head reads through)
      logits(t) = x(t) W_V^{kv(h)} W_O^h · diag(w_final) W_U[:, T]     (``unembed_norm``: with the
                  final norm's weights, else plain W_U; tied embeddings make W_U = W_E^T)

  A pair (t_i → t_{i+1}) succeeds when t_{i+1} has the highest logit among ``T``; the score is
  the share of pairs that succeed.
* ``extras["contextual"]``, the *contextual* score: on prompts such as ``" Monday, Tuesday, Wednesday,"`` the
  head's direct logit contribution at the final position (its output through the final norm's
  weights; the run's RMS scale is a positive factor per prompt and cannot change the top token)
  restricted to the task's tokens; success when the correct
  successor is its top task token. Computed on a dev half of the pairs; the other half is
  held out for validation.

Validation metric: top-1 accuracy of the model's next token on the held-out succession prompts
(zero ablation by default, as in the issue's measurement); ablating successor heads lowers it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Optional

import einops
import torch
from jaxtyping import Bool, Float, Int
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
from headscope.engine.architecture import architecture
from headscope.engine.circuits import apply_norm
from headscope.engine.devices import layer_device, readable_weights
from headscope.engine.unembed import (
    center_for_norm,
    direct_unembed,
    final_norm_weight,
    head_output_hooks,
    head_output_weights,
    input_embedding,
    last_position_head_outputs,
    post_attention_weights,
    unembedding,
)
from headscope.errors import DataError, InputError
from headscope.results import HeadScores
from headscope.significance import Significance
from headscope.stats import DEFAULT_ALPHA, permutation_null_maxima
from headscope.tasks.succession import (
    FORMS,
    ITEMS,
    SuccessionList,
    SuccessionTask,
    read_succession_lists,
    succession_tasks,
    user_tasks,
)

EMBEDDINGS = ("mlp0_residual", "mlp0", "raw")

SUCCESSOR_THRESHOLD = 0.4  # curt-tigges/circuits-over-time calls a head a successor head above this
N_PERMUTATIONS = 200  # random successor maps of the significance rule's null


MIN_PROMPTS = 2  # in-context prompts a data file must give: one scored, one held out for validation


@dataclass
class SuccessorConfig(DetectorConfig):
    tasks: tuple[str, ...] = setting(tuple(ITEMS), "shipped succession tasks scored (ignored with data)",
                                     choices=tuple(ITEMS))
    forms: tuple[str, ...] = setting(("space", "bare"), "how items are written: with a leading space, bare, ...",
                                     choices=FORMS)
    embedding: str = setting("mlp0_residual", "effective embedding: residual after block 0, MLP0 alone (the paper's) "
                             "or raw", choices=EMBEDDINGS)
    head_input_norm: bool = setting(True, "pass the effective embedding through the head's layer's RMSNorm")
    unembed_norm: bool = setting(True, "weight the unembedding by the final norm's weights")
    context_items: int = setting(3, "items shown before the one whose successor is asked for", min=1)
    separator: str = setting(",", "text between the items of an in-context prompt")
    data: Optional[str] = setting(None, "your own ordered lists: .txt (comma-separated, one list a line) or .jsonl "
                                  "({\"name\", \"items\", \"wraps\"}); replaces tasks", path=True)


@dataclass
class SuccessionPrompt:
    """An in-context succession prompt: its text, the task it comes from and the expected token."""

    text: str
    task: SuccessionTask
    target_index: int  # index (in the task's items) of the expected successor


@register_detector
class SuccessorDetector(Detector):
    name = "successor"
    atlas_order = 40
    Config = SuccessorConfig
    summary = "successor top among task tokens: effective OV circuit and in-context direct logits (Gould et al. 2023)"
    cost = "score 2 s, significance 0.5 s, validation 7 s"
    explanation = {"successor": (
        "A successor head maps a token of an ordered sequence to the next one: Monday to Tuesday, 3 to 4, March "
        "to April (Gould et al. 2023, 'Successor Heads'). headscope scores the head's effective OV circuit, the "
        "share of items whose successor gets the highest logit when the head reads the item, checks it on prompts "
        "such as ' Monday, Tuesday, Wednesday,', and validates by the model's top-1 accuracy on held-out "
        "succession prompts with the top heads ablated.")}

    def tasks(self, model: Any) -> list[SuccessionTask]:
        """The shipped ``tasks`` in every form, or with ``data`` the lists of the file, kept where
        their items are single tokens for ``model``'s tokenizer."""
        if self.config.embedding not in EMBEDDINGS:
            raise InputError(f"Unknown effective embedding {self.config.embedding!r}; choose one of {', '.join(EMBEDDINGS)}.")
        if self.config.data:
            return user_tasks(model, self.user_lists(), self.config.forms)
        return succession_tasks(model, self.config.tasks, self.config.forms)

    def user_lists(self) -> list[SuccessionList]:
        """The ordered lists of the ``data`` file (no model needed), each at least
        ``context_items + 1`` long."""
        return read_succession_lists(self.config.data, min_items=self.config.context_items + 1)

    def check_data(self) -> None:
        """Read the ``data`` file without a model: a :class:`DataError` naming file and line for a bad
        line or a list too short, or naming the file when all lists give fewer than 2 prompts."""
        if not self.config.data:
            return
        lists = self.user_lists()
        n = self.config.context_items
        per_form = sum(len(lst.items) if lst.wraps else len(lst.items) - n for lst in lists)
        forms = len(self.config.forms)
        self._check_prompt_count(per_form * forms, f"in {forms} form(s), its lists give")

    def _check_prompt_count(self, n_prompts: int, what: str) -> None:
        if n_prompts < MIN_PROMPTS:
            raise DataError(
                f"{self.config.data}: {what} {n_prompts} in-context prompt{'s' * (n_prompts != 1)}; the successor "
                f"detector needs at least {MIN_PROMPTS} (half are scored, half held out for validation). A list of "
                f"L items gives L - {self.config.context_items} prompts in each form (L if it wraps), where its items "
                "are single tokens: add items or lists."
            )

    def examples(self, model: Any) -> list[Example]:
        """Three in-context succession prompts of its dev half, each from another task, in the
        order of the tasks (none without a tokenizer: the tasks are text)."""
        if not has_tokenizer(model):
            return []
        first: dict[str, SuccessionPrompt] = {}
        for prompt in self.prompts(model, "dev"):
            first.setdefault(prompt.task.name, prompt)
        order = [task.name for task in self.tasks(model)]
        chosen = sorted(first.values(), key=lambda p: order.index(p.task.name))[:3]
        return [(f"{p.task.name}: the next item is '{p.task.texts[p.target_index].strip()}'", p.text) for p in chosen]

    def prompts(self, model: Any, split: str = "dev") -> list[SuccessionPrompt]:
        """Succession prompts of every task, the pairs split in halves by ``seed`` (dev / test)."""
        prompts = [p for task in self.tasks(model) for p in succession_prompts(task, self.config.context_items,
                                                                               self.config.separator)]
        if self.config.data:
            self._check_prompt_count(len(prompts), "for this model's tokenizer, the single-token items of its lists "
                                                   "give")
        random.Random(self.config.seed).shuffle(prompts)
        half = len(prompts) // 2
        return prompts[:half] if split == "dev" else prompts[half:]

    def score(self, model: Any, batch_size: Optional[int] = None, progress: Optional[bool] = None) -> HeadScores:
        tasks = self.tasks(model)
        ov = ov_success_by_task(model, tasks, self.config)
        prompts = self.prompts(model, "dev")
        contextual = contextual_success(model, prompts, batch_size, progress)  # [prompts, layers, heads]
        extras = {"contextual": contextual.float().mean(dim=0)}
        extras.update({f"ov:{key}": success.float().mean(dim=0) for key, success in ov.items()})
        by_task = {}
        for prompt, success in zip(prompts, contextual, strict=True):
            by_task.setdefault(f"{prompt.task.name}:{prompt.task.form}", []).append(success)
        extras.update({f"context:{key}": torch.stack(rows).float().mean(dim=0) for key, rows in by_task.items()})
        metadata = {
            "tasks": {f"{t.name}:{t.form}": {"items": len(t.token_ids), "of": len(t.texts), "pairs": len(t.pairs),
                                             "dropped_pairs": t.dropped_pairs} for t in tasks},
            "n_prompts": len(prompts),
            "chance": float(torch.tensor([1 / len(t.token_ids) for t in tasks for _ in t.pairs]).mean()),
        }
        if self.config.data:
            metadata["data_lists"] = {lst.name: {"line": lst.line, "items": len(lst.items), "wraps": lst.wraps}
                                      for lst in self.user_lists()}
        return self.result(model, _pooled(ov), extras, metadata)

    def significance(
        self, model: Any, scores: HeadScores, batch_size: Optional[int] = None, progress: Optional[bool] = None
    ) -> list[Significance]:
        """Permutation null: each head's pooled effective-OV accuracy against the same accuracy for
        a *random* successor map of each task (its tokens permuted; 200 permutations). A head is
        significant above the 95th percentile of the best head's null accuracy (family-wise 5%)
        *and* above the effect-size floor, a reimplementation's fixed threshold of 0.4
        (circuits-over-time): beating random maps is not enough to call a head that maps 14% of
        tokens to their successor (chance ``metadata["chance"]`` is a few percent) a successor head."""
        tasks = self.tasks(model)
        predictions = [effective_ov_predictions(model, task, self.config) for task in tasks]
        maxima = permutation_null_maxima(predictions, [len(t.token_ids) for t in tasks], N_PERMUTATIONS, self.config.seed)
        threshold = float(torch.quantile(maxima, 1 - DEFAULT_ALPHA))
        details = {"chance": scores.metadata.get("chance"), "n_permutations": N_PERMUTATIONS,
                   "null_max_median": float(maxima.median()), "alpha": DEFAULT_ALPHA,
                   "fixed_threshold_elsewhere": {"value": SUCCESSOR_THRESHOLD, "source": "curt-tigges/circuits-over-time"}}
        return [Significance(self.name, self.name, scores.values, threshold,
                             "effective-OV successor accuracy, pooled over tasks",
                             f"permutation null: above the {100 * (1 - DEFAULT_ALPHA):.0f}th percentile of the best "
                             f"head's accuracy for random successor maps ({N_PERMUTATIONS} permutations; family-wise)",
                             details, floor=SUCCESSOR_THRESHOLD,
                             floor_rule=(f"a published reimplementation's fixed threshold: accuracy > {SUCCESSOR_THRESHOLD} "
                                         "(curt-tigges/circuits-over-time)"))]

    def validation_task(self, model: Any) -> ValidationTask:
        prompts = self.prompts(model, "test")
        return ValidationTask(
            data=tokenize(model, [p.text for p in prompts]),
            metric=SuccessorAccuracy(model, prompts),
            metric_name="top-1 next token is the successor (held-out succession prompts)",
            ablation_hurts_when="decreases",
            last_position=True,
            default_method="zero",
        )


def succession_prompts(task: SuccessionTask, context_items: int = 3, separator: str = ",") -> list[SuccessionPrompt]:
    """One prompt per kept pair with ``context_items`` items up to its first (wrapping where the task wraps)."""
    n = len(task.texts)
    return [
        SuccessionPrompt(separator.join(task.texts[(first - k) % n] for k in reversed(range(context_items))) + separator,
                         task, second)
        for first, second in task.pairs
        if task.wraps or first >= context_items - 1
    ]


def ov_success_by_task(model: Any, tasks: list[SuccessionTask], config: SuccessorConfig) -> dict[str, Tensor]:
    """Effective-OV success ``[pairs, n_layers, n_heads]`` per ``"task:form"``."""
    return {f"{task.name}:{task.form}": effective_ov_success(model, task, config) for task in tasks}


def _pooled(success: dict[str, Tensor]) -> Tensor:
    return torch.cat([s for s in success.values()], dim=0).float().mean(dim=0)


def effective_embeddings(model: Any, token_ids: list[int], embedding: str) -> Float[Tensor, "n d_model"]:
    """The residual a token leaves for later layers, by the chosen convention (no attention, no
    position): the embedding as the model scales it (√d_model for Gemma), and MLP0's output through
    the block's own norms (pre-MLP norm, and the post-MLP norm where the model has one)."""
    arch = architecture(model)
    with torch.no_grad():
        table = input_embedding(model)
        raw = table[torch.tensor(token_ids, device=table.device)].to(layer_device(model, 0)) * arch.embedding_scale
        if embedding == "raw":
            return raw
        block = model.blocks[0]
        hidden = apply_norm(getattr(block, "ln2", None), raw[None])
        mlp_out = apply_norm(getattr(block, "ln2_post", None) if arch.post_mlp_norm else None, block.mlp(hidden))[0].float()
        mlp_out = mlp_out.to(raw.device)
        return mlp_out if embedding == "mlp0" else raw + mlp_out


def task_unembed(model: Any, token_ids: list[int], unembed_norm: bool = True) -> Float[Tensor, "d_model n"]:
    """Unembedding columns of ``token_ids``, weighted by the final norm's weights when ``unembed_norm``."""
    table = unembedding(model)
    unembed = table[:, torch.tensor(token_ids, device=table.device)]
    return final_norm_weight(model).float().to(table.device)[:, None] * unembed if unembed_norm else unembed


def head_ov_logits(
    model: Any, layer: int, heads: list[int], embedded: Float[Tensor, "n d_model"], unembed: Tensor,
    head_input_norm: bool = True,
) -> Float[Tensor, "heads n n_out"]:
    """``RMSNorm_layer(embedded) W_V W_O^h`` through ``unembed``, for each listed head of ``layer``;
    through a post-attention norm, its weights apply (its scale is positive and cannot change
    which task token is on top)."""
    attn = model.blocks[layer].attn
    group = model_shape(model).group_size
    post_weight = post_attention_weights(model)[layer]
    device = layer_device(model, layer)
    with torch.no_grad(), readable_weights(attn):
        norm = getattr(model.blocks[layer], "ln1", None) if head_input_norm else None
        x = apply_norm(norm, embedded.to(device)[None])[0].to(device)
        values = einops.einsum(x, attn.W_V.detach().float().to(device),
                               "n d_model, n_kv_heads d_model d_head -> n_kv_heads n d_head")
        w_o = attn.W_O.detach().float().to(device)
        outputs = [values[head // group] @ w_o[head] for head in heads]  # [n, d_model] each
        if post_weight is not None:
            outputs = [output * post_weight.to(device) for output in outputs]
        return torch.stack([center_for_norm(model, output) @ unembed.to(device) for output in outputs])


def effective_ov_success(model: Any, task: SuccessionTask, config: SuccessorConfig) -> Bool[Tensor, "pairs n_layers n_heads"]:
    """For each pair and head: is the successor the top task token of the head's effective OV logits?"""
    predictions, targets = effective_ov_predictions(model, task, config)
    return predictions == targets[:, None, None]


def effective_ov_predictions(
    model: Any, task: SuccessionTask, config: SuccessorConfig
) -> tuple[Int[Tensor, "pairs n_layers n_heads"], Int[Tensor, " pairs"]]:
    """For each pair's first item and each head: the task token (its index among the task's
    tokens, sorted by id) with the highest effective OV logit; and each pair's successor index."""
    shape = model_shape(model)
    order = sorted(task.token_ids)
    position = {item: i for i, item in enumerate(order)}
    ids = [task.token_ids[i] for i in order]
    embedded = effective_embeddings(model, ids, config.embedding)  # [n, d_model]
    unembed = task_unembed(model, ids, config.unembed_norm)
    sources = torch.tensor([position[a] for a, _ in task.pairs])
    targets = torch.tensor([position[b] for _, b in task.pairs])
    predictions = torch.zeros(len(task.pairs), shape.n_layers, shape.n_heads, dtype=torch.long)
    for layer in range(shape.n_layers):
        logits = head_ov_logits(model, layer, list(range(shape.n_heads)), embedded, unembed, config.head_input_norm)
        predictions[:, layer] = logits[:, sources].argmax(dim=-1).T.cpu()
    return predictions, targets


def contextual_success(
    model: Any, prompts: list[SuccessionPrompt], batch_size: Optional[int] = None, progress: Optional[bool] = None
) -> Bool[Tensor, "prompts n_layers n_heads"]:
    """Per prompt and head: is the correct successor the top task token of the head's direct logits
    at the final position?"""
    shape = model_shape(model)
    unembed = direct_unembed(model)
    w_o, post_weights = head_output_weights(model), post_attention_weights(model)
    hooks = [head_output_hooks(model, layer) for layer in range(shape.n_layers)]
    names = [name for layer_hooks in hooks for name in layer_hooks]

    def reduce(logits: Tensor, cache: dict, chunk: TokenBatch, rows: slice) -> Tensor:
        outputs = torch.stack([
            last_position_head_outputs(model, cache[z], chunk.last_positions, w_o[layer], post_weights[layer],
                                       cache[scale[0]] if scale else None).to(logits.device)
            for layer, (z, *scale) in enumerate(hooks)
        ], dim=1)  # [batch, n_layers, n_heads, d_model], on the logits' device
        success = []
        for row, prompt in enumerate(prompts[rows]):
            ids = prompt.task.task_token_ids
            target = sorted(prompt.task.token_ids).index(prompt.target_index)
            columns = unembed[:, torch.tensor(ids, device=unembed.device)].to(logits.device)
            head_logits = outputs[row] @ columns  # [layers, heads, n_task]
            success.append(head_logits.argmax(dim=-1) == target)
        return torch.stack(success).cpu()

    return run_batched(model, tokenize(model, [p.text for p in prompts]), reduce, names, batch_size, progress,
                       desc="successor", logits="last")


class SuccessorAccuracy:
    """``metric(logits, chunk)``: 1 where the top next token at the last position is the successor.
    Rows are matched to prompts by their tokens, so chunked batches work."""

    def __init__(self, model: Any, prompts: list[SuccessionPrompt]) -> None:
        batch = tokenize(model, [p.text for p in prompts])
        self.targets = {
            row_tokens(batch, row): p.task.token_ids[p.target_index]
            for row, p in enumerate(prompts)
        }

    def __call__(self, logits: Tensor, chunk: TokenBatch) -> Tensor:
        final = final_logits(logits, chunk)
        targets = torch.tensor([self.targets[row_tokens(chunk, row)] for row in range(len(chunk))], device=logits.device)
        return (final.argmax(dim=-1) == targets).float()
