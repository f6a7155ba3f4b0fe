"""examples/ray_atlas.py on a local Ray cluster of two workers: the atlas fanned out as Ray tasks
(each unit's scores, then each detector's later stages, then the assembly) equals one
sequential run.

"Equals" is ``Atlas.results_json()`` byte for byte: everything ``atlas.json`` holds except
``environment`` (date, versions, device) and ``timings`` (seconds), which differ between any two
runs, plus the attention patterns; ``atlas.json`` with those two keys removed, ``patterns.json``
and the CSV files are compared byte for byte too. Ray starts in about 5 s here; the test takes
15-30 s on two busy cores.
"""

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

import headscope as hs
from tests.unit import shard_helpers
from tests.unit.shard_helpers import DETECTORS, SETTINGS

ray = pytest.importorskip("ray")
ROOT = Path(__file__).resolve().parents[2]
VOLATILE = ("environment", "timings")


@pytest.fixture
def cluster(monkeypatch):
    """A local Ray cluster of two one-CPU workers whose processes import this checkout (the
    example, headscope's source and the tests' helpers), without the tests' type checks."""
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    paths = [str(ROOT / "examples"), str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, paths)))
    monkeypatch.setenv("HEADSCOPE_TYPECHECK", "0")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    session = tempfile.mkdtemp(prefix="hs-ray-", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=session)
    try:
        yield
    finally:
        ray.shutdown()
        sys.modules.pop("ray_atlas", None)
        shutil.rmtree(session, ignore_errors=True)


def without_volatile(path: Path) -> str:
    data = json.loads(path.read_text())
    return json.dumps({key: value for key, value in data.items() if key not in VOLATILE}, indent=1)


def test_the_ray_fan_out_equals_a_sequential_atlas(cluster, tmp_path):
    import ray_atlas

    options = dict(k=2, n_random=2, settings=SETTINGS)
    model = shard_helpers.build_model()
    try:
        hs.atlas(model, DETECTORS, progress=False, **options).save(tmp_path / "sequential")
        fanned = ray_atlas.ray_atlas(shard_helpers.build_model, tmp_path / "ray", detectors=DETECTORS,
                                     split_stages=True, **options)
    finally:
        hs.unregister_detector("top_two")
    sequential = hs.Atlas.load(tmp_path / "sequential")
    assert list(fanned.patterns) == ["top_two"] and fanned.failures == {}
    assert fanned.results_json() == sequential.results_json()
    assert without_volatile(tmp_path / "ray" / "atlas.json") == without_volatile(tmp_path / "sequential" / "atlas.json")
    for name in ("patterns.json", "heads.csv", "validation.csv", "significance.csv", "overlap.csv"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "sequential" / name).read_bytes(), name
    parts = {path.name for path in (tmp_path / "ray" / "parts").iterdir()}
    stages = ("scores", "significance", "validation")
    assert parts == {f"{name}.{stage}.json" for name in DETECTORS for stage in stages} | {"attention_patterns.patterns.json"}


def test_units_become_tasks_scores_first_when_stages_are_split(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    import ray_atlas

    units = hs.atlas_units(["induction", "previous_token", "duplicate_token", "successor"])
    assert ray_atlas.unit_runs(units, split_stages=False) == [[["induction", "previous_token", "duplicate_token"]],
                                                              [["successor"]]]
    assert ray_atlas.unit_runs(units, split_stages=True) == [
        [["induction.scores", "previous_token.scores", "duplicate_token.scores"],
         ["induction.significance", "induction.validation"], ["previous_token.significance", "previous_token.validation"],
         ["duplicate_token.significance", "duplicate_token.validation"]],
        [["successor.scores"], ["successor.significance", "successor.validation"]]]
    assert ray_atlas.unit_runs(units[1:], split_stages=True, validate=False) == [[["successor.scores"],
                                                                                  ["successor.significance"]]]
