"""The peer confirmation's I/O half on loopback: `heard` answers from a real daemon's control channel,
and how `peers.ask` counts answers, refusals and silence."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from bonjourgrid import peers
from bonjourgrid.election import Election, PeerAnswer
from bonjourgrid.envelope import Envelope
from bonjourgrid.gridkey import GridKey
from bonjourgrid.node import NodeConfig, NodeDaemon
from bonjourgrid.wire import request

GRID = "test"


def daemon(tmp: Path, key: GridKey, name: str) -> NodeDaemon:
    return NodeDaemon(NodeConfig(GRID, key, tmp / name, ["127.0.0.1"], 1, 100))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_parse_heard_keeps_only_well_formed_member_answers():
    ok = peers.parse_heard("p", {"member": True, "epoch": 3, "coordinator": "c", "silent": 0.25})
    assert ok == PeerAnswer("p", 3, "c", 0.25)
    for body in ({"member": False}, {"error": "unknown request 'heard'"}, {"refused": True},
                 {"member": True, "epoch": "3", "coordinator": "c", "silent": 0.1},
                 {"member": True, "epoch": True, "coordinator": "c", "silent": 0.1},
                 {"member": True, "epoch": 3, "coordinator": None, "silent": 0.1},
                 {"member": True, "epoch": 3, "coordinator": "c", "silent": -1},
                 {"member": True, "epoch": 3, "coordinator": "c", "silent": float("nan")},
                 {"member": True, "epoch": 3, "coordinator": "c"}):
        assert peers.parse_heard("p", body) == PeerAnswer("p"), body


def test_answer_heard_refuses_a_request_without_a_ce(tmp_path):
    d = daemon(tmp_path, GridKey.generate(), "a")
    for body in ({}, {"ce": 3}, {"ce": ""}, {"ce": "x" * 500}, []):
        with pytest.raises(peers.HeardRequestError, match="malformed heard request"):
            peers.answer_heard(d, body)  # type: ignore[arg-type]


def test_ask_counts_answers_refusals_and_silence(tmp_path):
    key = GridKey.generate()

    async def scenario() -> tuple[peers.Outcome, peers.Outcome, peers.Outcome, dict, dict]:
        member, stranger, boss = daemon(tmp_path, key, "m"), daemon(tmp_path, key, "s"), daemon(tmp_path, key, "b")
        member.worker = SimpleNamespace(ce="ce1", election=Election("m", "ce1", 2, "c", 1.0, 30.0,
                                                                    time.monotonic() - 0.7))
        servers = [await asyncio.start_server(d._serve_client, "127.0.0.1", 0) for d in (member, stranger, boss)]

        async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(1.0)  # accepts, never answers within the timeout: a peer on a dead link
            writer.close()

        silent = await asyncio.start_server(mute, "127.0.0.1", 0)
        port = {n: s.sockets[0].getsockname()[1] for n, s in zip(("member", "stranger", "c"), servers, strict=True)}
        port["silent"], port["closed"] = silent.sockets[0].getsockname()[1], free_port()
        view = {n: SimpleNamespace(addresses=("127.0.0.1",), port=p) for n, p in port.items()}
        asker = SimpleNamespace(view=SimpleNamespace(nodes=view), node_id="me",
                                config=SimpleNamespace(key=key, grid=GRID))
        try:
            t0 = time.monotonic()
            wants = Election("me", "ce1", 2, "c", 1.0, 30.0, 0.0).wants_coordinator
            out = await peers.ask(asker, "ce1", "c", ("member", "closed", "silent", "gone"), 0.3,  # type: ignore[arg-type]
                                  wants)
            assert time.monotonic() - t0 < 1.0
            # "member" asked as one of the other nodes (no heartbeat listed it): it knows the CE, it counts
            promoted = await peers.ask(asker, "ce1", "c", ("closed",), 0.3, wants)  # type: ignore[arg-type]
            # no node knows anything of the CE: the coordinator's own answer is waited for
            member.worker = None
            clueless = await peers.ask(asker, "ce1", "c", ("closed", "silent"), 0.3, wants)  # type: ignore[arg-type]
            bad = await request("127.0.0.1", port["stranger"], key, GRID, Envelope("heard", "me", {"ce": 7}))
            after = await request("127.0.0.1", port["stranger"], key, GRID, Envelope("heard", "me", {"ce": "ce1"}))
        finally:
            for s in (*servers, silent):
                s.close()
                with contextlib.suppress(Exception):
                    await s.wait_closed()
        return out, promoted, clueless, bad.body, after.body

    out, promoted, clueless, bad, after = asyncio.run(scenario())
    by_node = {a.node: a for a in out.answers}
    assert set(by_node) == {"member", "closed"}  # "silent" timed out, "gone" is not in the view, "c" not needed
    m = by_node["member"]
    assert (m.epoch, m.coordinator) == (2, "c") and 0.6 < m.silent < 1.0
    assert by_node["closed"] == PeerAnswer("closed")  # refused: reached, no opinion
    assert out.asked == 3  # the three peers in the view
    assert (out.others_asked, out.others_reached) == (1, 1)  # "stranger", not a member, answered
    assert [a.node for a in promoted.answers] == ["closed", "member"] and promoted.asked == 1
    assert [a.node for a in clueless.answers] == ["closed", "c"] and clueless.asked == 3
    assert "malformed heard request" in bad["error"]
    assert after["member"] is False  # the daemon kept serving after the malformed request


def test_answer_heard_from_a_coordinator_a_taking_over_replica_a_worker_and_a_stranger(tmp_path):
    d = daemon(tmp_path, GridKey.generate(), "a")
    assert peers.answer_heard(d, {"ce": "ce1"}) == {"ce": "ce1", "member": False}
    e = Election("a", "ce1", 1, "c", 1.0, 30.0, time.monotonic() - 2.0)
    d.worker = SimpleNamespace(ce="ce1", election=e)
    r = peers.answer_heard(d, {"ce": "ce1"})
    assert (r["member"], r["epoch"], r["coordinator"]) == (True, 1, "c") and 1.9 < r["silent"] < 3
    assert peers.answer_heard(d, {"ce": "other"})["member"] is False
    e.done, e.claimed = True, 2  # took over, its CE not started yet: the claim already counts
    assert peers.answer_heard(d, {"ce": "ce1"}) == {"ce": "ce1", "member": True, "coordinator": d.node_id,
                                                    "epoch": 2, "silent": 0.0}
    d.worker = None
    ce = SimpleNamespace(state="running", stepped_down=False, epoch=2, last_beat=time.monotonic() - 0.1)
    d.ces["ce1"] = ce  # type: ignore[assignment]
    r = peers.answer_heard(d, {"ce": "ce1"})
    assert (r["member"], r["ended"], r["coordinator"]) == (True, False, d.node_id) and 0.1 <= r["silent"] < 0.5
    ce.state = "done"
    r = peers.answer_heard(d, {"ce": "ce1"})
    assert (r["member"], r["ended"], r["epoch"]) == (False, True, 2)
    ce.state, ce.stepped_down = "moved", True
    assert peers.answer_heard(d, {"ce": "ce1"}) == {"ce": "ce1", "member": False}
    peers.remember_left(d, "ce1", peers.LeftCE(3, "x", time.monotonic() - 4.0, ended=True))
    r = peers.answer_heard(d, {"ce": "ce1"})
    assert (r["member"], r["ended"], r["epoch"], r["coordinator"]) == (False, True, 3, "x") and r["silent"] >= 4.0
    assert peers.parse_heard("a", r) == PeerAnswer("a", 3, "x", r["silent"], member=False, ended=True)
    for i in range(peers.LEFT_REMEMBERED + 5):
        peers.remember_left(d, f"other{i}", peers.LeftCE(1, "x", 0.0, ended=False))
    assert len(d.left_ces) == peers.LEFT_REMEMBERED and "ce1" not in d.left_ces  # bounded, oldest first out
