"""Seconds per atlas stage before and after the work-sharing changes, side by side in one run,
and whether the two atlases agree.

"before" runs the atlas with the sharing switched off (each validation's ablated runs go through
every layer: ``hs.validate(..., skip_layers=False)``, and no result is kept on disk:
``HEADSCOPE_RESULTS_CACHE=off``); "after" is the library as it is, with an empty store. Each
variant runs in its own fresh Python process (no in-memory cache carries over) into its own
folder, one after the other, on the same model; the script then prints each (detector, stage)'s
seconds, their ratio and the totals, and compares every number of the two ``atlas.json`` files
(timings and the environment aside): the largest difference, the significant heads and the
validation verdicts.

    python benchmarks/atlas_stages.py [--model smollm2-135m-instruct] [--detectors all] [--out DIR]
                                      [--device auto] [--batch-size N] [--variants before,after]

``--variants after --out DIR`` runs one variant again and compares it with the other's atlas
already in ``DIR/before`` (e.g. after a fix that changed only the new code path).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

VARIANTS = ("before", "after")
SKIPPED_KEYS = {"environment", "timings", "date", "seconds"}  # what may differ between two runs


def run_variant(args: argparse.Namespace) -> None:
    """In a child process: one atlas with the variant's switches, saved into ``args.out``."""
    import headscope as hs
    atlas_module = importlib.import_module("headscope.atlas")  # hs.atlas is the function

    if args.variant == "before":
        atlas_module.validate = functools.partial(atlas_module.validate, skip_layers=False)
    model = hs.load_model(args.model, device=args.device)
    detectors = "all" if args.detectors == "all" else args.detectors.split(",")
    started = time.perf_counter()
    result = hs.atlas(model, detectors, out=args.out, resume=False, batch_size=args.batch_size, progress=False)
    result.save(args.out)
    print(f"{args.variant}: atlas in {time.perf_counter() - started:.1f} s", flush=True)


def stage_seconds(atlas: dict[str, Any]) -> dict[tuple[str, str], float]:
    return {(name, stage): float(seconds) for name, stages in atlas["timings"].items()
            for stage, seconds in stages.items() if isinstance(seconds, (int, float)) and not isinstance(seconds, bool)}


def differences(a: Any, b: Any, path: str = "") -> list[tuple[str, float]]:
    """Every place where two atlas.json trees differ: ``(path, |difference|)`` (inf when not numeric)."""
    if isinstance(a, dict) and isinstance(b, dict):
        found = []
        for key in sorted(set(a) | set(b)):
            if key in SKIPPED_KEYS:
                continue
            if key not in a or key not in b:
                found.append((f"{path}/{key}", math.inf))
            else:
                found += differences(a[key], b[key], f"{path}/{key}")
        return found
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [(path, math.inf)]
        return [item for i, (x, y) in enumerate(zip(a, b)) for item in differences(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float):
        if a == b or (math.isnan(a) and math.isnan(b)):
            return []
        return [(path, abs(a - b))]
    return [] if a == b else [(path, math.inf)]


def print_table(atlases: dict[str, dict[str, Any]]) -> None:
    before, after = (stage_seconds(atlases[v]) for v in VARIANTS)
    print(f"\n{'detector':<18} {'stage':<13} {'before s':>9} {'after s':>9} {'after/before':>13}")
    for key in before:
        b, a = before[key], after.get(key, math.nan)
        ratio = a / b if b > 0.05 else math.nan
        print(f"{key[0]:<18} {key[1]:<13} {b:9.1f} {a:9.1f} {ratio:13.2f}")
    total_b, total_a = sum(before.values()), sum(after.values())
    print(f"{'total':<32} {total_b:9.1f} {total_a:9.1f} {total_a / total_b:13.2f}")


def print_agreement(atlases: dict[str, dict[str, Any]]) -> None:
    before, after = (atlases[v] for v in VARIANTS)
    found = differences(before, after)
    largest = max((d for _path, d in found), default=0.0)
    print(f"\n{len(found)} numbers differ between the two atlases; largest difference {largest:.3g}")
    for path, difference in found[:20]:
        print(f"  {path}: {difference:.3g}")
    heads = [significant_heads(atlas) for atlas in (before, after)]
    verdicts = [{name: (v or {}).get("significant") for name, v in atlas["validations"].items()} for atlas in (before, after)]
    print(f"significant heads identical: {heads[0] == heads[1]}; validation verdicts identical: "
          f"{verdicts[0] == verdicts[1]}")


def significant_heads(atlas: dict[str, Any]) -> dict[str, list[str]]:
    return {sig["role"]: sig["heads"] for sigs in atlas["significance"].values() for sig in sigs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--detectors", default="all", help="'all' or comma-separated names")
    parser.add_argument("--out", default=None, help="folder for the two atlases (default: a temporary folder)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="which to run (the others are read from --out)")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # the child processes
    args = parser.parse_args()
    if args.variant:
        run_variant(args)
        return
    root = Path(args.out or tempfile.mkdtemp(prefix="atlas-stages-"))
    atlases = {}
    for variant in VARIANTS:
        if variant not in args.variants.split(","):
            atlases[variant] = json.loads((root / variant / "atlas.json").read_text())
            continue
        command = [sys.executable, __file__, "--variant", variant, "--model", args.model, "--detectors", args.detectors,
                   "--out", str(root / variant), "--device", args.device]
        if args.batch_size:
            command += ["--batch-size", str(args.batch_size)]
        # "before" keeps no results on disk; "after" starts from an empty store, as a fresh install does
        store = "off" if variant == "before" else str(root / f"results-{time.time_ns()}")
        subprocess.run(command, check=True, env={**os.environ, "HEADSCOPE_RESULTS_CACHE": store})
        atlases[variant] = json.loads((root / variant / "atlas.json").read_text())
    print_table(atlases)
    print_agreement(atlases)
    print(f"\nboth atlases: {root}")


if __name__ == "__main__":
    main()
