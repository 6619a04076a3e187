"""Passive replication of a CE's journal to its replicas (DESIGN section 6).

The coordinator names k replicas among its workers (rank 1..k) and streams its
journal's change log to each, in order; a replica applies the changes to a
journal of its own (same path layout as a coordinator's, so a takeover just
opens it), fetches the job's inputs and every recorded output file from the
coordinator's data endpoint, and acknowledges the last sequence number it
holds. The stream is asynchronous: results that reached the coordinator but not
yet a replica are recovered after a failover from the workers, which keep their
results until the CE releases them and resend them to the new coordinator.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from .bus import BusError
from .datasrv import DataError, fetch
from .envelope import MAX_MESSAGE_BYTES
from .gridkey import GridKey
from .journal import Change, Journal, JournalError
from .sandbox import safe_join

if TYPE_CHECKING:
    from .coordinator import CoordinatorCE

log = logging.getLogger("bonjourgrid.replication")

BATCH = 500
# Of change payloads per message. A big job's first change nearly fills a message alone (jobspec's
# MAX_JOB_BYTES), so it goes alone, and a replica named late, which gets the whole history, gets it
# in batches that fit.
BATCH_BYTES = MAX_MESSAGE_BYTES // 2
RESEND_S = 2.0
# At most one batch per replica this often while the job runs (its end goes at once): a batch per
# task or two would cost the coordinator, the broker and the replica a message each.
PACE_S = 0.05
LEFT_MARKER = "left.json"  # in a replica's directory: this node left the CE before its end


def choose_replicas(current: list[str], workers: list[str], k: int, unfit: Collection[str] = ()) -> list[str]:
    """Keep the live replicas in their rank order, fill up to k from the other workers (join order).

    A worker that cannot store the journal (`unfit`: its disk is full) protects nothing: it is
    named only while too few other workers are left.
    """
    fit = [w for w in workers if w not in unfit]
    kept = [r for r in current if r in fit][:k]
    chosen = kept + [w for w in fit if w not in kept][: k - len(kept)]
    if len(chosen) < k:  # too few fit workers: better a replica whose disk may clear than none
        rest = [r for r in current if r in workers and r in unfit]
        chosen += (rest + [w for w in workers if w in unfit and w not in rest])[: k - len(chosen)]
    return chosen


class ReplicationSender:
    """Coordinator side: one ordered stream per replica, resent until acknowledged."""

    def __init__(self, ce: CoordinatorCE) -> None:
        self.ce = ce
        self.replicas: list[str] = []
        self.unfit: set[str] = set()  # replicas that said they cannot store the journal
        self.acked: dict[str, int] = {}
        self.sent: dict[str, tuple[int, float]] = {}  # replica -> (seq sent up to, when)
        self.wake = asyncio.Event()
        self.acked_changed = asyncio.Event()  # for whoever waits for the replicas to catch up
        self.urgent = asyncio.Event()  # set by `hurry()`: no pacing any more
        self._last_sent, self._backlog = 0.0, False

    def rename(self, workers: list[str], k: int) -> bool:
        """Re-rank the replicas; True if the ranking changed (and must be announced)."""
        new = choose_replicas(self.replicas, workers, k, self.unfit)
        if new == self.replicas and all(r in self.acked for r in new):
            return False
        for r in new:
            self.acked.setdefault(r, 0)
        for r in set(self.replicas) - set(new):
            self.acked.pop(r, None)
            self.sent.pop(r, None)
        self.replicas = new
        self.wake.set()
        self.acked_changed.set()  # a replica gone may be the one the end waited for
        return True

    def hurry(self) -> None:
        """The job is ending: send what is left at once, and from now on without pacing."""
        self.urgent.set()
        self.wake.set()

    def refused(self, node: str, reason: str) -> bool:
        """A replica cannot store what it is sent; True if that is news (the replicas must be renamed).

        Its batch is resent as usual, every RESEND_S, while it stays a replica: its disk may clear.
        """
        if node not in self.replicas or node in self.unfit:
            return False
        self.unfit.add(node)
        log.warning("CE %s: replica %s cannot store the journal (%s): another worker replaces it if one can",
                    self.ce.ce, node[:8], reason)
        return True

    def on_ack(self, node: str, seq: int) -> None:
        if node in self.acked:
            if self.acked[node] == 0 and seq > 0:
                log.info("CE %s: replica %s holds the journal up to seq %d", self.ce.ce, node[:8], seq)
            self.acked[node] = max(self.acked[node], seq)
            self.sent.pop(node, None)
            self.wake.set()
            self.acked_changed.set()

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), 0.5)
            self.wake.clear()
            pause = self._last_sent + PACE_S - time.monotonic()
            if pause > 0 and not self.urgent.is_set() and not self._backlog:  # the next moment joins the batch
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.urgent.wait(), pause)
            journal = self.ce.journal
            if journal is None:
                return
            last = journal.committed_seq
            now = time.monotonic()
            for node in list(self.replicas):
                done = self.acked.get(node, 0)
                in_flight = self.sent.get(node)
                if done >= last or (in_flight and now - in_flight[1] < RESEND_S):
                    continue
                try:
                    changes = await asyncio.to_thread(journal.changes_since, done, BATCH, BATCH_BYTES)
                    if not changes or self.ce.journal is None:
                        continue
                    await self.ce.send(node, "rep", {"changes": [c.to_dict() for c in changes],
                                                     "inputs": self.ce.inputs})
                except (BusError, JournalError, sqlite3.Error) as e:
                    # The bus is down for a moment, or the CE is being torn down (a cancel that
                    # asyncio.wait_for swallowed on 3.11): try again later, never end the stream.
                    log.debug("CE %s: replication to %s deferred: %s", self.ce.ce, node[:8], e)
                    continue
                self.sent[node] = (changes[-1].seq, now)
                self._last_sent, self._backlog = now, changes[-1].seq < last  # a catch-up goes unpaced


class ReplicaStore:
    """Replica side: the CE's journal and files on this node, kept ready for a takeover."""

    def __init__(self, ce_dir: Path, key: GridKey, ce: str) -> None:
        self.dir = ce_dir
        self.key = key
        self.ce = ce
        self.journal: Journal | None = None

    def apply(self, body: dict[str, Any], data_url: str | None) -> int:
        """Apply one batch (blocking: call in a thread); returns the last sequence number held."""
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / LEFT_MARKER).unlink(missing_ok=True)  # we are a replica (again)
        if self.journal is None:
            self.journal = Journal.open(self.dir / "journal.db")
        inputs = body.get("inputs") or []
        for f in inputs:
            self._fetch(data_url, f"/inputs/{f['sha256']}", f["sha256"], self.dir / "inputs" / f["sha256"])
        manifest = self.dir / "inputs.json"
        if not manifest.exists():
            manifest.write_text(json.dumps(inputs))
        changes = [Change.from_dict(c) for c in body.get("changes") or []]
        if changes and changes[0].seq == 1 and self.journal.last_seq() > 0 and not self._same_history(changes):
            self._restart()  # we replicated another (deposed) coordinator's history: start over
        fresh = [c for c in changes if c.seq > self.journal.last_seq()]
        for c in fresh:
            for index, result in c.results():
                for o in result.get("outputs", ()):
                    dest = safe_join(self.dir / "outputs" / str(index), o["path"])
                    self._fetch(data_url, f"/outputs/{index}/{quote(o['path'])}", o["sha256"], dest)
        self.journal.apply(fresh)
        return self.journal.last_seq()

    def _same_history(self, changes: list[Change]) -> bool:
        assert self.journal is not None
        mine = {c.seq: c for c in self.journal.changes_since(0, len(changes))}
        return all(mine[c.seq].payload == c.payload for c in changes if c.seq in mine)

    def _restart(self) -> None:
        log.warning("CE %s: the replica journal diverged from the new coordinator's: replaying it", self.ce)
        self.close()
        for suffix in ("", "-wal", "-shm"):
            (self.dir / f"journal.db{suffix}").unlink(missing_ok=True)
        self.journal = Journal.open(self.dir / "journal.db")

    def _fetch(self, data_url: str | None, path: str, sha: str, dest: Path) -> None:
        if dest.is_file():
            return
        if not data_url:
            raise DataError("no data endpoint to replicate files from")
        dest.parent.mkdir(parents=True, exist_ok=True)
        fetch(data_url, self.key, self.ce, sha, dest, path=path)

    def abandon(self, when: float) -> None:
        """We left the CE before its end: our copy, if any, stops here and must not pass for its state."""
        if (self.dir / "journal.db").is_file():
            try:
                (self.dir / LEFT_MARKER).write_text(json.dumps({"left_at": when}))
            except OSError as e:  # a full disk: the copy then says what it froze at; leaving goes on
                log.warning("CE %s: could not mark our copy of its journal as left behind: %s", self.ce, e)

    def close(self) -> None:
        if self.journal is not None:
            with contextlib.suppress(JournalError):
                self.journal.close()
            self.journal = None
