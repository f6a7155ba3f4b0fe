"""The ``headscope`` command: ``atlas``, ``compare``, ``scan``, ``validate``, ``detectors`` and
``info``. All logic lives in the library.

Errors have one path. A user mistake is a :class:`~headscope.errors.HeadscopeError`, printed as one
line ``headscope: error: <problem and fix>`` with exit code 2. Everything that can be checked
without a model is checked before one loads: the ``--model`` path, ``--device`` and
``--device-map``/``--max-memory``/``--offload-folder`` (a map replaces ``--device``), detector
names, the ``--config`` file and every setting in it (type, choices, range, against the
detector's config dataclass), ``--data`` files, ``--out`` and ``--scores``. An exception that is
not a ``HeadscopeError`` is a bug in headscope: it prints one line saying so, with exit code 1.
``headscope --debug ...`` re-raises either, so its traceback shows.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any, NoReturn, Optional, Sequence

import torch
from tqdm.auto import tqdm

from headscope import __version__
from headscope.api import saved_scores, scan
from headscope.atlas import all_detectors, atlas, missing_message, missing_parts, parse_only, parse_shard
from headscope.atlas import detector_settings as atlas_detector_settings
from headscope.compare import compare
from headscope.detectors.base import Detector, detector_of_scores, get_detector, list_detectors
from headscope.detectors.settings import DATA_SETTING, describe_settings, range_text, setting_fields, suggest
from headscope.engine.heads import model_shape
from headscope.engine.devices import placement_counts
from headscope.engine.runner import model_device, model_dtype
from headscope.errors import (
    CommandLineError,
    ConfigFileError,
    DataError,
    HeadscopeError,
    MissingPartsError,
    OutputFolderError,
    ResultFileError,
    SettingError,
    UnknownDetectorError,
)
from headscope.files import atomic_write_text
from headscope.models import DEFAULT_MODEL, check_model_path, check_placement, load_model, resolve_device
from headscope.results import HeadScores
from headscope.tasks.user_data import data_file
from headscope.validation import validate
from headscope.versions import package_versions, untested

CONFIG_EXAMPLE = '{"induction": {"block_len": 50}, "retrieval": {"lengths": [300]}}'
COST_SOURCE = ("rough cost: the stages of 'headscope atlas' on SmolLM2-135M-Instruct, 2 CPU cores, no GPU, "
               "default settings (fresh clone, 2026-12-01); scale with the model's size and the settings")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit code: 0 done,
    1 an atlas with failed detectors or a bug in headscope, 2 a user mistake, 130 interrupted."""
    args = None
    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    except HeadscopeError as error:
        if getattr(args, "debug", False):
            raise
        print(f"headscope: error: {one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("headscope: interrupted; finished results are saved and a rerun resumes.", file=sys.stderr)
        return 130
    except (MemoryError, OSError, torch.OutOfMemoryError) as error:  # the machine, not headscope nor the input: say what to change
        if getattr(args, "debug", False):
            raise
        print(f"headscope: error: {environment_problem(error)}", file=sys.stderr)
        return 1
    except Exception as error:  # a bug, not a user mistake: one line, and --debug for the traceback
        if getattr(args, "debug", False):
            raise
        print(f"headscope: internal error: {type(error).__name__}: {one_line(error)}. This is a bug in headscope, "
              "not a problem with your input: rerun with 'headscope --debug ...' to see the traceback and report it.",
              file=sys.stderr)
        return 1


def environment_problem(error: BaseException) -> str:
    """One line for a failure of the machine (out of memory, a full disk, a file system refusing a
    write), with what to change; finished results are saved, so a rerun resumes."""
    resumes = "finished results are saved and a rerun resumes"
    if isinstance(error, MemoryError) or "out of memory" in str(error).lower():
        return (f"out of memory ({type(error).__name__}): rerun with a smaller --batch-size (e.g. 4) or on a machine "
                f"with more memory; {resumes}.")
    where = f" ({error.filename})" if getattr(error, "filename", None) else ""
    return (f"the system refused an operation{where}: {error.strerror or one_line(error)}. Free disk space or fix the "
            f"folder's permissions; {resumes}.")


def one_line(error: BaseException) -> str:
    """The error's message on one line (runs of whitespace, newlines included, become one space)."""
    return " ".join(str(error).split()) or type(error).__name__


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line: it raises :class:`CommandLineError`
    (printed by :func:`main`) instead of printing the usage block and exiting. Abbreviated flags
    are refused (``--detector`` is not taken for ``--detectors``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise CommandLineError(f"{message}. See '{self.prog} --help'.")


def at_least_two(text: str) -> int:
    """argparse type: a whole number of at least 2 (random sets: their spread makes the interval)."""
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2 (the interval needs the spread of two random sets or "
                                         f"more), got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1 (counts, sizes, k)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# ---------------------------------------------------------------------------------------------
# the parser


def build_parser() -> argparse.ArgumentParser:
    """The ``headscope`` parser with every subcommand."""
    parser = Parser(prog="headscope", description="Score, validate and inspect attention heads.")
    parser.add_argument("--version", action="version", version=f"headscope {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error instead of one line")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _atlas_command(commands)
    _compare_command(commands)
    _scan_command(commands)
    _validate_command(commands)
    _detectors_command(commands)
    _info_command(commands)
    return parser


def _atlas_command(commands: Any) -> None:
    command = _add_command(commands, "atlas", "every detector, validated, as a report (report.html in --out)")
    _model_args(command)
    command.add_argument("--detectors", default="all", help="'all' (default) or comma-separated names")
    command.add_argument("--out", default="atlas", help="folder for report.html, atlas.json, CSV files and parts/")
    command.add_argument("-k", type=positive_int, default=5, help="heads ablated by each validation (default 5)")
    command.add_argument("--n-random", type=at_least_two, default=5,
                         help="random k-sets each validation compares with (default 5)")
    command.add_argument("--seed", type=int, default=0, help="seed of the random head sets of the validations (default 0)")
    command.add_argument("--no-validate", action="store_true", help="skip the causal validations")
    command.add_argument("--no-resume", action="store_true", help="recompute stages already saved in --out/parts")
    spread = command.add_mutually_exclusive_group()
    spread.add_argument("--only", metavar="DETECTOR[.STAGE],...",
                        help="run only these detectors (every stage) or stages (scores, significance, validation) into "
                             "--out/parts, for a scheduler (SLURM, Ray); no report: --assemble writes it")
    spread.add_argument("--shard", metavar="I/N",
                        help="run shard I of N (numbered from 1, e.g. $SLURM_ARRAY_TASK_ID/N with --array=1-N) of this "
                             "atlas's units into --out/parts, balanced by rough cost; no report: --assemble writes it")
    spread.add_argument("--assemble", action="store_true",
                        help="write the report from the parts in --out once every unit ran (with --only or --shard, "
                             "the same options): draws the attention patterns, computes nothing else")
    _settings_args(command)
    command.set_defaults(run=run_atlas)


def _compare_command(commands: Any) -> None:
    command = _add_command(commands, "compare", "which roles moved, appeared or vanished between two atlases")
    command.add_argument("a", help="atlas folder A (written by 'headscope atlas')")
    command.add_argument("b", help="atlas folder B")
    command.add_argument("--out", help="write the comparison as JSON to this file")
    command.add_argument("--plot", help="draw each role's share of significant heads by relative depth, A beside B, "
                                        "to this PNG file")
    command.set_defaults(run=run_compare)


def _scan_command(commands: Any) -> None:
    command = _add_command(commands, "scan", "score every head with one or more detectors")
    _model_args(command)
    command.add_argument("--detectors", default="induction",
                         help="comma-separated names (default induction; 'headscope detectors' lists them)")
    command.add_argument("--out", default="results", help="folder for <detector>.json and <detector>.png")
    command.add_argument("--top", type=positive_int, default=10, help="top heads to list in the JSON and on screen")
    command.add_argument("--no-resume", action="store_true", help="recompute detectors already saved in --out")
    _settings_args(command)
    command.set_defaults(run=run_scan)


def _validate_command(commands: Any) -> None:
    command = _add_command(commands, "validate", "ablate top-k heads vs random-k heads")
    _model_args(command)
    command.add_argument("--detector", default=None,
                         help="the detector to run and validate (default induction; with --scores, the scores' own)")
    command.add_argument("--scores", help="a saved <detector>.json to validate (else the detector is run)")
    command.add_argument("-k", type=positive_int, default=5, help="top heads ablated together (default 5)")
    command.add_argument("--n-random", type=at_least_two, default=5,
                         help="random k-sets the top-k is compared with (default 5)")
    command.add_argument(
        "--method", default=None, choices=["zero", "mean", "resample", "uniform", "sink", "shift", "task_mean"],
        help="ablation method (default: the detector's own: mean for most, uniform at decode for retrieval, sink "
             "removal for attention_sink, the probe shift for truthfulness, task means for function_vector)",
    )
    command.add_argument("--seed", type=int, default=0, help="seed of the random head sets (default 0)")
    command.add_argument("--out", help="write the result as JSON to this file")
    _data_arg(command)
    command.set_defaults(run=run_validate)


def _detectors_command(commands: Any) -> None:
    command = _add_command(commands, "detectors", "every detector with its settings (type, default, choices or "
                                                  "range) and rough cost; loads no model")
    command.add_argument("names", nargs="*", help="only these detectors (default: every registered one)")
    command.add_argument("--json", action="store_true", help="print JSON (name, summary, cost, settings) instead")
    command.set_defaults(run=run_detectors)


def _info_command(commands: Any) -> None:
    command = _add_command(commands, "info", "library versions and detectors; with --model also its shape, heads, "
                                             "KV groups and device")
    _model_args(command, default=None)
    command.add_argument("--versions-only", action="store_true",
                         help="print the library versions and tested ranges, load no model (exit 1 if outside)")
    command.set_defaults(run=run_info)


def _add_command(commands: Any, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand that also takes ``--debug`` after its name."""
    command = commands.add_parser(name, help=help, description=help)
    command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="show the full traceback of an error instead of one line")
    return command


def _model_args(command: argparse.ArgumentParser, default: Optional[str] = DEFAULT_MODEL) -> None:
    shown = f"default {default}" if default else "none: no model is loaded"
    command.add_argument("--model", default=default, help=f"bundled name, .gguf, HF folder or hub name ({shown})")
    command.add_argument("--device", default=None, help="cpu, cuda or auto (default: auto)")
    command.add_argument("--device-map", default=None, metavar="MAP",
                         help="split a model too large for one GPU: auto, balanced, balanced_low_0 or sequential, or a "
                              "JSON object (or .json file) of module name to GPU index, cpu or disk; replaces --device")
    command.add_argument("--max-memory", default=None, metavar="PLACE=SIZE,...",
                         help="with --device-map: the most each place holds, e.g. 0=70GiB,1=70GiB,cpu=200GiB "
                              "(the rest goes to disk)")
    command.add_argument("--offload-folder", default=None, metavar="PATH",
                         help="with --device-map: where weights offloaded to disk are written when the checkpoint "
                              "cannot be read in place (not safetensors)")
    command.add_argument("--batch-size", type=positive_int, default=None,
                         help="rows per forward pass (default: from memory)")


def _settings_args(command: argparse.ArgumentParser) -> None:
    command.add_argument("--config", help=f"JSON file of settings per detector, e.g. {CONFIG_EXAMPLE} "
                                          "('headscope detectors' lists them)")
    _data_arg(command)


def _data_arg(command: argparse.ArgumentParser) -> None:
    command.add_argument("--data", action="append", default=[], metavar="[NAME=]PATH",
                         help="your own data file for a detector's 'data' setting: PATH when one detector runs, "
                              "NAME=PATH (repeatable) to say which")


# ---------------------------------------------------------------------------------------------
# the commands


def run_scan(args: argparse.Namespace) -> int:
    """``headscope scan``: score with each detector, saving <name>.json and <name>.png in --out."""
    check_model_args(args)
    names = detector_names(args.detectors)
    detectors = build_detectors(names, detector_settings(names, args))
    check_out_folder(args.out)
    model = _load(args)
    out = Path(args.out)
    if not args.no_resume:
        saved_scores(model, detectors, out)  # another model's file in --out is refused before any detector runs
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
    """``headscope atlas``: every (or the named) detector, validated, saved as a report."""
    check_model_args(args)
    run_all = args.detectors.strip() == "all"
    names = all_detectors() if run_all else detector_names(args.detectors)
    settings = detector_settings(names, args)
    build_detectors(names, atlas_detector_settings(names, settings))  # checked before the model loads
    check_out_folder(args.out)
    options = dict(validate=not args.no_validate, k=args.k, n_random=args.n_random, settings=settings or None,
                   seed=args.seed)
    only = parse_only(args.only, names, not args.no_validate, "--only") if args.only is not None else None
    shard = parse_shard(args.shard, "--shard") if args.shard is not None else None
    if args.assemble:
        _check_assembly(args, names, options)
    model = _load(args)
    started = time.time()
    result = atlas(model, "all" if run_all else names, out=args.out, resume=not args.no_resume,
                   batch_size=args.batch_size, progress=True, only=None if only is None else args.only, shard=shard,
                   assemble=args.assemble, **options)
    if only is not None or shard is not None:
        return _units_done(result, args, time.time() - started)
    report = result.save(args.out)
    print(result)
    print(f"atlas of {len(result.scores)} detectors in {time.time() - started:.0f} s; report: {report}")
    if result.failures:
        print(f"headscope: error: {result.failure_summary()}. The report marks them; rerun the same command to "
              f"retry only what failed (details in {Path(args.out) / 'parts'}/<detector>.failed.json).", file=sys.stderr)
        return 1
    return 0


def _check_assembly(args: argparse.Namespace, names: list[str], options: dict[str, Any]) -> None:
    """Before the model loads: ``--assemble`` reads the parts (so not with ``--no-resume``), and
    every unit has a part (or a recorded failure) of these settings and code."""
    if args.no_resume:
        raise CommandLineError("--assemble reads the saved parts, and --no-resume would ignore them: drop --no-resume.")
    missing = missing_parts(args.out, names, **options)
    if missing:
        raise MissingPartsError(missing_message(missing, args.out, options["validate"]))


def _units_done(result: Any, args: argparse.Namespace, seconds: float) -> int:
    """After ``--only`` or ``--shard``: one line naming what ran and what to do next; exit 1 when a
    detector failed (recorded in --out/parts/<detector>.failed.json, the others finished)."""
    which = f"shard {args.shard}" if args.shard is not None else f"--only {args.only}"
    ran = ", ".join(result.settings.detectors) or "no units (there are more shards than units)"
    print(f"atlas {which}: {ran} in {seconds:.0f} s; parts in {Path(args.out) / 'parts'}. When every unit is done: "
          f"headscope atlas --assemble --out {shlex.quote(args.out)} (same model and options).")
    if result.failures:
        print(f"headscope: error: {result.failure_summary()}. Details in {Path(args.out) / 'parts'}/<detector>.failed.json;"
              " rerun the same command to retry only what failed, or --assemble to record the failure in the report.",
              file=sys.stderr)
        return 1
    return 0


def run_compare(args: argparse.Namespace) -> int:
    """``headscope compare A B``: roles that moved, appeared or vanished."""
    for flag, folder in (("a", args.a), ("b", args.b)):
        check_atlas_folder(folder, flag)
    for flag, path in (("--out", args.out), ("--plot", args.plot)):
        if path:
            check_out_file(path, flag)
    comparison = compare(args.a, args.b)
    print(comparison)
    if args.out:
        comparison.save(args.out)
    if args.plot:
        comparison.plot(args.plot)
    return 0


def run_validate(args: argparse.Namespace) -> int:
    """``headscope validate``: ablate the top-k heads of saved (or freshly computed) scores."""
    check_model_args(args)
    scores = read_scores(args.scores) if args.scores else None
    if scores is not None:
        check_scores_detector(scores, args)
        detector = None
    else:
        name = detector_names(args.detector or "induction", "--detector")
        if len(name) != 1:
            raise CommandLineError(f"--detector {args.detector!r} names {len(name)} detectors; validate takes one "
                                   f"at a time, e.g. --detector {name[0]}.")
        detector = build_detectors(name, detector_settings(name, args))[0]
    if args.out:
        check_out_file(args.out)
    model = _load(args)
    if scores is None:
        scores = scan(model, [detector], batch_size=args.batch_size, progress=True)[detector.name]
    result = validate(
        model, scores, k=args.k, n_random=args.n_random, method=args.method, seed=args.seed,
        batch_size=args.batch_size, progress=True,
    )
    print(result)
    if args.out:
        atomic_write_text(args.out, json.dumps(result.to_dict(), indent=1))
    return 0


def run_detectors(args: argparse.Namespace) -> int:
    """``headscope detectors``: every detector's summary, cost and settings, without a model."""
    names = args.names or list_detectors()
    detectors = [get_detector(name) for name in names]
    if args.json:
        print(json.dumps({"cost_source": COST_SOURCE, "detectors": [detector_description(d) for d in detectors]},
                         indent=1, default=str))
        return 0
    print(f"{len(detectors)} detector{'' if len(detectors) == 1 else 's'}; cost = {COST_SOURCE}. Set a setting with --config FILE "
          f"(e.g. {CONFIG_EXAMPLE}) or hs.detect(model, name, setting=value).")
    for detector in detectors:
        print()
        print(detector_text(detector_description(detector)))
    return 0


def run_info(args: argparse.Namespace) -> int:
    """``headscope info``: versions and detectors; the model's shape only with ``--model``."""
    print(_versions_table())
    if args.versions_only:
        return 0 if not untested() else 1
    if args.model is None:
        print(f"detectors    {', '.join(list_detectors())} ('headscope detectors' describes their settings)")
        print("model        none loaded: add --model NAME to see its layers, heads, KV groups and device")
        return 0
    check_model_args(args)
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
    if placement_counts(model):
        print(f"device map   {', '.join(f'{where}: {n} modules' for where, n in placement_counts(model).items())}")
    print(f"detectors    {', '.join(list_detectors())}")
    return 0


# ---------------------------------------------------------------------------------------------
# checks before the model loads


def check_model_args(args: argparse.Namespace) -> None:
    """``--model`` names something that exists (for a path), ``--device`` is usable, and
    ``--device-map``/``--max-memory``/``--offload-folder`` make a placement (``models.check_placement``)."""
    check_model_path(args.model)
    placement = placement_args(args)
    if args.device is not None and placement["device_map"] is not None and args.device != "auto":
        raise CommandLineError(f"--device {args.device} and --device-map are both given: a device map places every "
                               f"layer itself. Drop --device, or drop --device-map to load on {args.device}.")
    for flag, key in (("--max-memory", "max_memory"), ("--offload-folder", "offload_folder")):
        if placement[key] is not None and placement["device_map"] is None:
            raise CommandLineError(f"{flag} only applies to a model split by a device map: add --device-map auto (or "
                                   f"a map), or drop {flag}.")
    if placement["device_map"] is None:
        try:
            resolve_device(args.device)
        except (ValueError, RuntimeError) as error:
            raise CommandLineError(f"--device {args.device}: {one_line(error)} Use cpu, cuda or auto.") from None
    try:
        check_placement(**placement)
    except ValueError as error:
        flag = "--max-memory" if str(error).startswith("max_memory") else "--device-map"
        raise CommandLineError(f"{flag}: {one_line(error)}") from None


def placement_args(args: argparse.Namespace) -> dict[str, Any]:
    """``load_model``'s placement arguments from ``--device``, ``--device-map`` (a strategy name, a
    JSON object or a ``.json`` file), ``--max-memory`` (``PLACE=SIZE,...``) and ``--offload-folder``.

    Raises:
        CommandLineError: a map that is neither a name nor a JSON object, or a memory list that is
            not ``PLACE=SIZE`` pairs.
    """
    return {"device": args.device, "device_map": _device_map_arg(args.device_map),
            "max_memory": _max_memory_arg(args.max_memory), "offload_folder": args.offload_folder}


def _device_map_arg(text: Optional[str]) -> Any:
    if text is None or not text.strip():
        return None
    text = text.strip()
    json_text = text.startswith(("{", "["))
    if not json_text and not text.endswith(".json"):
        return text  # a strategy name, checked by check_placement
    source = "the JSON value"
    if not json_text:
        source = text
        try:
            text = Path(text).expanduser().read_text(encoding="utf-8")
        except OSError as error:
            raise CommandLineError(f"--device-map {source}: the file cannot be read ({error.strerror or error}); give "
                                   "an existing .json file, a JSON object or a strategy such as auto.") from None
    try:
        device_map = json.loads(text)
    except json.JSONDecodeError as error:
        raise CommandLineError(f"--device-map: {source} is not valid JSON ({error.msg} at column {error.colno}); write "
                               'it as {"model.embed_tokens": 0, "model.layers.0": 0, "lm_head": "cpu"}.') from None
    if not isinstance(device_map, dict):
        raise CommandLineError(f"--device-map: {source} holds a JSON {json_kind(device_map)}, not an object of module "
                               "name to place.")
    return device_map


def _max_memory_arg(text: Optional[str]) -> Optional[dict[Any, str]]:
    if text is None or not text.strip():
        return None
    memory: dict[Any, str] = {}
    for item in (part.strip() for part in text.split(",") if part.strip()):
        place, equals, size = (piece.strip() for piece in item.partition("="))
        if not equals or not place or not size:
            raise CommandLineError(f"--max-memory {text!r}: {item!r} is not PLACE=SIZE; write e.g. "
                                   "--max-memory 0=70GiB,cpu=200GiB.")
        memory[int(place) if place.isdigit() else place] = size
    return memory


def detector_names(text: str, flag: str = "--detectors") -> list[str]:
    """The registered detector names in a comma-separated list, each once, in order.

    Raises:
        CommandLineError: the list names no detector (empty, or only commas).
        UnknownDetectorError: a name that is not registered (with the closest name).
    """
    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not names:
        raise CommandLineError(f"{flag} {text!r} names no detector: give one or more comma-separated names, e.g. "
                               f"{flag} induction,previous_token ('headscope detectors' lists them).")
    for name in names:
        if name not in list_detectors():
            get_detector(name)  # raises UnknownDetectorError with the closest name
    return names


def read_config(path: Optional[str]) -> dict[str, dict[str, Any]]:
    """The ``--config`` file as ``{detector: {setting: value}}``: readable, JSON, an object of
    objects, every key a registered detector. The settings themselves are checked by the detectors
    (:func:`build_detectors`). Shared by ``scan`` and ``atlas``.

    Raises:
        ConfigFileError: naming the file, the problem (with line and column for bad JSON) and the fix.
    """
    if not path:
        return {}
    try:
        data = json.loads(_read_config_text(path))
    except json.JSONDecodeError as error:
        raise ConfigFileError(f"--config {path} is not valid JSON: {error.msg} at line {error.lineno}, column "
                              f"{error.colno}. Fix the file; it must look like {CONFIG_EXAMPLE}.") from None
    if not isinstance(data, dict):
        raise ConfigFileError(f"--config {path} holds a JSON {json_kind(data)}, not an object of settings per "
                              f"detector: write it like {CONFIG_EXAMPLE}.")
    for name, settings in data.items():
        _check_config_entry(path, name, settings)
    return data


def _read_config_text(path: str) -> str:
    file = Path(path).expanduser()
    if not file.exists():
        raise ConfigFileError(f"No --config file at {path}: give the path of an existing JSON file like {CONFIG_EXAMPLE}.")
    if file.is_dir():
        raise ConfigFileError(f"--config {path} is a folder: give the path of a JSON file like {CONFIG_EXAMPLE}.")
    try:
        return file.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigFileError(f"Cannot read --config {path} ({error.strerror or error}): check its permissions "
                              "(chmod +r) or copy it somewhere readable.") from None
    except UnicodeDecodeError:
        raise ConfigFileError(f"--config {path} is not UTF-8 text: save it as a UTF-8 JSON file like "
                              f"{CONFIG_EXAMPLE}.") from None


def _check_config_entry(path: str, name: str, settings: Any) -> None:
    if name not in list_detectors():
        hint = suggest(name, list_detectors())
        raise ConfigFileError(f"--config {path} has settings for {name!r}, which is not a detector.{hint} Known "
                              f"detectors: {', '.join(list_detectors())}; rename or remove that entry.")
    if not isinstance(settings, dict):
        raise ConfigFileError(f"--config {path}: the settings of {name} must be a JSON object like "
                              f'{{"seed": 1}}, not a {json_kind(settings)}.')


def json_kind(value: Any) -> str:
    """The JSON name of a parsed value's type (object, array, string, number, boolean, null)."""
    kinds = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def detector_settings(names: list[str], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Settings per detector of this run, from ``--config`` and ``--data`` (which wins), for the
    detectors that have any. A config entry for a detector the run leaves out is an error."""
    config_path = getattr(args, "config", None)
    config = read_config(config_path)
    left_out = [name for name in config if name not in names]
    if left_out:
        raise ConfigFileError(f"--config {config_path} has settings for {', '.join(left_out)}, which this run does not "
                              f"include ({', '.join(names)}): add {'them' if len(left_out) > 1 else 'it'} to "
                              "--detectors or remove the entry.")
    settings = {name: dict(config.get(name, {})) for name in names}
    for name, path in data_assignments(getattr(args, "data", None) or [], names).items():
        check_takes_data(name)
        settings[name][DATA_SETTING] = path
    return {name: values for name, values in settings.items() if values}


def data_assignments(values: list[str], names: list[str]) -> dict[str, str]:
    """``--data`` values as ``{detector: path}``. ``NAME=PATH`` names its detector (NAME must be
    registered and in the run); a bare ``PATH`` is allowed when exactly one detector runs.

    Raises:
        CommandLineError: a bare PATH with several detectors, a NAME not in the run, a detector
            given twice, an empty path.
    """
    assigned: dict[str, str] = {}
    for value in values:
        name, path = _split_data_value(value, names)
        if not path:
            raise CommandLineError(f"--data {value!r} has no path: write --data PATH or --data NAME=PATH.")
        if name in assigned:
            raise CommandLineError(f"--data is given twice for {name} ({assigned[name]} and {path}): keep one.")
        assigned[name] = path
    return assigned


def _split_data_value(value: str, names: list[str]) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    named = bool(sep) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) is not None and not Path(value).exists()
    if named and name not in list_detectors():
        get_detector(name)  # raises UnknownDetectorError with the closest name
    if named:
        if name not in names:
            raise CommandLineError(f"--data {value}: {name} is not in this run ({', '.join(names)}); add it to the "
                                   "detectors or drop this --data.")
        return name, path
    if len(names) != 1:
        raise CommandLineError(f"--data {value} does not say which detector it is for, and this run has "
                               f"{len(names)} ({', '.join(names)}): write --data NAME=PATH, e.g. --data "
                               f"{names[0]}={value}.")
    return names[0], value


def check_takes_data(name: str) -> None:
    """Raise :class:`SettingError` when the detector's config has no ``data`` setting."""
    if DATA_SETTING in setting_fields(get_detector(name).Config):
        return
    takers = [n for n in list_detectors() if DATA_SETTING in setting_fields(get_detector(n).Config)]
    raise SettingError(f"The {name} detector takes no --data: its config has no {DATA_SETTING!r} setting. Detectors "
                       f"that do: {', '.join(takers) or 'none yet'}; drop --data for {name}.")


def build_detectors(names: list[str], settings: dict[str, dict[str, Any]]) -> list[Detector]:
    """Each named detector with its settings (type, choices and range checked by the detector),
    its data files checked readable and parsed (``check_data``): every check that needs no model."""
    detectors = [get_detector(name, **settings.get(name, {})) for name in names]
    for detector in detectors:
        for path in detector.data_paths():
            data_file(path, f"{detector.name} data")
        detector.check_data()
    return detectors


def check_out_folder(path: str, flag: str = "--out") -> None:
    """Raise :class:`OutputFolderError` unless ``path`` is, or can be created as, a writable folder."""
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise OutputFolderError(f"{flag} {path} is a file, not a folder: give a folder (it is created when missing) "
                                "or move the file away.")
    _check_writable(folder, path, flag)


def check_out_file(path: str, flag: str = "--out") -> None:
    """Raise :class:`OutputFolderError` unless ``path`` is, or can be created as, a writable file."""
    file = Path(path).expanduser()
    if file.is_dir():
        raise OutputFolderError(f"{flag} {path} is a folder: give a file name, e.g. {flag} {Path(path) / 'result.json'}.")
    if file.exists() and not os.access(file, os.W_OK):
        raise OutputFolderError(f"{flag} {path} is not writable: choose another file or change its permissions.")
    _check_writable(file.parent, path, flag)


def _check_writable(folder: Path, given: str, flag: str) -> None:
    """The folder, or its nearest existing parent, is a folder this process can write into."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputFolderError(f"{flag} {given} cannot be created: {existing} is a file, not a folder. Choose "
                                "another path.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputFolderError(f"{flag} {given} is not writable ({existing}: permission denied): choose a folder "
                                "you can write to, or change its permissions.")


def read_scores(path: str) -> HeadScores:
    """The ``--scores`` file as :class:`HeadScores`, read before any model loads.

    Raises:
        ResultFileError: missing, a folder, unreadable, not JSON (cut off) or not saved scores.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        what = "is a folder" if file.is_dir() else "does not exist"
        raise ResultFileError(f"--scores {path} {what}: give a <detector>.json written by 'headscope scan' or "
                              "HeadScores.save.")
    try:
        return HeadScores.load(file)
    except HeadscopeError as error:
        raise ResultFileError(f"--scores: {one_line(error)}") from error
    except (OSError, ValueError, TypeError, KeyError, AttributeError, IndexError) as error:
        raise ResultFileError(f"--scores {path} is not a saved HeadScores file ({type(error).__name__}: "
                              f"{one_line(error)}); it may be cut off: write it again with 'headscope scan'.") from error


def check_scores_detector(scores: HeadScores, args: argparse.Namespace) -> None:
    """The scores' detector is registered and reads back its saved config; no flag contradicts it."""
    if args.data:
        raise CommandLineError("--data cannot be combined with --scores: the scores file records the data it was "
                               "computed on. Drop --data, or drop --scores to score your data first.")
    if args.detector and args.detector.strip() != scores.detector:
        raise CommandLineError(f"--detector {args.detector} does not match --scores {args.scores}, which holds "
                               f"{scores.detector} scores: drop --detector or pass that detector's scores.")
    try:
        detector_of_scores(scores)
    except (UnknownDetectorError, SettingError, DataError) as error:
        raise ResultFileError(f"--scores {args.scores}: {one_line(error)}") from error


def check_atlas_folder(path: str, flag: str) -> None:
    """Raise :class:`ResultFileError` unless ``path`` is an atlas folder (or its atlas.json)."""
    file = Path(path).expanduser()
    file = file / "atlas.json" if file.is_dir() else file
    if not file.is_file():
        raise ResultFileError(f"{flag}: no atlas at {path} (no {file}): give a folder written by 'headscope atlas'.")


# ---------------------------------------------------------------------------------------------
# printing


def detector_description(detector: Detector) -> dict[str, Any]:
    """A detector's name, summary, rough cost and settings (what ``headscope detectors`` shows)."""
    return {
        "name": detector.name, "summary": detector.summary, "cost": detector.cost or "not measured",
        "settings": describe_settings(detector.Config),
    }


def detector_text(description: dict[str, Any]) -> str:
    """One detector as text: a header line, the cost, then one line per setting."""
    lines = [f"{description['name']}: {description['summary']}", f"  cost: {description['cost']}"]
    for row in description["settings"]:
        allowed = _allowed_text(row)
        default = json.dumps(row["default"], default=str)
        allowed_part = f" ({allowed})" if allowed else ""
        help_part = f"  {row['help']}" if row["help"] else ""
        lines.append(f"  {row['name']}: {row['type']} = {default}{allowed_part}{help_part}")
    return "\n".join(lines)


def _allowed_text(row: dict[str, Any]) -> str:
    if row["choices"] is not None:
        return "one of " + ", ".join(json.dumps(c) for c in row["choices"])
    if row["min"] is not None or row["max"] is not None:
        return range_text(row["min"], row["max"], row["exclusive"])
    return ""


def _versions_table() -> str:
    rows = ["library           installed      tested"]
    for row in package_versions():
        flag = "" if row.in_range else "   <- outside the tested range: results may be wrong without an error"
        rows.append(f"{row.name:<17} {row.installed or 'missing':<14} {row.tested or '?'}{flag}")
    return "\n".join(rows)


def _load(args: argparse.Namespace):
    started = time.time()
    placement = placement_args(args)
    model = load_model(args.model, **placement)
    where = f"split by device map {args.device_map}" if placement["device_map"] is not None else f"on {model_device(model)}"
    print(f"loaded {model.cfg.model_name} {where} in {time.time() - started:.1f} s", file=sys.stderr)
    return model


def _top_table(scores: HeadScores, k: int, seconds: float) -> str:
    rows = [f"{scores.detector}: top {k} heads ({seconds:.0f} s)"]
    rows += [f"  L{row.layer:>2}H{row.head:<2} {row.score:.3f}" for row in scores.top(k)]
    return "\n".join(rows)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
