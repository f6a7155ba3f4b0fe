"""One short check of headscope's GPU paths, for a lent CUDA machine (run through gpu_check.sh).

Sections, each timed and recorded even when another fails:

  tests   the unit tests with their tiny models on the device (HEADSCOPE_TEST_DEVICE, a chosen subset)
  scan    the exact per-head ablation scan (hs.ablation_scan) vs the naive loop (one forward per head
          under hs.ablate): seconds, ratio and max |difference|, float32 and bfloat16, on randomly
          initialised models of real shapes built from transformers configs (SmolLM2-135M's, and a
          Llama-7B-like shape with fewer layers)
  memory  the rows per chunk auto_batch_size picks from free memory, and the out-of-memory halving
          triggered on purpose (memory capped with torch.cuda.set_per_process_memory_fraction; on a
          CPU the error is raised on purpose instead), checked equal to an uncapped run
  atlas   an atlas's stage times on the random SmolLM2-135M shape with a byte-level tokenizer

The weights are random (no checkpoint can travel to the lent machine): timings and agreement are
real, head roles are not. ``--small`` uses tiny shapes and settings (a CPU run in about a minute).

    bash benchmarks/gpu_check.sh [--device cuda|cpu] [--small] [--out DIR] [--sections tests,scan,memory,atlas]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("tests", "scan", "memory", "atlas")

# transformers LlamaConfig settings of the shapes timed (weights random).
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                         rms_norm_eps=1e-5, tie_word_embeddings=True),
    "llama-7b-like": dict(hidden_size=4096, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=32,
                          intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                          tie_word_embeddings=False),  # Llama 2 7B has 32 layers: 16 keep the check short
}
SMALL_SHAPES = {
    "smollm2-135m": dict(SHAPES["smollm2-135m"], hidden_size=48, num_hidden_layers=3, num_attention_heads=3,
                         num_key_value_heads=1, intermediate_size=96, vocab_size=512),
    "llama-7b-like": dict(SHAPES["llama-7b-like"], hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=4, intermediate_size=128, vocab_size=512),
}
# What the scans run: sequences x (a random block repeated twice), per shape.
SCAN_DATA = {"smollm2-135m": (8, 32), "llama-7b-like": (4, 32)}
SMALL_SCAN_DATA = {"smollm2-135m": (4, 6), "llama-7b-like": (2, 6)}

# Unit tests run on the device: the engine, scans, interventions, KV cache and decoding paths, the
# out-of-memory halving and the per-family hand-computed checks (~100 s on 2 CPU cores). --small:
# two tests of the halving alone.
DEVICE_TESTS = ["tests/unit/test_out_of_memory.py", "tests/unit/test_engine.py", "tests/unit/test_scans.py",
                "tests/unit/test_interventions.py", "tests/unit/test_decoding.py", "tests/unit/test_kv_cache.py",
                "tests/unit/test_hand_computed.py", "tests/unit/test_no_leaks.py"]
SMALL_TESTS = ["tests/unit/test_out_of_memory.py", "-k", "halving_retries or one_row"]

# Atlas detectors in the order run (a group shares one atlas call); what a random model needs to score
# at all (it knows no fact and retrieves no needle); and the tiny settings of --small.
ATLAS_GROUPS = [["induction", "previous_token", "duplicate_token"], ["attention_sink"], ["successor"],
                ["copy_suppression"], ["name_mover"], ["truthfulness"], ["function_vector"], ["retrieval"],
                ["safety"], ["select_copy"]]  # cheapest first (`headscope detectors` gives each one's cost)
NOT_IN_ATLAS = {"memory_context": "a random model knows no fact, so there is no conflict item to score"}
RANDOM_MODEL_SETTINGS = {
    "retrieval": dict(format="plain", rouge_threshold=-1.0),
    "select_copy": dict(only_known=False),
    "copy_suppression": dict(tokens="all"),
    "name_mover": dict(names=tuple("ABCDEFGH")),  # " A".." H": one token each for the byte-level tokenizer
    "function_vector": dict(tasks=("letter_upper",), only_correct=False),
}
_TEMPLATES = dict(n_sequences=4, block_len=8, n_repeats=3, n_validation_sequences=4)
SMALL_ATLAS_SETTINGS = {  # as tests/unit/test_architectures.py's RUNNABLE
    "induction": _TEMPLATES, "previous_token": _TEMPLATES, "duplicate_token": _TEMPLATES,
    "attention_sink": dict(text_length=16, n_sequences=4, n_validation_sequences=4),
    "successor": {}, "safety": dict(n_queries=4, max_new_tokens=32),
    "retrieval": dict(lengths=(300,), depths=(0, 100), max_new_tokens=4, format="plain", rouge_threshold=-1.0),
    "select_copy": dict(n_questions=40, n_dev=10, only_known=False),
    "copy_suppression": dict(tokens="all", n_tokens=40, text_length=24, n_sequences=2, n_validation_sequences=2),
    "name_mover": dict(names=tuple("ABCDEFGH"), n_prompts=8, n_validation=4),
    "function_vector": dict(tasks=("letter_upper",), only_correct=False, n_prompts=2, n_mean_prompts=2,
                            n_validation_prompts=2),
    "truthfulness": dict(n_shuffles=1),
}


# ----------------------------------------------------------------------------- models and timing


def random_model(shape: str, device: str, dtype: torch.dtype, small: bool, tokenizer: Any = None) -> Any:
    """A randomly initialised Llama of ``shape`` (built on ``device`` directly) as a headscope bridge."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    import headscope as hs

    config = LlamaConfig(**(SMALL_SHAPES if small else SHAPES)[shape], bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(0)
    with torch.device(device):
        hf_model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    bridge = build_bridge_from_module(hf_model, "LlamaForCausalLM", hf_config=hf_model.config, tokenizer=tokenizer)
    model = hs.load_model(bridge)
    model.cfg.model_name = f"random {shape}{' (small)' if small else ''}"
    return model


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()`` and its wall seconds (the device's queue drained before and after)."""
    synchronize(device)
    started = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - started


def free_model(device: str) -> None:
    """Give a dropped model's memory back to the device."""
    import gc

    if device.startswith("cuda"):
        gc.collect()
        torch.cuda.empty_cache()


@contextlib.contextmanager
def captured_stderr() -> Iterator[io.StringIO]:
    """Inside, stderr also goes to the yielded buffer (headscope's notes are read from it)."""
    buffer, original = io.StringIO(), sys.stderr

    class Tee(io.TextIOBase):
        def write(self, text: str) -> int:
            buffer.write(text)
            return original.write(text)

        def flush(self) -> None:
            original.flush()

    sys.stderr = Tee()
    try:
        yield buffer
    finally:
        sys.stderr = original


# ----------------------------------------------------------------------------- (a) unit tests


def tests_section(device: str, small: bool, out: Path, budget_s: float = 120.0) -> dict[str, Any]:
    """The chosen unit tests with their tiny models on ``device``; stopped after ``budget_s``
    (what finished by then is counted)."""
    files = SMALL_TESTS if small else DEVICE_TESTS
    command = [sys.executable, "-m", "pytest", *files, "-v", "-p", "no:cacheprovider", "-o", "addopts=",
               "--tb=line"]
    env = dict(os.environ, HEADSCOPE_TEST_DEVICE=device)
    log = out / "tests.log"
    started = time.perf_counter()
    with log.open("w") as sink:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
        try:
            code: Optional[int] = process.wait(timeout=budget_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            code = None
    text = log.read_text(errors="replace")
    outcomes = re.findall(r"^(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", text, flags=re.M)
    counts = {word: sum(1 for _, w in outcomes if w == word) for word in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
    return {"files": files, "device": device, "exit_code": code, "stopped_at_budget_s": budget_s if code is None else None,
            "counts": counts, "failed": [name for name, word in outcomes if word in ("FAILED", "ERROR")],
            "seconds": round(time.perf_counter() - started, 1), "last_lines": text.strip().splitlines()[-3:]}


# ----------------------------------------------------------------------------- (b) exact scan vs naive


def repeated_tokens(n: int, block: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """``n`` rows of a random block of ``block`` tokens repeated twice (ids 2.. to avoid BOS/EOS)."""
    generator = torch.Generator().manual_seed(seed)
    first = torch.randint(2, vocab, (n, block), generator=generator)
    return torch.cat([first, first], dim=1)


def mean_loss(logits: torch.Tensor, batch: Any) -> torch.Tensor:
    """Per row: the mean next-token loss (over real positions)."""
    from headscope.engine import masked_mean, next_token_losses

    return masked_mean(next_token_losses(logits, batch.tokens), batch.attention_mask[:, 1:].bool())


def scan_row(model: Any, shape: str, dtype: torch.dtype, device: str, tokens: torch.Tensor) -> dict[str, Any]:
    """Exact scan and naive loop on ``tokens``: seconds, ratio, agreement."""
    import headscope as hs
    from headscope.engine import model_shape

    hs.ablation_scan(model, tokens[:1, :8], mean_loss, heads=[(0, 0)], progress=False)  # warm-up (kernels, checks)
    exact, exact_s = timed(device, lambda: hs.ablation_scan(model, tokens, mean_loss, progress=False))
    naive, naive_s = timed(device, lambda: hs.naive_ablation_scan(model, tokens, mean_loss, progress=False))
    difference = float((exact.values - naive.values).abs().max())
    largest = float(naive.values.abs().max())
    m = model_shape(model)
    return {"shape": shape, "dtype": str(dtype).replace("torch.", ""), "layers": m.n_layers,
            "heads": m.n_layers * m.n_heads, "tokens": list(tokens.shape), "exact_s": round(exact_s, 3),
            "naive_s": round(naive_s, 3), "naive_over_exact": round(naive_s / exact_s, 2),
            "max_abs_difference": difference, "largest_effect": largest,
            "relative_difference": difference / largest if largest else None}


def scan_section(device: str, small: bool, shapes: tuple[str, ...] = ("smollm2-135m", "llama-7b-like"),
                 dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)) -> dict[str, Any]:
    rows = []
    for shape in shapes:
        n, block = (SMALL_SCAN_DATA if small else SCAN_DATA)[shape]
        for dtype in dtypes:
            model, build_s = timed(device, lambda: random_model(shape, device, dtype, small))
            tokens = repeated_tokens(n, block, model.cfg.d_vocab).to(device)
            rows.append(dict(scan_row(model, shape, dtype, device, tokens), build_s=round(build_s, 1)))
            print_rows([rows[-1]], SCAN_COLUMNS)
            del model
            free_model(device)
    return {"rows": rows}


SCAN_COLUMNS = ["shape", "dtype", "layers", "heads", "tokens", "exact_s", "naive_s", "naive_over_exact",
                "max_abs_difference", "largest_effect"]


# ----------------------------------------------------------------------------- (c) batch size and OOM halving


def batch_sizes(model: Any, lengths: tuple[int, ...] = (128, 512, 2048)) -> dict[str, Any]:
    """What auto_batch_size picks at a few lengths (and with every layer's pattern cached)."""
    from headscope.engine import auto_batch_size, model_device, model_shape

    device = model_device(model)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    layers = model_shape(model).n_layers
    return {"free_gib": None if free is None else round(free / 2**30, 1),
            "rows": {str(n): auto_batch_size(model, n) for n in lengths},
            "rows_with_all_patterns_cached": {str(n): auto_batch_size(model, n, n_cached=layers) for n in lengths}}


@contextlib.contextmanager
def simulated_out_of_memory(model: Any, rows: int) -> Iterator[dict[str, Any]]:
    """On a CPU: every forward of more than ``rows`` rows raises torch.OutOfMemoryError at the unembedding."""

    def refuse(module: Any, args: tuple) -> None:
        if args[0].shape[0] > rows:
            raise torch.OutOfMemoryError(f"CUDA out of memory (raised on purpose at {args[0].shape[0]} rows)")

    handle = model.unembed.register_forward_pre_hook(refuse)
    try:
        yield {}
    finally:
        handle.remove()


@contextlib.contextmanager
def capped_memory(device: str, headroom_gib: float) -> Iterator[dict[str, Any]]:
    """On CUDA: the caching allocator may hold at most what it holds now plus ``headroom_gib``."""
    total = torch.cuda.get_device_properties(0).total_memory
    free_model(device)
    allowed = torch.cuda.memory_reserved() + headroom_gib * 2**30
    torch.cuda.set_per_process_memory_fraction(min(1.0, allowed / total))
    try:
        yield {"cap_gib": round(allowed / 2**30, 1)}
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        free_model(device)


def per_row_loss(logits: torch.Tensor, cache: dict, chunk: Any) -> torch.Tensor:
    """Per row: the summed next-token loss at real positions (independent of the chunk's padding)."""
    from headscope.engine import next_token_losses

    return (next_token_losses(logits, chunk.tokens) * chunk.attention_mask[:, 1:]).sum(dim=1)


def out_of_memory_run(model: Any, device: str, small: bool) -> dict[str, Any]:
    """run_batched and ablation_scan with memory made short on purpose; checked against uncapped runs."""
    import headscope as hs
    from headscope.engine import run_batched

    rows, width, forced, headroom = (12, 16, 12, None) if small else (64, 512, 64, 3.0)
    tokens = repeated_tokens(rows, width // 2, model.cfg.d_vocab, seed=1).to(device)
    scan_tokens = tokens if small else tokens[:16, :256]  # the scan runs its 32 heads of layer 0 at once
    layer0 = [(0, h) for h in range(model.cfg.n_heads)]

    def scan() -> Any:
        return hs.ablation_scan(model, scan_tokens, mean_loss, heads=layer0, batch_size=len(scan_tokens))

    plain, plain_s = timed(device, lambda: run_batched(model, tokens, per_row_loss, batch_size=forced))
    plain_scan = scan()
    simulated = small or device == "cpu"  # tiny tensors do not reach a cap: raise the error on purpose
    short = (lambda: simulated_out_of_memory(model, 3)) if simulated else (lambda: capped_memory(device, headroom))
    with short() as cap, captured_stderr() as err:
        halved, halved_s = timed(device, lambda: run_batched(model, tokens, per_row_loss, batch_size=forced,
                                                             desc="forced batch"))
        halved_scan = scan()
    notes = re.findall(r"headscope: [^\n]*CUDA out of memory at [^\n]*", err.getvalue())
    final = _final_rows(notes, forced)
    at_final = run_batched(model, tokens, per_row_loss, batch_size=final)
    return {"how": "error raised on purpose above 3 rows" if simulated else f"memory capped at {cap['cap_gib']} GiB",
            "tokens": list(tokens.shape), "forced_batch_size": forced, "notes": notes, "rows_after_halving": final,
            "halved_s": round(halved_s, 2), "uncapped_s": round(plain_s, 2),
            "max_abs_difference_vs_uncapped": float((halved - plain).abs().max()),
            "identical_to_a_plain_run_at_the_final_size": bool(torch.equal(halved, at_final)),
            "scan_tokens": list(scan_tokens.shape),
            "scan_max_abs_difference_vs_uncapped": float((halved_scan.values - plain_scan.values).nan_to_num().abs().max())}


def _final_rows(notes: list[str], forced: int) -> int:
    """The rows per chunk the forced run continued at (from its note), or ``forced`` if it never halved."""
    for line in notes:
        found = re.search(r"forced batch: CUDA out of memory at \d+ rows per run; continuing at (\d+)", line)
        if found:
            return int(found.group(1))
    return forced


def memory_section(device: str, small: bool) -> dict[str, Any]:
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    result: dict[str, Any] = {"dtype": str(dtype).replace("torch.", "")}
    for shape in ("smollm2-135m", "llama-7b-like"):
        model = random_model(shape, device, dtype, small)
        result[f"auto_batch_size {shape}"] = batch_sizes(model)
        if shape == "llama-7b-like":
            result["out_of_memory"] = out_of_memory_run(model, device, small)
        del model
        free_model(device)
    return result


# ----------------------------------------------------------------------------- (d) atlas stage times


class OutOfTime(BaseException):
    """A section's time is up (a BaseException: the atlas records an Exception as a detector's failure)."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Inside, :class:`OutOfTime` is raised once ``seconds`` have passed (SIGALRM; main thread)."""
    if seconds <= 0:
        raise OutOfTime

    def ring(signum: int, frame: Any) -> None:
        raise OutOfTime

    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def atlas_section(device: str, small: bool, budget_s: float = 120.0,
                  groups: Optional[list[list[str]]] = None) -> dict[str, Any]:
    """Detector groups in turn (one atlas call each, default settings but what a random model
    needs) on the random SmolLM2-135M shape with a byte-level tokenizer, until ``budget_s``: the
    group running then is stopped, the rest skipped."""
    from tests.families import byte_tokenizer

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = random_model("smollm2-135m", device, dtype, small, tokenizer=byte_tokenizer())
    groups = groups or ATLAS_GROUPS
    started, timings, walls, failures, stopped = time.perf_counter(), {}, {}, {}, []
    for group in groups:
        try:
            with deadline(budget_s - (time.perf_counter() - started)):
                atlas, seconds = timed(device, lambda: _atlas(model, group, small))
        except OutOfTime:
            stopped += group
            continue
        timings.update({name: atlas.timings.get(name, {}) for name in group})
        walls[", ".join(group)] = round(seconds, 2)
        failures.update(atlas.failures)
    return {"model": model.cfg.model_name, "dtype": str(dtype).replace("torch.", ""),
            "weights": "random (no checkpoint travels to the lent machine): stage times are real, roles are not",
            "tokenizer": "byte-level BPE built in code (tests/families.py)",
            "ran": [n for g in groups for n in g if n not in stopped], "stopped_or_skipped_at_budget": stopped,
            "budget_s": budget_s, "not_run": NOT_IN_ATLAS, "timings": timings, "atlas_call_s": walls, "failures": failures,
            "seconds": round(time.perf_counter() - started, 1)}


def _atlas(model: Any, group: list[str], small: bool) -> Any:
    import headscope as hs

    table = SMALL_ATLAS_SETTINGS if small else RANDOM_MODEL_SETTINGS
    settings = {name: table[name] for name in group if table.get(name)}
    return hs.atlas(model, group, settings=settings, progress=False, **(dict(k=2, n_random=2) if small else {}))


# ----------------------------------------------------------------------------- report


def print_rows(rows: list[dict[str, Any]], columns: list[str]) -> None:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}"
        return str(value)

    table = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in table)) for i, c in enumerate(columns)]
    print("  " + "  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in table:
        print("  " + "  ".join(v.ljust(w) for v, w in zip(row, widths)), flush=True)


def print_section(name: str, result: dict[str, Any]) -> None:
    """A short human-readable summary of one section."""
    print(f"\n== {name} ({result.get('section_s', '?')} s)" + (f": FAILED {result['error']}" if "error" in result else ""))
    if "error" in result:
        return
    if name == "tests":
        print(f"  {result['counts']} on {result['device']}, exit {result['exit_code']}, {result['seconds']} s; "
              f"files {' '.join(result['files'])}")
        for failed in result["failed"][:20]:
            print(f"  FAILED {failed}")
    elif name == "scan":
        print_rows(result["rows"], SCAN_COLUMNS)
    elif name == "memory":
        for key, value in result.items():
            print(f"  {key}: {json.dumps(value)}")
    elif name == "atlas":
        print(f"  {result['model']} ({result['dtype']}); {result['weights']}; tokenizer: {result['tokenizer']}")
        print(f"  ran {', '.join(result['ran'])}; stopped or skipped at {result['budget_s']} s: "
              f"{', '.join(result['stopped_or_skipped_at_budget']) or 'none'}; not run: {result['not_run']}")
        print_rows(atlas_rows(result["timings"]), ["detector", "scores", "significance", "validation", "note"])
        for group, seconds in result["atlas_call_s"].items():
            print(f"  hs.atlas(model, [{group}]): {seconds} s")
        for detector, failure in result["failures"].items():
            print(f"  FAILED {detector} in {failure['stage']}: {failure['error']}: {failure['message'][:200]}")


def atlas_rows(timings: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per detector: seconds per stage, and what else its timings say."""
    rows = []
    for name, stages in timings.items():
        notes = [f"{key} {value}" for key, value in stages.items() if not isinstance(value, float)]
        rows.append({"detector": name, **{k: v for k, v in stages.items() if isinstance(v, float)},
                     "note": ", ".join(notes)})
    return rows


def environment(device: str) -> dict[str, Any]:
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "device": device, "threads": torch.get_num_threads()}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def run_sections(device: str, small: bool, out: Path, sections: tuple[str, ...],
                 budgets: dict[str, float]) -> dict[str, Any]:
    """Every asked section, each timed; one that raises is recorded and the others still run."""
    calls = {"tests": lambda: tests_section(device, small, out, budgets["tests"]),
             "scan": lambda: scan_section(device, small), "memory": lambda: memory_section(device, small),
             "atlas": lambda: atlas_section(device, small, budgets["atlas"])}
    results: dict[str, Any] = {}
    for name in sections:
        print(f"\n-- {name} ...", flush=True)
        started = time.perf_counter()
        try:
            results[name] = calls[name]()
        except Exception as error:  # a report, not a test: record it and go on
            results[name] = {"error": f"{type(error).__name__}: {error}"}
        results[name]["section_s"] = round(time.perf_counter() - started, 1)
        free_model(device)
    return results


def default_out() -> Path:
    return Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "results" / "gpu_check"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--small", action="store_true", help="tiny shapes and settings (a CPU run in about a minute)")
    parser.add_argument("--out", type=Path, default=None, help="folder for gpu_check.json and tests.log "
                                                               "(default $OUT, else results/gpu_check)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--tests-seconds", type=float, default=120.0, help="the tests are stopped after this")
    parser.add_argument("--atlas-seconds", type=float, default=120.0, help="the atlas is stopped after this")
    args = parser.parse_args(argv)
    sections = tuple(s for s in args.sections.split(",") if s)
    if set(sections) - set(SECTIONS):
        parser.error(f"unknown section(s) {sorted(set(sections) - set(SECTIONS))}; choose from {', '.join(SECTIONS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device here; run with --device cpu --small")
    if args.device == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    try:
        import transformer_lens  # noqa: F401
    except ImportError as error:
        parser.error(f"{error}: pass --wheels DIR to gpu_check.sh, with the wheels benchmarks/gpu_wheels.sh DIR downloads")
    out = args.out or default_out()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report = {"environment": environment(args.device), "small": args.small}
    print(json.dumps(report["environment"]), flush=True)
    budgets = {"tests": args.tests_seconds, "atlas": args.atlas_seconds}
    report["sections"] = run_sections(args.device, args.small, out, sections, budgets)
    report["seconds"] = round(time.perf_counter() - started, 1)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    for name, result in report["sections"].items():
        print_section(name, result)
    print(f"\ngpu_check: {report['seconds']} s in all; {out / 'gpu_check.json'}")
    return 1 if any("error" in r for r in report["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
