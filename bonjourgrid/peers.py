"""Peer confirmation before a takeover, the I/O half (the decision is `Election.peers_answered`).

A replica that stopped hearing its coordinator asks the CE's other workers, over the
sealed control channel and in parallel, whom they follow and how long they have not
heard it (`heard` requests), and a few other nodes of the grid whether they can be
reached at all; and the coordinator itself, whose answer is waited for only when no
peer can tell (`Election.wants_coordinator`). A node answers `heard` from its
own state: the CE it coordinates (how long since it last managed to beat, or that the
CE ended), the claim its worker follows and how long since it heard it, how it left
the CE (released at the end, released alone, gave up) and when, or that it knows nothing.

A refused connection counts as an answer with no opinion: the peer's host answered, so
our own link works, and its daemon is gone (it may have died with the coordinator). Only
a timeout means "not reached".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .election import PeerAnswer
from .envelope import Envelope
from .wire import request

if TYPE_CHECKING:
    from .node import NodeDaemon

log = logging.getLogger("bonjourgrid.peers")

OTHERS_ASKED = 3  # other nodes of the grid asked, only to learn whether we are isolated
LEFT_REMEMBERED = 32  # CEs a node remembers having left, to tell a replica that asks


@dataclass(frozen=True)
class LeftCE:
    """How this node left a CE: the claim it followed, when it last heard it, whether the job ended."""

    epoch: int
    coordinator: str
    last_heard: float  # monotonic
    ended: bool


def remember_left(daemon: NodeDaemon, ce: str, left: LeftCE) -> None:
    daemon.left_ces.pop(ce, None)
    daemon.left_ces[ce] = left
    while len(daemon.left_ces) > LEFT_REMEMBERED:
        daemon.left_ces.popitem(last=False)


class HeardRequestError(ValueError):
    """A malformed `heard` request; the message goes back to the asker."""


def answer_heard(daemon: NodeDaemon, body: dict[str, Any]) -> dict[str, Any]:
    """This node's side of a `heard` request about CE `body["ce"]`."""
    ce = body.get("ce") if isinstance(body, dict) else None
    if not isinstance(ce, str) or not ce or len(ce) > 200:
        raise HeardRequestError("malformed heard request: it needs a CE id, {\"ce\": \"...\"}")
    now = time.monotonic()
    coord = daemon.ces.get(ce)
    if coord is not None and not coord.stepped_down:
        ended = coord.state not in ("starting", "running")
        return {"ce": ce, "member": not ended, "ended": ended, "coordinator": daemon.node_id, "epoch": coord.epoch,
                "silent": round(max(0.0, now - coord.last_beat), 3)}
    worker = daemon.worker
    if worker is not None and worker.ce == ce:
        e = worker.election
        if e.claimed is not None:  # taking over right now: the CE is not up yet, the claim is made
            return {"ce": ce, "member": True, "coordinator": daemon.node_id, "epoch": e.claimed, "silent": 0.0}
        if not e.done:
            return {"ce": ce, "member": True, "coordinator": e.coordinator, "epoch": e.epoch,
                    "silent": round(e.silent_for(now), 3)}
    left = daemon.left_ces.get(ce)
    if left is not None:
        return {"ce": ce, "member": False, "ended": left.ended, "coordinator": left.coordinator,
                "epoch": left.epoch, "silent": round(max(0.0, now - left.last_heard), 3)}
    return {"ce": ce, "member": False}


def parse_heard(node: str, body: dict[str, Any]) -> PeerAnswer:
    """A reply as the election reads it; anything unusable counts as "reached, no opinion"."""
    epoch, coordinator, silent = body.get("epoch"), body.get("coordinator"), body.get("silent")
    member, ended = body.get("member"), body.get("ended", False)
    if not isinstance(member, bool) or not isinstance(ended, bool) or isinstance(epoch, bool) \
            or not isinstance(epoch, int) or not isinstance(coordinator, str) or isinstance(silent, bool) \
            or not isinstance(silent, int | float) or not math.isfinite(silent) or silent < 0:
        return PeerAnswer(node)
    return PeerAnswer(node, epoch, coordinator, float(silent), member=member, ended=ended)


@dataclass(frozen=True)
class Outcome:
    answers: tuple[PeerAnswer, ...]
    asked: int
    others_asked: int
    others_reached: int


async def ask(daemon: NodeDaemon, ce: str, coordinator: str, peers: tuple[str, ...], timeout: float,
              wants_coordinator: Callable[[Sequence[PeerAnswer]], bool]) -> Outcome:
    """Ask `peers`, a few other nodes and the coordinator at once; whoever has not answered within
    `timeout` did not. The coordinator is waited for only if `wants_coordinator(peers' answers)`."""
    view = daemon.view.nodes
    targets = [p for p in peers if p in view and view[p].addresses]
    skip = {*peers, daemon.node_id, coordinator}
    others = [n for n in sorted(view) if n not in skip and view[n].addresses][:OTHERS_ASKED]

    async def one(node: str) -> dict[str, Any] | None:
        rec = view.get(node)
        if rec is None or not rec.addresses:
            return None
        env = Envelope("heard", daemon.node_id, {"ce": ce}, ce=ce)
        try:
            reply = await request(rec.addresses[0], rec.port, daemon.config.key, daemon.config.grid, env,
                                  timeout=timeout)
        except ConnectionRefusedError:
            return {"refused": True}  # its host is up and answered: we are not cut off from it
        except Exception as e:  # timed out, unreachable, bad reply: it did not answer
            log.debug("CE %s: %s did not answer: %s", ce, node[:8], e)
            return None
        return reply.body

    boss = asyncio.ensure_future(one(coordinator)) if coordinator in view and coordinator != daemon.node_id \
        else None
    try:
        replies = await asyncio.gather(*(one(n) for n in targets + others))
        answers = [parse_heard(n, r) for n, r in zip(targets, replies, strict=False) if r is not None]
        # an "other" that turns out to know the CE (no heartbeat listed it to us yet) counts as a peer
        answers += [a for a in (parse_heard(n, r) for n, r in zip(others, replies[len(targets):], strict=True)
                                if r is not None) if a.epoch is not None]
        asked = len(targets)
        if boss is not None and wants_coordinator(answers):
            asked += 1
            reply = await boss
            if reply is not None:
                answers.append(parse_heard(coordinator, reply))
    finally:
        if boss is not None and not boss.done():
            boss.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await boss
    reached = sum(r is not None for r in replies[len(targets):])
    return Outcome(tuple(answers), asked, len(others), reached)
