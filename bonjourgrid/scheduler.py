"""Which desktops can serve a job, which to recruit first, which task goes to which worker (sans-I/O).

Matching is Steep-style: a job requires a set of capabilities and every one
must be offered by a node. Ranking is Condor-style: prefer the nodes with the
most free slots, then the most free memory, then the lowest load.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from .announcement import Announcement, Role
from .units import format_size


def satisfies(requires: Iterable[str], caps: Iterable[str]) -> bool:
    """`KEY=VALUE` needs exactly that; a bare `KEY` is met by `KEY` or any `KEY=...`."""
    offered = set(caps)
    keys = {c.split("=", 1)[0] for c in offered}
    return all(r in offered or ("=" not in r and r in keys) for r in requires)


@dataclass(frozen=True)
class Needs:
    """What one task of a job needs from a node."""

    requires: tuple[str, ...] = ()
    cpus: int = 1
    memory_bytes: int = 0

    def why_not(self, ann: Announcement) -> str | None:
        """None if the node can run the job's tasks, else the first reason it cannot."""
        missing = [r for r in self.requires if not satisfies((r,), ann.caps)]
        if missing:
            return "lacks " + ",".join(missing)
        if ann.cpus < self.cpus:
            return f"lends {ann.cpus} cpus < {self.cpus}"
        if (ann.memory_mib << 20) < self.memory_bytes:
            return f"lends {format_size(ann.memory_mib << 20)} < {format_size(self.memory_bytes)}"
        return None


def rank(candidates: Iterable[Announcement]) -> list[Announcement]:
    return sorted(candidates, key=lambda a: (-a.free_slots, -a.free_memory_mib, a.load, a.node_id))


def recruitable(anns: Iterable[Announcement], needs: Needs, exclude: set[str]) -> list[Announcement]:
    """Idle nodes that match, best first."""
    return rank(a for a in anns if a.role is Role.IDLE and a.node_id not in exclude and needs.why_not(a) is None)


def explain_no_match(anns: Iterable[Announcement], needs: Needs) -> str:
    """Why nobody can serve the job, in words a user can act on."""
    anns = list(anns)
    idle = [a for a in anns if a.role is Role.IDLE]
    if not anns:
        return "no node of this grid is visible (is a node daemon running on the other desktops, same grid and key?)"
    if not idle:
        return f"none of the {len(anns)} visible nodes is idle (all are busy in other CEs or used by their owners)"
    reasons: dict[str, int] = {}
    for a in idle:
        why = needs.why_not(a)
        if why:
            reasons[why] = reasons.get(why, 0) + 1
    detail = "; ".join(f"{n} {why}" for why, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
    return f"no idle node matches the job's requirements ({len(idle)} idle: {detail})"


@dataclass
class WorkerSlots:
    slots: int
    running: set[int] = field(default_factory=set)
    waiting: int = 0  # tasks it asked for that we could not give yet


class Dispatch:
    """The coordinator's in-memory queue: the journal is the truth, this is the fast mirror.

    Retried tasks go first, and preferably to a node they have not failed on. A task is queued
    at most once (`_queued` mirrors the two queues), and a task that finishes while queued (its
    result resent to a successor whose journal still had it pending) leaves the queue.
    """

    def __init__(self, pending: Iterable[int] = ()) -> None:
        self.fresh: deque[int] = deque()
        self.retry: deque[int] = deque()
        self._queued: set[int] = set()
        self.tried: dict[int, set[str]] = {}
        self.running: dict[int, str] = {}
        self.workers: dict[str, WorkerSlots] = {}
        self.set_pending(pending)

    @property
    def pending(self) -> int:
        return len(self.fresh) + len(self.retry)

    def set_pending(self, indices: Iterable[int]) -> None:
        """Queue exactly these tasks as fresh (a takeover rebuilding the queue from its journal)."""
        self.fresh.clear()
        self.retry.clear()
        self._queued.clear()
        for i in indices:
            if i not in self._queued:
                self._queued.add(i)
                self.fresh.append(i)

    def _unqueue(self, index: int) -> None:
        if index in self._queued:  # rare: a task finished or placed while queued
            self._queued.discard(index)
            for q in (self.fresh, self.retry):
                if index in q:
                    q.remove(index)

    def _queue_retry(self, index: int, first: bool = False) -> None:
        if index not in self._queued:
            self._queued.add(index)
            if first:
                self.retry.appendleft(index)
            else:
                self.retry.append(index)

    @property
    def capacity(self) -> int:
        return sum(w.slots for w in self.workers.values())

    def add_worker(self, node: str, slots: int) -> None:
        w = self.workers.get(node)
        if w is None:
            self.workers[node] = WorkerSlots(slots)
        else:
            w.slots = slots

    def remove_worker(self, node: str) -> list[int]:
        """Forget a worker; its running tasks go back to the queue (returned)."""
        self.workers.pop(node, None)
        lost = [i for i, n in self.running.items() if n == node]
        for i in lost:
            del self.running[i]
            self._queue_retry(i, first=True)
        return lost

    def take(self, node: str, n: int) -> list[int]:
        """Tasks for `node`, which asks for n more: up to what it asked for so far and did not get.

        Requests add up (a worker asks again before earlier asks were met, with its results),
        and what cannot be given now is remembered for `grant_waiting` (n = 0).
        """
        w = self.workers.get(node)
        if w is None:
            return []
        n += w.waiting
        out: list[int] = []
        for _ in range(len(self.retry)):
            if len(out) == n:
                break
            i = self.retry.popleft()
            tried = self.tried.get(i, ())
            if node in tried and any(o not in tried for o in self.workers):
                self.retry.append(i)  # leave it for a node it has not run on; once all have, anyone
            else:
                out.append(i)
        while len(out) < n and self.fresh:
            out.append(self.fresh.popleft())
        self._queued.difference_update(out)
        for i in out:
            self.running[i] = node
            self.tried.setdefault(i, set()).add(node)
            w.running.add(i)
        w.waiting = n - len(out)
        return out

    def give_back(self, node: str, picked: list[int]) -> None:
        """Undo `take` (the journal refused to record them): queued first again, and still owed to `node`.

        `node` stays in their `tried`: that only makes them prefer another node.
        """
        for i in reversed(picked):
            self.finish(i)
            self._queue_retry(i, first=True)
        if node in self.workers:
            self.workers[node].waiting += len(picked)

    def claim(self, index: int, node: str) -> None:
        """The middleware (HTCondor, BOINC) placed task `index` on `node` itself: record it as running there."""
        self._unqueue(index)
        self.running[index] = node
        self.tried.setdefault(index, set()).add(node)
        if node in self.workers:
            self.workers[node].running.add(index)

    def hold(self, node: str, index: int) -> None:
        """A middleware replica of `index` beyond the one claimed keeps `node` busy (not released as idle)."""
        if node in self.workers:
            self.workers[node].running.add(index)

    def unhold(self, node: str, index: int) -> None:
        if node in self.workers and self.running.get(index) != node:
            self.workers[node].running.discard(index)

    def finish(self, index: int) -> None:
        """The task is settled (recorded, failed for good, or handed back): not running, not queued."""
        node = self.running.pop(index, None)
        if node and node in self.workers:
            self.workers[node].running.discard(index)
        self._unqueue(index)

    def requeue(self, index: int) -> None:
        self.finish(index)
        self._queue_retry(index)

    def idle_workers(self, keep: Collection[str] = ()) -> list[str]:
        """Workers that ran dry (nothing running, nothing left to give them), except those in `keep`.

        The coordinator keeps its replicas: they hold the journal, and releasing one would leave the
        CE without a caught-up copy until another has received the whole journal again.
        """
        if self.pending:
            return []
        return [node for node, w in self.workers.items() if not w.running and node not in keep]

    def workers_wanted(self, max_workers: int | None) -> int:
        """How many more workers would shorten the job (the CE grows while tasks wait)."""
        free = sum(max(w.slots - len(w.running), 0) for w in self.workers.values())
        want = self.pending - free
        if want <= 0:
            return 0
        room = (max_workers - len(self.workers)) if max_workers is not None else want
        return max(0, min(want, room))
