"""CE bus latency and throughput, embedded amqtt broker vs Mosquitto, side by side.

Why: the bus carries task offers, results and the replication stream, so its round
trip bounds how fast a CE reacts and its throughput how small tasks can be. Both
ends are real processes (the responder runs in a child), messages are sealed and
opened envelopes, QoS 1, as in production.

    PYTHONPATH=. python benchmarks/bus_latency.py [--rounds 500] [--messages 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bonjourgrid.broker import BrokerError, start_embedded_broker, start_mosquitto
from bonjourgrid.bus import Bus, bus_credentials, topic
from bonjourgrid.envelope import Envelope
from bonjourgrid.gridkey import GridKey

GRID, CE = "bench", "ce1"


async def responder(url: str, key: GridKey, user: str, pw: str) -> None:
    """Child side: echo every request; count the stream and report when it is complete."""
    bus = Bus(url, key, GRID, "responder", username=user, password=pw)
    await bus.connect()
    state = {"n": 0, "want": 0}
    done = asyncio.Event()

    async def on_req(t: str, env: Envelope) -> None:
        await bus.publish(topic(GRID, CE, "rep"), Envelope("rep", "responder", env.body))

    async def on_stream(t: str, env: Envelope) -> None:
        if env.kind == "start":
            state["n"], state["want"] = 0, env.body["n"]
            return
        state["n"] += 1
        if state["n"] == state["want"]:
            await bus.publish(topic(GRID, CE, "rep"), Envelope("stream-done", "responder", {"n": state["n"]}))

    async def on_quit(t: str, env: Envelope) -> None:
        done.set()

    await bus.subscribe(topic(GRID, CE, "req"), on_req)
    await bus.subscribe(topic(GRID, CE, "stream"), on_stream)
    await bus.subscribe(topic(GRID, CE, "quit"), on_quit)
    await bus.publish(topic(GRID, CE, "rep"), Envelope("ready", "responder"))
    await done.wait()
    await bus.close()


async def measure(
    url: str, key: GridKey, user: str, pw: str, rounds: int, messages: int, broker_pid: int
) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    child = subprocess.Popen(
        [sys.executable, __file__, "--responder", url], stdin=subprocess.PIPE, env=env, start_new_session=True
    )
    assert child.stdin is not None
    child.stdin.write(json.dumps({"key": key.secret.hex(), "user": user, "pw": pw}).encode() + b"\n")
    child.stdin.close()
    replies: asyncio.Queue[Envelope] = asyncio.Queue()
    bus = Bus(url, key, GRID, "requester", username=user, password=pw)
    await bus.connect()
    await bus.subscribe(topic(GRID, CE, "rep"), lambda t, e: replies.put_nowait(e))
    try:
        # the responder says "ready" once subscribed; retry the wait for slow starts
        first = await asyncio.wait_for(replies.get(), 30)
        assert first.kind == "ready", first
        req = topic(GRID, CE, "req")
        for i in range(20):  # warm-up
            await bus.publish(req, Envelope("req", "requester", {"i": i}))
            await replies.get()
        rtts = []
        for i in range(rounds):
            t0 = time.perf_counter()
            await bus.publish(req, Envelope("req", "requester", {"i": i}))
            await replies.get()
            rtts.append(time.perf_counter() - t0)
        stream = topic(GRID, CE, "stream")
        await bus.publish(stream, Envelope("start", "requester", {"n": messages}))
        broker, me = psutil.Process(broker_pid), psutil.Process()
        cpu0 = (_cpu(broker), _cpu(me))
        t0 = time.perf_counter()
        for i in range(messages):
            await bus.publish(stream, Envelope("task", "requester", {"i": i, "cmd": "echo"}))
        done = await asyncio.wait_for(replies.get(), 300)
        elapsed = time.perf_counter() - t0
        broker_cpu, my_cpu = _cpu(broker) - cpu0[0], _cpu(me) - cpu0[1]
        assert done.kind == "stream-done" and done.body["n"] == messages, done
        await bus.publish(topic(GRID, CE, "quit"), Envelope("quit", "requester"))
        rtts.sort()
        return {
            "median_ms": statistics.median(rtts) * 1000,
            "p90_ms": rtts[int(0.9 * len(rtts))] * 1000,
            "msg_per_s": messages / elapsed,
            "broker_us": broker_cpu / messages * 1e6,
            "sender_us": my_cpu / messages * 1e6,
        }
    finally:
        await bus.close()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=500)
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--responder", metavar="URL", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.responder:
        cfg = json.loads(sys.stdin.readline())
        asyncio.run(responder(args.responder, GridKey(bytes.fromhex(cfg["key"])), cfg["user"], cfg["pw"]))
        return 0
    key = GridKey.generate()
    user, pw = bus_credentials(key, GRID, CE)
    rows = []
    for name, start in (("embedded (amqtt)", start_embedded_broker), ("mosquitto", start_mosquitto)):
        try:
            with start("127.0.0.1", 0, username=user, password=pw) as broker:
                r = asyncio.run(measure(broker.url, key, user, pw, args.rounds, args.messages, broker.pid))
        except BrokerError as e:
            print(f"{name}: skipped ({str(e).splitlines()[0]})", file=sys.stderr)
            continue
        rows.append((name, r))
    print(f"\nQoS 1, sealed envelopes, {args.rounds} round trips, {args.messages} messages streamed, "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    # CPU time per streamed message tells apart "this side is the bottleneck" from "the machine is busy"
    print(f"{'broker':<18} {'RTT median ms':>14} {'RTT p90 ms':>11} {'msg/s':>9} {'broker CPU us/msg':>18} "
          f"{'sender CPU us/msg':>18}")
    for name, r in rows:
        print(f"{name:<18} {r['median_ms']:>14.3f} {r['p90_ms']:>11.3f} {r['msg_per_s']:>9.0f} "
              f"{r['broker_us']:>18.0f} {r['sender_us']:>18.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
