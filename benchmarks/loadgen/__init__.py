"""A C open-loop HTTP load generator (openloop.c) and its Python wrapper.

Why: the asyncio generator `benchmarks.serving_load._load` costs ~0.5 ms of CPU per request,
so on a 2-core machine it cannot offer more than ~1,100 requests/s and it takes CPU from the
server under test. openloop.c keeps `_load`'s semantics (requests scheduled at start + i/rate,
latency from the *scheduled* time, at most `connections` in flight, a FIFO of due requests,
client timeouts) at a few microseconds of CPU per request. `run_load` returns the same dict as
`_load`, so callers can switch generators without touching their reporting.

The binary is compiled on first use with the system C compiler and cached by source hash.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["LoadRun", "LoadgenUnavailable", "available", "binary", "run_load"]

SOURCE = Path(__file__).with_name("openloop.c")
GENERATOR = "c-openloop"
_binary: Path | None = None


class LoadgenUnavailable(RuntimeError):
    """No C compiler, or openloop.c did not compile: fall back to the Python generator."""


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "recoplatform-loadgen"


def binary() -> Path:
    """Path of the compiled generator, compiling it once per source version.

    Compiled to a temporary name and renamed, so concurrent callers never run a half-written
    file; the name carries the source hash, so an edited openloop.c is rebuilt.
    """
    global _binary
    if _binary is not None and _binary.exists():
        return _binary
    source = SOURCE.read_bytes()
    target = _cache_dir() / f"openloop-{hashlib.sha256(source).hexdigest()[:12]}"
    if not target.exists():
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            raise LoadgenUnavailable("no C compiler (cc or gcc) on PATH to build openloop.c")
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        try:
            done = subprocess.run(
                [cc, "-O2", "-Wall", "-o", tmp, str(SOURCE)],
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                raise LoadgenUnavailable(
                    f"compiling {SOURCE.name} with {cc} failed:\n{done.stderr.strip()}"
                )
            os.chmod(tmp, 0o755)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    _binary = target
    return target


def available() -> bool:
    """Whether the C generator can be used here (builds it if needed)."""
    try:
        binary()
    except (LoadgenUnavailable, OSError):
        return False
    return True


def _value(field: str) -> str | None:
    return None if field == "-" else field


def _parse(text: str) -> tuple[dict[str, str], list[list]]:
    """The header's key=value pairs and the sample rows with Python types."""
    lines = text.splitlines()
    if not lines or not lines[0].startswith("#"):
        raise RuntimeError("openloop wrote no header line")
    header = dict(item.split("=", 1) for item in lines[0][1:].split() if "=" in item)
    rows = []
    for line in lines[1:]:
        offset, latency, status, source, degraded, reason, model, retry = line.split("\t")
        rows.append(
            [
                float(offset),
                None if latency == "-" else float(latency),
                int(status) if status.isdigit() else status,
                _value(source),
                None if degraded == "-" else degraded == "1",
                _value(reason),
                _value(model),
                _value(retry),
            ]
        )
    return header, rows


def _summary(rate: float, header: dict[str, str], rows: list[list], record: bool) -> dict:
    """`_load`'s result dict from the samples, with `_load`'s definitions: percentiles over the
    latencies of completed responses (any status) at index min(n-1, int(p*n)); throughput is
    completed responses over the time from start to the end of the last request."""
    counts = {"ok": 0, "http_4xx": 0, "http_5xx": 0, "errors": 0, "client_timeouts": 0}
    counts["degraded"] = 0
    latencies = []
    for row in rows:
        status = row[2]
        if status == "timeout":
            counts["client_timeouts"] += 1
        elif status == "error":
            counts["errors"] += 1
        else:
            latencies.append(row[1])
            if status >= 500:
                counts["http_5xx"] += 1
            elif status >= 400:
                counts["http_4xx"] += 1
            else:
                counts["ok"] += 1
                counts["degraded"] += row[4] is True
    latencies.sort()

    def pct(p: float) -> float | None:
        if not latencies:
            return None
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))], 2)

    done = len(latencies)
    elapsed = float(header["elapsed_s"])
    extra = {"started_at": float(header["started_at_monotonic"]), "samples": rows} if record else {}
    return {
        "requests_scheduled": int(header["requests"]),
        "requests_completed": done,
        "throughput_rps": round(done / elapsed, 1) if elapsed > 0 else 0.0,
        "target_rps": rate,
        "p50_ms": pct(0.50),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
        "max_ms": pct(1.0),
        **counts,
        "degraded_share": round(counts["degraded"] / max(1, counts["ok"]), 4),
        **extra,
        "generator": GENERATOR,
    }


class LoadRun:
    """A generator run started now and collected with `result()`, so that the caller can
    inject faults while it runs (the C counterpart of serving_load.LoadProcess)."""

    def __init__(
        self,
        host: str,
        port: int,
        paths: list[str],
        rate: float,
        duration: float,
        connections: int,
        *,
        timeout: float = 2.0,
        record: bool = False,
        seed: int = 7,
    ) -> None:
        if not paths or any(not p or any(c.isspace() for c in p) for p in paths):
            raise ValueError("paths must be non-empty strings without whitespace")
        self.rate, self.duration, self.timeout, self.record = rate, duration, timeout, record
        exe = binary()
        self._dir = tempfile.TemporaryDirectory(prefix="openloop-")
        work = Path(self._dir.name)
        (work / "paths.txt").write_text("\n".join(paths) + "\n")
        self._samples = work / "samples.tsv"
        args = [host, port, repr(float(rate)), repr(float(duration)), connections, timeout]
        args += [work / "paths.txt", self._samples, seed]
        try:
            self._proc = subprocess.Popen(
                [str(exe), *map(str, args)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        except OSError:
            self._dir.cleanup()
            raise

    def result(self) -> dict:
        """Wait for the run to end and summarise it like `_load`."""
        try:
            _, err = self._proc.communicate(timeout=self.duration + self.timeout + 60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
            self._dir.cleanup()
            raise
        try:
            if self._proc.returncode != 0:
                raise RuntimeError(f"openloop exited {self._proc.returncode}: {err.strip()}")
            header, rows = _parse(self._samples.read_text())
        finally:
            self._dir.cleanup()
        return _summary(self.rate, header, rows, self.record)


def run_load(
    host: str,
    port: int,
    paths: list[str],
    rate: float,
    duration: float,
    connections: int,
    *,
    timeout: float = 2.0,
    record: bool = False,
    seed: int = 7,
) -> dict:
    """Drive `rate` requests/s for `duration` s over at most `connections` connections.

    Returns `benchmarks.serving_load._load`'s dict (plus `"generator": "c-openloop"`); with
    `record`, `started_at` (a `time.monotonic()` value) and `samples`, one per request in
    scheduled order: `[offset_s, latency_ms, status, source, degraded, degrade_reason,
    model_version, retry_after]`, latency None and status "timeout"/"error" for a client
    timeout or a connection error. `seed` picks the path sequence (the C generator's own PRNG,
    not Python's, so the sequence differs from `_load`'s for the same seed).
    """
    return LoadRun(
        host, port, paths, rate, duration, connections, timeout=timeout, record=record, seed=seed
    ).result()
