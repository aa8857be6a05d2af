"""What a member knows of round-trip times: measured to whom it probes, estimated between any two.

Vivaldi as Serf runs it: every direct ack carries the acker's coordinate and
its RTT sample moves ours, and push-pulls carry coordinates too, so any two
members' RTT can be estimated without ever probing between them.
"""

from __future__ import annotations

from gossip.coordinate import DEFAULT as COORDINATE_CONFIG
from gossip.coordinate import Coordinate, CoordinateClient
from gossip.table import MemberTable

#: Seconds; no coordinate component of a real network comes near it.
_MAX_COORD_COMPONENT = 100.0


class Latency:
    def __init__(self, table: MemberTable) -> None:
        self.table = table
        self.vivaldi = CoordinateClient(COORDINATE_CONFIG, table.rng)
        #: Other members' latest coordinates.
        self.coordinates: dict[str, Coordinate] = {}
        table.on_forget(self._forget)

    def _forget(self, name: str) -> None:
        self.coordinates.pop(name, None)
        self.vivaldi.forget(name)

    def observe(self, name: str, raw: tuple[float, ...], rtt: float | None) -> bool:
        """Keep a member's coordinate (and, with an RTT sample, move ours); False if refused."""
        try:
            coord = Coordinate.from_wire(list(raw), COORDINATE_CONFIG.dimensionality)
            # Finite but absurd (a component of years) would only reset ours, over and over.
            if max(abs(x) for x in raw) > _MAX_COORD_COMPONENT:
                raise ValueError("coordinate out of range")
            if rtt is not None:
                self.vivaldi.update(name, coord, rtt)
        except ValueError:
            self.table.drop("bad_coordinate")
            return False
        self.coordinates[name] = coord
        return True

    def own_wire(self) -> tuple[float, ...]:
        """Our coordinate as an ack carries it."""
        return tuple(self.vivaldi.coordinate.to_wire())

    def to_send(self, everyone: bool) -> dict[str, tuple[float, ...]]:
        """Our coordinate; on a join, every up member's we hold, so the newcomer
        can estimate RTTs at once.  Periodic push-pulls carry only our own: the
        rest would double an idle agent's bytes for what acks renew anyway."""
        coords = {self.table.name: self.own_wire()}
        if everyone:
            members = self.table.members
            for name, c in self.coordinates.items():
                m = members.get(name)
                if m is not None and m.status.up:
                    coords[name] = tuple(c.to_wire())
        return coords

    def merge(self, source: str, coords: dict[str, tuple[float, ...]]) -> None:
        """Coordinates a push-pull from ``source`` carried.

        A member's own coordinate is the freshest there is; others' only fill
        gaps, since our own acks keep the ones we probe current.
        """
        name_self, members = self.table.name, self.table.members
        for name, raw in coords.items():
            if name != name_self and name in members and (name == source or name not in self.coordinates):
                if not self.observe(name, raw, None):
                    break

    def coordinate_of(self, name: str) -> Coordinate | None:
        return self.vivaldi.coordinate if name == self.table.name else self.coordinates.get(name)

    def rtt_estimate(self, a: str, b: str) -> tuple[float, str] | None:
        """RTT between two members in seconds, and how we know it.

        From us to a member we probe directly: the smoothed measurement
        ("measured").  Anything else: the distance between the two Vivaldi
        coordinates ("coordinates"), as ``serf rtt`` does.
        """
        if a == b:
            return (0.0, "measured")
        me = self.table.name
        if me in (a, b):
            other = self.table.members.get(b if a == me else a)
            if other is not None and other.rtt is not None:
                return (other.rtt, "measured")
        ca, cb = self.coordinate_of(a), self.coordinate_of(b)
        if ca is None or cb is None or not ca.is_compatible_with(cb):
            return None
        return (ca.distance_to(cb), "coordinates")
