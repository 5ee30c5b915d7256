"""The C open-loop generator (benchmarks/loadgen) against a tiny HTTP server started here.

The server counts the requests it receives per path, which is the oracle for the generator's
per-class counts; the generator's summary must have `benchmarks.serving_load._load`'s shape.
No timing thresholds: only counts, statuses, parsed fields and the schedule are asserted.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from benchmarks import loadgen
from benchmarks.serving_load import _load, free_port

pytestmark = pytest.mark.skipif(
    not loadgen.available(), reason="no C compiler: benchmarks/loadgen/openloop.c cannot be built"
)

TIMEOUT = 0.5  # client timeout; /slow answers only when the test ends


def _json(doc: dict) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


BODIES = {
    "/ok": _json(
        {
            "request_id": "a",
            "model_version": "v1",
            "source": "redis",
            "degraded": False,
            "degrade_reason": None,
            "items": [{"item_id": 1, "score": 0.5}],
        }
    ),
    "/degraded": _json(
        {
            "request_id": "b",
            "model_version": None,
            "source": "fallback",
            "degraded": True,
            "degrade_reason": "redis_down",
            "items": [],
        }
    ),
    "/chunked": _json(
        {
            "model_version": "v2",
            "source": "popular",
            "degraded": True,
            "degrade_reason": "ranker_timeout",
            "items": [],
        }
    ),
    "/busy": _json({"detail": "overloaded"}),
    "/missing": b"<h1>not found</h1>",
}
BODIES["/slow"] = BODIES["/ok"]
# (status, source, degraded, degrade_reason, model_version, retry_after) per path
EXPECTED = {
    "/ok": (200, "redis", False, None, "v1", None),
    "/slow": (200, "redis", False, None, "v1", None),
    "/degraded": (200, "fallback", True, "redis_down", None, None),
    "/chunked": (200, "popular", True, "ranker_timeout", "v2", None),
    "/busy": (503, None, None, None, None, "1"),
    "/missing": (404, None, None, None, None, None),
}


class Server(ThreadingHTTPServer):
    """`mode`: "keepalive" (HTTP/1.1, Content-Length), "close" (`Connection: close` on every
    response, as gunicorn's sync workers; /degraded without Content-Length, so its body runs
    to EOF) or "drop" (keep-alive implied, but the server closes after every response, as an
    idle keep-alive timeout does)."""

    daemon_threads = True
    request_queue_size = 256  # socketserver's 5 drops SYNs under a burst of new connections

    def __init__(self, mode: str) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.mode = mode
        self.hits: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.release = threading.Event()

    def handle_error(self, request, client_address) -> None:
        """A client that timed out closed the socket /slow writes to: expected here."""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        with self.server.lock:
            self.server.hits[path] += 1
        if path == "/slow":
            self.server.release.wait(10)
        body = BODIES.get(path, BODIES["/missing"])
        status = EXPECTED.get(path, EXPECTED["/missing"])[0]
        mode = self.server.mode
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if status == 503:
            self.send_header("Retry-After", "1")
        if mode == "close":
            self.send_header("Connection", "close")
        if mode in ("close", "drop"):
            self.close_connection = True
        if path == "/chunked":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            cut = body.index(b"true") + 2  # split inside a value the scan must find
            for part in (body[:cut], body[cut:]):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
            return
        if not (mode == "close" and path == "/degraded"):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def serve() -> Iterator:
    servers: list[Server] = []

    def start(mode: str) -> Server:
        server = Server(mode)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.release.set()
        server.shutdown()
        server.server_close()


def _load_reference(result: dict) -> dict:
    """`_load`'s summary computed from the recorded samples with `_load`'s definitions."""
    latencies = sorted(s[1] for s in result["samples"] if isinstance(s[2], int))
    n = len(latencies)
    return {
        f"p{p}_ms" if p != 100 else "max_ms": round(latencies[min(n - 1, int(p / 100 * n))], 2)
        for p in (50, 95, 99, 100)
    }


def _check(result: dict, server: Server, rate: float, total: int) -> None:
    hits = server.hits
    assert sum(hits.values()) == total  # every request sent exactly once
    assert result["requests_scheduled"] == total
    assert result["ok"] == hits["/ok"] + hits["/degraded"] + hits["/chunked"]
    assert result["degraded"] == hits["/degraded"] + hits["/chunked"]
    assert result["http_5xx"] == hits["/busy"]
    assert result["http_4xx"] == hits["/missing"]
    assert result["client_timeouts"] == hits["/slow"]
    assert result["errors"] == 0
    assert result["requests_completed"] == result["ok"] + result["http_4xx"] + result["http_5xx"]
    assert result["degraded_share"] == round(result["degraded"] / max(1, result["ok"]), 4)
    assert result["generator"] == "c-openloop"
    samples = result["samples"]
    assert len(samples) == total
    assert [s[0] for s in samples] == [round(i / rate, 4) for i in range(total)]
    rows = Counter()
    for _offset, latency, status, *fields in samples:
        if status == "timeout":
            assert latency is None
            assert fields == [None] * 5
            rows["/slow"] += 1
            continue
        assert isinstance(latency, float)
        assert latency >= 0
        path = next(p for p, e in EXPECTED.items() if e == (status, *fields) and p != "/slow")
        rows[path] += 1
    assert rows == +hits
    assert {k: result[k] for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms")} == _load_reference(
        result
    )


def test_keepalive_server_mixed_classes(serve) -> None:
    server = serve("keepalive")
    port = server.server_address[1]
    paths = ["/ok", "/ok", "/ok?user_id=5&limit=20", "/degraded"]
    paths += ["/busy", "/missing", "/chunked", "/slow"]
    before = time.monotonic()
    result = loadgen.run_load("127.0.0.1", port, paths, 200, 1.0, 64, timeout=TIMEOUT, record=True)
    after = time.monotonic()
    assert before < result["started_at"] < after  # the same clock as time.monotonic()
    _check(result, server, 200, 200)
    assert all(server.hits[p] > 0 for p in EXPECTED)


@pytest.mark.parametrize("mode", ["close", "drop"])
def test_connection_per_request_servers(serve, mode: str) -> None:
    server = serve(mode)
    port = server.server_address[1]
    paths = ["/ok", "/degraded", "/busy"]
    args = ("127.0.0.1", port, paths, 200, 0.25, 16)
    result = loadgen.run_load(*args, record=True)
    _check(result, server, 200, 50)
    if mode == "close":  # the same seed gives the same request sequence
        again = loadgen.run_load(*args, record=True)
        assert [s[2:] for s in again["samples"]] == [s[2:] for s in result["samples"]]
        other = loadgen.run_load(*args, record=True, seed=8)
        assert [s[2:] for s in other["samples"]] != [s[2:] for s in result["samples"]]


def test_same_result_shape_as_python_generator(serve) -> None:
    server = serve("keepalive")
    port = server.server_address[1]
    args = ("127.0.0.1", port, ["/degraded"], 100, 0.3, 8)
    ours = loadgen.run_load(*args, record=True)
    theirs = asyncio.run(_load(*args, record=True))
    assert ours.pop("generator") == "c-openloop"
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        assert type(ours[key]) is type(value), key
    assert ours["target_rps"] == theirs["target_rps"] == 100
    for key in ("requests_scheduled", "requests_completed", "ok", "degraded"):
        assert ours[key] == theirs[key] == 30, key
    assert ours["degraded_share"] == theirs["degraded_share"] == 1.0
    strip = [[s[0], *s[2:]] for s in ours["samples"]]
    assert strip == [[s[0], *s[2:]] for s in theirs["samples"]]
    summary = loadgen.run_load(*args)
    assert list(summary) == [k for k in ours if k not in ("started_at", "samples")] + ["generator"]


def test_refused_connections_are_errors() -> None:
    result = loadgen.run_load("127.0.0.1", free_port(), ["/ok"], 100, 0.2, 4, record=True)
    assert result["requests_scheduled"] == result["errors"] == 20
    assert result["requests_completed"] == 0
    assert result["p50_ms"] is None
    assert result["throughput_rps"] == 0.0
    assert {s[2] for s in result["samples"]} == {"error"}


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["127.0.0.1", "80", "fast", "1", "4", "2", "paths", "out", "7"],
        ["127.0.0.1", "0", "10", "1", "4", "2", "paths", "out", "7"],
        ["127.0.0.1", "80", "10", "1", "4", "2", "/nonexistent/paths", "out", "7"],
    ],
)
def test_bad_arguments_exit_2(args: list[str]) -> None:
    done = subprocess.run([loadgen.binary(), *args], capture_output=True, text=True, timeout=10)
    assert done.returncode == 2
    assert done.stderr.startswith("openloop: ")
    assert done.stderr.count("\n") == 1


def test_binary_is_cached_by_source_hash(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(loadgen, "_binary", None)
    built = loadgen.binary()
    assert built.parent == tmp_path / "recoplatform-loadgen"
    assert built.name.startswith("openloop-")
    assert [p.name for p in built.parent.iterdir()] == [built.name]  # no temporary left
    monkeypatch.setattr(loadgen, "_binary", None)
    assert loadgen.binary() == built


def test_unavailable_without_compiler_or_with_broken_source(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(loadgen, "_binary", None)
    monkeypatch.setattr(loadgen.shutil, "which", lambda name: None)
    with pytest.raises(loadgen.LoadgenUnavailable, match="no C compiler"):
        loadgen.binary()
    assert not loadgen.available()
    monkeypatch.undo()
    broken = tmp_path / "openloop.c"
    broken.write_text("int main(void) { return missing; }\n")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(loadgen, "_binary", None)
    monkeypatch.setattr(loadgen, "SOURCE", broken)
    with pytest.raises(loadgen.LoadgenUnavailable, match="missing"):
        loadgen.binary()
    assert not list((tmp_path / "recoplatform-loadgen").iterdir())
