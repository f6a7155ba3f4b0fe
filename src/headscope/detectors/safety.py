"""Safety heads — Zhou et al. 2024, "On the Role of Attention Heads in Large Language Model
Safety" (arXiv 2410.13708; code: ydyjya/SafetyHeadAttribution).

Data: harmful requests (``headscope.tasks.refusal``, train split by default, ``n_queries`` of them
drawn with ``seed``), each as a chat user turn without a system turn. Your own: ``data`` = a
``.txt`` (one request per line), ``.csv`` (a ``goal``, ``input``, ``request`` or ``harmful``
column) or ``.jsonl`` file (one of those keys per line), read by ``refusal.read_requests``; every
fourth request is held out for validation, the others form the ``"train"`` part. Ablation: *uniform
attention*, the head's pre-RoPE query × ε (``epsilon``, default 1e-5 as in Sahara's code; their
Ships script uses 1e-4), which makes its pattern uniform over the causal prefix.

Scores (all from one :func:`headscope.scans.readout_scan`, the last-position final hidden states
``s_n`` of every query with each head ablated in turn):

* ``values`` = **Ships**: ``mean_n KL(p(·|q_n) ‖ p_h(·|q_n))``, the next-token distribution at
  the last position, clean vs head ``h`` ablated.
* ``extras["dataset_ships"]`` = **dataset-level Ships**: stack the ``s_n`` into ``S`` [queries ×
  d_model], clean and ablated; the principal angle (degrees) between the spans of their top
  ``subspace_rank`` *left* singular vectors (the code's ``u[:, :1]``; the largest angle when the
  rank is above 1). A head whose removal rotates the dominant direction of the harmful queries'
  final states.
* ``extras["refusal_drop"]``: mean over queries of ``log P(refusal opening)`` clean minus ablated
  (the first-token proxy of ``refusal.first_token_refusal_probability``; not in the paper), from
  the same scan.
* **Sahara** (``sahara_steps`` > 0, metadata ``sahara``): greedy group search — step 1 takes the
  head with the largest dataset-level Ships; each later step rescans with the chosen group
  ablated and adds the head whose removal *together with the group* moves the subspace most;
  the angle after each step is reported. ``sahara_candidates`` = k restricts steps ≥ 2 to the k
  best heads of step 1 (the paper searches all heads).

Validation: attack success rate on held-out harmful requests (test split, or the held-out quarter
of ``data``): greedy generation of
``max_new_tokens`` (≥ 32) tokens with the heads ablated throughout; a response *complied* unless
it contains a refusal phrase, is shorter than 32 tokens or degenerates (``refusal.is_refusal``).
Ablating safety heads raises it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

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
from headscope.engine.generation import generate
from headscope.engine.heads import Head, all_heads, model_shape
from headscope.errors import DataError, InputError, SettingError
from headscope.interventions import per_row_ablation, scale_query
from headscope.results import HeadScores
from headscope.significance import Significance
from headscope.stats import DEFAULT_ALPHA, bonferroni_t, satterthwaite_df
from headscope.scans import ReadoutScan, readout_scan
from headscope.tasks import refusal

MIN_NEW_TOKENS = refusal.MIN_COMPLIANT_TOKENS
DECODE_ROWS = 128  # rows per batched decode: a decode step's cost is mostly per call on a CPU


@dataclass
class SafetyConfig(DetectorConfig):
    n_queries: Optional[int] = setting(32, "harmful requests scored (None: the whole scored part)", min=2)
    split: str = setting("train", "part the queries come from; validation uses the other (with data: every fourth "
                                  "request of the file is test)", choices=refusal.SPLITS)
    epsilon: float = setting(1e-5, "query scale of the uniform-attention ablation", min=0, exclusive=True)
    subspace_rank: int = setting(1, "top left singular vectors compared by dataset-level Ships", min=1)
    sahara_steps: int = setting(0, "greedy Sahara steps run by score() (0: none)", min=0)
    sahara_candidates: Optional[int] = setting(None, "Sahara steps >= 2 search only the best k heads of step 1 "
                                                     "(None: all)", min=1)
    n_eval: Optional[int] = setting(None, "held-out harmful requests for the attack success rate (None: all)", min=1)
    max_new_tokens: int = setting(32, "greedy tokens per response in validation (at least 32 there; scoring does not "
                                      "decode)", min=1)
    prompt_format: str = setting("chatml", "chatml (no system turn), the tokenizer's template, the bare request, or "
                                           "'## Query: ... ## Answer:'", choices=refusal.PROMPT_FORMATS)
    data: Optional[str] = setting(None, "your harmful requests (.txt one per line, .csv with a goal/input/request "
                                        "column, or .jsonl) instead of the shipped ones; every fourth is held out", path=True)

    def __post_init__(self) -> None:
        """Settings that only fail together: each Sahara step after the first adds one head not yet
        chosen from the candidates, so there must be as many candidates as steps."""
        if self.sahara_candidates is not None and 2 <= self.sahara_steps and self.sahara_candidates < self.sahara_steps:
            raise SettingError(f"safety: sahara_candidates={self.sahara_candidates} leaves nothing to add at step "
                               f"{self.sahara_candidates + 1} of sahara_steps={self.sahara_steps}: give at least as "
                               f"many candidates as steps, or None (all heads).")


@dataclass
class SaharaResult:
    """The group Sahara chose, in order, and the dataset-level Ships angle after each step."""

    group: list[Head]
    angles: list[float]
    candidates_per_step: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"group": [str(h) for h in self.group], "angles": self.angles,
                "candidates_per_step": self.candidates_per_step}


NO_FLOOR = ("none beyond a positive difference: neither the paper nor a control gives one yet (a harmless-vs-harmless "
            "control would need one more full scan)")


@register_detector
class SafetyDetector(Detector):
    """Ships, dataset-level Ships and Sahara on harmful requests (Zhou et al. 2024)."""

    name = "safety"
    atlas_order = 80
    # the atlas's safety scan (every head ablated on every query, plus the same scan of harmless
    # requests for the significance rule) on 16 requests instead of 32 halves its longest stage
    # (~200 s instead of ~400 s on a 2-core CPU)
    atlas_defaults = {"n_queries": 16}
    Config = SafetyConfig
    summary = "KL of the next-token distribution on harmful requests when a head attends uniformly (Ships)"
    cost = "score 84 s, significance (harmless control) 95 s, validation (greedy decodes) 97 s"
    renamed_settings = {"requests_file": "data"}
    explanation = {"safety": (
        "A safety head helps the model refuse harmful requests: making its attention uniform alone changes what "
        "the model says next on harmful requests, and can make it comply (Zhou et al. 2024, 'On the Role of "
        "Attention Heads in Large Language Model Safety'). headscope measures Ships, the KL divergence of the "
        "next-token distribution when the head attends uniformly, on harmful requests against as many harmless "
        "ones, and validates by the attack success rate on held-out requests with the top heads ablated.")}

    def examples(self, model: Any) -> list[Example]:
        """Two of the harmful requests it scores and one harmless request, in its prompt format;
        none without a tokenizer."""
        if not has_tokenizer(model):
            return []
        harmful = self.queries()[:2]
        harmless = self._harmless(1)
        prompts = refusal.request_prompts(harmful + harmless, self.config.prompt_format, model.tokenizer)
        titles = ["a harmful request"] * len(harmful) + ["a harmless request, for contrast"] * len(harmless)
        return list(zip(titles, prompts, strict=True))

    def check_data(self) -> None:
        """Read ``data`` without a model: every line, and enough requests on both sides of the split
        (at least 2 scored, for dataset-level Ships, and 1 held out, for the attack success rate)."""
        if self.config.data is None:
            return
        requests = refusal.read_requests(self.config.data)
        scored = sum(r.split == self.config.split for r in requests)
        if scored < 2 or scored == len(requests):
            needed = _minimum_requests(self.config.split)
            raise DataError(
                f"{self.config.data} holds {len(requests)} requests: every fourth is held out to measure the attack "
                f"success rate and the others are scored (split={self.config.split!r} scores "
                f"{'the held-out quarter' if self.config.split == 'test' else 'the other three quarters'}); at least 2 "
                f"must be scored (dataset-level Ships compares subspaces) and 1 held out, so it needs at least {needed}."
            )

    def queries(self) -> list[refusal.Request]:
        config = self.config
        requests = self._requests(config.split)
        if config.n_queries is not None:
            if config.n_queries < 2:
                raise InputError("n_queries must be at least 2: dataset-level Ships compares subspaces of several queries.")
            requests = self._sample(requests, config.n_queries)
        return requests

    def score(self, model: Any, batch_size: Optional[int] = None, progress: Optional[bool] = None) -> HeadScores:
        config = self.config
        if config.subspace_rank < 1:
            raise InputError(f"subspace_rank must be at least 1, got {config.subspace_rank}.")
        queries = self.queries()
        prompts = refusal.request_prompts(queries, config.prompt_format, model.tokenizer)
        scan = readout_scan(model, prompts, method="uniform", factor=config.epsilon, batch_size=batch_size,
                            progress=progress)
        next_token = next_token_scores(model, scan)
        angles = dataset_ships_scores(scan, config.subspace_rank)
        metadata: dict[str, Any] = {"n_queries": len(queries), "queries": [q.text for q in queries],
                                    "refusal_tokens": refusal.refusal_start_token_ids(model.tokenizer)}
        if config.sahara_steps > 0:
            result = sahara(model, prompts, config.sahara_steps, config.epsilon, config.subspace_rank,
                            config.sahara_candidates, first_scan=scan, batch_size=batch_size, progress=progress)
            metadata["sahara"] = result.to_dict()
        extras = {"dataset_ships": angles, "refusal_drop": next_token["refusal_drop"], "ships_sd": next_token["ships_sd"]}
        return self.result(model, next_token["ships"], extras=extras, metadata=metadata)

    def significance(
        self, model: Any, scores: HeadScores, batch_size: Optional[int] = None, progress: Optional[bool] = None
    ) -> list[Significance]:
        """Control: Ships of every head on as many *harmless* requests (same split, same sentence
        forms, same seed). A safety head disturbs the next token on harmful requests more than on
        harmless ones: one-sided Welch t-test of harmful mean KL - harmless mean KL, per head::

            t  = (ships_harmful - ships_harmless) / sqrt(sd_harmful^2 / n_harmful + sd_harmless^2 / n_harmless)
            df = Welch–Satterthwaite (n_harmful - 1 and n_harmless - 1 per part)
            significant when t > t_crit(df) at family-wise 5% over all heads (Bonferroni)

        The statistic is ``t / t_crit(df)`` (threshold 1), since each head has its own df. With 16
        queries the critical t is 4.0-4.6 for 270 heads, not the normal 3.56. A head that disturbs
        every request alike (a general-purpose head) is not called a safety head, however large its
        Ships. Costs one more uniform-attention scan (of the harmless requests). With your own
        ``data``, the control is still the shipped harmless requests: their sentence forms are not
        matched to yours."""
        if "ships_sd" not in scores.extras:
            raise InputError("These safety scores have no per-query spread (saved by an older headscope); rescore them.")
        harmful_n = int(scores.metadata["n_queries"])
        harmless = self._harmless(harmful_n)
        prompts = refusal.request_prompts(harmless, self.config.prompt_format, model.tokenizer)
        scan = readout_scan(model, prompts, method="uniform", factor=self.config.epsilon, batch_size=batch_size,
                            progress=progress)
        control = next_token_scores(model, scan)
        parts = [scores.extras["ships_sd"].double() ** 2 / harmful_n, control["ships_sd"].double() ** 2 / len(harmless)]
        t = (scores.values.double() - control["ships"].double()) / sum(parts).sqrt().clamp(min=1e-12)
        df = satterthwaite_df(parts, [harmful_n - 1, len(harmless) - 1])
        critical = bonferroni_t(scores.values.numel(), df, two_sided=False)
        details = {"t_critical_range": _finite_range(critical), "welch_df_range": _finite_range(df),
                   "n_harmful": harmful_n, "n_harmless": len(harmless), "alpha": DEFAULT_ALPHA,
                   "welch_t": [[round(x, 4) for x in row] for row in t.tolist()],
                   "harmless_ships": [[round(x, 6) for x in row] for row in control["ships"].tolist()]}
        return [Significance(self.name, self.name, t / critical, 1.0,
                             "Welch t of Ships (harmful minus harmless requests) over its critical t",
                             "control: Ships on as many harmless requests; one-sided Welch t-test (Welch–Satterthwaite "
                             f"df per head), Bonferroni over all heads (family-wise {DEFAULT_ALPHA})", details,
                             effect=scores.values - control["ships"], effect_name="Ships, harmful minus harmless (nats)",
                             floor=0.0, floor_rule=NO_FLOOR)]

    def _harmless(self, n: int) -> list[refusal.Request]:
        """``n`` harmless requests of the scored split, drawn with the detector's seed."""
        return self._sample(refusal.load_requests("harmless", self.config.split), n)

    def _sample(self, requests: list[refusal.Request], n: int) -> list[refusal.Request]:
        """``n`` of ``requests`` (all if fewer), drawn with the detector's seed."""
        return random.Random(self.config.seed).sample(requests, min(n, len(requests)))

    def validation_task(self, model: Any) -> ValidationTask:
        config = self.config
        if config.max_new_tokens < MIN_NEW_TOKENS:
            raise InputError(f"max_new_tokens must be at least {MIN_NEW_TOKENS}: shorter responses count as refusals.")
        held_out = "test" if config.split == "train" else "train"
        requests = self._requests(held_out)[: config.n_eval]
        where = f"{held_out} split" if config.data is None else f"{held_out} part of {config.data}"

        def measure(model: Any, head_sets: list, method: str) -> Tensor:
            return attack_success(model, requests, head_sets, method, config.epsilon, config.max_new_tokens,
                                  prompt_format=config.prompt_format)[0]

        return ValidationTask(requests, None, f"attack success rate ({where}, {config.max_new_tokens} greedy tokens)",
                              ablation_hurts_when="increases", measure=measure, default_method="uniform")


    def _requests(self, split: str) -> list[refusal.Request]:
        """The harmful requests of a split: shipped, or of your ``data`` file, split the same way
        (every fourth request held out), so validation never runs on a scored request (the paper
        measured attack success on the very queries it scored)."""
        if self.config.data is not None:
            self.check_data()
            return refusal.read_requests(self.config.data, split)
        return refusal.load_requests("harmful", split)


def _minimum_requests(split: str) -> int:
    """The fewest requests in a file that leave at least 2 in the scored part ``split`` and 1 in the
    other (every fourth request is ``"test"``)."""
    n = 2
    while True:
        held = n // refusal.HELD_OUT_EVERY
        scored, other = (held, n - held) if split == "test" else (n - held, held)
        if scored >= 2 and other >= 1:
            return n
        n += 1


def _finite_range(values: Tensor) -> list[float]:
    """``[min, max]`` of the finite values (empty when there are none)."""
    finite = values[torch.isfinite(values)]
    return [round(float(finite.min()), 4), round(float(finite.max()), 4)] if finite.numel() else []


def next_token_scores(model: Any, scan: ReadoutScan) -> dict[str, Float[Tensor, "layers heads"]]:
    """Both last-position scores of a scan, from one unembedding of its states:

    * ``"ships"``: mean over queries of KL(clean ‖ ablated) of the next-token distribution
      (``"ships_sd"``: its standard deviation over queries);
    * ``"refusal_drop"``: mean over queries of log P(refusal opening) clean minus ablated — how
      much removing the head lowers the first-token refusal probability (the cheap proxy of
      ``refusal.first_token_refusal_probability``).
    """
    ids = refusal.refusal_start_token_ids(model.tokenizer)
    clean = torch.log_softmax(scan.logits(model, scan.clean), dim=-1)  # [queries, vocab]
    clean_refusal = torch.logsumexp(clean[:, ids], dim=-1)
    shape = model_shape(model)
    scores = {name: torch.full((shape.n_layers, shape.n_heads), float("nan"))
              for name in ("ships", "ships_sd", "refusal_drop")}
    for layer in range(shape.n_layers):
        scanned = [h.head for h in scan.heads if h.layer == layer]
        if not scanned:
            continue
        ablated = torch.log_softmax(scan.logits(model, scan.ablated[layer, scanned]), dim=-1)  # [heads, queries, vocab]
        kl = (clean.exp()[None] * (clean[None] - ablated)).sum(dim=-1)  # [heads, queries]
        scores["ships"][layer, scanned], scores["ships_sd"][layer, scanned] = kl.mean(dim=-1), kl.std(dim=-1)
        scores["refusal_drop"][layer, scanned] = (clean_refusal[None] - torch.logsumexp(ablated[..., ids], dim=-1)).mean(dim=-1)
    return scores


def ships_scores(model: Any, scan: ReadoutScan) -> Float[Tensor, "layers heads"]:
    """Ships of every scanned head (see :func:`next_token_scores`)."""
    return next_token_scores(model, scan)["ships"]


def subspace_angle(
    clean: Float[Tensor, "queries d_model"], ablated: Float[Tensor, "queries d_model"], rank: int = 1
) -> float:
    """Largest principal angle (degrees) between the spans of the top ``rank`` left singular
    vectors of two matrices (Zhou et al.'s ``compute_subspace_similarity`` for rank 1)."""
    u_clean = torch.linalg.svd(clean.double(), full_matrices=False)[0][:, :rank]
    u_ablated = torch.linalg.svd(ablated.double(), full_matrices=False)[0][:, :rank]
    cosines = torch.linalg.svdvals(u_clean.T @ u_ablated).clamp(-1, 1)
    return float(torch.rad2deg(torch.acos(cosines.min())))


def dataset_ships_scores(scan: ReadoutScan, rank: int = 1, reference: Optional[Tensor] = None) -> Float[Tensor, "layers heads"]:
    """Dataset-level Ships of every scanned head: the angle between the reference states (default:
    the scan's clean states) and the states with that head ablated."""
    reference = scan.clean if reference is None else reference
    values = torch.full(scan.ablated.shape[:2], float("nan"))
    for head in scan.heads:
        values[head.layer, head.head] = subspace_angle(reference, scan.ablated[head.layer, head.head], rank)
    return values


def sahara(
    model: Any,
    prompts: Any,
    steps: int = 3,
    epsilon: float = 1e-5,
    rank: int = 1,
    candidates: Optional[int] = None,
    first_scan: Optional[ReadoutScan] = None,
    batch_size: Optional[int] = None,
    progress: Optional[bool] = None,
) -> SaharaResult:
    """Greedy Sahara search for a group of safety heads (see the module docstring).

    Each step is one :func:`readout_scan` with the group chosen so far ablated in the background;
    angles are always measured against the fully clean states. ``first_scan``: a scan of these
    prompts without background (the detector's own), reused as step 1.
    """
    if steps < 1:
        raise InputError(f"Sahara needs at least one step, got {steps}.")
    scan = first_scan or readout_scan(model, prompts, method="uniform", factor=epsilon, batch_size=batch_size,
                                      progress=progress)
    reference = scan.clean
    angles = dataset_ships_scores(scan, rank, reference)
    pool = all_heads(model)
    if candidates is not None:
        order = torch.argsort(torch.nan_to_num(angles.flatten(), nan=-1.0), descending=True)[:candidates]
        pool = [Head(int(i) // angles.shape[1], int(i) % angles.shape[1]) for i in order]
    group: list[Head] = []
    result = SaharaResult([], [], [len(scan.heads)])
    for step in range(steps):
        if step > 0:
            heads = [h for h in pool if h not in group]
            chosen = list(group)
            scan = readout_scan(model, prompts, method="uniform", factor=epsilon, heads=heads, batch_size=batch_size,
                                background=lambda m, chosen=chosen: scale_query(m, chosen, epsilon), progress=progress)
            angles = dataset_ships_scores(scan, rank, reference)
            result.candidates_per_step.append(len(heads))
        best = int(torch.argmax(torch.nan_to_num(angles.flatten(), nan=-1.0)))
        group.append(Head(best // angles.shape[1], best % angles.shape[1]))
        result.group = list(group)
        result.angles.append(float(angles.flatten()[best]))
    return result


def attack_success(
    model: Any,
    requests: Sequence[Any],
    head_sets: Sequence[Optional[Sequence[Any]]],
    method: str = "uniform",
    epsilon: float = 1e-5,
    max_new_tokens: int = 32,
    batch_size: Optional[int] = None,
    prompt_format: str = "chatml",
) -> tuple[Float[Tensor, "sets requests"], list[list[Any]]]:
    """Whether each request's greedy response complied (1) or not (0) under each head set
    (None = clean), and the generations; all sets run as rows of the same batched decode."""
    prompts = refusal.request_prompts(requests, prompt_format, model.tokenizer)
    rows = per_row_ablation([heads for heads in head_sets for _ in prompts], method, epsilon)
    outputs = generate(model, prompts * len(head_sets), max_new_tokens, row_intervention=rows,
                       batch_size=batch_size or DECODE_ROWS)
    complied = torch.tensor([0.0 if refusal.is_refusal(o.text, o.token_ids) else 1.0 for o in outputs])
    per_set = [outputs[i * len(prompts) : (i + 1) * len(prompts)] for i in range(len(head_sets))]
    return complied.view(len(head_sets), len(prompts)), per_set
