"""Name movers, negative name movers and S-inhibition heads — Wang, Variengien, Conmy, Shlegeris,
Steinhardt 2022, "Interpretability in the Wild: a Circuit for Indirect Object Identification in
GPT-2 small" (arXiv 2211.00593).

Data: IOI prompts (``headscope.tasks.ioi``): "When Mary and John went to the store, John gave a
drink to" -> " Mary", from 20 shipped templates in both name orders (ABBA, BABA), with names
kept only where ``" Name"`` is one token of the model's tokenizer (``names`` replaces the shipped
list, e.g. single letters for a byte tokenizer) and random places and objects, all drawn with
``seed``. The templates are split (``tasks.ioi.split_templates``, seeded): ``held_out_share`` of
them are held out for validation, the rest scored, so validation never sees a sentence frame that
chose a head. Each prompt has an ABC version (a third name C at S2) for patching.

Score (``values``, the name-mover score): direct logit attribution of each head's output at the
final position (END), through the final norm (its weights and the run's own scale there), onto
``W_U[IO] - W_U[S]`` (``engine.unembed.final_position_attributions``), averaged over prompts:

    DLA_h = (z_h W_O^h / rms_final) . diag(w_norm) . (W_U[:, IO] - W_U[:, S])

Extras: ``standard_error`` of that mean; ``attention_io``, ``attention_s1``, ``attention_s2``,
each head's mean attention from END to the IO, S1 and S2 tokens; ``attention_io_excess`` = mean of
``attention_io - attention_s1`` with its ``attention_excess_se``: IO and S1 are the two names
introduced together, and over both orders each sits in each slot equally often, so a head that
attends to a slot (or to any name) gains nothing here — the same-position control of the
attention to IO; ``unrelated``: the mean DLA onto two names that are *not* in the prompt (the
effect-size floor); ``s_inhibition``, ``s_inhibition_se``, ``s_inhibition_control`` and
``s_inhibition_exact`` (below).

S-inhibition (extras; the paper finds these heads by path patching from each head to the name
movers' queries, with the ABC prompts as the corrupted input). headscope's approximation: the
*receivers* are the ``n_receivers`` heads with the largest positive DLA among those whose
attention to IO beats their attention to S1 by the name movers' attention t-test (where none does,
among those with any positive excess): the name movers as scored here. Their metric is ``M`` = attention from END to IO
minus attention to S1 and S2, summed over the receivers. For every head ``h`` upstream of them,
``s_inhibition = -(ΔM)`` when ``h``'s output at END alone is patched in from the ABC prompt,
estimated to first order (attribution patching: ``grad_{z_h[END]} M . (z_h^ABC[END] -
z_h[END])``, one forward and one backward pass for all heads); positive = the head makes the name
movers prefer IO over S. ``s_inhibition_exact`` gives the exact activation-patching value (one
forward per head) for the ``n_confirm`` heads that rank highest. How this differs from the
paper's path patching: (1) only END is patched, which reaches the receivers only through their
*query* at END (keys and values at earlier positions cannot see END), as in the paper, but (2)
through every path from ``h`` to those queries (directly and through intermediate heads and MLPs
at END), where the paper's path patching keeps only the direct path; (3) the metric is the
receivers' attention (the mechanism the paper names), not the logit difference after them; (4)
the ranking over all heads is first-order; the exact values confirm its top. Heads at or above
the last receiver's layer cannot reach it and are NaN. ``s_inhibition_control`` is the same
estimate with the patch taken from a *control* prompt: another scored template with the same
names in the same order (the duplicated name unchanged), whose largest |mean| over heads is the
S-inhibition floor.

Significance: name movers: one-sided tests over prompts of both the DLA (``t`` above the
two-sided Student-t critical value at family-wise 5% over all heads, Bonferroni) and the
attention to IO beyond S1 (``t`` of ``attention_io_excess``, same critical value): the statistic
is the smaller ``t`` (an intersection-union test: significant only when both are); floor: the mean
DLA must exceed the largest |mean DLA| any head gives the two unrelated names. Negative name
movers: the same with ``-DLA``. S-inhibition heads: ``t`` of the per-prompt attribution estimate
(Bonferroni over all heads), floor the largest |mean| of the control patch.

Validation metric: ``logit(IO) - logit(S)`` at the final position on the held-out templates'
prompts; mean-ablating the top name movers lowers it (``ablation_hurts_when="decreases"``).
"""

from __future__ import annotations

import hashlib
import math
import random
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
from headscope.engine.architecture import final_norm_weight, head_hook
from headscope.engine.heads import hook_name, model_shape
from headscope.engine.metrics import final_logits
from headscope.engine.runner import Halving, auto_batch_size, model_device, run_batched
from headscope.engine.tokens import TokenBatch, row_tokens, tokenize
from headscope.engine.unembed import (
    FINAL_SCALE,
    final_position_attributions,
    head_output_hooks,
    head_output_weights,
    last_position_z,
    unembedding,
)
from headscope.errors import EmptyResultError, InputError
from headscope.results import HeadScores
from headscope.significance import Significance
from headscope.stats import DEFAULT_ALPHA, bonferroni_t, standard_error
from headscope.tasks.ioi import (
    IOIItem,
    ioi_items,
    ioi_prompts,
    make_prompt,
    single_token_names,
    split_templates,
    templates,
    words,
)


@dataclass
class NameMoverConfig(DetectorConfig):
    n_prompts: int = setting(48, "IOI prompts scored (the scored templates cycled, each in both orders)", min=4)
    n_validation: int = setting(40, "IOI prompts of the held-out templates for validation", min=2)
    held_out_share: float = setting(0.3, "share of the templates held out for validation (strictly between 0 and 1)",
                                    min=0.0, max=1.0, exclusive=True)
    names: Optional[tuple[str, ...]] = setting(None, "names to use instead of the shipped list (kept where ' Name' "
                                               "is one token; at least 5)")
    n_receivers: int = setting(3, "top name movers whose attention the S-inhibition scan measures", min=1)
    n_confirm: int = setting(3, "top S-inhibition heads whose first-order estimate is checked by exact patching "
                             "(0: none)", min=0)
    n_report: int = setting(5, "heads of each role listed in the metadata", min=1)


@register_detector
class NameMoverDetector(Detector):
    name = "name_mover"
    atlas_order = 67
    Config = NameMoverConfig
    summary = "IOI: direct logit attribution onto IO minus S, attention to IO, S-inhibition (Wang et al. 2022)"
    cost = "score 11 s, significance 0 s, validation 8 s"
    explanation = {
        "name_mover": (
            "A name mover copies the indirect object's name to the output: in 'When Mary and John went to the store, "
            "John gave a drink to', it attends from the last token to 'Mary' and raises ' Mary' (Wang et al. 2022, "
            "IOI). headscope scores each head's direct logit attribution onto IO minus S at the last position and "
            "requires attention to IO beyond the other name introduced with it; validated by the logit difference "
            "on held-out templates with the top heads ablated."),
        "negative_name_mover": (
            "A negative name mover attends to the indirect object like a name mover but writes against it, lowering "
            "its logit (Wang et al. 2022, IOI; copy suppression). headscope finds heads with a significantly "
            "negative direct logit attribution onto IO minus S at the last position that attend to IO beyond the "
            "other name introduced with it."),
        "s_inhibition": (
            "An S-inhibition head reads the repeated subject ('John ... John') and tells the name movers not to "
            "attend to it (Wang et al. 2022, found by path patching into the name movers' queries). headscope "
            "patches each head's last-position output in from the prompt with a third name instead of the "
            "repeated one and measures how much less the top name movers prefer IO over S (first-order over all "
            "heads, exact for the top few)."),
    }

    # --- data -----------------------------------------------------------------------------------

    def names_for(self, model: Any) -> list[str]:
        """The config's names (or the shipped ones) that are single tokens for ``model``."""
        if not has_tokenizer(model):
            raise InputError("The name_mover detector builds IOI prompts from text and needs the model's tokenizer; "
                             "this model has none.")
        given = self.config.names if self.config.names is not None else words()["names"]
        kept = single_token_names(model, given)
        if len(kept) < 5:
            raise InputError(
                f"The name_mover detector needs at least 5 names that are one token with a leading space for this "
                f"tokenizer (IO, S, the ABC name and two unrelated control names); {len(kept)} of the {len(given)} "
                f"given are: {kept}. Pass names=(...) with single-token names.")
        return kept

    def template_split(self) -> tuple[list[int], list[int]]:
        """``(scored, held_out)`` template indices of the shipped templates."""
        return split_templates(len(templates()), self.config.held_out_share, self.config.seed)

    def items(self, model: Any, split: str = "score") -> list[IOIItem]:
        """The located IOI items of the ``"score"`` or ``"held_out"`` templates (disjoint)."""
        if split not in ("score", "held_out"):
            raise InputError(f"The 'split' parameter of items must be 'score' or 'held_out'; got {split!r}.")
        scored, held_out = self.template_split()
        chosen, count = (scored, self.config.n_prompts) if split == "score" else (held_out, self.config.n_validation)
        seed = self.config.seed if split == "score" else self.config.seed + 1
        items, _dropped = ioi_items(model, ioi_prompts(chosen, self.names_for(model), count, seed=seed))
        if len(items) < 2:
            raise EmptyResultError(
                f"The name_mover detector located {len(items)} of {count} IOI prompts in this model's tokens (a name "
                "is not one token in context); it needs at least 2. Pass names=(...) that this tokenizer keeps whole.")
        return items

    def examples(self, model: Any) -> list[Example]:
        """Two IOI prompts of the first scored template (ABBA, BABA) and the ABC version of the first,
        with the model's single-token names (the first given names where it has too few: the
        examples only show attention patterns)."""
        if not has_tokenizer(model):
            return []
        try:
            names = self.names_for(model)
        except InputError:
            names = list(self.config.names if self.config.names is not None else words()["names"])
        scored, _ = self.template_split()
        try:
            first = ioi_prompts(scored[:1], names, 2, seed=self.config.seed)
        except InputError:  # fewer than 3 names given
            return []
        return [(f"IOI ({p.order}): answer ' {p.io}'", p.text) for p in first] + [
            ("IOI, ABC version (no repeated name)", first[0].abc_text)]

    # --- score ----------------------------------------------------------------------------------

    def score(self, model: Any, batch_size: Optional[int] = None, progress: Optional[bool] = None,
              items: Optional[list[IOIItem]] = None) -> HeadScores:
        """Score every head on ``items`` (default: the scored templates' prompts)."""
        items = items if items is not None else self.items(model, "score")
        if len(items) < 2:
            raise InputError(f"The name_mover detector needs at least 2 IOI items to score; got {len(items)}.")
        names = self.names_for(model)
        clean = clean_pass(model, items, unrelated_tokens(model, items, names, self.config.seed), batch_size, progress)
        values = clean["attribution"].mean(dim=0)
        excess = clean["attention_io"] - clean["attention_s1"]
        receivers = pick_receivers(values, excess, self.config.n_receivers)
        inhibition = s_inhibition_pass(model, items, control_prompts(items), receivers, batch_size)
        clean_metric = sum(clean["attention_io"][:, layer, head] - clean["attention_s1"][:, layer, head]
                           - clean["attention_s2"][:, layer, head] for layer, head in receivers)
        exact = confirm_exactly(model, items, receivers, inhibition, clean_metric, self.config.n_confirm)
        extras = {
            "standard_error": standard_error(clean["attribution"]),
            "attention_io": clean["attention_io"].mean(dim=0),
            "attention_s1": clean["attention_s1"].mean(dim=0),
            "attention_s2": clean["attention_s2"].mean(dim=0),
            "attention_io_excess": excess.mean(dim=0),
            "attention_excess_se": standard_error(excess),
            "unrelated": clean["unrelated"].mean(dim=0),
            "s_inhibition": inhibition["effect"].mean(dim=0),
            "s_inhibition_se": standard_error(inhibition["effect"]),
            "s_inhibition_control": inhibition["control"].mean(dim=0),
            "s_inhibition_exact": exact["values"],
        }
        scored, held_out = self.template_split()
        metadata: dict[str, Any] = {
            "n_items": len(items), "n_names": len(names), "scored_templates": scored, "held_out_templates": held_out,
            "receivers": [str(h) for h in receivers],
            "logit_diff": float(clean["logit_diff"].mean()),
            "accuracy": float((clean["logit_diff"] > 0).float().mean()),
            "s_inhibition_method": "attribution patching at END from the ABC prompt (first order), exact for the top "
                                   f"{self.config.n_confirm}",
            "s_inhibition_exact_vs_estimate": exact["pairs"],
            "nan_reason": "no IOI item could be scored",
        }
        result = self.result(model, values, extras, metadata=metadata)
        k = self.config.n_report
        result.metadata["name_movers"] = [str(h) for h in result.top_heads(k)]
        negative = HeadScores(-values, self.name, result.model)
        result.metadata["negative_name_movers"] = [str(h) for h in negative.top_heads(k)]
        s_scores = HeadScores(extras["s_inhibition"], "s_inhibition", result.model)
        result.metadata["s_inhibition_heads"] = [str(h) for h in s_scores.top_heads(k)]
        return result

    # --- significance ---------------------------------------------------------------------------

    def significance(
        self, model: Any, scores: HeadScores, batch_size: Optional[int] = None, progress: Optional[bool] = None
    ) -> list[Significance]:
        """Name movers and negative name movers (both tests and the unrelated-names floor) and
        S-inhibition heads (attribution t-test and the control-patch floor); see the module docstring."""
        needed = ("standard_error", "attention_io_excess", "attention_excess_se", "unrelated", "s_inhibition",
                  "s_inhibition_se", "s_inhibition_control")
        missing = [key for key in needed if key not in scores.extras]
        if missing:
            raise InputError(f"These name_mover scores lack {', '.join(missing)} (saved by another headscope); "
                             "rescore them.")
        n_items = int(scores.metadata.get("n_items") or 0)
        if n_items < 2:
            raise InputError(f"The name_mover significance tests need at least 2 scored items; these scores have "
                             f"{n_items}.")
        extras = scores.extras
        critical = bonferroni_t(scores.values.numel(), n_items - 1)
        t_dla = scores.values / extras["standard_error"].clamp(min=1e-12)
        t_attention = extras["attention_io_excess"] / extras["attention_excess_se"].clamp(min=1e-12)
        floor = float(extras["unrelated"].abs().max())
        floor_rule = (f"inputs without the structure: above the largest |mean DLA| any head gives onto two names that "
                      f"are not in the prompt ({floor:.3g} logits)")
        details = {"t_critical": critical, "df": n_items - 1, "n_items": n_items, "alpha": DEFAULT_ALPHA,
                   "floor_logits": floor}
        rule = (f"intersection-union test: both the DLA's t and the t of attention to IO minus attention to S1 (the "
                f"other name in the same slots, over both orders) over {n_items} prompts ({n_items - 1} df) beyond the "
                f"two-sided Bonferroni critical value over all heads (family-wise {DEFAULT_ALPHA})")
        inhibition = self._s_inhibition_significance(scores, critical, n_items)
        return [
            Significance(self.name, "name_mover", torch.minimum(t_dla, t_attention), critical,
                         "min(t of DLA onto IO - S, t of attention to IO - S1)", rule, details, effect=scores.values,
                         floor=floor, effect_name="mean DLA onto IO - S (logits)", floor_rule=floor_rule),
            Significance(self.name, "negative_name_mover", torch.minimum(-t_dla, t_attention), critical,
                         "min(t of DLA onto S - IO, t of attention to IO - S1)", rule, details, effect=-scores.values,
                         floor=floor, effect_name="mean DLA onto S - IO (logits)", floor_rule=floor_rule),
            inhibition,
        ]

    def _s_inhibition_significance(self, scores: HeadScores, critical: float, n_items: int) -> Significance:
        extras = scores.extras
        t = extras["s_inhibition"] / extras["s_inhibition_se"].clamp(min=1e-12)
        control = extras["s_inhibition_control"]
        floor = float(torch.nan_to_num(control.abs(), nan=0.0).max())
        rule = (f"one-sample t-test over {n_items} prompts of the first-order effect of patching the head's END output "
                f"from the ABC prompt on the receivers' attention (IO minus S), two-sided Bonferroni over all heads "
                f"(family-wise {DEFAULT_ALPHA}); receivers {', '.join(scores.metadata.get('receivers', []))}")
        return Significance(
            self.name, "s_inhibition", t, critical, "t of the S-inhibition effect on the name movers' attention", rule,
            {"t_critical": critical, "df": n_items - 1, "n_items": n_items, "floor_attention": floor,
             "receivers": scores.metadata.get("receivers", [])},
            effect=extras["s_inhibition"], floor=floor, effect_name="mean effect on the receivers' attention IO - S",
            floor_rule=(f"inputs without the structure change: above the largest |mean effect| any head has when its "
                        f"END output is patched from a prompt of another template with the same names ({floor:.3g})"))

    # --- validation -----------------------------------------------------------------------------

    def validation_task(self, model: Any) -> ValidationTask:
        """The IO-minus-S logit difference on the held-out templates' prompts."""
        items = self.items(model, "held_out")
        return ValidationTask(
            data=tokenize(model, [i.text for i in items]),
            metric=IOLogitDifference(model, items),
            metric_name="logit(IO) - logit(S) at the final position (held-out templates)",
            ablation_hurts_when="decreases",
            last_position=True,
        )


# --- the passes ---------------------------------------------------------------------------------


def name_directions(model: Any, good: Tensor, bad: Tensor) -> Float[Tensor, "batch d_model"]:
    """``diag(w_norm) (W_U[:, good] - W_U[:, bad])`` per row: the final-norm-weighted direction of a
    logit difference."""
    unembed = unembedding(model)
    good, bad = good.to(unembed.device), bad.to(unembed.device)
    return (final_norm_weight(model).float().to(unembed.device)[:, None] * (unembed[:, good] - unembed[:, bad])).T


def unrelated_tokens(model: Any, items: list[IOIItem], names: list[str], seed: int) -> list[tuple[int, int]]:
    """Per item, the tokens of two names that are in neither its prompt nor its ABC version."""
    rng = random.Random(seed)
    tokenizer = model.tokenizer
    pairs = []
    for item in items:
        present = {item.prompt.io, item.prompt.s, item.prompt.third}
        first, second = rng.sample([n for n in names if n not in present], 2)
        pairs.append(tuple(int(tokenizer(" " + n, add_special_tokens=False)["input_ids"][0]) for n in (first, second)))
    return pairs


def clean_pass(model: Any, items: list[IOIItem], unrelated: list[tuple[int, int]], batch_size: Optional[int] = None,
               progress: Optional[bool] = None) -> dict[str, Tensor]:
    """One cached run of the IOI prompts: per item, every head's DLA onto IO - S (``"attribution"``)
    and onto the two unrelated names (``"unrelated"``), its attention from END to IO, S1 and S2, and
    the logit difference (``[n_items, n_layers, n_heads]`` each; ``"logit_diff"`` ``[n_items]``)."""
    shape = model_shape(model)
    w_o = head_output_weights(model)
    names = [n for layer in range(shape.n_layers) for n in head_output_hooks(model, layer)]
    names += [hook_name(layer, "pattern") for layer in range(shape.n_layers)] + [FINAL_SCALE]
    io = torch.tensor([i.io_token for i in items])
    s = torch.tensor([i.s_token for i in items])
    control = torch.tensor(unrelated)
    positions = {key: torch.tensor([getattr(i, f"{key}_position") for i in items]) for key in ("io", "s1", "s2")}

    def reduce(logits: Tensor, cache: dict, chunk: TokenBatch, rows: slice) -> dict[str, Tensor]:
        last = chunk.last_positions.to(logits.device)
        local = torch.arange(len(chunk), device=logits.device)
        final_scale = cache[FINAL_SCALE]  # on the final norm's device
        scale = final_scale[local.to(final_scale.device), last.to(final_scale.device), 0].float().to(logits.device)
        out = {
            "attribution": final_position_attributions(model, cache, last, name_directions(model, io[rows], s[rows]),
                                                       scale, w_o),
            "unrelated": final_position_attributions(
                model, cache, last, name_directions(model, control[rows, 0], control[rows, 1]), scale, w_o),
            "logit_diff": logits[local, io[rows].to(logits.device)] - logits[local, s[rows].to(logits.device)],
        }
        for key, where in positions.items():
            out[f"attention_{key}"] = end_attention(cache, shape.n_layers, last, where[rows].to(logits.device))
        return out

    return run_batched(model, tokenize(model, [i.text for i in items]), reduce, names, batch_size, progress,
                       desc="name_mover", logits="last")


def end_attention(cache: dict, n_layers: int, last: Tensor, keys: Tensor) -> Float[Tensor, "batch n_layers n_heads"]:
    """Every head's attention from each row's ``last`` position to its ``keys`` position."""
    rows = torch.arange(len(last), device=last.device)
    per_layer = [_at(cache[hook_name(layer, "pattern")], rows, last, keys).float().to(last.device)
                 for layer in range(n_layers)]
    return torch.stack(per_layer, dim=1)


def _at(pattern: Tensor, rows: Tensor, last: Tensor, keys: Tensor) -> Float[Tensor, "batch n_heads"]:
    """``pattern[rows, :, last, keys]``, indexed on the pattern's device (its layer's)."""
    device = pattern.device
    return pattern[rows.to(device), :, last.to(device), keys.to(device)]


def pick_receivers(values: Float[Tensor, "n_layers n_heads"], excess: Float[Tensor, "n_items n_layers n_heads"],
                   n: int) -> list[tuple[int, int]]:
    """The ``n`` heads with the largest positive mean DLA among those whose attention to IO beats
    their attention to S1 by the significance rule's t-test (the name movers the S-inhibition scan
    measures); where none passes it, among those with any positive excess. Raises when none has."""
    t = excess.mean(dim=0) / standard_error(excess).clamp(min=1e-12)
    attends = t > bonferroni_t(values.numel(), excess.shape[0] - 1)
    if not bool((attends & (values > 0)).any()):
        attends = excess.mean(dim=0) > 0
    eligible = torch.where((values > 0) & attends, values, torch.full_like(values, -math.inf))
    order = torch.argsort(eligible.flatten(), descending=True)[:n]
    chosen = [divmod(int(i), values.shape[1]) for i in order if math.isfinite(float(eligible.flatten()[i]))]
    if not chosen:
        raise EmptyResultError("The name_mover detector found no head with a positive DLA onto IO - S that attends "
                               "more to IO than to S1, so there is no name mover whose attention S-inhibition could "
                               "steer: the model does not do IOI.")
    return chosen


def control_prompts(items: list[IOIItem]) -> list[str]:
    """Per item, the same names in the same order in the next scored template (another frame,
    place and object): a patch source that changes the sentence but not which name is repeated."""
    frames = sorted({i.prompt.template for i in items})
    if len(frames) < 2:
        raise InputError(f"The S-inhibition control patches from another scored template, and the scored prompts "
                         f"come from {len(frames)}: score on at least 2 templates (a smaller held_out_share, or more "
                         "templates).")
    texts = templates()
    out = []
    for item in items:
        p = item.prompt
        other = frames[(frames.index(p.template) + 1) % len(frames)]
        out.append(make_prompt(other, texts[other], p.order, p.io, p.s, p.third, p.place, p.obj).text)
    return out


def end_outputs(model: Any, prompts: list[str], layers: int,
                batch_size: Optional[int]) -> Float[Tensor, "n_items n_layers n_heads d_head"]:
    """Every head's ``z`` at each prompt's last position, for the first ``layers`` layers."""
    names = [hook_name(layer, "z") for layer in range(layers)]

    def reduce(logits: Tensor, cache: dict, chunk: TokenBatch) -> Tensor:
        return last_position_z(model, cache, chunk.last_positions, range(layers))

    return run_batched(model, tokenize(model, prompts), reduce, names, batch_size, False, desc="name_mover patches",
                       logits="last")


def receiver_metric(patterns: dict[int, Tensor], receivers: list[tuple[int, int]], chunk_items: list[IOIItem],
                    last: Tensor) -> Float[Tensor, " batch"]:
    """Per row: the receivers' attention from END to IO minus attention to S1 and S2, summed."""
    device = last.device
    rows = torch.arange(len(last), device=device)
    where = {key: torch.tensor([getattr(i, f"{key}_position") for i in chunk_items], device=device)
             for key in ("io", "s1", "s2")}
    total = torch.zeros(len(last), device=device)
    for layer, head in receivers:
        row = patterns[layer][rows.to(patterns[layer].device), head, last.to(patterns[layer].device)].float().to(device)
        total = total + row[rows, where["io"]] - row[rows, where["s1"]] - row[rows, where["s2"]]  # [batch, key_pos] rows
    return total


def s_inhibition_pass(model: Any, items: list[IOIItem], controls: list[str], receivers: list[tuple[int, int]],
                      batch_size: Optional[int]) -> dict[str, Tensor]:
    """First-order effect on :func:`receiver_metric` of patching each upstream head's END output
    from the ABC prompt (``"effect"``, sign flipped: positive = the head raises the receivers'
    IO-over-S attention) and from the control prompt (``"control"``), ``[n_items, n_layers,
    n_heads]``, NaN for heads at or above the last receiver's layer; ``"abc_z"`` holds the ABC
    prompts' END outputs for exact patching."""
    shape = model_shape(model)
    upstream = max(layer for layer, _ in receivers)
    effect = torch.full((len(items), shape.n_layers, shape.n_heads), math.nan)
    if upstream == 0:  # a receiver in the first layer: nothing upstream to patch
        return {"effect": effect, "control": effect.clone()}
    abc = end_outputs(model, [i.prompt.abc_text for i in items], upstream, batch_size)
    control = end_outputs(model, controls, upstream, batch_size)
    control_effect = effect.clone()
    batch = tokenize(model, [i.text for i in items])
    size = batch_size or max(1, auto_batch_size(model, batch.tokens.shape[1]) // 2)

    def gradients(rows: slice) -> tuple[slice, Tensor, Tensor]:
        return rows, *end_gradients(model, batch.select(rows).to(model_device(model)), items[rows], receivers, upstream)

    for rows, z, grad in Halving("name_mover S-inhibition").map(len(batch), size, gradients):
        effect[rows, :upstream] = -(grad * (abc[rows] - z)).sum(dim=-1)
        control_effect[rows, :upstream] = -(grad * (control[rows] - z)).sum(dim=-1)
    return {"effect": effect, "control": control_effect, "abc_z": abc}


def end_gradients(model: Any, chunk: TokenBatch, chunk_items: list[IOIItem], receivers: list[tuple[int, int]],
                  upstream: int) -> tuple[Tensor, Tensor]:
    """Each head's ``z`` at END and the gradient of :func:`receiver_metric` (summed over rows)
    with respect to it, ``[batch, upstream, n_heads, d_head]`` each, for the first ``upstream``
    layers. A zero tensor requiring grad is added at each ``hook_z``; parameters get no ``.grad``."""
    last = chunk.last_positions
    rows = torch.arange(len(chunk), device=last.device)
    deltas: dict[int, Tensor] = {}
    values: dict[int, Tensor] = {}
    patterns: dict[int, Tensor] = {}

    def add_delta(layer: int):
        def hook(activation: Tensor, hook: Any) -> Tensor:
            delta = torch.zeros_like(activation, requires_grad=True)
            deltas[layer], values[layer] = delta, activation.detach()
            return activation + delta
        return hook

    def keep_pattern(layer: int):
        def hook(pattern: Tensor, hook: Any) -> None:
            patterns[layer] = pattern
        return hook

    hooks = [(hook_name(layer, "z"), add_delta(layer)) for layer in range(upstream)]
    hooks += [(hook_name(layer, "pattern"), keep_pattern(layer)) for layer in sorted({r[0] for r in receivers})]
    mask = chunk.forward_mask
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        model(chunk.tokens, attention_mask=mask)
        metric = receiver_metric(patterns, receivers, chunk_items, last).sum()
        grads = torch.autograd.grad(metric, [deltas[layer] for layer in range(upstream)])

    def view(layer: int, t: Tensor) -> Tensor:  # at END, on the CPU (each layer's t on its own device)
        return head_hook(model, layer, "z")[1](t)[rows.to(t.device), last.to(t.device)].float().cpu()

    z = torch.stack([view(layer, values[layer]) for layer in range(upstream)], dim=1)
    grad = torch.stack([view(layer, g) for layer, g in enumerate(grads)], dim=1)
    return z, grad


def confirm_exactly(model: Any, items: list[IOIItem], receivers: list[tuple[int, int]], inhibition: dict[str, Tensor],
                    clean: Float[Tensor, " n_items"], n_confirm: int) -> dict[str, Any]:
    """Exact activation patching of the ``n_confirm`` heads with the largest first-order
    S-inhibition estimate: each one's END output replaced by its ABC value, one forward per head
    (``clean``: :func:`receiver_metric` of the clean run).
    ``"values"``: the mean exact effect (NaN for heads not confirmed); ``"pairs"``: per head, the
    exact value beside the estimate."""
    mean = inhibition["effect"].mean(dim=0)
    values = torch.full_like(mean, math.nan)
    if n_confirm == 0 or "abc_z" not in inhibition:
        return {"values": values, "pairs": {}}
    order = torch.argsort(torch.nan_to_num(mean, nan=-math.inf).flatten(), descending=True)[:n_confirm]
    pairs = {}
    for index in order.tolist():
        layer, head = divmod(index, mean.shape[1])
        if math.isnan(float(mean[layer, head])):
            continue
        patched = patched_metric(model, items, receivers, [(layer, head)], inhibition["abc_z"])
        values[layer, head] = float(-(patched - clean).mean())
        pairs[f"L{layer}H{head}"] = {"exact": float(values[layer, head]), "estimate": float(mean[layer, head])}
    return {"values": values, "pairs": pairs}


def patched_metric(model: Any, items: list[IOIItem], receivers: list[tuple[int, int]], heads: list[tuple[int, int]],
                   abc_z: Float[Tensor, "n_items n_upstream n_heads d_head"],
                   batch_size: Optional[int] = None) -> Float[Tensor, " n_items"]:
    """:func:`receiver_metric` per item with every head of ``heads`` given its END output from the
    ABC prompt (``abc_z``, :func:`end_outputs` of the items' ABC texts); ``[]``: the clean run.
    One forward over the items, whatever the number of heads."""
    batch = tokenize(model, [i.text for i in items])
    size = batch_size or max(1, auto_batch_size(model, batch.tokens.shape[1]))

    def patched(rows: slice) -> Tensor:
        return _patched_chunk(model, batch.select(rows).to(model_device(model)), items[rows], receivers, heads,
                              abc_z[rows])

    return torch.cat(Halving("name_mover patching").map(len(batch), size, patched))


def _patched_chunk(model: Any, batch: TokenBatch, items: list[IOIItem], receivers: list[tuple[int, int]],
                   heads: list[tuple[int, int]], abc_z: Tensor) -> Float[Tensor, " batch"]:
    last = batch.last_positions
    rows = torch.arange(len(batch), device=last.device)
    patterns: dict[int, Tensor] = {}

    def keep(layer: int):
        return lambda pattern, hook: patterns.__setitem__(layer, pattern)

    def patch(layer: int, indices: list[int]):
        view = head_hook(model, layer, "z")[1]

        def hook(activation: Tensor, hook: Any) -> Tensor:
            out = activation.clone()
            for index in indices:
                view(out)[rows.to(out.device), last.to(out.device), index] = abc_z[:, layer, index].to(out)
            return out
        return hook

    hooks: list = [(hook_name(layer, "pattern"), keep(layer)) for layer in sorted({r[0] for r in receivers})]
    by_layer: dict[int, list[int]] = {}
    for layer, index in heads:
        by_layer.setdefault(layer, []).append(index)
    hooks += [(hook_name(layer, "z"), patch(layer, indices)) for layer, indices in sorted(by_layer.items())]
    mask = batch.forward_mask
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        model(batch.tokens, attention_mask=mask)
        return receiver_metric(patterns, receivers, items, last).float().cpu()


class IOLogitDifference:
    """``metric(logits, chunk)``: logit(IO) - logit(S) at each row's last position. Rows are matched
    to items by their tokens, so chunked and repeated batches work."""

    def __init__(self, model: Any, items: list[IOIItem]) -> None:
        batch = tokenize(model, [i.text for i in items])
        self.answers = {row_tokens(batch, row): (i.io_token, i.s_token) for row, i in enumerate(items)}
        digest = hashlib.sha256(repr(sorted(self.answers.items())).encode()).hexdigest()[:16]
        self.cache_key = f"ioi logit difference | {digest}"  # validations of the same items share the clean run

    def __call__(self, logits: Tensor, chunk: TokenBatch) -> Tensor:
        rows = torch.arange(len(chunk), device=logits.device)
        final = final_logits(logits, chunk)
        pairs = torch.tensor([self.answers[row_tokens(chunk, row)] for row in range(len(chunk))], device=logits.device)
        return final[rows, pairs[:, 0]] - final[rows, pairs[:, 1]]
