"""gossip.broadcast_queue: transmit-limited, least-sent-first piggy-backing."""

from __future__ import annotations

import math
from collections import Counter
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip import broadcast_queue
from gossip.broadcast_queue import PRIORITY_ALIVE, PRIORITY_OTHER, BroadcastQueue
from gossip.config import LAN, LOCAL, GossipConfig

SETTINGS = settings(derandomize=True, deadline=None, database=None, max_examples=200)


@pytest.mark.parametrize("config", [LAN, LOCAL], ids=["lan", "local"])
@pytest.mark.parametrize("n", [0, 1, 2, 9, 10, 99, 100, 1000])
def test_retransmit_limit_formula(config: GossipConfig, n: int) -> None:
    expected = config.retransmit_mult * max(1, math.ceil(math.log10(n + 1)))
    assert config.retransmit_limit(n) == expected


def test_retransmit_limit_examples() -> None:
    assert LAN.retransmit_limit(1) == 4
    assert LAN.retransmit_limit(9) == 4
    assert LAN.retransmit_limit(10) == 8  # ceil(log10(11)) == 2
    assert LAN.retransmit_limit(100) == 12


def test_empty_and_zero_budget() -> None:
    q = BroadcastQueue()
    assert q.get(1000, 3) == []
    q.queue("a", b"x")
    assert q.get(0, 3) == [] and q.get(-5, 3) == []
    assert len(q) == 1  # nothing taken, nothing counted


def test_each_update_is_sent_exactly_limit_times() -> None:
    q = BroadcastQueue()
    q.queue("a", b"alive-a")
    sent = [q.get(1000, 3) for _ in range(5)]
    assert sent == [[b"alive-a"]] * 3 + [[], []]
    assert len(q) == 0 and not q.pending("a")


def test_least_transmitted_goes_first() -> None:
    q = BroadcastQueue()
    q.queue("old", b"o" * 10)
    assert q.get(10, 5) == [b"o" * 10]
    assert q.get(10, 5) == [b"o" * 10]
    q.queue("new", b"n" * 10)
    # Room for one: the fresh update wins over the twice-sent one.
    assert q.get(10, 5) == [b"n" * 10]
    assert q.get(10, 5) == [b"n" * 10]
    # Now both were sent twice; then the older one has caught up.
    assert sorted(q.get(20, 5)) == sorted([b"o" * 10, b"n" * 10])


def test_newer_update_for_the_same_key_replaces_the_old() -> None:
    q = BroadcastQueue()
    q.queue("a", b"alive-a-1")
    q.queue("b", b"alive-b-1")
    assert q.get(1000, 3)  # both sent once
    q.queue("a", b"suspect-a-1")
    assert len(q) == 2 and q.pending("a")
    out = [q.get(1000, 3) for _ in range(4)]
    flat = [p for batch in out for p in batch]
    assert b"alive-a-1" not in flat
    assert Counter(flat) == {b"suspect-a-1": 3, b"alive-b-1": 2}  # the replacement starts afresh


def test_item_that_does_not_fit_is_skipped_not_blocking() -> None:
    q = BroadcastQueue()
    q.queue("big", b"B" * 100)
    q.queue("small", b"s" * 10)
    assert q.get(50, 3) == [b"s" * 10]
    assert q.pending("big")


def test_per_item_overhead_counts_against_budget() -> None:
    q = BroadcastQueue()
    for k in "abc":
        q.queue(k, b"x" * 10)
    assert len(q.get(36, 3, per_item_overhead=2)) == 3
    assert len(q.get(35, 3, per_item_overhead=2)) == 2


def test_reset_drops_everything() -> None:
    q = BroadcastQueue()
    q.queue("a", b"1")
    q.queue("b", b"2")
    q.reset()
    assert len(q) == 0 and q.get(100, 3) == []


# -- model-based property ----------------------------------------------------------------

ops = st.lists(
    st.one_of(
        st.tuples(st.just("queue"), st.sampled_from("abcdefgh"), st.integers(min_value=1, max_value=60)),
        st.tuples(st.just("get"), st.integers(min_value=-5, max_value=200), st.integers(min_value=0, max_value=4)),
    ),
    max_size=60,
)


@SETTINGS
@given(ops, st.integers(min_value=1, max_value=5))
def test_queue_against_a_model(operations: list[tuple[str, object, int]], limit: int) -> None:
    q = BroadcastQueue()
    model: dict[str, tuple[bytes, int]] = {}  # key -> (payload, transmits)
    version = 0
    for op in operations:
        if op[0] == "queue":
            _, key, size = op
            version += 1
            payload = f"{key}:{version}:".encode().ljust(size, b".")
            q.queue(str(key), payload)
            model[str(key)] = (payload, 0)
        else:
            _, budget, overhead = op
            assert isinstance(budget, int)
            out = q.get(budget, limit, per_item_overhead=overhead)
            by_payload = {p: k for k, (p, _) in model.items()}
            taken = [by_payload[p] for p in out]  # only queued, current payloads come out
            assert len(set(taken)) == len(taken)  # each at most once per datagram
            used = sum(len(p) + overhead for p in out)
            assert used <= max(budget, 0)  # the budget is respected
            untaken = [k for k in model if k not in taken]
            if budget > 0:
                # Greedy: nothing that was left behind would still have fit.
                for k in untaken:
                    assert used + len(model[k][0]) + overhead > budget
                # Least-transmitted first: a taken item was sent no more often than
                # any item left behind that is no bigger than it.
                for t in taken:
                    for k in untaken:
                        if len(model[k][0]) <= len(model[t][0]):
                            assert model[t][1] <= model[k][1]
            for k in taken:
                payload, transmits = model[k]
                if transmits + 1 >= limit:
                    del model[k]
                else:
                    model[k] = (payload, transmits + 1)
        assert len(q) == len(model)
        assert all(q.pending(k) for k in model)


# -- bound and priorities (issue: the queue under scale) ---------------------------------------


def test_alive_messages_go_ahead_of_everything_else() -> None:
    q = BroadcastQueue()
    q.queue("suspect-x", b"s" * 50)
    q.queue("dead-y", b"d" * 60)
    q.queue("alive-z", b"a" * 10, PRIORITY_ALIVE)
    assert q.get(30, 5) == [b"a" * 10]  # even when the others are bigger or older
    q.queue("alive-z", b"A" * 10, PRIORITY_ALIVE)  # a newer update replaces the queued one in place
    assert len(q) == 3
    assert q.get(200, 5)[0] == b"A" * 10


def test_the_queue_is_bounded_relative_to_the_cluster_and_counts_what_it_drops() -> None:
    q = BroadcastQueue(min_depth=10)
    q.set_cluster_size(20)
    assert q.max_depth == 40
    q.set_cluster_size(3)
    assert q.max_depth == 10  # never below the minimum
    q.queue("alive-0", b"a", PRIORITY_ALIVE)
    for i in range(30):
        q.queue(f"k{i}", f"v{i}".encode())
        if i < 5:
            q.get(100, 10)  # the first few have been sent a few times already
    assert len(q) <= 10 and q.dropped == 31 - len(q)
    kept = set(q.get(10_000, 100))
    assert b"a" in kept  # the alive survived: lowest-priority, most-sent, oldest went first
    assert not kept & {f"v{i}".encode() for i in range(5)}
    assert f"v{29}".encode() in kept


# -- the sorted-list walk equals the plain algorithm ----------------------------------------------


def _reference_get(items: dict[str, list], budget: int, limit: int, overhead: int) -> list[bytes]:
    """The queue's rule written plainly: sort everything, walk it, take what still fits."""
    if budget <= 0:
        return []
    out, used = [], 0
    for key, rec in sorted(items.items(), key=lambda kv: (kv[1][0], kv[1][1], -len(kv[1][2]), -kv[1][3])):
        prio, transmits, payload, _order = rec
        if used + len(payload) + overhead > budget:
            continue
        used += len(payload) + overhead
        out.append(payload)
        rec[1] += 1
        if rec[1] >= limit:
            del items[key]
    return out


ops_with_priority = st.lists(
    st.one_of(
        st.tuples(st.just("queue"), st.sampled_from("abcdefgh"), st.integers(min_value=1, max_value=60),
                  st.sampled_from([PRIORITY_ALIVE, PRIORITY_OTHER])),
        # Budgets about one to three updates wide, so that partial fits across tiers are common.
        st.tuples(st.just("get"), st.integers(min_value=-5, max_value=150), st.integers(min_value=0, max_value=4),
                  st.just(0)),
    ),
    max_size=80,
)


@pytest.mark.parametrize("walk_below", [0, 1000], ids=["search", "walk"])
@settings(derandomize=True, deadline=None, database=None, max_examples=500)
@given(operations=ops_with_priority, limit=st.integers(min_value=1, max_value=6))
def test_get_takes_exactly_what_the_plain_sorted_walk_takes(walk_below: int,
                                                            operations: list[tuple[str, object, int, int]],
                                                            limit: int) -> None:
    # Both ways get() finds updates: the binary search of a long queue, the walk of a short one.
    with mock.patch.object(broadcast_queue, "_WALK_BELOW", walk_below):
        _check_against_reference(operations, limit)


def _check_against_reference(operations: list[tuple[str, object, int, int]], limit: int) -> None:
    q = BroadcastQueue()
    ref: dict[str, list] = {}  # key -> [priority, transmits, payload, order]
    order = 0
    for op, a, b, prio in operations:
        if op == "queue":
            order += 1
            payload = f"{a}:{order}:".encode().ljust(b, b".")
            q.queue(str(a), payload, prio)
            ref[str(a)] = [prio, 0, payload, order]
        else:
            assert isinstance(a, int)
            assert q.get(a, limit, per_item_overhead=b) == _reference_get(ref, a, limit, b)
        assert len(q) == len(ref)
