"""Redundant computing (BOINC's replication and quorum), as pure bookkeeping (sans-I/O).

A task is sent to `replication` different clients; results are grouped by
what they produced (exit code and every output's sha256), and once a group
reaches `quorum` members it is canonical. Replicas that were lost, or a
disagreement that leaves no group able to reach the quorum, ask for more
replicas, each on a node that has not run the task yet.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .protocol import result_name

SENT, DONE, LOST = "sent", "done", "lost"


@dataclass(frozen=True)
class Outcome:
    """What one replica produced; `key` is what replicas must agree on."""

    exit_code: int
    outputs: tuple[tuple[str, str, int], ...]  # (path, sha256, size), sorted
    stdout: bytes = b""
    stderr: bytes = b""
    started_at: float = 0.0
    ended_at: float = 0.0
    files: Path | None = None  # where the replica's output files were unpacked

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.exit_code, tuple((p, s) for p, s, _ in self.outputs))


@dataclass
class Replica:
    name: str
    node: str
    state: str = SENT
    outcome: Outcome | None = None


@dataclass
class TaskReplicas:
    index: int
    replication: int = 1
    quorum: int = 1
    replicas: dict[str, Replica] = field(default_factory=dict)
    seq: int = 0
    settled: bool = False
    epoch: int = 1  # the coordinator's: part of every name it hands out

    def inflight(self) -> list[Replica]:
        return [r for r in self.replicas.values() if r.state == SENT]

    def done(self) -> list[Replica]:
        return [r for r in self.replicas.values() if r.state == DONE]

    def groups(self) -> list[list[Replica]]:
        by: dict[tuple[Any, ...], list[Replica]] = {}
        for r in self.done():
            assert r.outcome is not None
            by.setdefault(r.outcome.key, []).append(r)
        return sorted(by.values(), key=len, reverse=True)

    def canonical(self) -> Replica | None:
        groups = self.groups()
        return groups[0][0] if groups and len(groups[0]) >= self.quorum else None

    def rejected(self) -> list[Replica]:
        """Replicas outside the canonical group (only meaningful once there is one)."""
        best = self.canonical()
        if best is None:
            return []
        assert best.outcome is not None
        return [r for r in self.done() if r.outcome is not None and r.outcome.key != best.outcome.key]

    def wanted(self) -> int:
        """How many more replicas to send now."""
        if self.settled or self.canonical() is not None:
            return 0
        groups = self.groups()
        best = len(groups[0]) if groups else 0
        inflight = len(self.inflight())
        return max(self.quorum - best - inflight, self.replication - inflight - len(self.done()), 0)

    def eligible(self, node: str) -> bool:
        """A node gets at most one live replica of a task (lost ones do not count)."""
        return self.wanted() > 0 and all(r.node != node or r.state == LOST for r in self.replicas.values())

    def issue(self, node: str) -> Replica:
        self.seq += 1
        rep = Replica(result_name(self.index, self.epoch, self.seq), node)
        self.replicas[rep.name] = rep
        return rep

    def adopt(self, name: str, node: str) -> Replica | None:
        """A replica a previous coordinator handed out, which `node`'s client still holds: ours now.

        None if we know that name already (or the task is settled): nothing to adopt.
        """
        if self.settled or name in self.replicas:
            return None
        rep = Replica(name, node)
        self.replicas[name] = rep
        return rep

    def report(self, name: str, outcome: Outcome | None) -> Replica | None:
        """A replica came back: with an outcome, or None when it failed inside BOINC (then it is lost)."""
        rep = self.replicas.get(name)
        if rep is None or rep.state != SENT:
            return None
        rep.state, rep.outcome = (DONE, outcome) if outcome is not None else (LOST, None)
        return rep

    def dropped_by(self, node: str, held: set[str]) -> list[Replica]:
        """Replicas `node`'s client should hold but no longer lists (it refused or lost them): lost."""
        lost = [r for r in self.inflight() if r.node == node and r.name not in held]
        for r in lost:
            r.state = LOST
        return lost

    def lose_node(self, node: str) -> list[Replica]:
        lost = [r for r in self.inflight() if r.node == node]
        for r in lost:
            r.state = LOST
        return lost


def may_take_a_replica(tasks: Iterable[TaskReplicas], node: str) -> bool:
    """Whether `node` may still take a replica some task wants: such a worker is not released as idle."""
    return any(t.eligible(node) for t in tasks)


def nodes_short(tasks: Iterable[TaskReplicas], workers: Iterable[str]) -> int:
    """How many more workers the replicas wanted need, beyond the nodes that may take them now.

    A task whose replicas disagree wants a node that has not run it yet; when every worker of the CE
    already has, only recruiting another one settles it.
    """
    nodes = list(workers)
    return max([0, *(t.wanted() - sum(1 for n in nodes if t.eligible(n)) for t in tasks)])


def parse_options(options: dict[str, object]) -> tuple[int, int]:
    """(replication, quorum) from the job's `backend_options`; replication is at least the quorum."""
    quorum = int(options.get("quorum", options.get("min_quorum", 1)) or 1)  # type: ignore[call-overload]
    replication = int(options.get("replication", quorum) or quorum)  # type: ignore[call-overload]
    if quorum < 1 or replication < 1:
        raise ValueError("backend_options: quorum and replication must be at least 1")
    return max(replication, quorum), quorum
