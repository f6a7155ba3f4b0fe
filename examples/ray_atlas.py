"""An atlas fanned out over a Ray cluster: one Ray task per unit of the atlas, then one that assembles.

    pip install "ray>=2.40"                      # on every node, beside headscope
    ray start --head                             # or attach to a running cluster (--address auto)
    python examples/ray_atlas.py --model smollm2-135m-instruct --out /shared/atlas --address auto

Each task loads the model and runs ``hs.atlas(model, out=..., only=unit)`` into the shared ``--out``
(a folder every node sees: NFS, Lustre, ...), writing that unit's parts and nothing else; Ray
places the tasks on free workers (a GPU each with ``--gpus-per-task 1``). The units are
``hs.atlas_units(...)``: a detector with all its stages, or the detectors scored in one pass.
With ``--split-stages`` each unit's scores are one task and each detector's later stages
(significance, validation) a task of its own that Ray starts once the scores are written
(their task's result is its argument). A last task reads every part, draws the attention
patterns and writes the report (``hs.atlas(..., assemble=True)``), as one sequential
``headscope atlas`` would: the same atlas (``Atlas.results_json``, byte for byte).

A detector that fails is recorded (``parts/<detector>.failed.json``) and the others finish; the
report marks it, as a sequential run's does. A rerun reuses every part already written.
From Python: ``ray_atlas("smollm2-135m-instruct", "atlas/")``, or ``ray_atlas(build)`` with
``build`` a function of no arguments returning the model (called in each task; a detector of
your own must be registered where it runs, e.g. by importing its module inside ``build``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import ray

import headscope as hs
from headscope.atlas import stages_run

ModelSource = Union[str, Callable[[], Any]]  # hs.load_model's spec, or a function building the model


def _model(source: ModelSource, device: Optional[str]) -> Any:
    return source() if callable(source) else hs.load_model(source, device=device)


@ray.remote
def run_units(source: ModelSource, only: list[str], out: str, options: dict[str, Any], device: Optional[str] = None,
              scored: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """One Ray task: ``only`` into ``out``'s parts. ``scored``: the result of the task that wrote the
    scores these stages read (Ray runs this task after it); a detector whose scores failed there
    is left out, its failure already recorded."""
    if scored is not None:
        only = [entry for entry in only if entry.partition(".")[0] not in scored["failures"]]
        if not only:
            return {"only": only, "failures": {}}
    atlas = hs.atlas(_model(source, device), out=out, only=only, progress=False, **options)
    return {"only": only, "failures": atlas.failures}


@ray.remote
def assemble(source: ModelSource, out: str, options: dict[str, Any], device: Optional[str] = None,
             *done: dict[str, Any]) -> dict[str, Any]:
    """The last Ray task (after every task in ``done``): the atlas from the parts, saved to ``out``."""
    atlas = hs.atlas(_model(source, device), out=out, assemble=True, progress=False, **options)
    report = atlas.save(out)
    return {"report": str(report), "failures": atlas.failures}


def unit_runs(units: Sequence[hs.AtlasUnit], split_stages: bool, validate: bool = True) -> list[list[list[str]]]:
    """Per unit, the ``only`` lists of its tasks: the whole unit, or with ``split_stages`` its
    scores first and then each detector's later stages."""
    if not split_stages:
        return [[list(unit.detectors)] for unit in units]
    later = stages_run(validate)[1:]  # after the scores
    return [[[f"{name}.scores" for name in unit.detectors]]
            + [[f"{name}.{stage}" for stage in later] for name in unit.detectors] for unit in units]


def ray_atlas(source: ModelSource, out: Union[str, Path], *, detectors: Union[str, Sequence[str]] = "all",
              split_stages: bool = False, device: Optional[str] = None, cpus_per_task: float = 1,
              gpus_per_task: float = 0, **options: Any) -> hs.Atlas:
    """Run the atlas of ``detectors`` as Ray tasks on the cluster ``ray.init`` attached to (one
    local cluster when none is), writing parts and then the report to ``out``.

    Args:
        source: a name or path for ``hs.load_model``, or a function of no arguments building the
            model; each task loads it.
        out: the shared folder (every node must see it).
        split_stages: one task for each unit's scores, then one for each detector's later stages.
        device: ``hs.load_model``'s device in each task (None: CUDA when the task has a GPU).
        cpus_per_task, gpus_per_task: the resources Ray gives each task.
        options: the rest of ``hs.atlas``'s settings (``validate``, ``k``, ``n_random``,
            ``settings``, ``seed``, ``batch_size``): the same in every task.

    Returns:
        The assembled atlas (``hs.Atlas.load(out)``).
    """
    if not ray.is_initialized():
        ray.init()
    out = str(out)
    options = {"detectors": detectors, **options}
    resources = {"num_cpus": cpus_per_task, "num_gpus": gpus_per_task}
    task, last = run_units.options(**resources), assemble.options(**resources)
    validate = options.get("validate", True)
    units = sorted(hs.atlas_units(detectors, validate), key=lambda unit: -unit.weight)  # the longest start first
    done = []
    for runs in unit_runs(units, split_stages, validate):
        first = task.remote(source, runs[0], out, options, device)
        done += [first] + [task.remote(source, only, out, options, device, first) for only in runs[1:]]
    summary = ray.get(last.remote(source, out, options, device, *done))
    print(f"ray_atlas: {len(done)} tasks, report {summary['report']}"
          + (f"; failed: {', '.join(summary['failures'])}" if summary["failures"] else ""))
    return hs.Atlas.load(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=hs.DEFAULT_MODEL, help="bundled name, .gguf, HF folder or hub name")
    parser.add_argument("--out", default="atlas", help="shared folder for parts/ and the report")
    parser.add_argument("--detectors", default="all", help="'all' or comma-separated names")
    parser.add_argument("--config", help="JSON settings per detector, as for 'headscope atlas --config'")
    parser.add_argument("-k", type=int, default=5)
    parser.add_argument("--n-random", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-validate", action="store_true")
    parser.add_argument("--split-stages", action="store_true", help="a task per detector stage after the scores")
    parser.add_argument("--address", default=None, help="Ray cluster to attach to ('auto': the running one)")
    parser.add_argument("--cpus-per-task", type=float, default=1)
    parser.add_argument("--gpus-per-task", type=float, default=0)
    parser.add_argument("--device", default=None, help="cpu, cuda or auto (default: CUDA when the task has a GPU)")
    args = parser.parse_args(argv)
    ray.init(address=args.address)
    detectors = "all" if args.detectors == "all" else args.detectors.split(",")
    settings = json.loads(Path(args.config).read_text()) if args.config else None
    atlas = ray_atlas(args.model, args.out, detectors=detectors, split_stages=args.split_stages, device=args.device,
                      cpus_per_task=args.cpus_per_task, gpus_per_task=args.gpus_per_task, validate=not args.no_validate,
                      k=args.k, n_random=args.n_random, seed=args.seed, settings=settings)
    print(atlas)
    return 1 if atlas.failures else 0


if __name__ == "__main__":
    sys.exit(main())
