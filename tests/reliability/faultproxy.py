"""A small asyncio TCP proxy that puts faults between a client and a service it started.

Toxiproxy is not packaged here and `tc netem` lacks its kernel module (RELIABILITY.md), so the
reliability scenarios put this in front of their private Redis. Modes, switchable at any time
and applied to connections already open (a serving client's pooled connections are open long
before the fault starts):

- ``pass``: bytes flow both ways untouched.
- ``latency``: every chunk, both ways, is delivered ``latency_ms`` after it arrived (order
  kept; throughput is not throttled, as on a long link).
- ``blackhole``: new and open connections are accepted and read, nothing is forwarded: the
  peer looks alive and never answers.
- ``reset``: open connections are closed with a TCP RST, new ones are reset at once.

The proxy runs its own event loop in a daemon thread, so a test drives it with plain calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

PASS = "pass"
LATENCY = "latency"
BLACKHOLE = "blackhole"
RESET = "reset"
MODES = (PASS, LATENCY, BLACKHOLE, RESET)

_CHUNK = 64 * 1024


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0) instead of FIN: the peer sees ECONNRESET."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass(eq=False)  # hashed by identity: kept in a set of open links
class _Link:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class FaultProxy:
    """`FaultProxy(upstream_port).start()` listens on a free loopback port (`port`)."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.mode = PASS
        self.latency_s = 0.0
        self.accepted = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._links: set[_Link] = set()

    # -- control (called from the test's thread) -------------------------------------------

    def start(self) -> FaultProxy:
        self._thread.start()
        self._call(self._start())
        return self

    def set_mode(self, mode: str, *, latency_ms: float = 0.0) -> None:
        """Switch every connection, open or new, to `mode`."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {MODES}")
        self._call(self._set_mode(mode, latency_ms / 1000.0))

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    # -- internals (on the proxy's loop) ---------------------------------------------------

    def _call(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, backlog=512)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            self._drop(link, reset=False)

    async def _set_mode(self, mode: str, latency_s: float) -> None:
        self.mode = mode
        self.latency_s = latency_s
        if mode == RESET:
            for link in list(self._links):
                self._drop(link, reset=True)

    def _drop(self, link: _Link, *, reset: bool) -> None:
        self._links.discard(link)
        for task in link.tasks:
            task.cancel()
        for writer in (link.client, link.upstream):
            if reset:
                _abort(writer)
            else:
                writer.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.mode == RESET:
            _abort(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            _abort(writer)  # upstream refused: the client sees the refusal as a reset
            return
        link = _Link(writer, up_writer)
        self._links.add(link)
        link.tasks = [
            asyncio.create_task(self._pump(link, reader, up_writer)),
            asyncio.create_task(self._pump(link, up_reader, writer)),
        ]

    async def _pump(
        self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Copy one direction; chunks are queued with their due time so latency does not
        accumulate from chunk to chunk."""
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        sender = asyncio.create_task(self._send(queue, writer))
        try:
            while True:
                data = await reader.read(_CHUNK)
                if not data:
                    break
                if self.mode == BLACKHOLE:
                    continue  # swallowed: the peer waits forever
                queue.put_nowait((time.monotonic() + self.latency_s * (self.mode == LATENCY), data))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            queue.put_nowait(None)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sender, timeout=self.latency_s + 1)
            if link in self._links:
                self._drop(link, reset=False)

    @staticmethod
    async def _send(
        queue: asyncio.Queue[tuple[float, bytes] | None], writer: asyncio.StreamWriter
    ) -> None:
        while (job := await queue.get()) is not None:
            due, data = job
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                writer.write(data)
                await writer.drain()
            except OSError:
                return


@contextlib.contextmanager
def fault_proxy(upstream_port: int) -> Iterator[FaultProxy]:
    """A started proxy in front of `upstream_port`, closed afterwards."""
    proxy = FaultProxy(upstream_port).start()
    try:
        yield proxy
    finally:
        proxy.close()
