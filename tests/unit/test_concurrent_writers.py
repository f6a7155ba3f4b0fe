"""Several processes saving results into one folder under the same names: no writer fails, no
reader ever sees a torn file, and no temporary file is left behind (real processes, spawned);
several processes appending lines to one file never interleave them."""

import json
import multiprocessing
import random
import traceback

import pytest

NAMES = ("induction", "previous_token", "duplicate_token")
SAVES = 300
PROCESSES = 3


def save_and_read(folder: str, seed: int, queue) -> None:
    """One writer: ``SAVES`` HeadScores saves (and a few checkpoints) cycling over ``NAMES``; after
    each save it reads back one of the files, which must always parse completely."""
    try:
        import torch

        from headscope.files import atomic_torch_save
        from headscope.results import HeadScores

        rng = random.Random(seed)
        for i in range(SAVES):
            name = NAMES[i % len(NAMES)]
            values = torch.full((6, 8), float(seed * 1000 + i))
            HeadScores(values, name, f"writer-{seed}").save(f"{folder}/{name}.json")
            written = NAMES[: i + 1]  # names this writer has saved: they exist whatever the others did
            loaded = HeadScores.load(f"{folder}/{rng.choice(written)}.json")  # raises on a torn file
            assert loaded.values.shape == (6, 8) and bool((loaded.values == loaded.values[0, 0]).all())
            if i % 30 == 0:
                atomic_torch_save(f"{folder}/scan.ckpt", {"writer": seed, "sums": values})
        queue.put((seed, None))
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
        queue.put((seed, traceback.format_exc()))


def run_workers(target, path) -> None:
    """``target(path, seed, queue)`` in ``PROCESSES`` spawned processes at once; each must report
    ``(seed, None)`` (or its traceback) and exit 0."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=target, args=(path, seed, queue)) for seed in range(PROCESSES)]
    for worker in workers:
        worker.start()
    reports = dict(queue.get(timeout=120) for _ in workers)
    for worker in workers:
        worker.join(timeout=30)
    assert all(worker.exitcode == 0 for worker in workers)
    assert reports == {seed: None for seed in range(PROCESSES)}, "\n".join(filter(None, reports.values()))


def test_processes_saving_the_same_names_never_fail_or_tear_a_file(tmp_path):
    run_workers(save_and_read, str(tmp_path))

    import torch

    from headscope.results import HeadScores

    for name in NAMES:
        saved = json.loads((tmp_path / f"{name}.json").read_text())  # complete JSON
        scores = HeadScores.load(tmp_path / f"{name}.json")
        assert scores.detector == name and scores.model == saved["model"]
    assert torch.load(tmp_path / "scan.ckpt", weights_only=True)["sums"].shape == (6, 8)
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp"))
    assert leftovers == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{n}.json" for n in NAMES] + ["scan.ckpt"])


APPENDS = 40
LINE_BYTES = 200_000  # several pages per line: an unlocked append could be split


def append_lines(path: str, seed: int, queue) -> None:
    """One writer: ``APPENDS`` long JSON lines appended to one file with ``append_line``."""
    try:
        from headscope.files import append_line

        for i in range(APPENDS):
            append_line(path, json.dumps({"writer": seed, "i": i, "pad": str(seed) * LINE_BYTES}))
        queue.put((seed, None))
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
        queue.put((seed, traceback.format_exc()))


def test_processes_appending_to_one_file_never_interleave_their_lines(tmp_path):
    path = tmp_path / "needles.jsonl"
    run_workers(append_lines, str(path))
    rows = [json.loads(line) for line in path.read_text().splitlines()]  # every line whole
    assert len(rows) == PROCESSES * APPENDS
    for seed in range(PROCESSES):
        mine = [row for row in rows if row["writer"] == seed]
        assert [row["i"] for row in mine] == list(range(APPENDS))
        assert all(row["pad"] == str(seed) * LINE_BYTES for row in mine)


def test_an_append_after_a_torn_line_starts_a_line_of_its_own(tmp_path):
    from headscope.files import append_line

    path = tmp_path / "needles.jsonl"
    path.write_text('{"a": 1}\n{"cut off mid-wri')  # a writer killed mid-line
    append_line(path, '{"b": 2}')
    append_line(path, '{"c": 3}')
    assert path.read_text() == '{"a": 1}\n{"cut off mid-wri\n{"b": 2}\n{"c": 3}\n'


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    from headscope.files import atomic_write, atomic_write_text

    path = atomic_write_text(tmp_path / "scores.json", '{"old": true}')

    def fail_halfway(handle):
        handle.write(b'{"new": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail_halfway)
    assert json.loads(path.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["scores.json"]
