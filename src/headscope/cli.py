"""The ``headscope`` command: ``atlas``, ``compare``, ``scan``, ``validate`` and ``info``. All logic
lives in the library."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from tqdm.auto import tqdm

from headscope import __version__
from headscope.api import scan
from headscope.atlas import atlas
from headscope.compare import compare
from headscope.detectors.base import get_detector, list_detectors
from headscope.engine.heads import model_shape
from headscope.engine.runner import model_device, model_dtype
from headscope.errors import HeadscopeError
from headscope.models import DEFAULT_MODEL, load_model
from headscope.results import HeadScores
from headscope.validation import validate
from headscope.versions import package_versions, untested


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except HeadscopeError as error:
        print(f"headscope: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("headscope: interrupted; finished results are saved and a rerun resumes.", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="headscope", description="Score, validate and inspect attention heads.")
    parser.add_argument("--version", action="version", version=f"headscope {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    atlas_cmd = commands.add_parser("atlas", help="every detector, validated, as a report (report.html in --out)")
    _model_args(atlas_cmd)
    atlas_cmd.add_argument("--detectors", default="all", help="'all' (default) or comma-separated names")
    atlas_cmd.add_argument("--out", default="atlas", help="folder for report.html, atlas.json, CSV files and parts/")
    atlas_cmd.add_argument("-k", type=int, default=5, help="heads ablated by each validation (default 5)")
    atlas_cmd.add_argument("--n-random", type=int, default=5, help="random k-sets each validation compares with (default 5)")
    atlas_cmd.add_argument("--seed", type=int, default=0)
    atlas_cmd.add_argument("--no-validate", action="store_true", help="skip the causal validations")
    atlas_cmd.add_argument("--no-resume", action="store_true", help="recompute stages already saved in --out/parts")
    atlas_cmd.add_argument("--config", help='JSON file of settings per detector, e.g. {"retrieval": {"lengths": [300]}}')
    atlas_cmd.set_defaults(run=run_atlas)

    compare_cmd = commands.add_parser("compare", help="which roles moved, appeared or vanished between two atlases")
    compare_cmd.add_argument("a", help="atlas folder A (written by 'headscope atlas')")
    compare_cmd.add_argument("b", help="atlas folder B")
    compare_cmd.add_argument("--out", help="write the comparison as JSON to this file")
    compare_cmd.add_argument("--plot", help="draw each role's share of significant heads by relative depth, A beside B, "
                                            "to this PNG file")
    compare_cmd.set_defaults(run=run_compare)

    scan_cmd = commands.add_parser("scan", help="score every head with one or more detectors")
    _model_args(scan_cmd)
    scan_cmd.add_argument("--detectors", default="induction", help="comma-separated names (see 'headscope info')")
    scan_cmd.add_argument("--out", default="results", help="folder for <detector>.json and <detector>.png")
    scan_cmd.add_argument("--top", type=int, default=10, help="top heads to list in the JSON and on screen")
    scan_cmd.add_argument("--no-resume", action="store_true", help="recompute detectors already saved in --out")
    scan_cmd.add_argument("--config", help='JSON file of settings per detector, e.g. {"induction": {"block_len": 50}}')
    scan_cmd.set_defaults(run=run_scan)

    validate_cmd = commands.add_parser("validate", help="ablate top-k heads vs random-k heads")
    _model_args(validate_cmd)
    validate_cmd.add_argument("--detector", default="induction")
    validate_cmd.add_argument("--scores", help="a saved <detector>.json to validate (else the detector is run)")
    validate_cmd.add_argument("-k", type=int, default=5)
    validate_cmd.add_argument("--n-random", type=int, default=5)
    validate_cmd.add_argument(
        "--method", default=None, choices=["zero", "mean", "resample", "uniform"],
        help="ablation method (default: the detector's own, mean for most, uniform at decode for retrieval)",
    )
    validate_cmd.add_argument("--seed", type=int, default=0)
    validate_cmd.add_argument("--out", help="write the result as JSON to this file")
    validate_cmd.set_defaults(run=run_validate)

    info_cmd = commands.add_parser("info", help="library versions, model shape, heads, KV groups, device, detectors")
    _model_args(info_cmd)
    info_cmd.add_argument("--versions-only", action="store_true",
                          help="print the library versions and tested ranges, load no model (exit 1 if outside)")
    info_cmd.set_defaults(run=run_info)
    return parser


def _model_args(command: argparse.ArgumentParser) -> None:
    command.add_argument("--model", default=DEFAULT_MODEL, help=f"bundled name, .gguf, HF folder or hub name (default {DEFAULT_MODEL})")
    command.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    command.add_argument("--batch-size", type=int, default=None, help="rows per forward pass (default: from memory)")


def run_scan(args: argparse.Namespace) -> int:
    names = [name.strip() for name in args.detectors.split(",") if name.strip()]
    settings = json.loads(Path(args.config).read_text()) if args.config else {}
    detectors = [get_detector(name, **settings.get(name, {})) for name in names]  # fail before loading
    model = _load(args)
    out = Path(args.out)
    bar = tqdm(detectors, desc="detectors", unit="detector", disable=False)
    for detector in bar:
        name = detector.name
        bar.set_postfix_str(name)
        started = time.time()
        scores = scan(
            model, [detector], out=out, resume=not args.no_resume, batch_size=args.batch_size, progress=True, top_k=args.top
        )[name]
        scores.plot(path=out / f"{name}.png")
        tqdm.write(_top_table(scores, args.top, time.time() - started))
    print(f"wrote {', '.join(f'{n}.json/.png' for n in names)} to {out}/")
    return 0


def run_atlas(args: argparse.Namespace) -> int:
    detectors = "all" if args.detectors == "all" else [n.strip() for n in args.detectors.split(",") if n.strip()]
    settings = json.loads(Path(args.config).read_text()) if args.config else None
    for name in list_detectors() if detectors == "all" else detectors:
        get_detector(name, **(settings or {}).get(name, {}))  # fail on a bad name or setting before loading
    model = _load(args)
    started = time.time()
    result = atlas(model, detectors, validate=not args.no_validate, k=args.k, n_random=args.n_random, settings=settings,
                   out=args.out, resume=not args.no_resume, seed=args.seed, batch_size=args.batch_size, progress=True)
    report = result.save(args.out)
    print(result)
    print(f"atlas of {len(result.scores)} detectors in {time.time() - started:.0f} s; report: {report}")
    if result.failures:
        print(f"headscope: error: {result.failure_summary()}. The report marks them; rerun the same command to "
              f"retry only what failed (details in {Path(args.out) / 'parts'}/<detector>.failed.json).", file=sys.stderr)
        return 1
    return 0


def run_compare(args: argparse.Namespace) -> int:
    comparison = compare(args.a, args.b)
    print(comparison)
    if args.out:
        comparison.save(args.out)
    if args.plot:
        comparison.plot(args.plot)
    return 0


def run_validate(args: argparse.Namespace) -> int:
    model = _load(args)
    if args.scores:
        scores = HeadScores.load(args.scores)
    else:
        scores = scan(model, [args.detector], batch_size=args.batch_size, progress=True)[args.detector]
    result = validate(
        model, scores, k=args.k, n_random=args.n_random, method=args.method, seed=args.seed,
        batch_size=args.batch_size, progress=True,
    )
    print(result)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result.to_dict(), indent=1))
    return 0


def run_info(args: argparse.Namespace) -> int:
    print(_versions_table())
    if args.versions_only:
        return 0 if not untested() else 1
    model = _load(args)
    shape = model_shape(model)
    groups = ", ".join(
        f"KV{kv}: q{kv * shape.group_size}-{(kv + 1) * shape.group_size - 1}" for kv in range(shape.n_kv_heads)
    )
    print(f"model        {model.cfg.model_name}")
    print(f"layers       {shape.n_layers}")
    print(f"query heads  {shape.n_heads} per layer, {shape.n_total_heads} in all")
    print(f"KV heads     {shape.n_kv_heads} per layer ({groups})")
    print(f"d_model      {shape.d_model}, d_head {shape.d_head}, vocab {shape.d_vocab}, context {shape.n_ctx}")
    print(f"device       {model_device(model)}, dtype {model_dtype(model)}")
    print(f"detectors    {', '.join(list_detectors())}")
    return 0


def _versions_table() -> str:
    rows = ["library           installed      tested"]
    for row in package_versions():
        flag = "" if row.in_range else "   <- outside the tested range: results may be wrong without an error"
        rows.append(f"{row.name:<17} {row.installed or 'missing':<14} {row.tested or '?'}{flag}")
    return "\n".join(rows)


def _load(args: argparse.Namespace):
    started = time.time()
    model = load_model(args.model, device=args.device)
    print(f"loaded {model.cfg.model_name} on {model_device(model)} in {time.time() - started:.1f} s", file=sys.stderr)
    return model


def _top_table(scores: HeadScores, k: int, seconds: float) -> str:
    rows = [f"{scores.detector}: top {k} heads ({seconds:.0f} s)"]
    rows += [f"  L{row.layer:>2}H{row.head:<2} {row.score:.3f}" for row in scores.top(k)]
    return "\n".join(rows)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
