"""The CE bus: publish/subscribe over MQTT, every message a sealed envelope.

Why this shape:
- paho-mqtt runs inside the asyncio event loop (its socket is watched with
  add_reader/add_writer, keepalive is driven by a timer), not in a thread of its
  own: handlers then run in the loop without a thread hop, and a QoS 1 round trip
  costs a fraction of a millisecond with TCP_NODELAY, which paho never sets.
- Anything that does not open as an envelope of this grid (forged, replayed,
  stale, oversized, garbage) is dropped, counted per reason in `dropped` and
  logged at warning at most once per reason every `DropLog.interval` seconds: a
  flood of bad packets neither crashes the daemon nor floods its log.
- Last wills. The broker publishes a will long after it was handed over at
  connect time, while `Opener` refuses anything older than 60 s. A will is
  therefore sealed at connect time with a *separate* key (`derive("bus-will")`)
  and a long window (`WILL_MAX_AGE_S`). A separate key matters: had wills simply
  been exempt from the timestamp check, any captured ordinary message could be
  replayed as "old but accepted". Its nonce is the connection's `session` id, so
  the application can tell a will of the current connection from one of a
  connection it already knows to be over; nonces are still remembered, so the
  same will is delivered once per receiver. Receivers try the will key only
  after the ordinary key failed, so ordinary messages cost one HMAC.
- Credentials: the broker admits one username/password per CE, derived from the
  grid key (`bus_credentials`), so only grid members can connect at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import inspect
import logging
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from . import eager
from .envelope import MAX_MESSAGE_BYTES, BadMessage, Envelope, Opener, new_nonce, seal
from .gridkey import GridKey

log = logging.getLogger(__name__)

TOPIC_ROOT = "bg"
WILL_PURPOSE = "bus-will"
RECONNECT_EVERY_S = 0.5  # a member whose broker connection dropped (a stall, a link down) tries again this often
WILL_MAX_AGE_S = 30 * 24 * 3600.0  # a connection may live for weeks; its will is sealed when it opens
READ_BURST = 256  # packets read per readable event at most, so one busy peer cannot starve the loop
# publish() waits while this many QoS>0 messages await PUBACK: bounded memory, and paho scans its whole
# outgoing queue on every PUBACK, so letting it queue beyond its in-flight window costs O(n) per message
DEFAULT_MAX_INFLIGHT = 100

Handler = Callable[[str, Envelope], Awaitable[None] | None]


class BusError(Exception):
    """The bus cannot do what was asked (broker unreachable, refused, not connected); the message says which."""


# -- pure parts ----------------------------------------------------------------------------


def _check_name(what: str, value: str) -> str:
    if not value or any(c in value for c in "/+#\0"):
        raise ValueError(f"bad {what} {value!r}: must be non-empty, without '/', '+', '#' or NUL")
    return value


def topic(grid: str, ce: str, *parts: str) -> str:
    """`bg/<grid>/ce/<ce>/<parts...>`; a part may be a whole-level wildcard '+' or a final '#' (for filters)."""
    _check_name("grid", grid)
    _check_name("ce", ce)
    for i, p in enumerate(parts):
        if p == "+" or (p == "#" and i == len(parts) - 1):
            continue
        _check_name("topic part", p)
    return "/".join((TOPIC_ROOT, grid, "ce", ce, *parts))


def is_filter(t: str) -> bool:
    return any(level in ("+", "#") for level in t.split("/"))


def bus_credentials(key: GridKey, grid: str, ce: str) -> tuple[str, str]:
    """Broker username/password for one CE: anyone holding the grid key can compute them, nobody else can."""
    _check_name("grid", grid)
    _check_name("ce", ce)
    username = f"bg/{grid}/{ce}"
    password = hmac.new(key.derive("bus-auth"), f"{grid}\0{ce}".encode(), hashlib.sha256).hexdigest()
    return username, password


def will_key(key: GridKey) -> GridKey:
    """The key last wills are sealed with: separate, so an ordinary message can never pass as a (long-lived) will."""
    return GridKey(key.derive(WILL_PURPOSE))


def seal_will(key: GridKey, grid: str, env: Envelope, session: str, now: float) -> bytes:
    return seal(will_key(key), grid, replace(env, nonce=session), now)


class Decoder:
    """Opens bus payloads: ordinary envelopes within 60 s, or wills sealed with the will key within WILL_MAX_AGE_S."""

    def __init__(self, key: GridKey, grid: str, max_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.opener = Opener(key, grid, max_bytes=max_bytes)
        self.will_opener = Opener(will_key(key), grid, window_s=WILL_MAX_AGE_S, max_bytes=max_bytes)

    def open(self, data: bytes, now: float) -> tuple[Envelope, bool]:
        """(envelope, is_will), or BadMessage."""
        try:
            return self.opener.open(data, now), False
        except BadMessage as e:
            if e.reason != "bad-signature":
                raise
            try:
                return self.will_opener.open(data, now), True
            except BadMessage as e2:
                if e2.reason == "bad-signature":
                    raise e from None
                raise


class DropLog:
    """Counts dropped messages per reason; logs each reason at most once per `interval` (rate-limited)."""

    def __init__(
        self, logger: logging.Logger = log, interval: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.counts: Counter[str] = Counter()
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def drop(self, reason: str, detail: str = "", where: str = "") -> bool:
        """Count one drop; True if it was logged."""
        self.counts[reason] += 1
        now = self.clock()
        last = self._last.get(reason)
        if last is not None and now - last < self.interval:
            self._suppressed[reason] += 1
            return False
        self._last[reason] = now
        more = self._suppressed.pop(reason, 0)
        extra = f" (+{more} more since the last report)" if more else ""
        self.logger.warning("dropped bus message on %s: %s%s", where or "?", detail or reason, extra)
        return True


def _has_data(sock: socket.socket) -> bool:
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True  # let paho's next read see the error and report the lost connection


def parse_url(url: str) -> tuple[str, int]:
    """`mqtt://host:port` (or tcp://) -> (host, port); port defaults to 1883."""
    parts = urlsplit(url if "://" in url else f"mqtt://{url}")
    if parts.scheme not in ("mqtt", "tcp"):
        raise BusError(f"unsupported broker URL {url!r}: expected mqtt://HOST:PORT")
    if not parts.hostname:
        raise BusError(f"broker URL {url!r} names no host")
    try:
        port = parts.port or 1883
    except ValueError:
        raise BusError(f"broker URL {url!r} has a bad port") from None
    return parts.hostname, port


# -- the bus ---------------------------------------------------------------------------------


@dataclass
class _Subscription:
    pattern: str
    handler: Handler
    qos: int
    waiting: deque[tuple[str, Envelope]] = field(default_factory=deque)  # not handed to the handler yet
    task: asyncio.Task[None] | None = None  # a handler that had to wait, then the messages behind it


class Bus:
    """One MQTT connection of a CE member. Create, `await connect()`, subscribe/publish, `await close()`."""

    def __init__(
        self,
        url: str,
        key: GridKey,
        grid: str,
        client_id: str,
        *,
        will: tuple[str, Envelope] | None = None,
        keepalive: float = 5.0,
        username: str | None = None,
        password: str | None = None,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
    ) -> None:
        self.url = url
        self.host, self.port = parse_url(url)
        self.grid = grid
        self.client_id = client_id
        self.keepalive = max(1, round(keepalive))  # MQTT counts keepalive in whole seconds
        self.on_disconnect: Callable[[str], None] | None = None
        self.connected = False
        self.session = ""  # random id of the current connection, the nonce of its will
        self.handler_errors = 0
        self._key = key
        self._will = will
        if will is not None and is_filter(will[0]):
            raise ValueError(f"a will topic cannot be a filter: {will[0]!r}")
        self._drops = DropLog()
        self._decoder = Decoder(key, grid)
        self._subs: list[_Subscription] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._connect_fut: asyncio.Future[None] | None = None
        self._close_fut: asyncio.Future[None] | None = None
        self._suback: dict[int, asyncio.Future[list[Any]]] = {}
        self._closing = False
        self._misc_task: asyncio.Task[None] | None = None
        self._unacked: set[int] = set()  # mids of QoS>0 publishes awaiting PUBACK
        self._acks_drained: asyncio.Event | None = None
        self._sock: Any = None
        self._writer_on = False
        self._flush_scheduled = False
        self._first_of_turn = False  # a write is scheduled, nothing published since: publish writes now

        c = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True, reconnect_on_failure=False
        )
        self._window = max(1, max_inflight)
        c.max_inflight_messages_set(self._window)
        c.max_queued_messages_set(0)
        if username is not None:
            c.username_pw_set(username, password)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        c.on_publish = self._on_publish
        c.on_socket_open = self._on_socket_open
        c.on_socket_close = self._on_socket_close
        c.on_socket_register_write = self._on_register_write
        c.on_socket_unregister_write = self._on_unregister_write
        self._client = c

    @property
    def dropped(self) -> Counter[str]:
        return self._drops.counts

    # -- public API ----------------------------------------------------------------------

    async def connect(self, timeout: float = 5.0) -> None:
        """Open the connection (with a freshly sealed will) and wait for the broker's CONNACK."""
        if self.connected:
            return
        loop = asyncio.get_running_loop()
        self._loop, self._loop_thread = loop, threading.get_ident()
        self._closing = False
        self._acks_drained = asyncio.Event()
        self._acks_drained.set()
        self._unacked.clear()
        self.session = new_nonce()
        if self._will is not None:
            wtopic, wenv = self._will
            payload = seal_will(self._key, self.grid, wenv, self.session, time.time())
            self._client.will_set(wtopic, payload, qos=1, retain=False)
        self._connect_fut = loop.create_future()
        deadline = loop.time() + timeout
        with contextlib.suppress(RuntimeError):  # paho refuses to change it once a connection was made
            self._client.connect_timeout = timeout
        try:
            # the TCP connect blocks (up to `timeout` for a dead host): keep it off the event loop
            await asyncio.wait_for(
                loop.run_in_executor(None, self._client.connect, self.host, self.port, self.keepalive), timeout
            )
        except (TimeoutError, OSError) as e:
            self._teardown_socket()
            why = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
            raise BusError(f"cannot reach the MQTT broker at {self.url}: {why}") from None
        sock = self._client.socket()
        if sock is None:
            raise BusError(f"cannot reach the MQTT broker at {self.url}: connection closed at once")
        self._sock = sock
        loop.add_reader(sock, self._on_readable)
        self._flush()
        try:
            await asyncio.wait_for(asyncio.shield(self._connect_fut), max(0.01, deadline - loop.time()))
        except TimeoutError:
            self._teardown_socket()
            raise BusError(f"the MQTT broker at {self.url} did not answer CONNECT within {timeout:g} s") from None
        except BusError:
            self._teardown_socket()
            raise
        self._misc_task = loop.create_task(self._misc_loop(), name=f"bus-keepalive-{self.client_id}")
        # resubscribe (clean session): subscriptions made before connect, or before a reconnect
        for sub in self._subs:
            await self._send_subscribe(sub)
        self._dispatch()  # what came before a reconnect and was not handled yet

    async def close(self) -> None:
        """Clean disconnect (the broker does not fire the will); stops handler tasks. Idempotent."""
        self._closing = True
        if self.connected and self._loop is not None:
            self._close_fut = self._loop.create_future()
            self._client.disconnect()
            self._flush()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._close_fut, 2.0)
        self.connected = False
        self._teardown_socket()
        if self._misc_task is not None:
            self._misc_task.cancel()
            self._misc_task = None
        for sub in self._subs:
            if sub.task is not None:
                sub.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await sub.task
                sub.task = None

    async def publish(self, topic: str, env: Envelope, qos: int = 1, retain: bool = False) -> None:
        """Seal `env` and hand it to the connection; waits only while `max_inflight` QoS>0 messages await PUBACK."""
        if not self.connected:
            raise BusError(f"not connected to the MQTT broker at {self.url}")
        if is_filter(topic):
            raise ValueError(f"cannot publish to a topic filter: {topic!r}")
        data = seal(self._key, self.grid, env, time.time())
        if len(data) > MAX_MESSAGE_BYTES:
            raise BusError(f"message of {len(data)} bytes exceeds the bus limit of {MAX_MESSAGE_BYTES}")
        while qos > 0 and len(self._unacked) >= self._window and self._acks_drained is not None:
            self._acks_drained.clear()
            await self._acks_drained.wait()
            if not self.connected:
                raise BusError(f"lost the connection to the MQTT broker at {self.url}")
        info = self._client.publish(topic, data, qos=qos, retain=retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise BusError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        if qos > 0:
            self._unacked.add(info.mid)
        if self._first_of_turn:
            self._first_of_turn = False
            self._write()

    async def subscribe(self, pattern: str, handler: Handler, qos: int = 1) -> None:
        """Deliver envelopes on topics matching `pattern` to `handler`, one at a time, in arrival order."""
        if not pattern:
            raise ValueError("empty topic filter")
        sub = _Subscription(pattern, handler, qos)
        self._subs.append(sub)
        if self.connected:
            await self._send_subscribe(sub)

    # -- internals: event-loop side -----------------------------------------------------------

    def _dispatch(self) -> None:
        """Hand what arrived to the handlers now, in this turn of the event loop, not the next one.

        A handler that has to wait goes on as a task, and the messages of its subscription wait
        behind it: one at a time, in arrival order. Most handlers never wait, and a reply to a
        message then leaves within the turn that read it (`eager`)."""
        if self._closing:
            return
        for sub in self._subs:
            if sub.waiting and (sub.task is None or sub.task.done()):
                sub.task = eager.start(self._drain(sub))

    async def _drain(self, sub: _Subscription) -> None:
        while sub.waiting:
            t, env = sub.waiting.popleft()
            try:
                r = sub.handler(t, env)
                if inspect.isawaitable(r):
                    await r
            except asyncio.CancelledError:
                raise
            except Exception:
                self.handler_errors += 1
                log.exception("bus handler for %s failed on a %r message from %s", sub.pattern, env.kind, env.sender)

    async def _send_subscribe(self, sub: _Subscription) -> None:
        assert self._loop is not None
        rc, mid = self._client.subscribe(sub.pattern, sub.qos)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise BusError(f"subscribe to {sub.pattern} failed: {mqtt.error_string(rc)}")
        fut = self._loop.create_future()
        self._suback[mid] = fut
        self._flush()
        try:
            codes = await asyncio.wait_for(fut, 10.0)
        except TimeoutError:
            raise BusError(f"no SUBACK for {sub.pattern} within 10 s") from None
        finally:
            self._suback.pop(mid, None)
        if any(getattr(c, "is_failure", False) for c in codes):
            raise BusError(f"the broker refused the subscription to {sub.pattern}: {codes[0]}")

    async def _misc_loop(self) -> None:
        """Drives paho's keepalive: PINGREQ when idle, and 'connection lost' when no PINGRESP comes back."""
        period = min(1.0, self.keepalive / 4)
        while True:
            await asyncio.sleep(period)
            try:
                self._client.loop_misc()
                self._flush()
            except Exception:
                log.exception("bus keepalive step failed")

    def _on_readable(self) -> None:
        # paho reads one packet per call when nothing awaits an ack: drain what the kernel already holds
        # (bounded, for fairness) instead of paying one event-loop iteration per incoming message
        sock = self._sock
        try:
            for _ in range(READ_BURST):
                self._client.loop_read()
                if sock is None or self._sock is not sock or not _has_data(sock):
                    break
        except Exception:
            log.exception("bus read failed")
        self._dispatch()  # before the flush: a reply then shares one write with the PUBACKs
        self._flush()

    def _on_writable(self) -> None:
        self._flush()

    def _schedule_flush(self) -> None:
        """Coalesce writes: everything queued until the loop runs again goes out in one loop_write.

        But the first message published in a turn of the loop goes at once (`publish`): a lone
        reply, the usual case, does not wait for the turn to end."""
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._first_of_turn = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._first_of_turn = False
        self._write()

    def _write(self) -> None:
        if self._sock is None:
            return
        try:
            if self._client.want_write():
                self._client.loop_write()
        except Exception:
            log.exception("bus write failed")
        self._sync_writer()

    def _sync_writer(self) -> None:
        """Watch the socket for writability only while paho has bytes the kernel would not take yet."""
        loop, sock = self._loop, self._sock
        if loop is None or sock is None:
            return
        want = self._client.want_write() and self._client.socket() is sock
        if want and not self._writer_on:
            loop.add_writer(sock, self._on_writable)
            self._writer_on = True
        elif not want and self._writer_on:
            loop.remove_writer(sock)
            self._writer_on = False

    def _teardown_socket(self) -> None:
        loop, sock = self._loop, self._sock
        self._sock = None
        if loop is not None and sock is not None:
            loop.remove_reader(sock)
            if self._writer_on:
                loop.remove_writer(sock)
        self._writer_on = False
        if self._client.socket() is not None:
            with contextlib.suppress(Exception):
                self._client._sock_close()  # paho has no public "drop the socket without DISCONNECT"

    def _in_loop(self, fn: Callable[[], None]) -> None:
        """Run fn in the loop thread (paho calls some callbacks from the executor thread during connect)."""
        if self._loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            fn()
        else:
            self._loop.call_soon_threadsafe(fn)

    # -- internals: paho callbacks (must never raise: paho would propagate into loop_read) -----------

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        def drop() -> None:
            if self._sock is sock:
                self._teardown_socket()

        with contextlib.suppress(Exception):
            self._in_loop(drop)

    def _on_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(Exception):
            self._in_loop(self._schedule_flush)

    def _on_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(Exception):
            self._in_loop(self._sync_writer)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        fut = self._connect_fut
        if rc.is_failure:
            if fut is not None and not fut.done():
                fut.set_exception(BusError(f"the MQTT broker at {self.url} refused the connection: {rc}"))
            return
        self.connected = True
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        was = self.connected
        self.connected = False
        if self._acks_drained is not None:
            self._acks_drained.set()  # wake blocked publishers: they raise BusError
        if self._misc_task is not None:
            self._misc_task.cancel()
            self._misc_task = None
        if self._closing:
            if self._close_fut is not None and not self._close_fut.done():
                self._close_fut.set_result(None)
            return
        if rc == 141:
            reason = "keepalive timeout (no answer from the broker)"
        elif getattr(rc, "value", None) == 128:  # paho's "Unspecified error": EOF or socket error
            reason = "connection lost (closed by the broker or the network)"
        else:
            reason = f"connection lost ({rc})"
        fut = self._connect_fut
        if fut is not None and not fut.done():
            fut.set_exception(BusError(f"the MQTT broker at {self.url} closed the connection during CONNECT: {rc}"))
        elif was:
            log.warning("lost the MQTT connection to %s: %s", self.url, reason)
            cb = self.on_disconnect
            if cb is not None and self._loop is not None:
                self._loop.call_soon(self._call_on_disconnect, cb, reason)

    @staticmethod
    def _call_on_disconnect(cb: Callable[[str], None], reason: str) -> None:
        try:
            cb(reason)
        except Exception:
            log.exception("bus on_disconnect callback failed")

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, codes: list[Any], props: Any) -> None:
        fut = self._suback.get(mid)
        if fut is not None and not fut.done():
            fut.set_result(list(codes))

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        self._unacked.discard(mid)
        if len(self._unacked) <= self._window * 3 // 4 and self._acks_drained is not None:
            self._acks_drained.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            t = msg.topic
        except UnicodeDecodeError:
            self._drops.drop("bad-topic", "topic is not UTF-8", "?")
            return
        try:
            env, _is_will = self._decoder.open(msg.payload, time.time())
        except BadMessage as e:
            self._drops.drop(e.reason, str(e), t)
            return
        except Exception as e:  # the decoder is meant to raise only BadMessage; never let a packet kill the bus
            self._drops.drop("malformed", f"{type(e).__name__}: {e}", t)
            return
        for sub in self._subs:
            if mqtt.topic_matches_sub(sub.pattern, t):
                sub.waiting.append((t, env))
