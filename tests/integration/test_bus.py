"""The CE bus on real brokers (embedded amqtt child and Mosquitto), all on 127.0.0.1.

Faults are real: clients and brokers are killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from bonjourgrid.broker import BrokerError, BrokerHandle, mosquitto_binary, start_embedded_broker, start_mosquitto
from bonjourgrid.bus import Bus, BusError, bus_credentials, topic
from bonjourgrid.envelope import Envelope, seal
from bonjourgrid.gridkey import GridKey

ROOT = Path(__file__).resolve().parents[2]
GRID, CE = "g1", "ce1"
HOST = "127.0.0.1"
KINDS = ["embedded", "mosquitto"]


@dataclass
class Site:
    kind: str
    broker: BrokerHandle
    key: GridKey
    user: str
    pw: str

    def bus(self, client_id: str, **kw: object) -> Bus:
        return Bus(self.broker.url, self.key, GRID, client_id, username=self.user, password=self.pw, **kw)  # type: ignore[arg-type]


def _start(kind: str, key: GridKey) -> Site:
    user, pw = bus_credentials(key, GRID, CE)
    if kind == "mosquitto" and mosquitto_binary() is None:
        pytest.skip("mosquitto not installed (apt-get install -y mosquitto)")
    start = start_embedded_broker if kind == "embedded" else start_mosquitto
    return Site(kind, start(HOST, 0, username=user, password=pw), key, user, pw)


@pytest.fixture(scope="module", params=KINDS)
def site(request: pytest.FixtureRequest) -> Iterator[Site]:
    """One broker per kind for the whole module: keeps the CPU use of the suite modest."""
    s = _start(request.param, GridKey.generate())
    yield s
    s.broker.stop()


@pytest.fixture(params=KINDS)
def own_site(request: pytest.FixtureRequest) -> Iterator[Site]:
    """A broker of the test's own, for tests that kill it."""
    s = _start(request.param, GridKey.generate())
    yield s
    s.broker.stop()


def run(coro: object, timeout: float = 60.0) -> object:
    return asyncio.run(asyncio.wait_for(coro, timeout))  # type: ignore[arg-type]


def raw_publish(site: Site, t: str, payloads: list[bytes]) -> None:
    """Publish raw bytes with a plain paho client (an attacker holding broker credentials, or a broken peer)."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"raw-{time.monotonic_ns()}")
    c.username_pw_set(site.user, site.pw)
    c.connect(HOST, site.broker.port)
    c.loop_start()
    try:
        for p in payloads:
            c.publish(t, p, qos=1).wait_for_publish(5)
    finally:
        c.disconnect()
        c.loop_stop()


async def wait_until(pred, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


# -- round trip, bad input -------------------------------------------------------------------


def test_round_trip_request_response(site: Site) -> None:
    async def main() -> None:
        a, b = site.bus("rt-a"), site.bus("rt-b")
        await a.connect()
        await b.connect()
        replies: asyncio.Queue[Envelope] = asyncio.Queue()

        async def echo(t: str, env: Envelope) -> None:
            await b.publish(topic(GRID, CE, "rt", "rep"), Envelope("rep", "b", {"got": env.body["i"]}, CE, 3))

        await b.subscribe(topic(GRID, CE, "rt", "req"), echo)
        await a.subscribe(topic(GRID, CE, "rt", "+"), lambda t, e: replies.put_nowait(e) if e.kind == "rep" else None)
        for i in range(20):
            await a.publish(topic(GRID, CE, "rt", "req"), Envelope("req", "a", {"i": i}, CE, 3))
            env = await asyncio.wait_for(replies.get(), 5)
            assert env.body == {"got": i} and env.sender == "b" and env.epoch == 3 and env.ce == CE
        assert a.dropped == {} and b.dropped == {}
        await a.close()
        await b.close()
        assert not a.connected

    run(main())


def test_handlers_see_messages_in_order(site: Site) -> None:
    async def main() -> None:
        a, b = site.bus("ord-a"), site.bus("ord-b")
        await a.connect()
        await b.connect()
        seen: list[int] = []

        async def slow(t: str, env: Envelope) -> None:
            if env.body["i"] % 7 == 0:
                await asyncio.sleep(0.01)  # a slow handler must not let later messages overtake
            seen.append(env.body["i"])

        await b.subscribe(topic(GRID, CE, "ord"), slow)
        for i in range(300):
            await a.publish(topic(GRID, CE, "ord"), Envelope("n", "a", {"i": i}))
        await wait_until(lambda: len(seen) == 300, 20)
        assert seen == list(range(300))
        await a.close()
        await b.close()

    run(main())


def test_bad_messages_are_dropped_counted_and_the_bus_goes_on(site: Site) -> None:
    async def main() -> None:
        b = site.bus("bad-b")
        got: list[Envelope] = []
        await b.subscribe(topic(GRID, CE, "bad"), lambda t, e: got.append(e))  # before connect: sent on connect
        await b.connect()
        now = time.time()
        good = seal(site.key, GRID, Envelope("ok", "x", {"n": 1}), now)
        payloads = [
            seal(GridKey.generate(), GRID, Envelope("forged", "x"), now),  # wrong key
            good,
            good,  # replayed: same bytes twice
            seal(site.key, GRID, Envelope("old", "x"), now - 300),  # stale timestamp
            os.urandom(200),  # garbage
            b"",  # empty
        ]
        await asyncio.to_thread(raw_publish, site, topic(GRID, CE, "bad"), payloads)
        # drops are counted as they arrive; accepted messages reach handlers through their queue
        await wait_until(lambda: sum(b.dropped.values()) == 5 and got)
        assert b.dropped == {"bad-signature": 2, "replayed": 1, "stale": 1, "malformed": 1}
        assert [e.kind for e in got] == ["ok"]
        a = site.bus("bad-a")  # the subscriber still works
        await a.connect()
        await a.publish(topic(GRID, CE, "bad"), Envelope("ok", "a", {"n": 2}))
        await wait_until(lambda: len(got) == 2)
        assert got[1].body == {"n": 2}
        await a.close()
        await b.close()

    run(main())


def test_four_mib_message_arrives_intact(site: Site) -> None:
    async def main() -> None:
        a, b = site.bus("big-a"), site.bus("big-b")
        await a.connect()
        await b.connect()
        got: asyncio.Queue[Envelope] = asyncio.Queue()
        await b.subscribe(topic(GRID, CE, "big"), lambda t, e: got.put_nowait(e))
        blob = os.urandom(3 << 20).hex()[: 4 << 20]  # 4 MiB of text, the JSON envelope is a bit larger
        await a.publish(topic(GRID, CE, "big"), Envelope("blob", "a", {"data": blob}))
        await a.publish(topic(GRID, CE, "big"), Envelope("after", "a"))
        env = await asyncio.wait_for(got.get(), 30)
        assert env.body["data"] == blob
        assert (await asyncio.wait_for(got.get(), 10)).kind == "after"
        await a.close()
        await b.close()

    run(main())


# -- authentication at the broker --------------------------------------------------------------


def test_wrong_credentials_cannot_connect(site: Site) -> None:
    async def main() -> None:
        other_user, other_pw = bus_credentials(GridKey.generate(), GRID, CE)  # another grid's key
        wrong_pw = site.pw[:-1] + ("1" if site.pw.endswith("0") else "0")
        for user, pw in ((other_user, other_pw), (None, None), (site.user, wrong_pw)):
            bus = Bus(site.broker.url, site.key, GRID, "intruder", username=user, password=pw)
            with pytest.raises(BusError, match=r"refused|closed the connection"):
                await bus.connect(timeout=5)
            assert not bus.connected
            await bus.close()
        ok = site.bus("member")
        await ok.connect()
        await ok.close()

    run(main())


def test_connect_to_nothing_fails_clearly() -> None:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]  # bound, not listening: connection refused

        async def main() -> None:
            bus = Bus(f"mqtt://{HOST}:{port}", GridKey.generate(), GRID, "lonely")
            with pytest.raises(BusError, match="cannot reach"):
                await bus.connect(timeout=2)

        run(main())


# -- failures: last will, broker loss ------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import asyncio, json, sys
    from bonjourgrid.bus import Bus, topic
    from bonjourgrid.envelope import Envelope
    from bonjourgrid.gridkey import GridKey
    cfg = json.loads(sys.stdin.readline())
    async def main():
        will = (topic(cfg["grid"], cfg["ce"], "member", "lost"), Envelope("member.lost", "w1", {"why": "will"}))
        bus = Bus(cfg["url"], GridKey(bytes.fromhex(cfg["key"])), cfg["grid"], "w1", will=will,
                  keepalive=cfg["keepalive"], username=cfg["user"], password=cfg["pw"])
        await bus.connect()
        print(json.dumps({"session": bus.session}), flush=True)
        if cfg["close"]:
            await bus.close()
            print("closed", flush=True)
        await asyncio.sleep(3600)
    asyncio.run(main())
    """
)


def spawn_member(site: Site, keepalive: float, close: bool = False) -> tuple[subprocess.Popen[str], str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    assert p.stdin is not None and p.stdout is not None
    cfg = {"url": site.broker.url, "key": site.key.secret.hex(), "grid": GRID, "ce": CE, "user": site.user,
           "pw": site.pw, "keepalive": keepalive, "close": close}
    p.stdin.write(json.dumps(cfg) + "\n")
    p.stdin.flush()
    line = p.stdout.readline()
    if not line:
        p.kill()
        raise AssertionError("member process failed to connect")
    return p, json.loads(line)["session"]


def test_killed_member_fires_its_will_within_keepalive(site: Site) -> None:
    keepalive = 2.0

    async def main() -> None:
        obs = site.bus("observer")
        wills: asyncio.Queue[tuple[float, Envelope]] = asyncio.Queue()
        await obs.subscribe(topic(GRID, CE, "member", "lost"), lambda t, e: wills.put_nowait((time.monotonic(), e)))
        await obs.connect()
        p, session = await asyncio.to_thread(spawn_member, site, keepalive)
        try:
            await asyncio.sleep(0.2)
            killed = time.monotonic()
            p.send_signal(signal.SIGKILL)
            at, env = await asyncio.wait_for(wills.get(), keepalive * 1.5)
            assert at - killed < keepalive * 1.5
            assert env.kind == "member.lost" and env.sender == "w1" and env.nonce == session
        finally:
            p.kill()
            p.wait()
        assert obs.dropped == {}
        await obs.close()

    run(main())


def test_clean_close_does_not_fire_the_will(site: Site) -> None:
    async def main() -> None:
        obs = site.bus("observer2")
        wills: list[Envelope] = []
        await obs.subscribe(topic(GRID, CE, "member", "lost"), lambda t, e: wills.append(e))
        await obs.connect()
        p, _ = await asyncio.to_thread(spawn_member, site, 2.0, True)
        try:
            assert p.stdout is not None
            assert (await asyncio.to_thread(p.stdout.readline)).strip() == "closed"
            p.send_signal(signal.SIGKILL)  # after a clean close, dying is nobody's business
            await asyncio.sleep(1.0)
            assert wills == []
        finally:
            p.kill()
            p.wait()
        await obs.close()

    run(main())


def test_killed_broker_triggers_on_disconnect(own_site: Site) -> None:
    async def main() -> None:
        a = own_site.bus("loser", keepalive=2)
        reasons: list[str] = []
        a.on_disconnect = reasons.append
        await a.connect()
        await a.subscribe(topic(GRID, CE, "x"), lambda t, e: None)
        own_site.broker.proc.send_signal(signal.SIGKILL)
        await wait_until(lambda: bool(reasons), 2 * 1.5)
        assert not a.connected
        assert "lost" in reasons[0] or "keepalive" in reasons[0]
        with pytest.raises(BusError, match="not connected"):
            await a.publish(topic(GRID, CE, "x"), Envelope("x", "a"))
        await a.close()
        assert len(reasons) == 1

    run(main())


# -- the embedded broker's life cycle ----------------------------------------------------------------


def test_embedded_broker_start_failure_is_clear() -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
        s.bind((HOST, 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(BrokerError) as ei:
            start_embedded_broker(HOST, port, timeout=10)
    msg = str(ei.value)
    assert "broker log" in msg and ("in use" in msg or "Errno 98" in msg), msg


@pytest.mark.parametrize("kind", ["amqtt", "mosquitto"])
def test_a_ce_broker_dies_with_its_parent(tmp_path: Path, kind: str) -> None:
    """A coordinator killed with SIGKILL takes its CE's broker along: its workers must notice it is gone."""
    if kind == "mosquitto" and mosquitto_binary() is None:
        pytest.skip("mosquitto not installed (apt-get install -y mosquitto)")
    code = textwrap.dedent(
        f"""
        import asyncio
        from pathlib import Path
        from bonjourgrid.broker import start_ce_broker

        async def main():
            h = await start_ce_broker({kind!r}, "127.0.0.1", username="u", password="p",
                                      log_file=Path({str(tmp_path / "broker.log")!r}))
            print(h.pid, flush=True)
            await asyncio.sleep(3600)

        asyncio.run(main())
        """
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    assert parent.stdout is not None
    broker_pid = int(parent.stdout.readline())
    os.kill(broker_pid, 0)  # alive
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(broker_pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(broker_pid, signal.SIGKILL)
    raise AssertionError("the broker outlived its parent")


def test_auto_ce_broker_falls_back_to_amqtt_without_a_usable_mosquitto(tmp_path: Path, monkeypatch) -> None:
    """A desktop with Mosquitto 1.x (which reads neither our config nor our password file) gets amqtt."""
    from bonjourgrid.broker import mosquitto_problem, start_ce_broker

    old = tmp_path / "mosquitto"
    old.write_text("#!/bin/sh\necho 'mosquitto version 1.6.9'\nexit 3\n")
    old.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    mosquitto_problem.cache_clear()
    try:
        assert "not Mosquitto 2 or newer" in (mosquitto_problem() or "")
        key = GridKey.generate()
        user, pw = bus_credentials(key, GRID, CE)

        async def main() -> None:
            broker = await start_ce_broker("auto", HOST, username=user, password=pw, log_file=tmp_path / "b.log")
            try:
                assert "bonjourgrid.broker" in broker.proc.args  # the built-in one
                bus = Bus(broker.url, key, GRID, "member", username=user, password=pw)
                await bus.connect()
                await bus.close()
            finally:
                broker.stop()

        run(main())
    finally:
        mosquitto_problem.cache_clear()


def test_stop_is_idempotent() -> None:
    h = start_embedded_broker(HOST, 0)
    assert h.alive() and h.url == f"mqtt://{HOST}:{h.port}"
    h.stop()
    h.stop()
    assert not h.alive()


def test_frozen_broker_is_detected_by_keepalive(own_site: Site) -> None:
    """A broker that stops answering without closing the socket (host hung, cable cut) is found by keepalive."""

    async def main() -> None:
        a = own_site.bus("patient", keepalive=1)
        reasons: list[str] = []
        a.on_disconnect = reasons.append
        await a.connect()
        own_site.broker.proc.send_signal(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            await wait_until(lambda: bool(reasons), 4.0)
            assert time.monotonic() - t0 < 3.0
            assert "keepalive" in reasons[0]
        finally:
            own_site.broker.proc.send_signal(signal.SIGCONT)
        await a.close()

    run(main())


def test_reconnect_after_broker_restart_restores_subscriptions(own_site: Site) -> None:
    async def main() -> None:
        port = own_site.broker.port
        a = own_site.bus("phoenix", keepalive=2)
        got: list[str] = []
        await a.subscribe(topic(GRID, CE, "again"), lambda t, e: got.append(e.kind))
        await a.connect()
        first_session = a.session
        own_site.broker.proc.send_signal(signal.SIGKILL)
        own_site.broker.stop()
        await wait_until(lambda: not a.connected, 3)
        with pytest.raises(BusError, match="cannot reach"):
            await a.connect(timeout=2)
        start = start_embedded_broker if own_site.kind == "embedded" else start_mosquitto
        own_site.broker = await asyncio.to_thread(start, HOST, port, username=own_site.user, password=own_site.pw)
        await a.connect()
        assert a.session != first_session  # a new connection has a new will
        await a.publish(topic(GRID, CE, "again"), Envelope("back", "phoenix"))
        await wait_until(lambda: got == ["back"])
        await a.close()

    run(main())
