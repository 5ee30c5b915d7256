"""The exposure writer: JSON lines off the request path, bounded, rotated, flushed."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from apps.serving import metrics
from apps.serving.exposure import AUDIT, EXPOSURES, FEEDBACK, ExposureWriter, default_path


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[ExposureWriter]:
    w = ExposureWriter(tmp_path / "logs" / "exposures.jsonl", queue_size=100)
    yield w
    w.close()


def test_each_stream_gets_one_json_line_per_record_in_its_own_file(writer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Given records on the three streams, one with a newline inside a value
    assert writer.submit(EXPOSURES, {"request_id": "a", "note": "two\nlines"})
    assert writer.submit(EXPOSURES, {"request_id": "b"})
    assert writer.submit(FEEDBACK, {"event": "click"})
    writer.write_now(AUDIT, {"action": "serving_reload"})
    # When the writer is flushed
    assert writer.flush()
    # Then each file holds its own records, one parseable line each
    logs = tmp_path / "logs"
    assert [r["request_id"] for r in lines(logs / "exposures.jsonl")] == ["a", "b"]
    assert lines(logs / "exposures.jsonl")[0]["note"] == "two\nlines"
    assert lines(logs / "feedback.jsonl") == [{"event": "click"}]
    assert lines(logs / "audit.jsonl") == [{"action": "serving_reload"}]
    assert writer.written == 3


def test_a_full_queue_drops_and_counts_instead_of_blocking(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Given a writer whose drain thread is held up by a slow disk
    writer = ExposureWriter(tmp_path / "exposures.jsonl", queue_size=2)
    release = threading.Event()
    real_write = writer._write

    def slow_write(stream: str, line: str) -> None:
        release.wait(5)
        real_write(stream, line)

    writer._write = slow_write  # type: ignore[method-assign]
    before = metrics.EXPOSURE_DROPPED._value.get()
    # When more records arrive than the queue holds (one is taken by the blocked thread)
    results = [writer.submit(EXPOSURES, {"n": n}) for n in range(10)]
    # Then submit never blocked: the overflow is dropped and counted
    assert results.count(False) >= 7
    assert writer.dropped == results.count(False)
    assert metrics.EXPOSURE_DROPPED._value.get() - before == writer.dropped
    # And what was accepted reaches the file once the disk catches up
    release.set()
    writer.close()
    assert len(lines(tmp_path / "exposures.jsonl")) == results.count(True)


def test_files_rotate_by_size(tmp_path) -> None:  # type: ignore[no-untyped-def]
    writer = ExposureWriter(tmp_path / "exposures.jsonl", max_bytes=200, backup_count=2)
    for n in range(30):
        writer.submit(EXPOSURES, {"n": n, "pad": "x" * 20})
        writer.flush()  # one batch per line: rotation is checked after each batch
    writer.close()
    assert (tmp_path / "exposures.jsonl.1").exists()
    assert (tmp_path / "exposures.jsonl.2").exists()
    assert not (tmp_path / "exposures.jsonl.3").exists()
    for path in tmp_path.glob("exposures.jsonl*"):
        if not path.name.endswith(".lock"):
            assert path.stat().st_size <= 200 + 40  # at most one line beyond the limit
    # the newest lines are in the current file, the older ones in .1 then .2, in order
    kept = [
        r["n"]
        for name in ("exposures.jsonl.2", "exposures.jsonl.1", "exposures.jsonl")
        if (tmp_path / name).exists()
        for r in lines(tmp_path / name)
    ]
    assert kept == list(range(30 - len(kept), 30))


def _write_from_a_process(path: str, tag: str, count: int) -> None:
    writer = ExposureWriter(Path(path), max_bytes=4_000, backup_count=1_000)
    for n in range(count):
        writer.submit(EXPOSURES, {"tag": tag, "n": n, "pad": "y" * 40})
        if n % 10 == 0:  # a batch per 10 lines: ~600 bytes, a rotation every few batches
            writer.flush()
    writer.close()


def test_processes_sharing_one_log_lose_and_repeat_no_line_across_rotations(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Given three worker processes appending to the same rotating file (as gunicorn workers do)
    import multiprocessing

    context = multiprocessing.get_context("fork")
    path = tmp_path / "exposures.jsonl"
    workers = [
        context.Process(target=_write_from_a_process, args=(str(path), tag, 600))
        for tag in ("a", "b", "c")
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    # Then the files rotated many times, and every line of every process is there exactly once
    files = [p for p in tmp_path.glob("exposures.jsonl*") if not p.name.endswith(".lock")]
    # (at least 1,800 x ~60 bytes / 4,000: 27 rotations unless a drain batched many flushes)
    assert len(files) > 5
    seen = [(r["tag"], r["n"]) for f in files for r in lines(f)]
    assert sorted(seen) == sorted((tag, n) for tag in ("a", "b", "c") for n in range(600))


def test_close_flushes_what_is_queued(tmp_path) -> None:  # type: ignore[no-untyped-def]
    writer = ExposureWriter(tmp_path / "exposures.jsonl")
    for n in range(500):
        writer.submit(EXPOSURES, {"n": n})
    writer.close()
    assert [r["n"] for r in lines(tmp_path / "exposures.jsonl")] == list(range(500))


def test_the_path_comes_from_the_reco_setting(settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings.RECO = {**settings.RECO, "EXPOSURE_LOG": str(tmp_path / "x.jsonl")}
    assert default_path() == tmp_path / "x.jsonl"
    settings.RECO = {k: v for k, v in settings.RECO.items() if k != "EXPOSURE_LOG"}
    settings.DATA_DIR = tmp_path
    assert default_path() == tmp_path / "exposures" / "exposures.jsonl"


def test_an_unknown_stream_is_a_programming_error(writer) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="unknown stream"):
        writer.submit("nope", {})
