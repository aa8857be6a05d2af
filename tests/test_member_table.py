"""gossip.table: the member table the membership components share.

What every component relies on: the count of members up stays right whoever
changes a member, components hear of members coming and going, and records
shared between the simulator's tables are copied before any change.
"""

from __future__ import annotations

import random

from gossip.config import LOCAL
from gossip.member import Member, Status
from gossip.table import MemberTable, shared_record
from gossip.wire import Address


def A(name: str) -> Address:
    return (f"10.0.0.{ord(name[0]) % 250}", 7946)


def table(now: float = 0.0) -> MemberTable:
    return MemberTable(Member("me", A("me"), 0, Status.ALIVE), LOCAL, random.Random(1), now)


def member(name: str, status: Status = Status.ALIVE) -> Member:
    return Member(name, A(name), 0, status)


def recount(t: MemberTable) -> int:
    return sum(1 for m in t.members.values() if m.status.up)


def test_the_up_count_follows_admissions_status_changes_and_removals() -> None:
    t = table()
    assert t.num_up() == 1
    for name in "abc":
        t.admit(1.0, member(name))
    assert t.num_up() == 4 == recount(t)
    t.set_status(2.0, t.members["a"], Status.SUSPECT, "test")
    assert t.num_up() == 4
    t.set_status(3.0, t.members["a"], Status.DEAD, "test")
    assert t.num_up() == 3 == recount(t)
    t.forget("b")
    assert t.num_up() == 2 == recount(t)
    t.forget("a")  # a dead member leaves the count as it is
    assert t.num_up() == 2 == recount(t)


def test_components_hear_of_admissions_and_removals() -> None:
    t = table()
    seen: list[tuple[str, str]] = []
    t.on_admit(lambda name: seen.append(("admit", name)))
    t.on_forget(lambda name: seen.append(("forget", name)))
    t.admit(4.0, member("a"))
    assert t.news == 1 and t.last_news == 4.0
    t.forget("a")
    assert seen == [("admit", "a"), ("forget", "a")] and "a" not in t.members


def test_a_status_change_is_an_event_and_a_repeat_is_not() -> None:
    t = table()
    t.admit(0.0, member("a"))
    t.set_status(1.0, t.members["a"], Status.SUSPECT, "suspected by b")
    t.set_status(2.0, t.members["a"], Status.SUSPECT, "suspected by c")
    assert [(e.fields["name"], e.fields["previous"], e.fields["status"]) for e in t.events] == [
        ("a", "alive", "suspect")]
    assert t.members["a"].status_since == 2.0


def test_reap_forgets_members_down_long_enough_and_never_ourselves() -> None:
    t = table()
    for name in "ab":
        t.admit(0.0, member(name))
    t.set_status(10.0, t.members["a"], Status.DEAD, "test")
    t.set_status(10.0, t.members["b"], Status.LEFT, "test")
    t.set_status(10.0, t.me, Status.LEFT, "leave requested")
    t.reap(10.0 + LOCAL.dead_reap_after - 1.0)
    assert set(t.members) == {"me", "a", "b"}
    t.reap(10.0 + LOCAL.dead_reap_after)
    assert set(t.members) == {"me"}
    assert sorted(e.fields["name"] for e in t.events if e.kind == "member_reaped") == ["a", "b"]


def test_shared_records_are_copied_before_a_change_and_never_changed() -> None:
    tags: dict[str, str] = {}
    records = {n: shared_record(n, A(n), 0.0, tags) for n in ("me", "a", "b")}
    t1, t2 = table(), table()
    t2.admit(0.0, member("b"))  # what a table already knew of its own stays
    t1.share(records)
    t2.share(records)
    assert t1.members["a"] is t2.members["a"] is records["a"]
    assert t1.members["me"] is t1.me and t2.members["b"] is not records["b"]
    assert t1.num_up() == 3
    mine = t1.own(t1.members["a"])
    t1.set_status(1.0, mine, Status.DEAD, "test")
    assert t1.members["a"] is mine and not mine.shared
    assert records["a"].status is Status.ALIVE and t2.members["a"] is records["a"]
    assert t1.own(mine) is mine  # a record of its own is changed in place
    assert t1.num_up() == 2 == recount(t1)
