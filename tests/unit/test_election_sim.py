"""The election state machine under a simulated network with virtual time, over many random seeds.

The network drops, delays, duplicates and reorders messages: heartbeats, claims, and the
replicas' asks to their peers and the answers. Coordinators crash (the process only: the host
still refuses connections) or are switched off (silence), and a node may be cut off for a
while and come back, maybe with its bus connection gone (it hears no heartbeat until a Hold
that says the coordinator lives makes it reconnect; the real worker also retries on its own every
0.5 s, `WorkerCE._reconnect`, which can only bring that moment earlier). Idle nodes
outside the CE answer asks (they only show whether the asker is isolated). The coordinator may
release workers one by one (the CE shrinks) or end the job (releases everybody). Invariants:

* fencing: a node never follows a claim (epoch, coordinator) lower than one it followed before;
* unique claims: no two nodes ever take over with the same epoch;
* convergence: once faults stop, every live node follows the same live coordinator, and exactly
  one live node acts as coordinator; or, when no replica survived, every worker gave its node
  back within its lease (no orphans);
* a replica cut off while the coordinator is alive and heard by the others never takes over;
* a replica cut off while the job ends never takes over (no zombie CE).
"""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass, field

import pytest

from bonjourgrid.election import (
    AskPeers,
    Election,
    GiveUp,
    Hold,
    PeerAnswer,
    Reattach,
    TakeOver,
    supersedes,
)
from bonjourgrid.replication import choose_replicas

TIMEOUT = 1.0
LEASE = 12.0
HB = 0.25
K = 2  # replicas
OTHERS = 3  # other nodes of the grid asked besides the peers (bonjourgrid.peers.OTHERS_ASKED)


@dataclass
class Ask:
    """An ask in flight: collects answers until its deadline (timeout / 2), like `peers.ask`."""

    id: int
    epoch: int
    peers: tuple[str, ...]
    others: tuple[str, ...]
    coordinator: str
    answers: dict[str, PeerAnswer] = field(default_factory=dict)
    reached: set[str] = field(default_factory=set)
    boss: PeerAnswer | None = None  # the coordinator's answer (used only if no peer knows anything)


@dataclass
class Node:
    name: str
    member: bool = True  # False: an idle node of the grid, outside the CE
    election: Election | None = None
    coordinating: int | None = None  # epoch, when acting as coordinator
    replicas: tuple[str, ...] = ()
    alive: bool = True  # the daemon
    host_up: bool = True  # a crashed daemon's host still refuses connections; a switched-off one is silent
    cut_off_until: float = 0.0  # a partitioned node neither sends nor receives
    bus_lost: bool = False  # hears no heartbeat until it reconnects
    followed: list[tuple[int, str]] = field(default_factory=list)
    gave_up: bool = False
    asking: Ask | None = None
    last_beat: float = 0.0  # as coordinator
    ended: int | None = None  # as coordinator: the epoch at which it ended the job
    left: PeerAnswer | None = None  # how it left the CE (released), as it tells an asker; silent = when


class Sim:
    def __init__(self, seed: int, n: int = 6, drop: float = 0.2, dup: float = 0.1, max_delay: float = 0.4,
                 idle: int = 0):
        self.rng = random.Random(seed)
        self.drop, self.dup, self.max_delay = drop, dup, max_delay
        self.now = 0.0
        self.queue: list[tuple[float, int, object]] = []
        self.seq = itertools.count()
        self.ask_ids = itertools.count(1)
        self.faults_until = 0.0
        names = [f"n{i}" for i in range(n)]
        self.nodes = {x: Node(x) for x in names}
        self.nodes.update({f"i{i}": Node(f"i{i}", member=False) for i in range(idle)})
        coord = self.nodes[names[0]]
        coord.coordinating, coord.replicas = 1, tuple(names[1:1 + K])
        for x in names[1:]:
            nd = self.nodes[x]
            nd.election = Election(x, "ce", 1, names[0], TIMEOUT, LEASE, 0.0, replicas=coord.replicas)
            nd.followed.append((1, names[0]))
        self.claims: dict[int, set[str]] = {1: {names[0]}}
        self.released: set[str] = set()  # workers the first coordinator released
        self.claim_log: list[tuple[float, str, int]] = []

    @property
    def members(self) -> list[Node]:
        return [nd for nd in self.nodes.values() if nd.member]

    # -- plumbing --
    def at(self, t: float, what: object) -> None:
        heapq.heappush(self.queue, (t, next(self.seq), what))

    def reachable(self, x: str) -> bool:
        nd = self.nodes[x]
        return nd.alive and self.now >= nd.cut_off_until

    def host_reachable(self, x: str) -> bool:
        nd = self.nodes[x]
        return nd.host_up and self.now >= nd.cut_off_until

    def send(self, src: str, dst: str, msg: tuple) -> None:
        faulty = self.now < self.faults_until
        if faulty and self.rng.random() < self.drop:
            return
        copies = 2 if faulty and self.rng.random() < self.dup else 1
        for _ in range(copies):
            delay = self.rng.uniform(0, self.max_delay if faulty else 0.02)
            self.at(self.now + delay, ("deliver", src, dst, msg))

    # -- behaviour --
    def step(self, what: object) -> None:
        kind = what[0]
        if kind == "tick":
            for nd in self.members:
                if nd.alive:
                    self.tick(nd)
            self.at(self.now + 0.05, ("tick",))
        elif kind == "beat":
            for nd in self.members:
                if nd.coordinating is not None and self.reachable(nd.name):
                    nd.last_beat = self.now
                    workers = tuple(m.name for m in self.members if m is not nd and m.name not in self.released)
                    for other in workers:
                        self.send(nd.name, other, ("hb", nd.coordinating, nd.name, nd.replicas, workers))
            self.at(self.now + HB, ("beat",))
        elif kind == "deliver":
            _, src, dst, msg = what
            if not (self.host_reachable(src) if msg[0] == "refused" else self.reachable(src)):
                return
            if self.reachable(dst):
                self.receive(self.nodes[dst], src, msg)
            elif msg[0] == "ask" and self.host_reachable(dst):
                self.send(dst, src, ("refused", msg[1]))  # the kernel answers for a dead daemon
        elif kind == "decide":
            self.decide(self.nodes[what[1]], what[2])
        elif kind == "crash":
            self.nodes[what[1]].alive = False
        elif kind == "off":
            self.nodes[what[1]].alive = self.nodes[what[1]].host_up = False
        elif kind in ("finish", "release_one"):
            nd = self.nodes[what[1]]
            if nd.alive and nd.coordinating is not None:
                ended = kind == "finish"
                for other in (m.name for m in self.members if m is not nd) if ended else what[2:]:
                    self.released.add(other)
                    self.send(nd.name, other, ("release", nd.coordinating, nd.name, ended))
                if ended:
                    nd.ended, nd.coordinating = nd.coordinating, None
        elif kind == "cut":
            self.nodes[what[1]].cut_off_until = self.now + what[2]
            self.nodes[what[1]].bus_lost = bool(what[3:] and what[3])

    def receive(self, nd: Node, src: str, msg: tuple) -> None:
        kind = msg[0]
        if kind == "ask":
            self.send(nd.name, src, ("heard", msg[1], self.heard(nd)))
            return
        if kind in ("heard", "refused"):
            ask = nd.asking
            if ask is not None and ask.id == msg[1]:
                answer = msg[2] if kind == "heard" else PeerAnswer(src)
                if src in ask.peers and src not in ask.answers:
                    ask.answers[src] = answer
                elif src in ask.others and answer.epoch is not None:
                    ask.answers[src] = answer  # as `peers.ask`: an "other" that knows the CE counts as a peer
                elif src == ask.coordinator:
                    ask.boss = answer
                ask.reached.add(src)
            return
        if kind == "release":
            e = nd.election
            if e is not None and not e.done and (msg[1], msg[2]) == (e.epoch, e.coordinator):
                nd.left = PeerAnswer(nd.name, msg[1], msg[2], self.now, member=False, ended=msg[3])
                nd.election = None
            return
        epoch, coord = msg[1], msg[2]
        if nd.coordinating is not None:
            if supersedes(epoch, coord, nd.coordinating, nd.name):
                self.step_down(nd, epoch, coord)
            return
        if nd.election is None:
            return
        if kind == "hb":
            if nd.bus_lost:
                return
            actions = nd.election.heartbeat(epoch, coord, self.now, replicas=msg[3], workers=msg[4])
        else:
            actions = nd.election.coordinator_seen(epoch, coord, None, None, self.now)
        self.apply(nd, actions)

    def heard(self, nd: Node) -> PeerAnswer:
        """What `peers.answer_heard` says on this node."""
        if nd.coordinating is not None:
            return PeerAnswer(nd.name, nd.coordinating, nd.name, self.now - nd.last_beat)
        if nd.ended is not None:
            return PeerAnswer(nd.name, nd.ended, nd.name, 0.0, member=False, ended=True)
        e = nd.election
        if e is not None and e.claimed is not None:
            return PeerAnswer(nd.name, e.claimed, nd.name, 0.0)
        if e is not None and not e.done:
            return PeerAnswer(nd.name, e.epoch, e.coordinator, e.silent_for(self.now))
        if nd.left is not None:
            assert nd.left.silent is not None
            return PeerAnswer(nd.name, nd.left.epoch, nd.left.coordinator, self.now - nd.left.silent,
                              member=False, ended=nd.left.ended)
        return PeerAnswer(nd.name)

    def decide(self, nd: Node, ask_id: int) -> None:
        ask = nd.asking
        if not nd.alive or ask is None or ask.id != ask_id or nd.election is None:
            return
        nd.asking = None
        others_reached = len(ask.reached & set(ask.others))
        answers, asked = list(ask.answers.values()), len(ask.peers)
        if nd.election.wants_coordinator(answers):  # as `peers.ask`: the coordinator's answer, waited for only then
            asked += 1
            answers += [ask.boss] if ask.boss is not None else []
        self.apply(nd, nd.election.peers_answered(ask.epoch, answers, asked, self.now, len(ask.others),
                                                  others_reached))

    def step_down(self, nd: Node, epoch: int, coord: str) -> None:
        nd.coordinating = None
        nd.election = Election(nd.name, "ce", epoch, coord, TIMEOUT, LEASE, self.now)
        nd.followed.append((epoch, coord))

    def tick(self, nd: Node) -> None:
        if nd.election is not None and nd.coordinating is None:
            self.apply(nd, nd.election.tick(self.now))

    def apply(self, nd: Node, actions: list) -> None:
        for a in actions:
            if isinstance(a, Reattach):
                assert not supersedes(*nd.followed[-1], a.epoch, a.coordinator), "fencing violated"
                nd.followed.append((a.epoch, a.coordinator))
                nd.bus_lost = False  # a new coordinator: a new bus connection
            elif isinstance(a, AskPeers):
                assert nd.election is not None
                skip = {*a.peers, nd.name, nd.election.coordinator}
                others = tuple(x for x in sorted(self.nodes) if x not in skip)[:OTHERS]
                nd.asking = Ask(next(self.ask_ids), a.epoch, a.peers, others, nd.election.coordinator)
                for x in (*a.peers, *others, nd.election.coordinator):
                    self.send(nd.name, x, ("ask", nd.asking.id))
                self.at(self.now + TIMEOUT / 2, ("decide", nd.name, nd.asking.id))
            elif isinstance(a, TakeOver):
                self.claims.setdefault(a.epoch, set()).add(nd.name)
                self.claim_log.append((self.now, nd.name, a.epoch))
                nd.coordinating, nd.asking = a.epoch, None
                nd.followed.append((a.epoch, nd.name))
                # as `jobs.take_over` then `choose_replicas` on the workers' hellos (alive: they say hello)
                assert nd.election is not None
                kept = [r for r in nd.election.replicas if r != nd.name]
                nd.replicas = tuple(choose_replicas(kept, [m.name for m in self.members if m is not nd and m.alive], K))
                for other in self.nodes:
                    if other != nd.name:
                        self.send(nd.name, other, ("seen", a.epoch, nd.name))
            elif isinstance(a, Hold):
                if a.alive:
                    nd.bus_lost = False  # reconnects to the coordinator the others still hear
            elif isinstance(a, GiveUp):
                nd.gave_up = True
                nd.election = None

    def run(self, until: float) -> None:
        self.at(0.0, ("tick",))
        self.at(0.0, ("beat",))
        while self.queue and self.queue[0][0] <= until:
            self.now, _, what = heapq.heappop(self.queue)
            self.step(what)


def scenario(seed: int) -> Sim:
    rng = random.Random(seed * 7919)
    sim = Sim(seed, drop=rng.choice([0.0, 0.1, 0.3]), dup=rng.choice([0.0, 0.2]),
              max_delay=rng.choice([0.05, 0.3, 0.8]), idle=rng.choice([0, 1, 2]))
    sim.faults_until = 20.0
    t = rng.uniform(1, 4)
    sim.at(t, (rng.choice(["crash", "off"]), "n0"))
    if rng.random() < 0.5:  # the successor dies too
        sim.at(t + rng.uniform(2.5, 6), (rng.choice(["crash", "off"]), "n1"))
    if rng.random() < 0.3:  # a replica is cut off for a while and comes back
        sim.at(rng.uniform(0, 8), ("cut", "n2", rng.uniform(0.5, 4), rng.random() < 0.5))
    return sim


@pytest.mark.parametrize("seed", range(300))
def test_election_invariants(seed: int) -> None:
    sim = scenario(seed)
    sim.run(until=60.0)
    for epoch, who in sim.claims.items():
        assert len(who) == 1, f"epoch {epoch} claimed by {who}"
    live = [nd for nd in sim.members if nd.alive]
    coords = [nd for nd in live if nd.coordinating is not None]
    if coords:
        assert len(coords) == 1, f"{len(coords)} live coordinators"
        c = coords[0]
        for nd in live:
            if nd is not c and not nd.gave_up:
                assert nd.followed[-1] == (c.coordinating, c.name), (nd.name, nd.followed[-1])
    else:  # nobody could take over: everybody gave its node back (no orphans)
        assert all(nd.gave_up for nd in live), [(nd.name, nd.followed[-1]) for nd in live]


def test_a_partitioned_coordinator_steps_down_when_it_hears_the_successor() -> None:
    sim = Sim(seed=1, drop=0.0, dup=0.0)
    sim.faults_until = 0.0
    sim.at(1.0, ("cut", "n0", 5.0))
    sim.run(until=20.0)
    assert sim.nodes["n0"].coordinating is None
    assert sim.nodes["n1"].coordinating == 2  # rank 1 took over with epoch 1 + 1
    assert sim.nodes["n0"].followed[-1] == (2, "n1")


def assert_nothing_moved(sim: Sim) -> None:
    assert sim.claims == {1: {"n0"}}, sim.claim_log
    assert sim.nodes["n0"].coordinating == 1
    for nd in sim.members[1:]:
        assert nd.followed == [(1, "n0")] and not nd.gave_up, (nd.name, nd.followed, nd.gave_up)


def test_the_rank_one_replica_cut_off_for_five_seconds_changes_nothing() -> None:
    sim = Sim(seed=1, drop=0.0, dup=0.0)
    sim.at(1.0, ("cut", "n1", 5.0))
    sim.run(until=20.0)
    assert_nothing_moved(sim)


@pytest.mark.parametrize("seed", range(100))
def test_a_cut_off_replica_never_takes_over_from_a_live_coordinator(seed: int) -> None:
    """Jitter and duplicates but no loss: the others keep hearing the coordinator all along."""
    rng = random.Random(seed * 104729)
    sim = Sim(seed, drop=0.0, dup=0.2, max_delay=0.1, idle=rng.choice([0, 1, 2]))
    sim.faults_until = 60.0
    sim.at(rng.uniform(0.5, 5), ("cut", rng.choice(["n1", "n2"]), rng.uniform(1.5, LEASE - 4), rng.random() < 0.5))
    sim.run(until=30.0)
    assert_nothing_moved(sim)


@pytest.mark.parametrize("cut", [0.0, 3.0])
def test_a_replica_that_lost_its_bus_rejoins_the_coordinator_the_others_hear(cut: float) -> None:
    """Its link (if cut) comes back but its bus connection does not: the peers' answers send it back."""
    sim = Sim(seed=5, drop=0.0, dup=0.0)
    sim.at(1.0, ("cut", "n1", cut, True))
    sim.run(until=20.0)
    assert_nothing_moved(sim)
    assert not sim.nodes["n1"].bus_lost


def test_a_replica_cut_off_beyond_the_lease_gives_its_node_back_without_claiming() -> None:
    sim = Sim(seed=2, drop=0.0, dup=0.0, idle=1)
    sim.at(1.0, ("cut", "n1", LEASE + 5))
    sim.run(until=30.0)
    assert sim.claims == {1: {"n0"}} and sim.nodes["n0"].coordinating == 1
    assert sim.nodes["n1"].gave_up


@pytest.mark.parametrize("how", ["crash", "off"])
def test_a_replica_whose_peers_died_with_the_coordinator_takes_over_if_it_can_reach_anyone(how: str) -> None:
    """Three members (coordinator and two replicas) and one idle node: n0 and n2 die at once."""
    sim = Sim(seed=3, n=3, drop=0.0, dup=0.0, idle=1)
    sim.at(1.0, (how, "n0"))
    sim.at(1.0, (how, "n2"))
    sim.run(until=10.0)
    assert sim.nodes["n1"].coordinating == 2


def test_a_lone_survivor_that_reaches_nobody_cannot_tell_it_from_its_own_isolation() -> None:
    """Every other node switched off at once (silence, no refusal): it holds, then gives up at the lease."""
    sim = Sim(seed=4, n=3, drop=0.0, dup=0.0)
    sim.at(1.0, ("off", "n0"))
    sim.at(1.0, ("off", "n2"))
    sim.run(until=20.0)
    assert sim.claims == {1: {"n0"}} and sim.nodes["n1"].gave_up


def test_a_refusing_host_proves_the_link_works() -> None:
    """Same, but the daemons crashed and their hosts refuse connections: the survivor takes over."""
    sim = Sim(seed=4, n=3, drop=0.0, dup=0.0)
    sim.at(1.0, ("crash", "n0"))
    sim.at(1.0, ("crash", "n2"))
    sim.run(until=20.0)
    assert sim.nodes["n1"].coordinating == 2


@pytest.mark.parametrize("seed", range(50))
def test_a_replica_cut_off_while_the_job_ends_never_resurrects_the_ce(seed: int) -> None:
    """The job ends while a replica hears nothing: when it can ask again, its peers (or the old
    coordinator, when the CE had shrunk to the replica alone) tell it so, and it goes home."""
    rng = random.Random(seed * 15485863)
    sim = Sim(seed, drop=0.0, dup=0.2, max_delay=0.1, idle=rng.choice([0, 1]))
    sim.faults_until = 60.0
    victim = rng.choice(["n1", "n2"])
    if rng.random() < 0.5:  # the CE shrank to the replica alone before the end
        sim.at(0.5, ("release_one", "n0", *(x for x in ("n1", "n2", "n3", "n4", "n5") if x != victim)))
    t = rng.uniform(1, 4)
    sim.at(t, ("cut", victim, rng.uniform(1.5, 6), rng.random() < 0.5))
    sim.at(t + rng.uniform(0.1, 1.2), ("finish", "n0"))
    sim.run(until=40.0)
    assert sim.claims == {1: {"n0"}}, sim.claim_log
    nd = sim.nodes[victim]
    assert nd.gave_up or (nd.left is not None and nd.left.ended), (nd.followed, nd.gave_up, nd.left)


def test_a_replica_alone_in_a_shrunk_ce_asks_the_coordinator_itself() -> None:
    """Its peers were released long ago and know nothing; the coordinator says it still beats."""
    sim = Sim(seed=6, drop=0.0, dup=0.0)
    sim.at(0.5, ("release_one", "n0", "n2", "n3", "n4", "n5"))
    sim.at(2.0, ("cut", "n1", 3.0, True))
    sim.run(until=20.0)
    assert sim.claims == {1: {"n0"}}, sim.claim_log
    assert sim.nodes["n1"].followed == [(1, "n0")] and not sim.nodes["n1"].gave_up
    assert not sim.nodes["n1"].bus_lost  # it reconnected
