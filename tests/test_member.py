"""gossip.member: statuses and SWIM's precedence rule between claims."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip.member import Status, overrides

SETTINGS = settings(derandomize=True, deadline=None, database=None, max_examples=300)

A, S, D, L = Status.ALIVE, Status.SUSPECT, Status.DEAD, Status.LEFT


def test_up_means_alive_or_suspect() -> None:
    assert [s for s in Status if s.up] == [A, S]


def test_status_values_are_the_wire_strings() -> None:
    assert [s.value for s in Status] == ["alive", "suspect", "dead", "left"]
    assert Status("left") is L


@pytest.mark.parametrize("new, new_inc, old, old_inc, expected", [
    (A, 5, A, 4, True),  # higher incarnation always wins
    (A, 5, D, 4, True),
    (A, 5, S, 4, True),
    (A, 4, A, 4, False),  # equal: alive never beats anything
    (A, 4, S, 4, False),
    (A, 4, D, 4, False),
    (S, 4, A, 4, True),  # equal: suspect beats alive
    (S, 4, S, 4, False),
    (S, 4, D, 4, False),
    (D, 4, A, 4, True),  # equal: dead and left beat alive and suspect
    (D, 4, S, 4, True),
    (L, 4, S, 4, True),
    (D, 4, L, 4, False),  # a leave is never turned into a death
    (D, 3, A, 4, False),  # lower incarnation never wins
    (L, 3, A, 4, False),
])
def test_overrides_table(new: Status, new_inc: int, old: Status, old_inc: int, expected: bool) -> None:
    assert overrides(new, new_inc, old, old_inc) is expected


claims = st.tuples(st.sampled_from(list(Status)), st.integers(min_value=0, max_value=5))


@SETTINGS
@given(claims, claims, claims)
def test_overrides_is_a_strict_order(x: tuple[Status, int], y: tuple[Status, int],
                                     z: tuple[Status, int]) -> None:
    assert not overrides(*x, *x)  # irreflexive
    assert not (overrides(*x, *y) and overrides(*y, *x))  # asymmetric
    if overrides(*x, *y) and overrides(*y, *z):
        assert overrides(*x, *z)  # transitive
