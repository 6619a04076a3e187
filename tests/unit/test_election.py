"""The election's decisions, one at a time (pure logic; the simulation covers them under faults)."""

from __future__ import annotations

from bonjourgrid.election import (
    MAX_ASKED,
    AskPeers,
    Election,
    GiveUp,
    Hold,
    PeerAnswer,
    Reattach,
    TakeOver,
)

T = 1.0


def replica(rank: int = 1, workers: tuple[str, ...] = ("r1", "r2", "w3", "w4")) -> Election:
    """Node r<rank> of a CE coordinated by c at epoch 1, replicas r1, r2; last heartbeat at 0."""
    e = Election(f"r{rank}", "ce", 1, "c", T, 12.0, 0.0, replicas=("r1", "r2"))
    e.heartbeat(1, "c", 0.0, workers=workers)
    return e


def ask(e: Election, now: float) -> AskPeers:
    actions = e.tick(now)
    assert len(actions) == 1 and isinstance(actions[0], AskPeers), actions
    return actions[0]


def test_rank_r_asks_its_peers_at_r_timeouts_of_silence_not_before():
    e = replica(1)
    assert e.tick(0.99) == []
    a = ask(e, 1.0)
    assert a == AskPeers(1, ("r2", "w3", "w4"))  # neither itself nor the coordinator
    assert e.tick(1.1) == []  # once: the ask is in flight
    e2 = replica(2)
    assert e2.tick(1.5) == []
    assert ask(e2, 2.0).peers == ("r1", "w3", "w4")


def test_a_big_ce_asks_only_a_few_peers_replicas_first():
    e = replica(2, workers=tuple(f"w{i}" for i in range(50)))
    peers = ask(e, 2.0).peers
    assert len(peers) == MAX_ASKED and peers[0] == "r1"


def test_peers_that_still_hear_the_coordinator_keep_us_from_taking_over():
    e = replica(1)
    a = ask(e, 1.0)
    out = e.peers_answered(a.epoch, [PeerAnswer("r2", 1, "c", 0.1), PeerAnswer("w3", 1, "c", 1.0)], 3, 1.02)
    assert len(out) == 1 and isinstance(out[0], Hold) and out[0].alive
    assert e.tick(1.5) == []  # not before another timeout
    assert isinstance(ask(e, 2.1), AskPeers)  # then it asks again
    assert not e.done


def test_a_peer_following_a_newer_claim_means_someone_else_took_over():
    e = replica(2)
    a = ask(e, 2.0)
    out = e.peers_answered(a.epoch, [PeerAnswer("w3", 2, "r1", 1.9)], 3, 2.01)
    assert isinstance(out[0], Hold) and not out[0].alive  # alive, but not ours: nothing to reconnect to
    assert not e.done


def twice(e: Election, now: float, answers: list[PeerAnswer], asked: int = 3, others_asked: int = 0,
          others_reached: int = 0) -> list:
    """Answers without an opinion: the first round holds and asks again at once; the second decides."""
    a = ask(e, now)
    first = e.peers_answered(a.epoch, answers, asked, now + 0.01, others_asked, others_reached)
    assert len(first) == 1 and isinstance(first[0], Hold) and not first[0].alive, first
    assert not e.done
    a = ask(e, now + 0.05)
    return e.peers_answered(a.epoch, answers, asked, now + 0.06, others_asked, others_reached)


def test_a_peer_following_an_older_claim_says_nothing_about_ours():
    e = replica(1)
    e.coordinator_seen(3, "x", "mqtt://x", None, 0.0)
    assert twice(e, 1.0, [PeerAnswer("w3", 1, "c", 0.0)]) == [TakeOver(4)]


def test_peers_that_do_not_hear_it_either_confirm_the_takeover_at_once():
    e = replica(1)
    a = ask(e, 1.0)
    answers = [PeerAnswer("r2", 1, "c", 1.0), PeerAnswer("w3", 1, "c", 0.5), PeerAnswer("w4")]  # w4: not a member
    assert e.peers_answered(a.epoch, answers, 3, 1.02) == [TakeOver(2)]
    assert e.done and e.claimed == 2 and e.tick(5.0) == [] and e.tick(100.0) == []


def test_rank_two_takes_over_with_epoch_plus_two():
    e = replica(2)
    a = ask(e, 2.0)
    assert e.peers_answered(a.epoch, [PeerAnswer("w3", 1, "c", 2.0)], 3, 2.01) == [TakeOver(3)]


def test_nobody_answering_means_we_are_probably_the_isolated_one():
    e = replica(1)
    a = ask(e, 1.0)
    out = e.peers_answered(a.epoch, [], 3, 1.5, others_asked=2, others_reached=0)
    assert isinstance(out[0], Hold) and not out[0].alive
    assert e.tick(2.0) == []
    # the link came back, the peers died with the coordinator, but another node of the grid answers
    assert twice(e, 2.5, [], others_asked=2, others_reached=1) == [TakeOver(2)]


def test_refusals_alone_take_two_rounds_and_a_silent_round_in_between_starts_over():
    e = replica(1)
    refused = [PeerAnswer("r2"), PeerAnswer("w3")]  # their daemons died with the coordinator
    a = ask(e, 1.0)
    assert isinstance(e.peers_answered(a.epoch, refused, 3, 1.01)[0], Hold)
    a = ask(e, 1.05)
    assert isinstance(e.peers_answered(a.epoch, [], 3, 1.55)[0], Hold)  # our link went down again
    assert e.tick(2.0) == []
    assert twice(e, 2.6, refused) == [TakeOver(2)]


def test_with_nobody_to_ask_at_all_we_take_over():
    e = replica(1, workers=("r1",))
    e.replicas = ("r1",)
    a = ask(e, 1.0)
    assert a.peers == ()
    assert e.peers_answered(a.epoch, [], 0, 1.0, others_asked=0, others_reached=0) == [TakeOver(2)]


def test_peers_alone_unreachable_but_no_other_node_to_ask_is_still_isolation():
    e = replica(1)
    a = ask(e, 1.0)
    assert isinstance(e.peers_answered(a.epoch, [], 3, 1.5)[0], Hold)


def test_a_heartbeat_while_asking_makes_the_outcome_moot():
    e = replica(1)
    a = ask(e, 1.0)
    e.heartbeat(1, "c", 1.2)
    assert e.peers_answered(a.epoch, [PeerAnswer("w3", 1, "c", 1.0)], 3, 1.3) == []
    assert not e.done


def test_an_outcome_for_an_old_ask_is_ignored():
    e = replica(1)
    a = ask(e, 1.0)
    assert e.peers_answered(a.epoch + 1, [PeerAnswer("w3", 1, "c", 1.0)], 3, 1.3) == []
    assert e.peers_answered(a.epoch, [PeerAnswer("w3", 1, "c", 1.0)], 3, 1.3) == [TakeOver(2)]
    assert e.peers_answered(a.epoch, [PeerAnswer("w3", 1, "c", 1.0)], 3, 1.3) == []  # a duplicate outcome


def test_a_lost_outcome_does_not_block_the_election_forever():
    e = replica(1)
    ask(e, 1.0)
    assert e.tick(2.9) == []
    assert isinstance(ask(e, 3.1), AskPeers)


def test_the_lease_still_ends_a_replica_that_keeps_being_told_the_coordinator_lives():
    e = replica(1)
    now = 1.0
    while not e.done:
        actions = e.tick(now)
        for a in actions:
            if isinstance(a, AskPeers):
                e.peers_answered(a.epoch, [PeerAnswer("r2", 1, "c", 0.0)], 3, now)
        if any(isinstance(a, GiveUp) for a in actions):
            break
        assert not any(isinstance(a, TakeOver) for a in actions)
        now += 0.05
    assert 12.0 <= now < 12.1


def test_a_new_coordinator_forgets_the_old_ones_workers_and_ranks_the_old_replicas_as_a_successor_does():
    e = replica(2)
    assert e.heartbeat(2, "r1", 0.5) == [Reattach("r1", 2, None, None)]
    assert e.workers == () and e.replicas == ("r2",) and e.rank == 1  # jobs.take_over keeps them, in order
    e.heartbeat(2, "r1", 0.6, workers=("r2", "w9"))
    assert ask(e, 1.6) == AskPeers(2, ("w9",))
    e = replica(2)
    e.coordinator_seen(3, "r1", "mqtt://r1", None, 0.5)
    assert e.replicas == ("r2",) and e.workers == ()


def test_workers_and_non_replicas_never_ask():
    e = Election("w3", "ce", 1, "c", T, 12.0, 0.0, replicas=("r1", "r2"), workers=("r1", "r2", "w3"))
    assert all(not isinstance(a, AskPeers) for t in range(1, 120) for a in e.tick(t / 10))
    assert e.tick(12.0) == [GiveUp()]


def test_a_peer_released_at_the_end_of_the_job_sends_us_home_instead_of_taking_over():
    e = replica(1)
    a = ask(e, 1.0)
    ended = PeerAnswer("w3", 1, "c", 4.0, member=False, ended=True)
    out = e.peers_answered(a.epoch, [PeerAnswer("w4"), ended], 3, 1.1)
    assert len(out) == 1 and isinstance(out[0], GiveUp) and "ended" in out[0].reason
    assert e.done and e.claimed is None


def test_an_end_under_an_older_claim_does_not_count():
    e = replica(1)
    e.coordinator_seen(3, "x", "mqtt://x", None, 0.0)
    assert twice(e, 1.0, [PeerAnswer("w3", 1, "c", 0.1, member=False, ended=True)]) == [TakeOver(4)]


def test_a_peer_released_just_now_shows_the_coordinator_alive_one_released_long_ago_shows_nothing():
    e = replica(1)
    a = ask(e, 1.0)
    out = e.peers_answered(a.epoch, [PeerAnswer("w3", 1, "c", 0.2, member=False)], 3, 1.1)
    assert isinstance(out[0], Hold) and out[0].alive
    assert twice(e, 2.2, [PeerAnswer("w3", 1, "c", 9.0, member=False)]) == [TakeOver(2)]


def test_the_coordinator_answering_for_itself_counts_like_a_peer():
    e = replica(1)
    a = ask(e, 1.0)
    out = e.peers_answered(a.epoch, [PeerAnswer("c", 1, "c", 0.05)], 1, 1.1)  # it beats: our bus is the problem
    assert isinstance(out[0], Hold) and out[0].alive
    a = ask(e, 2.2)
    assert e.peers_answered(a.epoch, [PeerAnswer("c", 1, "c", 2.0)], 1, 2.3) == [TakeOver(2)]  # it cannot beat


def test_the_coordinator_is_waited_for_only_when_no_peer_can_tell():
    wants = replica(1).wants_coordinator
    assert wants([])
    assert wants([PeerAnswer("w3"), PeerAnswer("w4")])  # refused, strangers
    assert wants([PeerAnswer("w4", 1, "c", 9.0, member=False)])  # released long ago, as the CE shrank
    assert not wants([PeerAnswer("w3"), PeerAnswer("w4", 1, "c", 1.0)])  # a member
    assert not wants([PeerAnswer("w4", 1, "c", 0.1, member=False)])  # released just now
    assert not wants([PeerAnswer("w4", 1, "c", 9.0, member=False, ended=True)])  # saw the end


def test_a_heartbeat_in_between_makes_the_next_silence_start_its_rounds_afresh():
    e = replica(1)
    a = ask(e, 1.0)
    assert isinstance(e.peers_answered(a.epoch, [PeerAnswer("w3")], 3, 1.01)[0], Hold)  # first opinion-less round
    e.heartbeat(1, "c", 1.02)
    a = ask(e, 2.1)
    assert isinstance(e.peers_answered(a.epoch, [PeerAnswer("w3")], 3, 2.11)[0], Hold)  # a first round again
