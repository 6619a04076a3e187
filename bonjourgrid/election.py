"""Who coordinates a CE after its coordinator disappears: failure detection and re-election (sans-I/O).

Every worker of a CE runs one `Election`. Heartbeats of the coordinator keep it
quiet. When they stop for `timeout` (or the bus connection drops and they then
stay away), the CE's replicas take over in rank order: rank r tries at
`last heartbeat + r x timeout`, so rank 1 goes first and rank 2 only if rank 1
did not show up with a higher epoch in the meantime. Everybody else waits to
see a coordinator of a higher epoch and reattaches to it, or gives the node
back after the lease when nobody comes (no orphans).

Silence on our side is not proof the coordinator is gone: our own link may be
the one that is down (a flapping desktop). So a replica whose turn comes first
asks the CE's other workers (`AskPeers`) whether they still hear the coordinator,
and takes over only on evidence that it is gone for them too (`peers_answered`):

* a peer saw the CE end (released at the end of the job): the job is over, our
  copy of the journal is stale; leave the CE (no zombie coordinator);
* a peer follows a higher claim, or heard our coordinator less than timeout/2
  ago (or was released by it that recently): the coordinator is alive and we
  are the one cut off; hold, ask again one timeout later (the lease still ends it);
* a member that follows our coordinator has not heard it for timeout/2 or more
  either, and nobody says alive: take over;
* only answers without an opinion (a refused connection: that daemon is gone,
  but our link works; a node outside the CE): we are not isolated, the peers
  died with the coordinator; take over, once a second round right away says
  the same (the first may have raced our link coming back);
* nobody answered at all: we are probably isolated; hold and ask again; if
  there was nobody to ask, take over (nothing better is knowable).

When no peer can tell (`wants_coordinator`: none is a member, saw the end, or
left the CE just now), the coordinator's own answer counts too, like a peer's:
how long since it last managed to beat, or that the CE ended.

Epochs fence: a heartbeat, or a coordinator seen, with an epoch lower than the
one we follow is ignored, so a deposed coordinator that comes back is never
obeyed again. Rank r takes over with epoch `old + r`, so two replicas of one
coordinator never claim the same epoch; should two claims ever meet with equal
epochs (a successor that failed in turn while a slow replica of its
predecessor woke up), the claim order `(epoch, node id)` decides, everywhere
the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

MAX_ASKED = 8  # peers asked at once: one live answer is enough, a big CE must not be flooded


@dataclass(frozen=True)
class TakeOver:
    """This node becomes the coordinator, with this epoch."""

    epoch: int


@dataclass(frozen=True)
class Reattach:
    """Follow a (new) coordinator."""

    coordinator: str
    epoch: int
    bus: str | None
    data: str | None


@dataclass(frozen=True)
class GiveUp:
    """Nobody took over within the lease (or the CE ended without us): the node goes back to Idle."""

    reason: str = ""
    ended: bool = False  # a peer saw the job end


@dataclass(frozen=True)
class AskPeers:
    """Before taking over: ask these CE members whether they still hear the coordinator.

    The I/O layer asks them (and, to tell "they died too" from "I am isolated", a few other
    nodes of the grid) and feeds the outcome back through `Election.peers_answered`.
    """

    epoch: int
    peers: tuple[str, ...]


@dataclass(frozen=True)
class Hold:
    """Not taking over now (asked again later). `alive`: peers still hear the coordinator."""

    reason: str
    alive: bool


Action = TakeOver | Reattach | GiveUp | AskPeers | Hold


@dataclass(frozen=True)
class PeerAnswer:
    """What one asked peer said: the claim it follows and how long since it last heard it.

    `member` False: it left the CE that long ago, released by that claim (`ended`: at the end of
    the job) or giving up. `epoch` None: it knows nothing of this CE, its daemon is gone (its host
    refused the connection), or its answer was unusable; it was reached all the same.
    """

    node: str
    epoch: int | None = None
    coordinator: str | None = None
    silent: float | None = None
    member: bool = True
    ended: bool = False


def supersedes(epoch: int, node: str, than_epoch: int, than_node: str) -> bool:
    """Does the claim (epoch, node) win over (than_epoch, than_node)? One total order for everybody."""
    return (epoch, node) > (than_epoch, than_node)


@dataclass
class Election:
    me: str
    ce: str
    epoch: int
    coordinator: str
    timeout: float
    lease: float
    last_heartbeat: float
    replicas: tuple[str, ...] = ()
    bus: str | None = None
    data: str | None = None
    workers: tuple[str, ...] = ()  # the CE's workers, as the coordinator last listed them
    done: bool = False  # took over or gave up: this election has nothing more to say
    claimed: int | None = None  # the epoch we took over with (what we tell a peer that asks)
    _asking: int | None = None  # epoch of the ask in flight
    _asked_at: float = 0.0
    _next_ask: float = 0.0
    _unconfirmed: bool = False  # the last round reached somebody but nobody with an opinion
    _tried: set[int] = field(default_factory=set)

    @property
    def rank(self) -> int | None:
        """1-based replica rank of this node, None if it is not a replica."""
        return self.replicas.index(self.me) + 1 if self.me in self.replicas else None

    def heartbeat(self, epoch: int, coordinator: str, now: float, replicas: tuple[str, ...] | None = None,
                  workers: tuple[str, ...] | None = None) -> list[Action]:
        """A heartbeat (or any message) from a coordinator of this CE."""
        if self.done or supersedes(self.epoch, self.coordinator, epoch, coordinator):
            return []
        actions: list[Action] = []
        if (epoch, coordinator) != (self.epoch, self.coordinator):
            actions.append(Reattach(coordinator, epoch, self.bus, self.data))
            self._new_coordinator(coordinator)
        self.epoch, self.coordinator, self.last_heartbeat = epoch, coordinator, max(self.last_heartbeat, now)
        self._unconfirmed = False  # a new silence starts its rounds afresh
        if replicas is not None:
            self.replicas = replicas
        if workers is not None:
            self.workers = workers
        return actions

    def coordinator_seen(self, epoch: int, coordinator: str, bus: str | None, data: str | None,
                         now: float) -> list[Action]:
        """A Coordinator service of this CE announced over mDNS."""
        if self.done or coordinator == self.me or not supersedes(epoch, coordinator, self.epoch, self.coordinator):
            return []
        self.epoch, self.coordinator, self.bus, self.data = epoch, coordinator, bus, data
        self.last_heartbeat = now  # a fresh coordinator: give it a full timeout to start beating
        self._unconfirmed = False
        self._new_coordinator(coordinator)
        return [Reattach(coordinator, epoch, bus, data)]

    def _new_coordinator(self, coordinator: str) -> None:
        """Until its first heartbeat: a successor keeps the old replicas, in order (`jobs.take_over`)."""
        self.replicas = tuple(r for r in self.replicas if r != coordinator)
        self.workers = ()  # the old coordinator's list says nothing about the new CE

    def wants_coordinator(self, answers: Sequence[PeerAnswer]) -> bool:
        """Does the coordinator's own answer matter? Only when no peer can tell whether it is gone now.

        A peer that left the CE long ago (released as the CE shrank) cannot. The I/O layer asks the
        coordinator along with the peers but waits for it only then, so a switched-off coordinator
        (no answer, no refusal) delays no takeover that the peers confirm.
        """
        return not any(a.epoch is not None and (a.member or a.ended or self._recent(a)) for a in answers)

    def silent_for(self, now: float) -> float:
        """Seconds since we last heard the coordinator we follow (what we tell a peer that asks)."""
        return max(0.0, now - self.last_heartbeat)

    def tick(self, now: float) -> list[Action]:
        if self.done:
            return []
        silent = now - self.last_heartbeat
        rank = self.rank
        if self._asking is not None and now - self._asked_at > 2 * self.timeout:
            self._asking = None  # the outcome never came back: ask anew
        if rank is not None and silent >= rank * self.timeout and self.epoch not in self._tried \
                and self._asking is None and now >= self._next_ask:
            self._asking, self._asked_at = self.epoch, now
            peers = [p for p in (*self.replicas, *self.workers) if p not in (self.me, self.coordinator)]
            return [AskPeers(self.epoch, tuple(dict.fromkeys(peers))[:MAX_ASKED])]
        if silent >= self.lease:
            self.done = True
            return [GiveUp()]
        return []

    def peers_answered(self, epoch: int, answers: Sequence[PeerAnswer], asked: int, now: float,
                       others_asked: int = 0, others_reached: int = 0) -> list[Action]:
        """The outcome of `AskPeers(epoch, ...)`: take over, or hold and ask again a timeout later.

        `answers`: one per peer that answered (and per other node that turned out to know the CE, and
        the coordinator's own if it was waited for); `asked`: peers asked (and the coordinator then);
        `others_*`: other nodes of the grid asked, and how many answered at all.
        """
        if self.done or self._asking != epoch:
            return []  # stale: a later ask, or the election is over
        self._asking = None
        rank = self.rank
        if epoch != self.epoch or rank is None or now - self.last_heartbeat < rank * self.timeout:
            return []  # the coordinator was heard (or replaced) meanwhile: nothing to decide
        claims = [a for a in answers if a.epoch is not None and a.coordinator is not None]
        if any(a.ended and not supersedes(self.epoch, self.coordinator, a.epoch, a.coordinator) for a in claims):
            self.done = True
            return [GiveUp("the CE ended while we did not hear it", ended=True)]
        ours = [a for a in claims if (a.epoch, a.coordinator) == (self.epoch, self.coordinator)]
        newer = [a for a in claims if supersedes(a.epoch, a.coordinator, self.epoch, self.coordinator)]
        hear = [a for a in ours if self._recent(a)]
        if newer or hear:
            self._next_ask, self._unconfirmed = now + self.timeout, False
            what = f"{len(hear)} still hear(s) the coordinator" if hear else f"{len(newer)} follow(s) a newer one"
            return [Hold(f"{what}, of {len(answers)} node(s) answering", bool(hear))]
        confirmed = any(a.member for a in ours)  # silent for them too
        reached = bool(answers) or others_reached > 0
        if confirmed or (reached and self._unconfirmed) or (asked == 0 and others_asked == 0):
            self._tried.add(epoch)
            self.done, self.claimed = True, self.epoch + rank
            return [TakeOver(self.claimed)]
        if reached:
            self._next_ask, self._unconfirmed = now, True
            return [Hold("only nodes without an opinion answered: asking again at once to be sure", False)]
        self._next_ask, self._unconfirmed = now + self.timeout, False
        return [Hold(f"none of the {asked + others_asked} node(s) asked answered: we may be cut off", False)]

    def _recent(self, a: PeerAnswer) -> bool:
        return a.silent is not None and a.silent < self.timeout / 2
