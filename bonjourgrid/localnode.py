"""How commands reach the node daemon running on this machine (or run a temporary one)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .envelope import BadMessage, Envelope
from .gridkey import GridKey
from .wire import request

NODE_FILE = "node.json"
FINAL_STATES = ("done", "failed", "cancelled")  # a job's end, as a node reports it (journal.FINISHED_JOB_STATES)
T = TypeVar("T")


class NodeUnavailable(Exception):
    pass


class RequestFailed(Exception):
    """The node answered with an error meant for the user."""


@dataclass
class LocalNode:
    state_dir: Path
    key: GridKey
    grid: str
    port: int = 0
    node_id: str = ""
    host: str = "127.0.0.1"  # another node's address when following a CE that moved

    @classmethod
    def find(cls, state_dir: Path, key: GridKey, grid: str) -> LocalNode | None:
        """The daemon of this state dir, if it runs (its node.json names a live pid and our grid)."""
        try:
            info = json.loads((state_dir / NODE_FILE).read_text())
            if info.get("grid") != grid or not _alive(int(info["pid"])):
                return None
            return cls(state_dir, key, grid, int(info["port"]), str(info["node_id"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    async def ask(self, kind: str, body: dict[str, Any] | None = None, timeout: float = 10.0) -> dict[str, Any]:
        try:
            reply = await request(self.host, self.port, self.key, self.grid, Envelope(kind, "cli", body or {}),
                                  timeout=timeout)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, BadMessage) as e:
            raise NodeUnavailable(f"the local node daemon did not answer: {e}") from None
        if "error" in reply.body:
            raise RequestFailed(str(reply.body["error"]))
        return reply.body


async def wait_for_node(state_dir: Path, key: GridKey, grid: str, timeout: float = 30.0) -> LocalNode:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        node = LocalNode.find(state_dir, key, grid)
        if node is not None:
            with contextlib.suppress(NodeUnavailable, RequestFailed):
                await node.ask("status", timeout=2)
                return node
        await asyncio.sleep(0.05)
    raise NodeUnavailable("the temporary node daemon did not come up")


async def find_job(key: GridKey, grid: str, job: str, seconds: float = 1.5) -> LocalNode | None:
    """The node to ask about `job` now: its coordinator (highest claim announced over mDNS).

    If none is announced: a node that coordinated it and knows the end; else a replica of its
    journal that knows the end (a replica gets every result and output file, and the end, from
    the coordinator); else a node that coordinates it, its announcement not seen yet; else a
    replica, to follow the job's progress until the end reaches it. Never a copy the job went on
    without: a coordinator that stepped down (`moved`), a replica that left the CE (`left`).
    """
    from .election import supersedes
    from .mdns import browse

    view = await browse(grid, key, None, seconds)

    def node(rec: Any) -> LocalNode:
        return LocalNode(Path("."), key, grid, rec.port, rec.ann.node_id, rec.addresses[0])

    best = None
    for rec in view.coordinators_of(job):
        if rec.addresses and (best is None or supersedes(rec.ann.epoch or 0, rec.ann.node_id,
                                                          best.ann.epoch or 0, best.ann.node_id)):
            best = rec
    if best is not None:
        return node(best)
    async def answers() -> AsyncIterator[tuple[LocalNode, dict[str, Any]]]:
        for rec in view.nodes.values():
            if rec.addresses:
                candidate = node(rec)
                with contextlib.suppress(NodeUnavailable, RequestFailed):
                    yield candidate, await candidate.ask("job", {"job": job}, timeout=2)

    return await pick_job_holder(answers())


async def pick_job_holder(answers: AsyncIterator[tuple[T, dict[str, Any]]]) -> T | None:
    """find_job's choice among nodes' answers to a `job` request, in the order of its docstring.

    Stops reading answers at the first node that coordinated the job and knows its end.
    """
    running = replica_end = replica_running = None
    async for candidate, status in answers:
        state = status.get("state")
        over = state in FINAL_STATES
        if over and not status.get("replica"):
            return candidate
        if over:
            replica_end = replica_end or candidate
        elif state not in (None, "moved", "left"):  # neither copy follows the job any more
            if status.get("replica"):
                replica_running = replica_running or candidate
            else:
                running = running or candidate
    return replica_end or running or replica_running


def _alive(pid: int) -> bool:
    """Whether a process `pid` exists (without psutil: a command starts faster without it)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True
