"""Exposure, feedback and audit logs: JSON lines written off the request path.

A request only serialises its record and puts it on a bounded in-memory queue (`put_nowait`);
a daemon thread drains the queue into size-rotated files. When the queue is full the line is
dropped and counted (`recommendation_exposure_dropped_total`): a slow disk must never slow or
fail a recommendation. The queue is flushed at interpreter exit.

Streams share one writer and one directory: `exposures` goes to RECO["EXPOSURE_LOG"] (default
DATA_DIR/exposures/exposures.jsonl), `feedback` and `audit` to `feedback.jsonl` and
`audit.jsonl` beside it, and the shadow model's answers (`shadow`) to `shadow.jsonl`. Audit
lines are rare and must not be dropped, so `write_now` writes
them synchronously.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import threading
import time
from logging.handlers import RotatingFileHandler
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

_STOP = object()


def default_path() -> Path:
    """RECO["EXPOSURE_LOG"], else DATA_DIR/exposures/exposures.jsonl."""
    configured = getattr(settings, "RECO", {}).get("EXPOSURE_LOG")
    if configured:
        return Path(configured)
    return Path(settings.DATA_DIR) / "exposures" / "exposures.jsonl"


def _dumps(record: dict[str, Any]) -> str:
    # One line per record: json.dumps escapes newlines inside strings.
    return json.dumps(record, separators=(",", ":"), default=str, ensure_ascii=False)


class ExposureWriter:
    """Non-blocking JSON-lines writer with one rotating file per stream."""

    def __init__(
        self,
        path: Path,
        *,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        max_bytes: int = DEFAULT_MAX_BYTES,
        backup_count: int = DEFAULT_BACKUP_COUNT,
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
        self.accepted = 0
        self.dropped = 0
        self.written = 0
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._handlers: dict[str, RotatingFileHandler] = {}
        self._handlers_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()
        self._pid = os.getpid()
        self._closed = False

    # -- the request side ------------------------------------------------------------------

    def submit(self, stream: str, record: dict[str, Any]) -> bool:
        """Queue one record; never blocks. False (and counted) when the queue is full."""
        if stream not in self.paths:
            raise ValueError(f"unknown stream {stream!r}")
        self._ensure_thread()
        try:
            self._queue.put_nowait((stream, _dumps(record)))
        except queue.Full:
            self.dropped += 1
            metrics.EXPOSURE_DROPPED.inc()
            return False
        self.accepted += 1
        if stream == EXPOSURES:
            metrics.EXPOSURES.inc()
        return True

    def queue_size_now(self) -> int:
        """Lines waiting for the writer thread (approximate, for the queue-size gauge)."""
        return self._queue.qsize()

    def write_now(self, stream: str, record: dict[str, Any]) -> None:
        """Write one record synchronously (audit lines: rare, and never to be dropped)."""
        self._write(stream, _dumps(record))

    # -- lifecycle -------------------------------------------------------------------------

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued line is on disk; False if `timeout` passed first."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() >= deadline or not self._thread_alive():
                return False
            time.sleep(0.005)
        for handler in list(self._handlers.values()):
            handler.flush()
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Flush, stop the thread and close the files. Later submits reopen them."""
        self.flush(timeout)
        thread = self._thread
        if thread is not None and thread.is_alive():
            try:
                self._queue.put(_STOP, timeout=timeout)
                thread.join(timeout)
            except queue.Full:
                pass
        self._thread = None
        with self._handlers_lock:
            for handler in self._handlers.values():
                handler.close()
            self._handlers.clear()

    # -- internals -------------------------------------------------------------------------

    def _thread_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _ensure_thread(self) -> None:
        if self._thread_alive() and self._pid == os.getpid():
            return
        with self._thread_lock:
            if self._pid != os.getpid():
                # A forked worker inherits the queue but not the thread: start afresh.
                self._queue = queue.Queue(maxsize=self.queue_size)
                self._handlers = {}
                self._pid = os.getpid()
                self._thread = None
            if not self._thread_alive():
                self._thread = threading.Thread(
                    target=self._drain, name="exposure-writer", daemon=True
                )
                self._thread.start()

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                stream, line = item
                self._write(stream, line)
                self.written += 1
            except Exception:  # a bad disk must not kill the thread; the line is lost
                logger.exception("exposure writer: cannot write a line")
            finally:
                self._queue.task_done()

    def _handler(self, stream: str) -> RotatingFileHandler:
        handler = self._handlers.get(stream)
        if handler is None:
            with self._handlers_lock:
                handler = self._handlers.get(stream)
                if handler is None:
                    path = self.paths[stream]
                    path.parent.mkdir(parents=True, exist_ok=True)
                    handler = RotatingFileHandler(
                        path,
                        maxBytes=self.max_bytes,
                        backupCount=self.backup_count,
                        encoding="utf-8",
                    )
                    handler.setFormatter(logging.Formatter("%(message)s"))
                    self._handlers[stream] = handler
        return handler

    def _write(self, stream: str, line: str) -> None:
        handler = self._handler(stream)
        # handle() takes the handler's lock (emit() alone does not), so the thread and
        # write_now() interleave by whole lines, and rotation happens under the lock.
        handler.handle(logging.makeLogRecord({"msg": line, "levelno": logging.INFO}))


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
