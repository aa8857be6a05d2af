"""Hybrid logical clock: versions that every node orders the same way, close to wall time.

Config entries are written on any node, with no leader to number the writes.
Wall clocks alone would let a node whose clock runs behind lose every write to
an older one; Lamport counters alone would say nothing a person can read
("written at 14:02").  A hybrid logical clock (Kulkarni et al., "Logical
Physical Clocks", OPODIS 2014) keeps both: its timestamp is never behind the
local wall clock, never behind any timestamp this node has seen, and grows
with every event, so a write made after seeing another always orders after it
(happened-before is kept), and an operator can still read it as a time.

A timestamp is one int, milliseconds since the Unix epoch times COUNTER_SPAN
plus a counter below it, so versions compare as plain integers, pack into
msgpack as one, and stay below 2^53 until the year 2255: JSON readers that hold
numbers as doubles (a browser, jq) read them exactly, so a version copied from
``config read`` into a check-and-set is the version.  Pure: the caller passes
the wall clock in.
"""

from __future__ import annotations

from typing import Final

#: Events one millisecond can tell apart before the counter carries into the next.
COUNTER_SPAN: Final = 1000
#: A peer's timestamp further ahead of our wall clock than this is not believed
#: (a clock set a year ahead must not push every later write there): the paper's
#: bound on clock drift, ε.
MAX_DRIFT_MS: Final = 60_000


class ClockDriftError(ValueError):
    """A remote timestamp runs further ahead of our wall clock than MAX_DRIFT_MS."""


def wall_ms(ts: int) -> int:
    """The physical part of a timestamp: milliseconds since the epoch."""
    return ts // COUNTER_SPAN


def make(wall: int, counter: int = 0) -> int:
    return wall * COUNTER_SPAN + counter


class HybridClock:
    """One node's clock (the paper's Figure 5, with l and c packed into one int)."""

    def __init__(self, last: int = 0) -> None:
        #: The latest timestamp issued or seen; persisted with the entries, so a
        #: restart with a clock set back still issues later versions.
        self.last = last

    def now(self, wall: int) -> int:
        """A timestamp for a local event (a write), later than every one before.

        The wall clock's when it moved on; else the last one's counter plus one.
        A counter that overflows carries into the milliseconds, so the clock runs
        a millisecond ahead after COUNTER_SPAN events in one: still later than
        all before it, which is all the ordering needs.
        """
        self.last = max(self.last + 1, make(wall))
        return self.last

    def observe(self, remote: int, wall: int) -> None:
        """Take in a timestamp received from another node, so later local ones order after it."""
        if wall_ms(remote) - wall > MAX_DRIFT_MS:
            raise ClockDriftError(
                f"a timestamp {(wall_ms(remote) - wall) / 1000:.0f} s ahead of this node's clock")
        if remote > self.last:
            self.last = remote
