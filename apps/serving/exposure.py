"""Exposure, feedback, audit and shadow logs: JSON lines written off the request path.

A request only serialises its record and appends it to a bounded in-memory buffer (a deque:
no lock, no thread wake-up per request); a daemon thread wakes every `FLUSH_INTERVAL` seconds
and writes everything buffered with one `write()` per stream. When the buffer is full the line
is dropped and counted (`recommendation_exposure_dropped_total`): a slow disk must never slow
or fail a recommendation. The buffer is flushed at interpreter exit.

Several processes (gunicorn workers) write the same files safely: each opens them with
`O_APPEND` (the kernel positions every write at the end, so whole batches never overwrite or
interleave with another process's), rotation happens under an exclusive `flock` on a lock
file beside the log and re-checks the size after taking it, and a writer that finds the path
now names another inode (someone rotated) reopens before its next batch. Python's
RotatingFileHandler is not safe here: each process would rotate on its own count and rename
the others' files away.

Streams share one writer and one directory: `exposures` goes to RECO["EXPOSURE_LOG"] (default
DATA_DIR/exposures/exposures.jsonl), `feedback` and `audit` to `feedback.jsonl` and
`audit.jsonl` beside it, and the shadow model's answers (`shadow`) to `shadow.jsonl`. Audit
lines are rare and must not be dropped, so `write_now` writes them synchronously.
"""

from __future__ import annotations

import atexit
import collections
import fcntl
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from django.conf import settings

from apps.serving import metrics

logger = logging.getLogger(__name__)

EXPOSURES = "exposures"
FEEDBACK = "feedback"
AUDIT = "audit"
SHADOW = "shadow"
STREAMS = (EXPOSURES, FEEDBACK, AUDIT, SHADOW)

# About 100 ms of peak traffic per worker; beyond that the disk is not keeping up and dropping
# is better than holding memory.
DEFAULT_QUEUE_SIZE = 10_000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_BACKUP_COUNT = 5
# How long a line may wait in memory before the writer thread writes it.
FLUSH_INTERVAL = 0.05


def default_path() -> Path:
    """RECO["EXPOSURE_LOG"], else DATA_DIR/exposures/exposures.jsonl."""
    configured = getattr(settings, "RECO", {}).get("EXPOSURE_LOG")
    if configured:
        return Path(configured)
    return Path(settings.DATA_DIR) / "exposures" / "exposures.jsonl"


def _dumps(record: dict[str, Any]) -> str:
    # One line per record: json.dumps escapes newlines inside strings.
    return json.dumps(record, separators=(",", ":"), default=str, ensure_ascii=False)


class _AppendFile:
    """One log file opened O_APPEND, rotated by size under a cross-process flock."""

    def __init__(self, path: Path, max_bytes: int, backup_count: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backup_count = backup_count
        self._fd: int | None = None
        self._ino: int | None = None
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self._lock:
            fd = self._open()
            os.write(fd, data)
            if self.max_bytes and os.fstat(fd).st_size >= self.max_bytes:
                self._rotate()

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
            self._fd = self._ino = None

    def _open(self) -> int:
        try:
            current = os.stat(self.path).st_ino
        except FileNotFoundError:
            current = None
        if self._fd is not None and current == self._ino:
            return self._fd
        if self._fd is not None:  # rotated (or removed) by someone: follow the path
            os.close(self._fd)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._ino = os.fstat(self._fd).st_ino
        return self._fd

    def _rotate(self) -> None:
        lock_path = self.path.with_name(self.path.name + ".lock")
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                try:
                    if os.stat(self.path).st_size < self.max_bytes:
                        return  # another process rotated while we waited
                except FileNotFoundError:
                    return
                if self.backup_count <= 0:
                    os.truncate(self.path, 0)
                    return
                for n in range(self.backup_count - 1, 0, -1):
                    older = self.path.with_name(f"{self.path.name}.{n}")
                    if older.exists():
                        os.replace(older, self.path.with_name(f"{self.path.name}.{n + 1}"))
                os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


class ExposureWriter:
    """Non-blocking JSON-lines writer with one append-only, size-rotated file per stream."""

    def __init__(
        self,
        path: Path,
        *,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        max_bytes: int = DEFAULT_MAX_BYTES,
        backup_count: int = DEFAULT_BACKUP_COUNT,
        flush_interval: float = FLUSH_INTERVAL,
    ) -> None:
        self.path = Path(path)
        self.paths = {
            EXPOSURES: self.path,
            FEEDBACK: self.path.with_name("feedback.jsonl"),
            AUDIT: self.path.with_name("audit.jsonl"),
            SHADOW: self.path.with_name("shadow.jsonl"),
        }
        self.queue_size = queue_size
        self.max_bytes = max_bytes
        self.backup_count = backup_count
        self.flush_interval = flush_interval
        self.accepted = 0
        self.dropped = 0
        self.written = 0
        self._buffer: collections.deque[tuple[str, str]] = collections.deque()
        self._in_flight = 0  # lines taken from the buffer, not yet written
        self._files: dict[str, _AppendFile] = {}
        self._files_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()
        self._pid = os.getpid()

    # -- the request side ------------------------------------------------------------------

    def submit(self, stream: str, record: dict[str, Any]) -> bool:
        """Buffer one record; never blocks. False (and counted) when the buffer is full."""
        if stream not in self.paths:
            raise ValueError(f"unknown stream {stream!r}")
        self._ensure_thread()
        if len(self._buffer) >= self.queue_size:
            self.dropped += 1
            metrics.EXPOSURE_DROPPED.inc()
            return False
        self._buffer.append((stream, _dumps(record)))  # deque.append is atomic
        self.accepted += 1
        if stream == EXPOSURES:
            metrics.EXPOSURES.inc()
        return True

    def queue_size_now(self) -> int:
        """Lines waiting for the writer thread (for the queue-size gauge)."""
        return len(self._buffer) + self._in_flight

    def write_now(self, stream: str, record: dict[str, Any]) -> None:
        """Write one record synchronously (audit lines: rare, and never to be dropped)."""
        self._file(stream).write((_dumps(record) + "\n").encode("utf-8"))

    # -- lifecycle -------------------------------------------------------------------------

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every buffered line is on disk; False if `timeout` passed first."""
        deadline = time.monotonic() + timeout
        self._wake.set()
        while self._buffer or self._in_flight:
            if time.monotonic() >= deadline or not self._thread_alive():
                return False
            self._wake.set()
            time.sleep(0.002)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Flush, stop the thread and close the files. Later submits reopen them."""
        self.flush(timeout)
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._stop = True
            self._wake.set()
            thread.join(timeout)
        self._thread = None
        self._stop = False
        with self._files_lock:
            for handle in self._files.values():
                handle.close()
            self._files.clear()

    # -- internals -------------------------------------------------------------------------

    def _thread_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _ensure_thread(self) -> None:
        if self._pid == os.getpid() and self._thread_alive():
            return
        with self._thread_lock:
            if self._pid != os.getpid():
                # A forked worker inherits the buffer and descriptors but not the thread.
                self._buffer = collections.deque()
                self._in_flight = 0
                self._files = {}
                self._pid = os.getpid()
                self._thread = None
            if not self._thread_alive():
                self._thread = threading.Thread(
                    target=self._drain, name="exposure-writer", daemon=True
                )
                self._thread.start()

    def _file(self, stream: str) -> _AppendFile:
        handle = self._files.get(stream)
        if handle is None:
            with self._files_lock:
                handle = self._files.get(stream)
                if handle is None:
                    handle = _AppendFile(self.paths[stream], self.max_bytes, self.backup_count)
                    self._files[stream] = handle
        return handle

    def _drain(self) -> None:
        gauge = metrics.QUEUE_SIZE.labels(pool="exposure_log")
        while True:
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            gauge.set(len(self._buffer))  # what piled up in one interval
            self._write_buffered()
            if self._stop:
                self._write_buffered()
                return

    def _write_buffered(self) -> None:
        buffer = self._buffer
        taken = len(buffer)  # only this thread pops, so at least this many are there
        if not taken:
            return
        # Counted in flight before they leave the buffer: flush() never sees both empty
        # while lines are still on their way to disk.
        self._in_flight += taken
        batches: dict[str, list[str]] = {}
        for _ in range(taken):
            stream, line = buffer.popleft()
            batches.setdefault(stream, []).append(line)
        for stream, lines in batches.items():
            try:
                self._write(stream, lines)
                self.written += len(lines)
            except Exception:  # a bad disk must not kill the thread; these lines are lost
                logger.exception("exposure writer: cannot write %d lines", len(lines))
        self._in_flight -= taken

    def _write(self, stream: str, lines: list[str]) -> None:
        """One write() per batch; rotation is checked after each batch, so a file may end a
        batch beyond max_bytes (keep batches small relative to it)."""
        self._file(stream).write(("\n".join(lines) + "\n").encode("utf-8"))


_writer: ExposureWriter | None = None
_writer_lock = threading.Lock()


def get_writer() -> ExposureWriter:
    """The process's writer, created on first use at `default_path()`."""
    global _writer
    if _writer is None:
        with _writer_lock:
            if _writer is None:
                _writer = ExposureWriter(default_path())
    return _writer


def set_writer(writer: ExposureWriter | None) -> ExposureWriter | None:
    """Replace the process's writer (tests); returns the previous one, not closed."""
    global _writer
    with _writer_lock:
        previous, _writer = _writer, writer
    return previous


@atexit.register
def _close_at_exit() -> None:
    if _writer is not None:
        _writer.close(timeout=2.0)
