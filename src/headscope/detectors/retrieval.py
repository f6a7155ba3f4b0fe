"""Retrieval heads — Wu, Wang, Xiao, Peng, Fu 2024, "Retrieval Head Mechanistically Explains
Long-Context Factuality" (arXiv 2404.15574; code: nightdessert/Retrieval_Head).

Data: needle-in-a-haystack prompts (``headscope.tasks.haystack``): an invented fact hidden at a
depth of a filler text, a question at the end, over a grid of lengths × depths. Your own data:
``data`` = a JSONL file of needles (``{"needle", "question", "answer"}`` per line, the answer a
part of the needle; ``haystack.read_needles``) used instead of the shipped ones, and ``haystack`` =
a UTF-8 text used as filler instead of the shipped essays (read from its start, never repeated:
too short for a length is an error; ``haystack.read_haystack``). Their SHA-256 go into the saved
config and into the ``checkpoint``'s sample keys.

Score (``values``), the paper's copy-paste rate: decode the answer greedily with a KV cache; at
decode step ``t`` the model emits token ``y_t``, and head ``h``'s query that produced it attends
most to key position ``k_t^h``. Then, for a sample whose answer occupies prompt positions
``[a, b)``:

    score_h(sample) = |{t : a <= k_t^h < b and prompt[k_t^h] == y_t}| / (b - a)

averaged over the samples whose answer was retrieved (ROUGE-1 recall of the answer in the
response > ``rouge_threshold`` = 0.5). A head with score > ``score_threshold`` = 0.1 is a
retrieval head. ``extras["activation_rate"]``: the share of retrieved samples in which the head
scored above the threshold (the paper's "dynamically activated"). Only the top-1 key of each head
per step is kept (``headscope.engine.decoding``), never the attention patterns.

ROUGE-1 here is unigram recall over lower-cased alphanumeric words, without the Porter stemmer
the paper's ``rouge_score`` call uses; on these needles (invented names, concrete nouns) the two
differ rarely.

Validation (``hs.validate``), the paper's ablation: the top-k heads masked at decode steps only
(uniform attention through an ε-scaled query; the prefill is untouched) against k random heads,
on the same grid filled with the next needles (held out from scoring). Every sample has its own
needle: scoring takes needles ``needle_offset .. needle_offset + n - 1`` (``n`` = grid size)
and validation the next ``n``, from a sequence in which no needle repeats (``"facts"``: the 24
shipped needles, then generated ones, ``haystack.fact_needles``; ``"codes"``: distinct random
codes; ``data``: the lines of your file in order, which must hold ``needle_offset + 2n``
needles), so the two never share a needle. The default grid (9 cells) scores shipped needles 0–8
and validates on 9–17; the 99-cell grid of ``configs/retrieval-full-grid.json`` scores 0–98
(24 shipped, 75 generated) and validates on generated needles 99–197.
The metric is ``validation_metric``: the teacher-forced log-likelihood per answer token
(``"loglik"``, default), or ROUGE-1 recall / exact match of the greedy answer (``"rouge"``,
``"exact"``). :func:`measure_needles` gives all three at once, and
``headscope.studies.retrieval.plot_needle_heatmaps`` draws the usual length × depth heatmap for
each condition.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from headscope.detectors.base import (
    Detector,
    DetectorConfig,
    Example,
    ValidationTask,
    has_tokenizer,
    register_detector,
    setting,
)
from headscope.engine.decoding import (
    DEFAULT_PREFILL_CHUNK,
    DecodeTrace,
    Prefix,
    continuation_logprobs,
    greedy_decode,
    greedy_decode_rows,
)
from headscope.engine.heads import Head, check_heads
from headscope.engine.runner import bar_disabled
from headscope.errors import DataError, EmptyResultError, InputError, ResultFileError
from headscope.files import append_line
from headscope.identity import ModelIdentity, model_identity
from headscope.interventions import DEFAULT_UNIFORM_EPSILON, ablate_per_row
from headscope.results import HeadScores
from headscope.significance import Significance
from headscope.tasks.haystack import (
    FORMATS,
    N_GENERATED_FACTS,
    QUESTION_TEMPLATE,
    HaystackSample,
    HaystackText,
    Needle,
    code_needles,
    fact_needles,
    filler_sentences,
    needle_grid,
    read_haystack,
    read_needles,
    shipped_needles,
)
from headscope.tasks.user_data import file_sha256

NEEDLE_SOURCES = ("facts", "codes")
NEEDLE_METRICS = ("loglik", "rouge", "exact")


@dataclass
class RetrievalConfig(DetectorConfig):
    lengths: tuple[int, ...] = setting((300, 550, 800), "prompt lengths in tokens (the grid's columns)", min=1)
    depths: tuple[float, ...] = setting((0, 50, 100), "needle depths, percent of the filler (the grid's rows)", min=0,
                                      max=100)
    needles_per_cell: int = setting(1, "samples per length × depth cell, each with its own needle", min=1)
    needles: str = setting("facts", "shipped needles: invented facts (24 shipped, then generated) or random access "
                                    "codes; ignored when data is given", choices=("facts", "codes"))
    needle_offset: int = setting(0, "score needles offset..offset+n-1 (n = grid size); validation takes the next n",
                                 min=0)
    format: str = setting("auto", "prompt format: chat with a chat template (the bundled instruct model ends its turn "
                                  "at once in plain), else plain (base models); or either by name", choices=FORMATS)
    max_new_tokens: int = setting(50, "greedy tokens decoded per answer", min=1)
    rouge_threshold: float = setting(0.5, "a sample counts when ROUGE-1 recall of the answer exceeds this")
    score_threshold: float = setting(0.1, "the paper's retrieval-head threshold")
    prefill_chunk: int = setting(DEFAULT_PREFILL_CHUNK, "prompt tokens per prefill forward pass", min=1)
    validation_metric: str = setting("loglik", "held-out metric: teacher-forced log-likelihood, or ROUGE-1 / exact "
                                               "match of the greedy answer", choices=NEEDLE_METRICS)
    mask_epsilon: float = setting(DEFAULT_UNIFORM_EPSILON, "query scale of the decode-time uniform-attention mask",
                                  min=0, exclusive=True)
    checkpoint: Optional[str] = setting(None, "a JSONL file: per-sample results kept, a rerun resumes (one file per "
                                              "model: another model's is refused)", path=True)
    data: Optional[str] = setting(None, 'your needles, a JSONL file of {"needle", "question", "answer"} lines (the '
                                        "answer a part of the needle), instead of the shipped ones", path=True)
    haystack: Optional[str] = setting(None, "your filler, a UTF-8 text file, instead of the shipped essays (never "
                                            "repeated: it must be long enough for the longest length)", path=True)


@dataclass
class NeedleOutcome:
    """One sample's greedy answer, how well it retrieved the needle, and each head's copy score."""

    key: str
    length: int
    depth: float
    n_tokens: int
    response: str
    rouge: float
    exact: bool
    copy_scores: Float[Tensor, "n_layers n_heads"]

    def to_json(self) -> str:
        """One JSON line (``from_json`` reads it back)."""
        return json.dumps(self.to_row())

    @classmethod
    def from_json(cls, line: str) -> "NeedleOutcome":
        """The outcome of a line written by ``to_json``."""
        return cls.from_row(json.loads(line))

    def to_row(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (``copy_scores`` as nested lists)."""
        row = asdict(self)
        row["copy_scores"] = self.copy_scores.tolist()
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "NeedleOutcome":
        """The outcome of a dict written by ``to_row``."""
        return cls(**{**row, "copy_scores": torch.tensor(row["copy_scores"])})


@register_detector
class RetrievalDetector(Detector):
    name = "retrieval"
    atlas_order = 50
    Config = RetrievalConfig
    summary = "copy-paste rate from the needle at decode steps, top-1 attention (Wu et al. 2024)"
    cost = "score 27 s (9 needle samples of 300-800 tokens, ~3 s each), validation 11 s"
    explanation = {"retrieval": (
        "A retrieval head finds a fact hidden in a long context and copies it into the answer: while the model "
        "writes the answer, the head attends to the very token of the needle it is about to emit (Wu et al. "
        "2024, 'Retrieval Head Mechanistically Explains Long-Context Factuality'). headscope decodes answers to "
        "needle-in-a-haystack questions and scores the share of needle tokens a head copies by its top-1 "
        "attention; it validates by masking the top heads at decode steps and measuring the answers on new "
        "needles.")}

    def needles(self, held_out: bool = False) -> list[Needle]:
        """One needle per sample of the grid, in the grid's order: the scored ones (from
        ``needle_offset``) or, with ``held_out``, the next ``grid_size`` ones, which validation uses.

        Raises:
            InputError: an unknown needle source, a negative offset, or a grid too large for the
                needles there are (scoring and validation would then share needles).
        """
        config = self.config
        if config.needles not in NEEDLE_SOURCES:
            raise InputError(f"Unknown needle source {config.needles!r}; choose one of {', '.join(NEEDLE_SOURCES)}.")
        if config.needle_offset < 0:
            raise InputError(
                f"needle_offset is the index of the first scored needle and must be >= 0; got {config.needle_offset}."
            )
        n_cells = grid_size(config)
        start = config.needle_offset + (n_cells if held_out else 0)
        if config.data is not None:
            return self._file_needles(n_cells, start)
        if config.needles == "codes":
            return code_needles(start + n_cells, config.seed)[start:]
        needed, available = config.needle_offset + 2 * n_cells, len(shipped_needles()) + N_GENERATED_FACTS
        if needed > available:
            raise InputError(
                f"The retrieval grid has {n_cells} samples, so scoring takes fact needles {config.needle_offset}.."
                f"{config.needle_offset + n_cells - 1} and validation the next {n_cells}: {needed} needles, but only "
                f"{available} distinct fact needles exist, so validation would reuse needles the heads were chosen "
                "on. Use needles='codes' (no such limit), a smaller grid (lengths, depths, needles_per_cell) or a "
                "smaller needle_offset."
            )
        return fact_needles(n_cells, start)

    def _file_needles(self, n_cells: int, start: int) -> list[Needle]:
        """Needles ``start .. start + n_cells - 1`` of the ``data`` file (never wrapped around).

        Raises:
            DataError: the file cannot be read, or holds fewer than ``needle_offset + 2 * n_cells``.
        """
        config = self.config
        pool = read_needles(config.data)
        needed = config.needle_offset + 2 * n_cells
        if needed > len(pool):
            raise DataError(
                f"{config.data} holds {len(pool)} needles, but the retrieval grid has {n_cells} samples "
                f"({len(config.lengths)} lengths × {len(config.depths)} depths × {config.needles_per_cell} per cell), "
                f"each with its own needle: scoring takes needles {config.needle_offset}.."
                f"{config.needle_offset + n_cells - 1} of the file and validation the next {n_cells}, so it needs "
                f"{needed}. Add needles, or make the grid smaller (lengths, depths, needles_per_cell) or needle_offset "
                "smaller."
            )
        return pool[start : start + n_cells]

    def examples(self, model: Any) -> list[Example]:
        """The two shortest of its first six scored needles, each beside a short filler sentence,
        with the question and the answer's first words appended: at the answer's tokens a retrieval
        head looks back at the same tokens in the needle (none without a tokenizer: the needles are
        text)."""
        if not has_tokenizer(model):
            return []
        own = self.filler()
        sentences = own.sentences[:20] if own is not None else filler_sentences()
        short = (sorted(sentences, key=len)[:2] * 2)[:2]  # a text of one sentence repeats it
        needles = sorted(self.needles()[:6], key=lambda n: len(n.needle) + len(n.question) + len(n.answer))[:2]
        shown = []
        for index, needle in enumerate(needles):
            hay = [short[0], needle.needle] if index == 0 else [needle.needle, short[1]]
            answer = " ".join(needle.answer.split()[:6])  # its first words show the copying; all of it is long
            text = " ".join(hay) + "\n\n" + QUESTION_TEMPLATE.format(question=needle.question) + " " + answer
            shown.append((f"a needle {'after' if index == 0 else 'before'} a filler sentence, the answer's start "
                          f"'{answer}' appended", text))
        return shown

    def filler(self) -> Optional[HaystackText]:
        """The ``haystack`` text, or ``None`` for the shipped filler."""
        return None if self.config.haystack is None else read_haystack(self.config.haystack)

    def check_data(self) -> None:
        """Read ``data`` (every needle line, and enough of them for scoring and validation) and
        ``haystack`` (UTF-8 text) without a model. Whether the haystack is long enough for each
        length needs the tokenizer: that is checked when the prompts are built, before any decoding."""
        if self.config.data is not None:
            self.needles(held_out=True)
        self.filler()

    def data_paths(self) -> list[str]:
        """``data`` and ``haystack``, those given."""
        return [str(path) for path in (self.config.data, self.config.haystack) if path]

    def data_tag(self) -> str:
        """What :func:`sample_key` adds to tell samples of your files apart (``""`` for the shipped
        data): the first 16 hex digits of each file's SHA-256."""
        parts = [f"{name}={file_sha256(path)[:16]}" for name, path in
                 (("data", self.config.data), ("haystack", self.config.haystack)) if path]
        return ",".join(parts)

    def samples(self, model: Any, held_out: bool = False) -> list[HaystackSample]:
        """The grid's samples, each with its own needle (:meth:`needles`), in the ``haystack`` text
        when one is given."""
        config = self.config
        return needle_grid(model, config.lengths, config.depths, self.needles(held_out), config.needles_per_cell,
                           config.format, filler=self.filler())

    def score(self, model: Any, batch_size: Optional[int] = None, progress: Optional[bool] = None,
              samples: Optional[list[HaystackSample]] = None) -> HeadScores:
        samples = samples if samples is not None else self.samples(model)
        config = self.config
        outcomes = needle_scan(model, samples, config.max_new_tokens, config.prefill_chunk, config.checkpoint, progress,
                               data_tag=self.data_tag())
        retrieved = [o for o in outcomes if o.rouge > config.rouge_threshold]
        if not retrieved:
            raise EmptyResultError(_nothing_retrieved(outcomes, config.rouge_threshold))
        values, activation = retrieval_scores(outcomes, config.rouge_threshold, config.score_threshold)
        result = self.result(model, values, {"activation_rate": activation}, metadata={
            "needle_source": "data" if config.data is not None else config.needles,
            "filler_source": "haystack" if config.haystack is not None else "shipped",
            "n_samples": len(outcomes),
            "n_retrieved": len(retrieved),
            "samples": [{k: v for k, v in asdict(o).items() if k != "copy_scores"} for o in outcomes],
        })
        n_above = len(result.above(config.score_threshold))
        result.metadata["n_above_threshold"] = n_above
        result.metadata["fraction_above_threshold"] = n_above / values.numel()
        return result

    def significance(
        self, model: Any, scores: HeadScores, batch_size: Optional[int] = None, progress: Optional[bool] = None
    ) -> list[Significance]:
        """The paper's threshold (Wu et al. 2024): a retrieval head scores above ``score_threshold``
        (0.1) — it copies the needle token it attends to on more than a tenth of the decode steps."""
        details = {"n_samples": scores.metadata.get("n_samples"), "n_retrieved": scores.metadata.get("n_retrieved")}
        paper = f"the paper's threshold: retrieval score > {self.config.score_threshold} (Wu et al. 2024)"
        return [Significance(self.name, self.name, scores.values, self.config.score_threshold,
                             "retrieval score (share of needle tokens copied by top-1 attention)", paper, details,
                             floor=self.config.score_threshold, floor_rule=paper)]

    def validation_task(self, model: Any) -> ValidationTask:
        config = self.config
        if config.validation_metric not in NEEDLE_METRICS:
            raise InputError(
                f"Unknown validation metric {config.validation_metric!r}; choose one of {', '.join(NEEDLE_METRICS)}."
            )
        shared = {n.needle for n in self.needles()} & {n.needle for n in self.needles(held_out=True)}
        if shared:
            raise InputError(
                f"Validation would reuse {len(shared)} needle(s) that scoring chose the heads on (e.g. "
                f"{sorted(shared)[0]!r}), so it would not be held out. Use needles='codes' or a smaller grid."
            )
        samples = self.samples(model, held_out=True)  # the grid again, with the next needles: held out from scoring
        names = {"loglik": "log-likelihood per answer token (teacher-forced)",
                 "rouge": "ROUGE-1 recall of the greedy answer", "exact": "exact match of the greedy answer"}

        def measure(model: Any, head_sets: list, method: str) -> Tensor:
            metrics = measure_needles(model, samples, head_sets, method, (config.validation_metric,),
                                      None, config.prefill_chunk, config.mask_epsilon)
            return metrics[config.validation_metric]

        return ValidationTask(samples, None, f"{names[config.validation_metric]}, heads masked at decode steps",
                              ablation_hurts_when="decreases", measure=measure, default_method="uniform")


def _nothing_retrieved(outcomes: Sequence[NeedleOutcome], rouge_threshold: float) -> str:
    answers = "; ".join(repr(o.response[:40]) for o in outcomes[:3])
    return (
        f"The retrieval detector retrieved none of {len(outcomes)} needles (ROUGE-1 recall > {rouge_threshold}), "
        f"so no head can be scored. First answers: {answers}. A model that repeats one token points at a "
        f"broken KV cache or prompt format (run 'headscope info'); a model too small for the task needs "
        f"shorter haystacks (lengths=...) or the other prompt format (format=...)."
    )


def grid_size(config: RetrievalConfig) -> int:
    """Samples in the grid: lengths × depths × needles per cell."""
    return len(config.lengths) * len(config.depths) * config.needles_per_cell


def retrieval_scores(
    outcomes: Sequence[NeedleOutcome], rouge_threshold: float = 0.5, score_threshold: float = 0.1
) -> tuple[Float[Tensor, "n_layers n_heads"], Float[Tensor, "n_layers n_heads"]]:
    """Mean copy score over retrieved samples, and the share of them where a head passes the threshold."""
    retrieved = [o.copy_scores for o in outcomes if o.rouge > rouge_threshold]
    if not retrieved:
        shape = outcomes[0].copy_scores.shape if outcomes else (0, 0)
        nan = torch.full(shape, float("nan"))
        return nan, nan.clone()
    stacked = torch.stack(retrieved)
    return stacked.mean(dim=0), (stacked > score_threshold).float().mean(dim=0)


# --- scoring one sample -----------------------------------------------------------------------


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def rouge1_recall(reference: str, response: str) -> float:
    """Share of the reference's words (with multiplicity) found in the response."""
    wanted, found = Counter(words(reference)), Counter(words(response))
    total = sum(wanted.values())
    return sum(min(n, found[w]) for w, n in wanted.items()) / total if total else 0.0


def exact_match(reference: str, response: str) -> bool:
    """The reference's words appear in the response, in order and contiguous."""
    ref, got = words(reference), words(response)
    return any(got[i : i + len(ref)] == ref for i in range(len(got) - len(ref) + 1)) if ref else False


def copy_scores(trace: DecodeTrace, sample: HaystackSample) -> Float[Tensor, "n_layers n_heads"]:
    """Per head: decode steps whose top-1 key lies in the answer span and holds the token emitted,
    divided by the span's length."""
    start, end = sample.answer_span
    keys = trace.top_keys.long()  # [steps, layers, heads]
    if keys.numel() == 0 or end == start:
        return torch.zeros(trace.top_keys.shape[1:] or (0, 0))
    in_span = (keys >= start) & (keys < end)
    key_tokens = sample.tokens[keys.clamp(max=sample.n_tokens - 1)]
    copied = in_span & (key_tokens == trace.tokens[:, None, None])
    return copied.sum(dim=0).float() / (end - start)


def stop_token_ids(model: Any) -> list[int]:
    """End of text, end of turn and a newline end an answer (the paper stops at a newline)."""
    tokenizer = model.tokenizer
    ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    for text in ("\n", "\n\n"):
        encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(encoded) == 1:
            ids.add(encoded[0])
    return sorted(i for i in ids if isinstance(i, int) and i >= 0 and i != tokenizer.unk_token_id)


def sample_key(sample: HaystackSample, data_tag: str = "") -> str:
    """The key of a sample's outcome in a checkpoint: format, length, depth and question, and with
    your own data (``data_tag``, :meth:`RetrievalDetector.data_tag`) the files' hashes, so that a
    checkpoint written for other needles or another haystack is never reused."""
    key = f"{sample.format}|{sample.length}|{sample.depth:g}|{sample.needle.question}"
    return f"{key}|{data_tag}" if data_tag else key


def answer_needle(model: Any, sample: HaystackSample, max_new_tokens: int = 50,
                  prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> NeedleOutcome:
    """Greedy answer to one sample with top-1 keys recorded, scored for retrieval and copying."""
    prefix = Prefix(model, sample.tokens, prefill_chunk)
    trace = greedy_decode(model, prefix, max_new_tokens, stop_token_ids(model))
    response = trace.text(model.tokenizer)
    return NeedleOutcome(
        key=sample_key(sample), length=sample.length, depth=sample.depth, n_tokens=sample.n_tokens,
        response=response, rouge=rouge1_recall(sample.needle.answer, response),
        exact=exact_match(sample.needle.answer, response), copy_scores=copy_scores(trace, sample),
    )


def needle_scan(
    model: Any,
    samples: Sequence[HaystackSample],
    max_new_tokens: int = 50,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    checkpoint: Optional[Union[str, Path]] = None,
    progress: Optional[bool] = None,
    data_tag: str = "",
) -> list[NeedleOutcome]:
    """:func:`answer_needle` for every sample; with ``checkpoint``, each outcome is appended to a
    JSONL file as soon as it is known and samples already there are not recomputed (matched by
    :func:`sample_key`, which ``data_tag`` extends for your own data files, and by
    ``max_new_tokens``: an answer decoded for another length is another outcome).

    Each checkpoint line carries the model's identity (``headscope.identity``); appends are
    locked (``headscope.files.append_line``), so several processes may share the file.

    Raises:
        IdentityMismatchError: the checkpoint holds answers of another model, of other weights
            (also this model before a weight edit) or of other library versions.
    """
    identity = model_identity(model) if checkpoint is not None else None
    done = _read_checkpoint(checkpoint, identity)
    outcomes = []
    for sample in tqdm(samples, desc="needles", disable=bar_disabled(progress), leave=False):
        key = f"{sample_key(sample, data_tag)}|max_new_tokens={max_new_tokens}"
        if key not in done:
            done[key] = replace(answer_needle(model, sample, max_new_tokens, prefill_chunk), key=key)
            _append_checkpoint(checkpoint, done[key], identity)
        outcomes.append(done[key])
    return outcomes


def _read_checkpoint(path: Optional[Union[str, Path]], identity: Optional[ModelIdentity]) -> dict[str, NeedleOutcome]:
    """The outcomes of a checkpoint by key; a line cut off by an interruption is skipped (its
    sample is recomputed); a line of another identity refuses the whole file."""
    if path is None or identity is None or not Path(path).exists():
        return {}
    outcomes = {}
    for line in Path(path).read_text().splitlines():
        row = _checked_row(line, path, identity)
        if row is None:
            continue
        try:
            outcome = NeedleOutcome.from_row(row)
        except (TypeError, KeyError, ValueError):
            continue  # not an outcome (a torn line that happens to parse): that sample is recomputed
        outcomes[outcome.key] = outcome
    return outcomes


def _checked_row(line: Union[str, bytes], path: Union[str, Path], identity: ModelIdentity) -> Optional[dict[str, Any]]:
    """A checkpoint line's outcome fields after its identity passed the check; None for a line
    that is not a JSON object (cut off, empty).

    Raises:
        IdentityMismatchError: the line was written for another identity, or without one.
    """
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(row, dict):
        return None
    saved = row.pop("identity", None)
    if saved is not None:
        try:
            saved = ModelIdentity.from_dict(saved)
        except ResultFileError:
            return None  # a damaged line: its sample is recomputed
    identity.check_matches(saved, source=f"The needle checkpoint {path}",
                           fix=f"give each model its own checkpoint file (the retrieval setting checkpoint=..., e.g. "
                               f"with the model's name in it), or delete {path} to decode every needle again")
    return row


def _append_checkpoint(path: Optional[Union[str, Path]], outcome: NeedleOutcome,
                       identity: Optional[ModelIdentity]) -> None:
    """One line, ``{"identity": ..., **outcome}``, appended under a lock; the file's first line
    is checked under the same lock, so a file another process began for another model is refused."""
    if path is None or identity is None:
        return
    line = json.dumps({"identity": identity.to_dict(), **outcome.to_row()})
    append_line(path, line, check=lambda first: _checked_row(first, path, identity) if first.strip() else None)


# --- causal check -------------------------------------------------------------------------------


def measure_needles(
    model: Any,
    samples: Sequence[HaystackSample],
    head_sets: Sequence[Optional[Iterable[Union[Head, str]]]],
    method: str = "uniform",
    metrics: Sequence[str] = NEEDLE_METRICS,
    max_new_tokens: Optional[int] = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    epsilon: float = DEFAULT_UNIFORM_EPSILON,
    progress: Optional[bool] = None,
    rows_per_batch: int = 16,
) -> dict[str, Float[Tensor, "sets samples"]]:
    """Needle metrics with each head set masked at decode steps (``None`` = clean).

    One prefill per sample serves every head set; the head sets run side by side as the rows of
    one batch (``rows_per_batch`` at a time, each row with its own mask). ``"loglik"``: mean
    log-probability of the answer's tokens, teacher-forced; ``"rouge"`` / ``"exact"``: of the
    greedy answer, decoded for ``max_new_tokens`` (default: the needle's length in tokens plus 8,
    room to restate the whole needle; a batch stops early once every row has stopped).
    """
    unknown = sorted(set(metrics) - set(NEEDLE_METRICS))
    if unknown:
        raise InputError(f"Unknown needle metric(s) {', '.join(unknown)}; choose from {', '.join(NEEDLE_METRICS)}.")
    head_sets = [None if heads is None else tuple(check_heads(model, heads)) for heads in head_sets]
    values = {name: torch.zeros(len(head_sets), len(samples)) for name in metrics}
    for column, sample in enumerate(tqdm(samples, desc="needles", disable=bar_disabled(progress), leave=False)):
        prefix = Prefix(model, sample.tokens, prefill_chunk)
        for first in range(0, len(head_sets), rows_per_batch):
            group = head_sets[first : first + rows_per_batch]
            measured = _measure_group(model, prefix, sample, group, method, epsilon, metrics, max_new_tokens)
            for name, row_values in measured.items():
                values[name][first : first + len(group), column] = row_values
    return values


def _measure_group(model, prefix, sample, head_sets, method, epsilon, metrics, max_new_tokens) -> dict[str, Tensor]:
    """The metrics of one sample for a few head sets, decoded as one batch."""
    if max_new_tokens is None:
        max_new_tokens = len(model.tokenizer(sample.needle.needle, add_special_tokens=False)["input_ids"]) + 8
    mask = lambda m: ablate_per_row(m, head_sets, method, epsilon)  # noqa: E731
    out = {}
    if "loglik" in metrics:
        out["loglik"] = continuation_logprobs(model, prefix, sample.answer_tokens, mask, rows=len(head_sets)).mean(dim=1)
    if "rouge" in metrics or "exact" in metrics:
        traces = greedy_decode_rows(model, prefix, len(head_sets), max_new_tokens, stop_token_ids(model), mask)
        responses = [trace.text(model.tokenizer) for trace in traces]
        out["rouge"] = torch.tensor([rouge1_recall(sample.needle.answer, r) for r in responses])
        out["exact"] = torch.tensor([float(exact_match(sample.needle.answer, r)) for r in responses])
    return {name: value for name, value in out.items() if name in metrics}
