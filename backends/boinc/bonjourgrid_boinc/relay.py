"""A loopback HTTP relay between a worker's BOINC client and whoever coordinates the CE now.

Why: a BOINC client keeps a project under its master URL for good, and the URL
holds the server's address. Attached to the coordinator directly, the client
would lose the project (its tasks, finished results and files) when a successor
with another address takes over. Attached to `http://127.0.0.1:<port>/<ce>/`
instead, it keeps one URL for the CE's whole life; the worker half points the
relay at the current coordinator (`set_upstream`) and the client never notices
a failover.

A request that could not be delivered (connection refused, no route) or was
delivered but never answered (the coordinator died under it) is held until a
new coordinator is known, then sent to it: the client got no reply, so its
state did not change, and the successor starts from what the client tells it.
A request answered with a response is never repeated. The Host header passes
through unchanged, so the coordinator builds every URL of its replies (master,
downloads, uploads) on the client's own loopback URL.

Parsing and rewriting of heads are pure functions; `Relay` does the I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import time
from dataclasses import dataclass
from typing import IO
from urllib.parse import urlsplit

log = logging.getLogger("bonjourgrid.boinc.relay")

HOLD_S = 120.0  # how long a request waits for a coordinator (the worker gives up on the CE sooner: the lease)
CONNECT_TIMEOUT_S = 3.0
RETRY_S = 1.0  # an unreachable coordinator is tried again this often while no successor is known
MAX_HEAD = 64 << 10
MAX_BODY = (1 << 30) + (1 << 20)  # an output file (1 GiB) plus the upload request around it
SPOOL = 4 << 20  # bodies above this wait on disk, not in memory
CHUNK = 64 << 10
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "expect", "te", "upgrade", "transfer-encoding"}


@dataclass(frozen=True)
class Head:
    """A request's first line and headers, as received."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]

    def get(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)

    @property
    def content_length(self) -> int:
        value = self.get("content-length")
        if value is None:
            return 0
        n = int(value)  # ValueError for garbage
        if not 0 <= n <= MAX_BODY:
            raise ValueError(f"content length {n} out of range")
        return n

    @property
    def expects_continue(self) -> bool:
        return (self.get("expect") or "").lower() == "100-continue"


def parse_head(raw: bytes) -> Head:
    """`METHOD target HTTP/1.x` and headers, up to the blank line. ValueError for anything else."""
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or parts[0] not in ("GET", "HEAD", "POST"):
        raise ValueError(f"not an HTTP request: {lines[0][:80]!r}")
    if not parts[1].startswith("/"):
        raise ValueError("only origin-form targets are relayed")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise ValueError(f"bad header line {line[:80]!r}")
        headers.append((name, value.strip()))
    head = Head(parts[0], parts[1], tuple(headers))
    if head.get("transfer-encoding"):
        raise ValueError("chunked request bodies are not relayed")
    return head


def upstream_head(head: Head) -> bytes:
    """The request as the coordinator gets it: same target and Host, one request per connection."""
    keep = [(k, v) for k, v in head.headers if k.lower() not in HOP_BY_HOP]
    lines = [f"{head.method} {head.target} HTTP/1.1", *(f"{k}: {v}" for k, v in keep), "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def response_head(raw: bytes) -> bytes:
    """The coordinator's response head with `Connection: close` (the relay serves one request per connection)."""
    lines = raw.decode("latin-1").split("\r\n")
    if not lines[0].startswith("HTTP/1."):
        raise ValueError(f"not an HTTP response: {lines[0][:80]!r}")
    keep = [ln for ln in lines[1:] if ln and ln.split(":", 1)[0].strip().lower() not in ("connection", "keep-alive")]
    return ("\r\n".join([lines[0], *keep, "Connection: close"]) + "\r\n\r\n").encode("latin-1")


def error_response(code: int, reason: str) -> bytes:
    body = f"{reason}\n".encode()
    return (f"HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n").encode() + body


def parse_upstream(url: str) -> tuple[str, int]:
    """(host, port) of a coordinator's project URL `http://host:port/<ce>/`. ValueError otherwise."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname or parts.port is None:
        raise ValueError(f"not a project URL: {url[:120]!r}")
    return parts.hostname, parts.port


class Relay:
    def __init__(self, port: int, upstream: str, hold_s: float = HOLD_S) -> None:
        self.want_port = port
        self.port = 0
        self.hold_s = hold_s
        self.upstream = parse_upstream(upstream)
        self.generation = 0  # bumped at every new coordinator: held requests go to it
        self._changed = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.relayed = self.replayed = 0

    async def start(self) -> int:
        """Listen on loopback, on the wanted port if free (else any): returns the port."""
        try:
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.want_port, limit=MAX_HEAD)
        except OSError:
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, limit=MAX_HEAD)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    def set_upstream(self, url: str) -> None:
        """A (new) coordinator's project URL. Raises ValueError for a malformed one."""
        target = parse_upstream(url)
        if target == self.upstream:
            return
        log.info("relay: BOINC requests go to %s:%d now", *target)
        self.upstream = target
        self.generation += 1
        self._changed.set()
        self._changed = asyncio.Event()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._handlers):
            t.cancel()
        for t in list(self._handlers):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    # ------------------------------------------------------------------ I/O --

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            pass
        except Exception as e:  # one bad request must not take the relay down
            log.warning("relay: request failed: %s", e)
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = parse_head((await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30))[:-4])
            length = head.content_length
        except (ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError) as e:
            log.warning("relay: dropped a bad request: %s", e)
            writer.write(error_response(400, "Bad Request"))
            return
        if head.expects_continue:
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
        with tempfile.SpooledTemporaryFile(max_size=SPOOL) as body:
            left = length
            while left:
                chunk = await reader.read(min(CHUNK, left))
                if not chunk:
                    return  # the client went away
                body.write(chunk)
                left -= len(chunk)
            await self._forward(head, body, length, writer)

    async def _forward(self, head: Head, body: IO[bytes], length: int, writer: asyncio.StreamWriter) -> None:
        deadline = time.monotonic() + self.hold_s
        while True:
            host, port = self.upstream
            gen = self.generation
            try:
                up_r, up_w = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT_S)
            except (OSError, TimeoutError):
                # Not delivered: try again once a successor is known (or the same one comes back).
                if not await self._wait_change(gen, min(RETRY_S, deadline - time.monotonic()), deadline):
                    writer.write(error_response(502, "Bad Gateway"))
                    return
                continue
            try:
                answered = await self._exchange(head, body, length, up_r, up_w, gen, writer)
            finally:
                up_w.close()
            if answered:
                self.relayed += 1
                return
            # Delivered, never answered: the coordinator died under it. The client saw no reply,
            # so the request goes, unchanged, to the next coordinator.
            if not await self._wait_change(gen, deadline - time.monotonic(), deadline, strict=True):
                writer.write(error_response(502, "Bad Gateway"))
                return
            self.replayed += 1
            log.info("relay: %s %s sent again, to the new coordinator", head.method, head.target.split("?")[0])

    async def _exchange(self, head: Head, body: IO[bytes], length: int, up_r: asyncio.StreamReader,
                        up_w: asyncio.StreamWriter, gen: int, writer: asyncio.StreamWriter) -> bool:
        """Send the request, pass the response back. False if no response came (nothing reached the client)."""
        try:
            up_w.write(upstream_head(head))
            body.seek(0)
            sent = 0
            while sent < length:
                chunk = body.read(CHUNK)
                up_w.write(chunk)
                sent += len(chunk)
                await up_w.drain()
            await up_w.drain()
            raw = await self._response_head(up_r, gen)
            if raw is None:
                return False
            out = response_head(raw[:-4])
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            return False
        writer.write(out)
        while True:  # from here on the client has a response: pass it through, however it ends
            try:
                chunk = await up_r.read(CHUNK)
            except OSError:
                break
            if not chunk:
                break
            writer.write(chunk)
            await writer.drain()
        await writer.drain()
        return True

    async def _response_head(self, up_r: asyncio.StreamReader, gen: int) -> bytes | None:
        """The response head, or None if the coordinator is replaced (or the connection dies) before it comes."""
        read = asyncio.ensure_future(up_r.readuntil(b"\r\n\r\n"))
        changed = asyncio.ensure_future(self._changed_after(gen))
        try:
            done, _ = await asyncio.wait({read, changed}, timeout=self.hold_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            changed.cancel()
        if read in done and read.exception() is None:
            return read.result()
        read.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await read
        return None

    async def _changed_after(self, gen: int) -> None:
        while self.generation == gen:
            await self._changed.wait()

    async def _wait_change(self, gen: int, timeout: float, deadline: float, strict: bool = False) -> bool:
        """Wait up to `timeout` for a new coordinator. True: go on (with `strict`, only if one came)."""
        if time.monotonic() >= deadline:
            return False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed_after(gen), max(timeout, 0.0))
        changed = self.generation != gen
        return changed or (not strict and time.monotonic() < deadline)
