"""Truthfulness heads — Li, Patel, Viégas, Pfister, Wattenberg 2023, "Inference-Time Intervention:
Eliciting Truthful Answers from a Language Model" (arXiv 2306.03341; code likenneth/honest_llama).

Data: true/false statement pairs (``headscope.tasks.statements``): 229 pairs written for
headscope, each a true statement and a false one that share their start and differ in the final
word(s) ("The capital of France is Paris." / "... is Rome."). The pairs, never a pair's two
statements, are split with ``random.Random(seed)`` into probe-train (the rest), probe-validation
(``validation_share``, default a quarter) and held-out (``held_out_share``, a quarter) parts:
probes and directions are fitted on probe-train, heads are scored and selected on
probe-validation, and the causal validation runs on the held-out pairs only.

Your own pairs (``data="pairs.jsonl"``, or ``{"truthfulness": {"data": ...}}`` in a CLI config)
replace the shipped ones: JSON lines ``{"true": "...", "false": "..."}`` with an optional
``"category"``; no statement twice; each part of the split must get at least 2 pairs.
``check_data()`` reads the file without a model; every error names the file and line.

Score (``values``): for every head, ``z`` is its output before ``W_O`` (``hook_z``, one slot per
query head under grouped-query attention) at each statement's last token (the final full stop),
all heads from one batched forward pass. Per head, a logistic-regression probe is fitted on the
probe-train statements: features standardised by their probe-train mean and standard deviation,
L2 penalty ``regularization / 2 * |w|^2`` on the summed log-loss (scikit-learn's ``C = 1 /
regularization``; intercept unpenalised), solved exactly by damped Newton steps in float64 for
every head at once (deterministic). ``values`` = the probe's accuracy on the probe-validation
statements (true statements labelled 1, false 0; chance 0.5, the parts being balanced).

Extras: ``"pair_accuracy"``, the share of probe-validation pairs whose true statement gets the
higher probe logit (the test's unit, below); ``"mass_mean_accuracy"``, the validation accuracy of
the paper's mass-mean direction ``theta = mean(z | true) - mean(z | false)`` (probe-train), a
statement called true when ``z . theta`` exceeds the midpoint of the two classes' projections;
``"train_accuracy"``; ``"shuffled_accuracy"``, the best validation accuracy of the head's probes
fitted on shuffled labels (in each probe-train pair a coin flip says which statement is called
true; ``n_shuffles`` draws). ``metadata["chance"]`` = 0.5.

Significance: the two statements of a pair are not independent, so the test counts pairs: a
head's pair accuracy against chance 0.5 by the exact one-sided binomial test over the
probe-validation pairs, Bonferroni over all heads (family-wise 5%,
``stats.binomial_critical_accuracy``); and an effect-size floor from a control: the statement
accuracy must exceed the best accuracy any head's probe reaches after fitting on shuffled labels.

Validation (``hs.validate`` with ``method="shift"``, the only one): the paper's intervention. For a
head set, each head's ``z`` gets ``alpha * sigma_h * theta_h`` added at every position, ``theta_h``
the unit mass-mean direction and ``sigma_h`` the standard deviation of the probe-train
activations' projections on it (sign: towards the true statements' mean; ``alpha > 0`` pushes to
"true"). Metric per held-out pair: ``log P(true statement) - log P(false statement)``, the sums of
the log-probabilities of each statement's tokens from the first one where the pair differs to the
end (the shared start has the same log-probability in both, so this is the whole statements'
difference). The top-k heads are compared with random k-sets shifted along their own directions;
``ablation_hurts_when="increases"``: significant when shifting the top heads raises the preference
for true statements more than shifting random heads does. ``alpha`` defaults to 10 (the paper used
15 on LLaMA-7B): on SmolLM2-135M's probe-validation pairs (never the held-out ones) the top-5
heads' gain is 0.14, 0.16, 0.16, 0.15, 0.09 nats at alpha 7.5, 10, 12.5, 15, 20; 10 is the smallest
alpha within 0.01 of the best, and random heads' shifts damage the model less there.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from jaxtyping import Float, Int
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
from headscope.engine.heads import Head, hook_name, model_shape
from headscope.engine.runner import run_batched
from headscope.engine.tokens import TokenBatch, tokenize
from headscope.engine.unembed import last_position_z
from headscope.errors import EmptyResultError, InputError
from headscope.interventions import add_vector
from headscope.results import HeadScores
from headscope.significance import Significance
from headscope.stats import DEFAULT_ALPHA, binomial_critical_accuracy
from headscope.tasks.statements import (
    PairSplit,
    StatementPair,
    check_split,
    read_statement_pairs,
    shipped_pairs,
    split_pairs,
    statements,
)

CHANCE = 0.5  # every part holds as many true statements as false ones
NEWTON_STEPS = 50  # at most; the probes stop earlier once every step is below NEWTON_TOLERANCE
NEWTON_TOLERANCE = 1e-10
METHODS = ("shift",)


@dataclass
class TruthfulnessConfig(DetectorConfig):
    validation_share: float = setting(0.25, "share of the pairs whose statements score the probes (the rest, less "
                                      "the held-out share, fit them)", min=0.0, max=1.0, exclusive=True)
    held_out_share: float = setting(0.25, "share of the pairs kept out of probing and head selection, for the causal "
                                    "validation", min=0.0, max=1.0, exclusive=True)
    regularization: float = setting(1.0, "L2 penalty of the probes on standardised features (scikit-learn's 1 / C)",
                                    min=0.0, exclusive=True)
    n_shuffles: int = setting(5, "probes fitted on shuffled labels per head, for the effect-size floor", min=1)
    alpha: float = setting(10.0, "validation shift: alpha times each head's standard deviation along its direction",
                           min=0.0)
    data: Optional[str] = setting(None, "your own pairs, JSON lines of {\"true\": ..., \"false\": ...}; replaces the "
                                  "shipped ones", path=True)


@register_detector
class TruthfulnessDetector(Detector):
    name = "truthfulness"
    atlas_order = 85
    Config = TruthfulnessConfig
    summary = "held-out accuracy of a per-head linear probe telling true from false statements (Li et al. 2023)"
    cost = "score 8 s, significance 0 s, validation 19 s"
    explanation = {"truthfulness": (
        "A truthfulness head's output carries whether the statement just read is true: a linear probe on it tells "
        "'The capital of France is Paris.' from '... is Rome.' (Li et al. 2023, 'Inference-Time Intervention'). "
        "headscope fits a logistic-regression probe per head on the last token of true and false statements and "
        "scores its accuracy on other pairs; it validates by shifting the top heads' outputs along their "
        "true-minus-false direction on held-out pairs and checking that the model then prefers the true "
        "statements more than when random heads are shifted.")}

    def pairs(self) -> list[StatementPair]:
        """The shipped pairs, or those of the ``data`` file."""
        return read_statement_pairs(self.config.data) if self.config.data else shipped_pairs()

    def split(self) -> PairSplit:
        """The pairs in probe-train, probe-validation and held-out parts (see the module docstring)."""
        config = self.config
        return split_pairs(self.pairs(), config.validation_share, config.held_out_share, config.seed,
                           where=config.data)

    def check_data(self) -> None:
        """Read the ``data`` file without a model: a :class:`DataError` naming file and line for a bad
        line or a repeated statement, or naming the file when a part of the split would be too small."""
        if not self.config.data:
            return
        pairs = read_statement_pairs(self.config.data)
        check_split(len(pairs), self.config.validation_share, self.config.held_out_share, self.config.data)

    def examples(self, model: Any) -> list[Example]:
        """A probe-train pair's true and false statements and another probe-train true statement
        (none without a tokenizer: the statements are text)."""
        if not has_tokenizer(model):
            return []
        first, second = self.split().train[:2]
        return [("true statement", first.true), ("false statement of the same pair", first.false),
                ("another true statement", second.true)]

    def score(self, model: Any, batch_size: Optional[int] = None, progress: Optional[bool] = None) -> HeadScores:
        """Fit a probe per head on the probe-train statements and score it on the probe-validation
        ones (the held-out pairs are not run)."""
        split = self.split()
        train_texts, train_labels = statements(split.train)
        validation_texts, validation_labels = statements(split.validation)
        z = last_token_z(model, train_texts + validation_texts, batch_size, progress)
        check_finite_outputs(z)
        train_z, validation_z = z[:, :len(train_texts)], z[:, len(train_texts):]
        train_y = torch.tensor(train_labels, dtype=torch.float64)
        validation_y = torch.tensor(validation_labels, dtype=torch.float64)
        probe = fit_probes(train_z, train_y, self.config.regularization)
        validation_logits = probe_logits(probe, validation_z)
        shape = model_shape(model)
        grid = (shape.n_layers, shape.n_heads)
        extras = {
            "pair_accuracy": pair_accuracy(validation_logits).reshape(grid),
            "mass_mean_accuracy": mass_mean_accuracy(train_z, train_y, validation_z, validation_y).reshape(grid),
            "train_accuracy": accuracy(probe_logits(probe, train_z), train_y).reshape(grid),
            "shuffled_accuracy": self._shuffled_accuracy(train_z, validation_z, validation_y).reshape(grid),
        }
        values = accuracy(validation_logits, validation_y).reshape(grid)
        metadata = {"chance": CHANCE, "n_train_pairs": len(split.train), "n_validation_pairs": len(split.validation),
                    "n_held_out_pairs": len(split.held_out), "n_shuffles": self.config.n_shuffles}
        return self.result(model, values.float(), {k: v.float() for k, v in extras.items()}, metadata)

    def _shuffled_accuracy(self, train_z: Tensor, validation_z: Tensor,
                           validation_y: Tensor) -> Float[Tensor, " heads"]:
        """Each head's best validation accuracy over ``n_shuffles`` probes fitted on shuffled labels."""
        generator = random.Random(self.config.seed + 1)
        best = torch.zeros(train_z.shape[0], dtype=torch.float64)
        for _ in range(self.config.n_shuffles):
            shuffled = torch.tensor(shuffled_pair_labels(train_z.shape[1] // 2, generator), dtype=torch.float64)
            probe = fit_probes(train_z, shuffled, self.config.regularization)
            best = torch.maximum(best, accuracy(probe_logits(probe, validation_z), validation_y))
        return best

    def significance(
        self, model: Any, scores: HeadScores, batch_size: Optional[int] = None, progress: Optional[bool] = None
    ) -> list[Significance]:
        """Pair accuracy above the exact binomial critical value over the probe-validation pairs
        (one-sided against 0.5, Bonferroni over all heads), and statement accuracy above the best
        any head's probe reaches on shuffled labels (the control floor)."""
        missing = {"pair_accuracy", "shuffled_accuracy"} - set(scores.extras)
        if missing or not scores.metadata.get("n_validation_pairs"):
            raise InputError("These truthfulness scores lack their pair accuracies or shuffled-label control (saved "
                             "by another version); rescore them.")
        n_pairs = int(scores.metadata["n_validation_pairs"])
        n_heads = scores.values.numel()
        threshold = binomial_critical_accuracy(n_pairs, CHANCE, n_heads)
        floor = float(torch.nan_to_num(scores.extras["shuffled_accuracy"], nan=0.0).max())
        details = {"n_validation_pairs": n_pairs, "chance": CHANCE, "alpha": DEFAULT_ALPHA, "n_tests": n_heads,
                   "shuffled_floor": floor, "n_shuffles": scores.metadata.get("n_shuffles")}
        rule = (f"exact one-sided binomial test of the pair accuracy against chance {CHANCE} over {n_pairs} "
                f"probe-validation pairs, Bonferroni over {n_heads} heads (family-wise {DEFAULT_ALPHA})")
        floor_rule = (f"a control: above the best validation accuracy any head's probe reaches when fitted on shuffled "
                      f"labels (a coin flip per probe-train pair; {scores.metadata.get('n_shuffles')} shuffles): "
                      f"{floor:.3g}")
        return [Significance(self.name, self.name, scores.extras["pair_accuracy"], threshold,
                             "probe's pair accuracy on probe-validation pairs (true statement gets the higher logit)",
                             rule, details, effect=scores.values, floor=floor, floor_rule=floor_rule,
                             effect_name="probe's statement accuracy on probe-validation statements")]

    def validation_task(self, model: Any) -> ValidationTask:
        """The preference for the true statement of each held-out pair, with head sets shifted
        along their mass-mean directions (fitted on probe-train, computed on first use)."""
        split = self.split()
        config = self.config
        shifts: dict[str, Tensor] = {}

        def measure(model: Any, head_sets: list, method: str) -> Tensor:
            if method not in METHODS:
                raise InputError(f"The truthfulness validation shifts heads along their truth directions: the "
                                 f"'method' parameter must be 'shift'; got {method!r}.")
            if not shifts:
                shifts["z"] = truth_shifts(model, split.train, config.alpha)
            return torch.stack([true_preference(model, split.held_out, shifts["z"], heads) for heads in head_sets])

        return ValidationTask(
            data=list(split.held_out), metric=None,
            metric_name=(f"log P(true) - log P(false) per held-out pair, heads shifted by {config.alpha:g} sigma along "
                         "their true-minus-false direction"),
            ablation_hurts_when="increases", measure=measure, default_method="shift")


def last_token_z(model: Any, texts: list[str], batch_size: Optional[int] = None,
                 progress: Optional[bool] = None) -> Float[Tensor, "heads statements d_head"]:
    """Every head's ``hook_z`` at each statement's last token, as float64, heads flattened in
    layer-major order (``layer * n_heads + head``)."""
    shape = model_shape(model)
    names = [hook_name(layer, "z") for layer in range(shape.n_layers)]

    def reduce(logits: Tensor, cache: dict, chunk: TokenBatch) -> Tensor:
        return last_position_z(model, cache, chunk.last_positions, range(shape.n_layers)).double().cpu()

    z = run_batched(model, tokenize(model, texts), reduce, names, batch_size, progress, desc="truthfulness",
                    logits="last")  # [statements, n_layers, n_heads, d_head]
    return z.flatten(1, 2).transpose(0, 1).contiguous()


def check_finite_outputs(z: Float[Tensor, "heads statements d_head"]) -> None:
    """Raise :class:`EmptyResultError` when a head's output is NaN or infinite on a statement
    (a probe would silently call every such statement false)."""
    finite = torch.isfinite(z).flatten(1).all(dim=1)
    if not bool(finite.all()):
        raise EmptyResultError(
            f"The truthfulness detector cannot probe this model: {int((~finite).sum())} of {len(finite)} heads give NaN "
            "or infinite outputs on the statements. Check the model's weights and dtype (run 'headscope info' for "
            "the library versions).")


@dataclass
class Probes:
    """Logistic-regression probes, one per head, on standardised features."""

    mean: Float[Tensor, "heads 1 d_head"]
    std: Float[Tensor, "heads 1 d_head"]
    weight: Float[Tensor, "heads d_head"]
    bias: Float[Tensor, " heads"]


def fit_probes(z: Float[Tensor, "heads n d_head"], labels: Float[Tensor, " n"], regularization: float) -> Probes:
    """One L2-regularised logistic regression per head, all at once: minimise
    ``sum_i logloss(w . x_i + b, y_i) + regularization / 2 * |w|^2`` over standardised ``x``
    (probe-train mean and standard deviation; a constant feature keeps scale 1) by Newton steps,
    each halved until the objective does not rise (float64; deterministic)."""
    z = z.double()
    mean = z.mean(dim=1, keepdim=True)
    std = z.std(dim=1, keepdim=True, unbiased=False)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    x = torch.cat([(z - mean) / std, torch.ones_like(z[..., :1])], dim=-1)  # [heads, n, d_head + 1]
    y = labels.double().to(x.device)
    penalty = torch.full((x.shape[-1],), float(regularization), dtype=torch.float64)
    penalty[-1] = 0.0  # the intercept is not penalised
    theta = torch.zeros(x.shape[0], x.shape[-1], dtype=torch.float64)
    loss = _probe_objective(x, y, theta, penalty)
    for _ in range(NEWTON_STEPS):
        step = _newton_step(x, y, theta, penalty)
        size = torch.ones(x.shape[0], dtype=torch.float64)
        for _ in range(30):  # halve each head's step until its objective does not rise
            trial = theta - size[:, None] * step
            trial_loss = _probe_objective(x, y, trial, penalty)
            worse = trial_loss > loss + 1e-12 * loss.abs().clamp(min=1.0)
            if not bool(worse.any()):
                break
            size = torch.where(worse, size / 2, size)
        kept = ~worse
        theta = torch.where(kept[:, None], trial, theta)
        loss = torch.where(kept, trial_loss, loss)
        if float((torch.where(kept, size, 0.0)[:, None] * step).abs().max()) < NEWTON_TOLERANCE:
            break
    return Probes(mean, std, theta[:, :-1], theta[:, -1])


def _probe_objective(x: Tensor, y: Tensor, theta: Tensor, penalty: Tensor) -> Float[Tensor, " heads"]:
    """Summed log-loss plus the L2 penalty, per head."""
    logits = (x @ theta[..., None])[..., 0]  # [heads, n]
    log_loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y.expand_as(logits), reduction="none")
    return log_loss.sum(dim=1) + 0.5 * (penalty * theta**2).sum(dim=1)


def _newton_step(x: Tensor, y: Tensor, theta: Tensor, penalty: Tensor) -> Float[Tensor, "heads d"]:
    """``H^-1 g`` of the objective at ``theta`` for every head."""
    p = torch.sigmoid((x @ theta[..., None])[..., 0])  # [heads, n]
    gradient = (x.transpose(1, 2) @ (p - y)[..., None])[..., 0] + penalty * theta
    hessian = (x * (p * (1 - p))[..., None]).transpose(1, 2) @ x + torch.diag(penalty)  # [heads, d, d]
    hessian = hessian + 1e-10 * torch.eye(x.shape[-1], dtype=torch.float64)  # intercept of a constant-free head
    return torch.linalg.solve(hessian, gradient)


def probe_logits(probes: Probes, z: Float[Tensor, "heads n d_head"]) -> Float[Tensor, "heads n"]:
    """Each head's probe logit (positive: called true) for each statement."""
    x = (z.double() - probes.mean) / probes.std
    return torch.einsum("hnd,hd->hn", x, probes.weight) + probes.bias[:, None]


def accuracy(logits: Float[Tensor, "heads n"], labels: Float[Tensor, " n"]) -> Float[Tensor, " heads"]:
    """Share of statements whose sign of the logit matches the label (a logit of 0 is 'false')."""
    return ((logits > 0).double() == labels.double()[None]).double().mean(dim=1)


def pair_accuracy(logits: Float[Tensor, "heads n"]) -> Float[Tensor, " heads"]:
    """Share of pairs (rows ``2 i`` true, ``2 i + 1`` false) whose true statement has the strictly
    higher logit."""
    return (logits[:, 0::2] > logits[:, 1::2]).double().mean(dim=1)


def mass_mean_directions(z: Float[Tensor, "heads n d_head"], labels: Float[Tensor, " n"]) -> Float[Tensor, "heads d_head"]:
    """``mean(z | true) - mean(z | false)`` per head (the paper's mass-mean direction)."""
    true = labels.bool()
    return z[:, true].mean(dim=1) - z[:, ~true].mean(dim=1)


def mass_mean_accuracy(train_z: Tensor, train_y: Tensor, validation_z: Tensor,
                       validation_y: Tensor) -> Float[Tensor, " heads"]:
    """Validation accuracy of the mass-mean classifier: true when ``z . theta`` exceeds the
    midpoint of the probe-train classes' mean projections."""
    theta = mass_mean_directions(train_z, train_y)
    true = train_y.bool()
    projected = torch.einsum("hnd,hd->hn", train_z, theta)
    midpoint = (projected[:, true].mean(dim=1) + projected[:, ~true].mean(dim=1)) / 2
    logits = torch.einsum("hnd,hd->hn", validation_z, theta) - midpoint[:, None]
    return accuracy(logits, validation_y)


def shuffled_pair_labels(n_pairs: int, generator: random.Random) -> list[int]:
    """Labels for interleaved pairs where a coin flip says which statement of each pair is called true."""
    return [label for _ in range(n_pairs) for label in ((1, 0) if generator.random() < 0.5 else (0, 1))]


def truth_shifts(model: Any, pairs: tuple[StatementPair, ...], alpha: float, batch_size: Optional[int] = None
                 ) -> Float[Tensor, "n_layers n_heads d_head"]:
    """``alpha * sigma_h * theta_h`` for every head: ``theta_h`` the unit mass-mean direction of
    ``pairs``' last-token outputs, ``sigma_h`` the (population) standard deviation of their
    projections on it. A head with no difference between the classes gets zeros."""
    texts, labels = statements(pairs)
    z = last_token_z(model, texts, batch_size, progress=False)
    theta = mass_mean_directions(z, torch.tensor(labels, dtype=torch.float64))
    theta = theta / theta.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    sigma = torch.einsum("hnd,hd->hn", z, theta).std(dim=1, unbiased=False)
    shape = model_shape(model)
    return (alpha * sigma[:, None] * theta).reshape(shape.n_layers, shape.n_heads, -1).float()


@contextlib.contextmanager
def shifted(model: Any, shifts: Float[Tensor, "n_layers n_heads d_head"],
            heads: Optional[list[Head]]) -> Iterator[None]:
    """Inside the block, each head of ``heads`` has ``shifts[layer, head]`` added to its ``hook_z``
    at every position (``hs.add_vector``); ``None`` or no heads: the clean model. Every hook is
    removed on exit, also when adding a later one fails."""
    with contextlib.ExitStack() as stack:
        for head in [Head.parse(h) for h in heads or []]:
            stack.enter_context(add_vector(model, shifts[head.layer, head.head], head.layer, hook="z", head=head))
        yield


def true_preference(model: Any, pairs: tuple[StatementPair, ...], shifts: Tensor, heads: Optional[list[Head]],
                    batch_size: Optional[int] = None) -> Float[Tensor, " pairs"]:
    """``log P(true) - log P(false)`` of each pair, ``heads`` shifted (see :func:`shifted`)."""
    texts, _ = statements(pairs)
    batch = tokenize(model, texts)
    start = differing_from(batch)
    with shifted(model, shifts, heads):
        log_probs = statement_log_probs(model, batch, start, batch_size)
    return (log_probs[0::2] - log_probs[1::2]).float()


def differing_from(batch: TokenBatch) -> Int[Tensor, " statements"]:
    """For interleaved pairs: the first position where a statement's tokens differ from its pair's."""
    start = torch.zeros(len(batch), dtype=torch.long)
    for pair in range(len(batch) // 2):
        true, false = (batch.tokens[row, : int(batch.lengths[row])].tolist() for row in (2 * pair, 2 * pair + 1))
        shared = next((i for i, (a, b) in enumerate(zip(true, false)) if a != b), min(len(true), len(false)))
        start[2 * pair] = start[2 * pair + 1] = max(shared, 1)
    return start


def statement_log_probs(model: Any, batch: TokenBatch, start: Int[Tensor, " statements"],
                        batch_size: Optional[int] = None) -> Float[Tensor, " statements"]:
    """Each row's summed log-probability of its tokens at positions ``start`` to its end."""

    def reduce(logits: Tensor, cache: dict, chunk: TokenBatch, rows: slice) -> Tensor:
        predicted = torch.arange(1, chunk.tokens.shape[1], device=logits.device)[None]  # position p + 1 read at p
        wanted = (predicted >= start[rows].to(logits.device)[:, None]) & chunk.attention_mask[:, 1:].bool()
        row, position = wanted.nonzero(as_tuple=True)
        log_probs = torch.log_softmax(logits[row, position].double(), dim=-1)
        token_log_probs = log_probs.gather(-1, chunk.tokens[row, position + 1][:, None])[:, 0]
        return torch.zeros(len(chunk), dtype=torch.float64, device=logits.device).index_add_(
            0, row, token_log_probs).cpu()

    return run_batched(model, batch, reduce, batch_size=batch_size, progress=False, desc="truthfulness validation")
