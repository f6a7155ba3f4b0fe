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
from typing import Any, Callable, Optional, Sequence

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
from headscope.directions import (MIN_PROMPTS_FOR_CHOICE, capture_last_position, head_share_frequency, refusal_direction,
                                  top_share_heads)
from headscope.engine.generation import generate
from headscope.engine.heads import Head, all_heads, model_shape
from headscope.errors import DataError, InputError, SettingError
from headscope.interventions import per_row_ablation, scale_query
from headscope.results import HeadScores
from headscope.significance import Significance
from headscope.stability import (SelectionStability, bootstrap_rows, heads_of, mean_score_stability, stability_of,
                                 top_k_mask)
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
    n_bootstrap: int = setting(200, "bootstrap resamples of the requests for each head's selection frequency by "
                                    "Ships, dataset-level Ships and the refusal direction (0: none; no model run)", min=0)
    stability_k: int = setting(3, "heads counted as selected in each resample (the top k)", min=1)
    sahara_resamples: int = setting(20, "bootstrap resamples Sahara searches too; the group given is the one they "
                                        "choose most often (0: the search on all queries only; each new group prefix "
                                        "costs one scan of the candidates)", min=0)
    direction_queries: Optional[int] = setting(None, "harmful and as many harmless requests of the split behind the "
                                                     "refusal direction (None: all; one forward pass each)", min=4)
    direction_layer: Optional[int] = setting(None, "residual layer of the refusal direction (None: the best held-out "
                                                   "separation among the first 80% of layers)", min=0)
    held_out: str = setting("split", "requests validation measures attack success on: the other split, or "
                                     "'elsewhere' (48 requests in other styles and categories)",
                            choices=("split", "elsewhere"))
    n_eval: Optional[int] = setting(None, "held-out harmful requests for the attack success rate, spread evenly over "
                                          "the categories (None: all)", min=1)
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
    """What Sahara found.

    Attributes:
        group: the group to use: with resamples, the stable one (the heads the resampled searches
            chose most often, ``frequency`` = each one's share of them); without, ``search_group``.
        angles: the dataset-level Ships angle after each step of the search on all queries.
        candidates_per_step: heads searched at each step of that search.
        search_group: the group the search on all queries chose, in order.
        frequency: each ``group`` head's share of the resampled searches that chose it (None
            without resamples).
        n_resamples: bootstrap resamples of the queries searched.
        head_frequency: every head some resampled search chose, with its share.
        resampled_groups: each resampled search's group, in order.
        n_scans: readout scans run after step 1 (the cost: one per new group prefix).
    """

    group: list[Head]
    angles: list[float]
    candidates_per_step: list[int] = field(default_factory=list)
    search_group: list[Head] = field(default_factory=list)
    frequency: Optional[list[float]] = None
    n_resamples: int = 0
    head_frequency: dict[str, float] = field(default_factory=dict)
    resampled_groups: list[list[Head]] = field(default_factory=list)
    n_scans: int = 0

    def __post_init__(self) -> None:
        self.search_group = self.search_group or list(self.group)

    def add_resamples(self, groups: list[list[Head]], size: int, heads: list[Head]) -> None:
        """Take the resampled searches' groups; ``group`` becomes the ``size`` heads they chose most
        often (ties: the search on all queries' heads first, in its order, then layer by layer)."""
        counts = {head: sum(head in g for g in groups) for head in heads}
        rank = {head: i for i, head in enumerate(self.search_group)}
        order = sorted(heads, key=lambda h: (-counts[h], rank.get(h, len(rank)), h.layer, h.head))
        self.group = order[:size]
        self.frequency = [counts[h] / len(groups) for h in self.group]
        self.n_resamples = len(groups)
        self.head_frequency = {str(h): counts[h] / len(groups) for h in order if counts[h]}
        self.resampled_groups = groups

    def to_dict(self) -> dict[str, Any]:
        return {"group": [str(h) for h in self.group], "frequency": self.frequency,
                "search_group": [str(h) for h in self.search_group], "angles": self.angles,
                "candidates_per_step": self.candidates_per_step, "n_resamples": self.n_resamples,
                "head_frequency": self.head_frequency, "n_scans": self.n_scans,
                "resampled_groups": [[str(h) for h in g] for g in self.resampled_groups]}


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
    cost = ("score 84 s (+ ~20 s for the refusal direction's 510 forward passes; bootstrap stability needs no model "
            "run), significance (harmless control) 95 s, validation (greedy decodes) 97 s")
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
                            config.sahara_candidates, first_scan=scan, batch_size=batch_size, progress=progress,
                            resamples=config.sahara_resamples, seed=config.seed)
            metadata["sahara"] = result.to_dict()
        extras = {"dataset_ships": angles, "refusal_drop": next_token["refusal_drop"], "ships_sd": next_token["ships_sd"]}
        found = self._stability(scan, next_token["ships_per_query"], angles) if config.n_bootstrap > 0 else {}
        direction = self._refusal_direction(model, batch_size, progress)
        metadata["refusal_direction"] = direction["record"]
        if "shares" in direction:
            extras["refusal_direction"] = direction["shares"]
        if "stability" in direction:
            found["refusal_direction"] = direction["stability"]
        extras.update({f"{name}_frequency": s.frequency for name, s in found.items()})
        if found:
            metadata["stability"] = {name: s.to_dict() for name, s in found.items()}
        return self.result(model, next_token["ships"], extras=extras, metadata=metadata)

    def _refusal_direction(self, model: Any, batch_size: Optional[int], progress: Optional[bool]) -> dict[str, Any]:
        """The refusal direction (Arditi et al. 2024) from ``direction_queries`` harmful and as many
        harmless requests of the scored split, every head's share of it, and (with ``n_bootstrap``)
        how often each head is among the top ``stability_k`` by share over resamples of both sets."""
        config = self.config
        harmful, harmless = self.direction_requests()
        if config.direction_layer is None and len(harmful) < MIN_PROMPTS_FOR_CHOICE:
            return {"record": {"skipped": f"{len(harmful)} harmful requests in the scored part: choosing the "
                                          f"direction's layer needs {MIN_PROMPTS_FOR_CHOICE}; give direction_layer"}}
        captures = [capture_last_position(model, refusal.request_prompts(requests, config.prompt_format, model.tokenizer),
                                          batch_size=batch_size, progress=progress) for requests in (harmful, harmless)]
        direction = refusal_direction(*captures, layer=config.direction_layer)
        shares = direction.head_shares(*captures)
        record = direction.to_dict()
        record.update(harmful_queries=[r.text for r in harmful], harmless_queries=[r.text for r in harmless],
                      score="share of the direction's length written at the last position (harmful minus harmless)")
        found: dict[str, Any] = {"shares": shares, "record": record}
        if config.n_bootstrap > 0:
            frequency = head_share_frequency(*captures, direction.layer, config.stability_k, config.n_bootstrap,
                                             config.seed)
            found["stability"] = SelectionStability("refusal_direction", frequency, config.stability_k,
                                                    config.n_bootstrap, len(harmful) + len(harmless),
                                                    top_share_heads(shares, config.stability_k))
        return found

    def direction_requests(self) -> tuple[list[refusal.Request], list[refusal.Request]]:
        """The harmful and harmless requests behind the refusal direction: ``direction_queries`` of
        each (all of the scored split when None), drawn with the detector's seed."""
        harmful = self._requests(self.config.split)
        n = len(harmful) if self.config.direction_queries is None else self.config.direction_queries
        return self._sample(harmful, n), self._harmless(n)

    def selection_requests(self) -> list[str]:
        """Every request the scores were selected on (the scored queries and both sides of the
        refusal direction): held-out evaluation must avoid them all."""
        harmful, harmless = self.direction_requests()
        return list(dict.fromkeys([q.text for q in self.queries()] + [r.text for r in harmful + harmless]))

    def _stability(self, scan: ReadoutScan, ships_per_query: Tensor, angles: Tensor) -> dict[str, SelectionStability]:
        """Selection frequency of every head by Ships and by dataset-level Ships over
        ``n_bootstrap`` resamples of the scored queries (no model run: Ships is a mean over
        queries, and dataset-level Ships is recomputed on each resample's rows)."""
        config = self.config
        rows = bootstrap_rows(scan.clean.shape[0], config.n_bootstrap, config.seed)
        resampled = dataset_ships_resampled(scan, rows, config.subspace_rank)
        return {"ships": mean_score_stability(ships_per_query, config.stability_k, rows, "ships"),
                "dataset_ships": stability_of(angles, resampled, config.stability_k, "dataset_ships", len(rows[0]))}

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
        """Attack success on requests the heads were not selected on: the other split (or the
        held-out quarter of ``data``), or with ``held_out="elsewhere"`` the 48 requests written in
        other styles and categories (``refusal.load_elsewhere``). Checked disjoint from the scored
        requests before anything runs (:func:`check_held_out`)."""
        config = self.config
        if config.max_new_tokens < MIN_NEW_TOKENS:
            raise InputError(f"max_new_tokens must be at least {MIN_NEW_TOKENS}: shorter responses count as refusals.")
        requests, where = self._held_out_requests()
        requests = refusal.evenly_spaced(requests, config.n_eval)
        selection = self.selection_requests()

        def measure(model: Any, head_sets: list, method: str) -> Tensor:
            return attack_success(model, requests, head_sets, method, config.epsilon, config.max_new_tokens,
                                  prompt_format=config.prompt_format, selection=selection)[0]

        return ValidationTask(requests, None, f"attack success rate ({where}, {config.max_new_tokens} greedy tokens)",
                              ablation_hurts_when="increases", measure=measure, default_method="uniform")

    def _held_out_requests(self) -> tuple[list[refusal.Request], str]:
        """The held-out harmful requests validation uses, and where they come from."""
        if self.config.held_out == "elsewhere":
            return refusal.load_elsewhere("harmful"), "requests from elsewhere"
        other = "test" if self.config.split == "train" else "train"
        return self._requests(other), f"{other} split" if self.config.data is None else f"{other} part of {self.config.data}"

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


def next_token_scores(model: Any, scan: ReadoutScan) -> dict[str, Tensor]:
    """Both last-position scores of a scan, from one unembedding of its states:

    * ``"ships"``: mean over queries of KL(clean ‖ ablated) of the next-token distribution
      (``"ships_sd"``: its standard deviation over queries);
    * ``"refusal_drop"``: mean over queries of log P(refusal opening) clean minus ablated — how
      much removing the head lowers the first-token refusal probability (the cheap proxy of
      ``refusal.first_token_refusal_probability``);
    * ``"ships_per_query"``: the KL of every query, ``[layers, heads, queries]``.
    """
    ids = refusal.refusal_start_token_ids(model.tokenizer)
    clean = torch.log_softmax(scan.logits(model, scan.clean), dim=-1)  # [queries, vocab]
    clean_refusal = torch.logsumexp(clean[:, ids], dim=-1)
    shape = model_shape(model)
    scores = {name: torch.full((shape.n_layers, shape.n_heads), float("nan"))
              for name in ("ships", "ships_sd", "refusal_drop")}
    scores["ships_per_query"] = torch.full((shape.n_layers, shape.n_heads, clean.shape[0]), float("nan"))
    for layer in range(shape.n_layers):
        scanned = [h.head for h in scan.heads if h.layer == layer]
        if not scanned:
            continue
        ablated = torch.log_softmax(scan.logits(model, scan.ablated[layer, scanned]), dim=-1)  # [heads, queries, vocab]
        kl = (clean.exp()[None] * (clean[None] - ablated)).sum(dim=-1)  # [heads, queries]
        scores["ships"][layer, scanned], scores["ships_sd"][layer, scanned] = kl.mean(dim=-1), kl.std(dim=-1)
        scores["ships_per_query"][layer, scanned] = kl
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
    every_query = torch.arange(scan.clean.shape[0])[None]
    return dataset_ships_resampled(scan, every_query, rank, reference)[0]


def dataset_ships_resampled(
    scan: ReadoutScan,
    rows: Int[Tensor, "resamples draws"],
    rank: int = 1,
    reference: Optional[Tensor] = None,
    heads: Optional[Sequence[Head]] = None,
) -> Float[Tensor, "resamples layers heads"]:
    """Dataset-level Ships of every scanned head (or of ``heads``) on each row set of ``rows``
    (query indices, repeats allowed: bootstrap resamples), NaN elsewhere.

    The top left singular vectors of a stack of states ``S`` [queries × d_model] are the top
    eigenvectors of its Gram matrix ``S Sᵀ``, and a resample's Gram matrix is the whole Gram matrix
    indexed by its rows: one Gram matrix per head, then one small batched eigendecomposition per
    head for all resamples. Equal to :func:`subspace_angle` on each resample (tested)."""
    reference = scan.clean if reference is None else reference
    u_reference = _top_left_vectors(_gram(reference)[rows[:, :, None], rows[:, None, :]], rank)
    values = torch.full((rows.shape[0], *scan.ablated.shape[:2]), float("nan"))
    for head in scan.heads if heads is None else heads:
        ablated = scan.ablated[head.layer, head.head]
        u_ablated = _top_left_vectors(_gram(ablated)[rows[:, :, None], rows[:, None, :]], rank)
        cosines = torch.linalg.svdvals(u_reference.transpose(1, 2) @ u_ablated).clamp(-1, 1)  # [resamples, rank]
        values[:, head.layer, head.head] = torch.rad2deg(torch.acos(cosines.min(dim=-1).values)).float()
    return values


def _gram(states: Float[Tensor, "queries d_model"]) -> Float[Tensor, "queries queries"]:
    states = states.double()
    return states @ states.T


def _top_left_vectors(grams: Float[Tensor, "resamples n n"], rank: int) -> Float[Tensor, "resamples n rank"]:
    """The top ``rank`` eigenvectors of each Gram matrix (= top left singular vectors of the states)."""
    return torch.linalg.eigh(grams)[1][..., -rank:]


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
    resamples: int = 0,
    seed: int = 0,
) -> SaharaResult:
    """Greedy Sahara search for a group of safety heads (see the module docstring), on all the
    prompts and on ``resamples`` bootstrap resamples of them.

    Each step is one :func:`readout_scan` with the group chosen so far ablated in the background;
    angles are always measured against the fully clean states. ``first_scan``: a scan of these
    prompts without background (the detector's own), reused as step 1. The searches run in
    lockstep: a scan covers every prompt, so searches that chose the same heads so far share it and
    each reads its own rows (a resample costs only the group prefixes no earlier search reached).
    ``candidates`` restricts steps ≥ 2 of each search to the best heads of its own step 1 (a
    prefix's scan covers the union of its searches' candidates).

    The group returned (``group``) is the stable one when ``resamples`` > 0: the ``steps`` heads
    chosen most often by the resampled searches, each with its share (``frequency``); the search on
    all prompts is ``search_group`` with its ``angles``.
    """
    if steps < 1:
        raise InputError(f"Sahara needs at least one step, got {steps}.")
    scan = first_scan or readout_scan(model, prompts, method="uniform", factor=epsilon, batch_size=batch_size,
                                      progress=progress)
    n_queries = scan.clean.shape[0]
    rows = torch.arange(n_queries)[None]
    if resamples > 0:
        rows = torch.cat([rows, bootstrap_rows(n_queries, resamples, seed)])
    search = _GreedySearches(model, prompts, scan, rows, epsilon, rank, batch_size, progress)
    search.run(steps, candidates)
    result = SaharaResult(search.groups[0], search.angles[0], search.candidates_per_step, n_scans=search.n_scans)
    if resamples > 0:
        result.add_resamples(search.groups[1:], steps, all_heads(model))
    return result


class _GreedySearches:
    """Sahara searches on several row sets of the same prompts, run step by step together: at each
    step, the searches that chose the same heads so far (a group prefix, in order) share one scan
    of the union of their candidates (dropped after the step: a prefix is reached at one step only)."""

    def __init__(self, model, prompts, first_scan: ReadoutScan, rows: Tensor, epsilon, rank, batch_size, progress):
        self.model, self.prompts, self.rows, self.epsilon, self.rank = model, prompts, rows, epsilon, rank
        self.batch_size, self.progress = batch_size, progress
        self.reference = first_scan.clean
        self.first_scan = first_scan
        self.groups: list[list[Head]] = [[] for _ in range(rows.shape[0])]
        self.angles: list[list[float]] = [[] for _ in range(rows.shape[0])]
        self.candidates_per_step: list[int] = []
        self.n_scans = 0

    def run(self, steps: int, candidates: Optional[int]) -> None:
        first = dataset_ships_resampled(self.first_scan, self.rows, self.rank, self.reference)
        pools = torch.isfinite(first)
        if candidates is not None:  # each search's own best heads of step 1
            pools = top_k_mask(first, min(candidates, int(pools.flatten(1).sum(1).min())))
        self.candidates_per_step.append(len(self.first_scan.heads))
        self._choose(list(range(len(self.groups))), first)
        for step in range(1, steps):
            for prefix, members in self._by_prefix().items():
                allowed = pools[members].clone()
                for head in prefix:
                    allowed[:, head.layer, head.head] = False
                scores = self._scores(prefix, members, allowed)
                self._choose(members, scores.masked_fill(~allowed, float("nan")))
            self.candidates_per_step.append(int(pools[0].sum()) - step)

    def _by_prefix(self) -> dict[tuple[Head, ...], list[int]]:
        members: dict[tuple[Head, ...], list[int]] = {}
        for index, group in enumerate(self.groups):
            members.setdefault(tuple(group), []).append(index)
        return members

    def _scores(self, prefix: tuple[Head, ...], members: list[int], allowed: Tensor) -> Tensor:
        """Dataset-level Ships of the heads some member may add, with ``prefix`` ablated: one scan
        of the union of the members' candidates, read on each member's rows."""
        needed = heads_of(allowed.any(dim=0))
        chosen = list(prefix)
        scan = readout_scan(self.model, self.prompts, method="uniform", factor=self.epsilon, heads=needed,
                            batch_size=self.batch_size, progress=self.progress,
                            background=lambda m: scale_query(m, chosen, self.epsilon))
        self.n_scans += 1
        return dataset_ships_resampled(scan, self.rows[members], self.rank, self.reference, heads=needed)

    def _choose(self, members: list[int], scores: Float[Tensor, "members layers heads"]) -> None:
        flat = scores.flatten(1)
        best = flat.nan_to_num(nan=-torch.inf).argmax(dim=1)
        for position, (member, index) in enumerate(zip(members, best.tolist(), strict=True)):
            self.groups[member].append(Head(index // scores.shape[2], index % scores.shape[2]))
            self.angles[member].append(float(flat[position, index]))


def attack_success(
    model: Any,
    requests: Sequence[Any],
    head_sets: Sequence[Optional[Sequence[Any]]],
    method: str = "uniform",
    epsilon: float = 1e-5,
    max_new_tokens: int = 32,
    batch_size: Optional[int] = None,
    prompt_format: str = "chatml",
    *,
    selection: Optional[Sequence[Any]] = None,
    intervention: Optional[Callable[[Any], Any]] = None,
) -> tuple[Float[Tensor, "sets requests"], list[list[Any]]]:
    """Whether each request's greedy response complied (1) or not (0) under each head set
    (None = clean), and the generations; all sets run as rows of the same batched decode.

    Args:
        selection: the requests the heads were selected on; when given, the evaluated requests
            must be disjoint from them (:func:`check_held_out`), or a ``DataError`` names the
            overlap before anything runs.
        intervention: a context-manager factory active for every row too (e.g.
            ``lambda m: hs.ablate_direction(m, direction)``), around the head sets' ablations.
    """
    if selection is not None:
        check_held_out(requests, selection)
    prompts = refusal.request_prompts(requests, prompt_format, model.tokenizer)
    rows = per_row_ablation([heads for heads in head_sets for _ in prompts], method, epsilon)
    outputs = generate(model, prompts * len(head_sets), max_new_tokens, row_intervention=rows, intervention=intervention,
                       batch_size=batch_size or DECODE_ROWS)
    complied = torch.tensor([0.0 if refusal.is_refusal(o.text, o.token_ids) else 1.0 for o in outputs])
    per_set = [outputs[i * len(prompts) : (i + 1) * len(prompts)] for i in range(len(head_sets))]
    return complied.view(len(head_sets), len(prompts)), per_set


def check_held_out(evaluated: Sequence[Any], selection: Sequence[Any]) -> None:
    """Raise a ``DataError`` when an evaluated request equals or nearly repeats a request the heads
    were selected on (``refusal.overlapping_requests``): a held-out claim needs held-out requests."""
    overlap = refusal.overlapping_requests(evaluated, selection)
    if overlap:
        shown = "; ".join(f"{a!r} ~ {b!r}" for a, b in overlap[:3])
        raise DataError(f"{len(overlap)} evaluated request(s) repeat or nearly repeat requests the heads were selected "
                        f"on ({shown}{'; ...' if len(overlap) > 3 else ''}): evaluate on held-out requests (the other "
                        "split, or refusal.load_elsewhere()).")
