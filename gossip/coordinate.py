"""Vivaldi network coordinates, as hashicorp/serf's ``coordinate`` package has them.

Every node keeps a point in a small Euclidean space plus a "height", so that
the distance between two nodes' coordinates estimates their round trip time
without anyone having to measure it.  Nodes learn their place from the RTTs
they already measure for failure detection (SWIM probes), the peer's
coordinate riding along on the ack.  That is what lets a service mesh pick
the nearest healthy instance, or order a failover, with no central
measurement service.

The algorithm is serf's (coordinate/client.go, coordinate.go, config.go),
which combines:

[1] Dabek et al., "Vivaldi: A Decentralized Network Coordinate System",
    SIGCOMM 2004 -- the spring model, the adaptive timestep and the error
    estimate;
[2] Ledlie et al., "Network Coordinates in the Wild", NSDI 2007 -- the
    height vector, the per-peer latency filter and gravity;
[3] Lee et al., "On Suitability of Euclidean Embedding for Host-based
    Network Coordinate Systems", ToN 2010 -- the adjustment term.

All distances are in seconds, as in serf.  Nothing here reads a clock or a
global random generator: RTTs are measured by the caller, and the one random
choice (which way to push two coordinates that sit on top of each other)
comes from a ``random.Random`` the caller owns, so simulations replay.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from gossip.frozen import same_class_equality

#: Below this, two points count as the same place (serf's zeroThreshold).  It
#: is also the floor for an RTT and for the summed error, to keep divisions
#: finite.
ZERO_THRESHOLD = 1.0e-6

#: An RTT above this is a measurement bug or a stalled process, not a
#: distance; serf's Client.Update refuses it with the same bound.
MAX_RTT = 10.0


@dataclass(frozen=True)
class CoordinateConfig:
    """Tuning of the coordinate system; the defaults are serf's DefaultConfig."""

    #: Dimensions of the Euclidean part.  [2] found no gain beyond about 7;
    #: serf uses 8 plus the height.
    dimensionality: int = 8
    #: Error of a node that has observed nothing yet, and the ceiling that
    #: keeps a run of bad samples from growing the error without bound.
    vivaldi_error_max: float = 1.5
    #: c_e in [1]: the largest share a single sample has in the error estimate.
    vivaldi_ce: float = 0.25
    #: c_c in [1]: the largest fraction of the prediction error a single
    #: sample may move the coordinate by.
    vivaldi_cc: float = 0.25
    #: Samples in the adjustment window of [3]; 0 turns the adjustment off.
    adjustment_window_size: int = 20
    #: Floor of the height.  The height must stay positive (it models the
    #: access link), so it costs a little accuracy: keep it small next to
    #: real RTTs (10 us).
    height_min: float = 10.0e-6
    #: RTT samples kept per peer for the moving median of [2], which rides
    #: out one-off spikes while reacting within a few probes, important since
    #: any one peer is probed only rarely.
    latency_filter_size: int = 3
    #: rho in [2]'s gravity: how hard coordinates are pulled back towards the
    #: origin, so the whole system does not drift away over time.
    gravity_rho: float = 150.0

    def __post_init__(self) -> None:
        # serf only checks the dimensionality; the rest would quietly break
        # the maths (division by zero, a force that diverges) instead.
        if self.dimensionality < 1:
            raise ValueError("dimensionality must be at least 1")
        if not self.vivaldi_error_max > 0.0:
            raise ValueError("vivaldi_error_max must be positive")
        if not (0.0 < self.vivaldi_ce <= 1.0 and 0.0 < self.vivaldi_cc <= 1.0):
            raise ValueError("vivaldi_ce and vivaldi_cc must be in (0, 1]")
        if self.adjustment_window_size < 0:
            raise ValueError("adjustment_window_size must not be negative")
        if not (0.0 <= self.height_min < math.inf):
            raise ValueError("height_min must be finite and not negative")
        if self.latency_filter_size < 1:
            raise ValueError("latency_filter_size must be at least 1")
        if not (0.0 < self.gravity_rho < math.inf):
            raise ValueError("gravity_rho must be positive and finite")


DEFAULT = CoordinateConfig()


def _is_number(value: object) -> bool:
    # Exact types only: bool is an int subclass, and an arbitrary subclass
    # could make float() raise something other than ValueError.
    return type(value) is float or type(value) is int


@same_class_equality
class Coordinate(NamedTuple):
    """A node's place in the coordinate space; all fields in seconds except error.

    Immutable so that a coordinate handed to the wire layer, or kept as the
    last one heard from a peer, cannot change under its holder.
    """

    #: The Euclidean part.
    vec: tuple[float, ...]
    #: Confidence of the node in its own coordinate (dimensionless; lower is
    #: better).  Peers weigh our samples by it [1].
    error: float
    #: Offset learnt from recent prediction errors [3]; may be negative.
    adjustment: float
    #: The non-Euclidean access-link part [2], added to every distance.
    height: float

    @classmethod
    def origin(cls, config: CoordinateConfig = DEFAULT) -> Coordinate:
        """Where a node starts, with the maximum error so that peers discount it (serf NewCoordinate)."""
        return cls(
            vec=(0.0,) * config.dimensionality,
            error=config.vivaldi_error_max,
            adjustment=0.0,
            height=config.height_min,
        )

    def is_valid(self) -> bool:
        """False once NaN or infinity has crept in, which would then spread to every peer."""
        return all(math.isfinite(x) for x in self.vec) and all(
            math.isfinite(x) for x in (self.error, self.adjustment, self.height)
        )

    def is_compatible_with(self, other: Coordinate) -> bool:
        return len(self.vec) == len(other.vec)

    def raw_distance_to(self, other: Coordinate) -> float:
        """Vivaldi distance without the adjustment terms, which the adjustment window itself needs [3]."""
        self._check_compatible(other)
        return _magnitude(_diff(self.vec, other.vec)) + self.height + other.height

    def distance_to(self, other: Coordinate) -> float:
        """Estimated RTT in seconds (serf Coordinate.DistanceTo)."""
        dist = self.raw_distance_to(other)
        adjusted = dist + self.adjustment + other.adjustment
        # serf: the adjustment terms may only refine a positive estimate; if
        # they would make it zero or negative, fall back to the raw distance.
        if adjusted > 0.0:
            dist = adjusted
        return dist

    def to_wire(self) -> list[float]:
        """Flat list for msgpack: the vector, then error, adjustment, height."""
        return [*self.vec, self.error, self.adjustment, self.height]

    @classmethod
    def from_wire(cls, obj: object, dimensionality: int) -> Coordinate:
        """Parse a peer's coordinate; it is untrusted input, so ValueError is the only failure."""
        if type(dimensionality) is not int or dimensionality < 1:
            raise ValueError("dimensionality must be a positive int")
        if not isinstance(obj, (list, tuple)):
            raise ValueError("coordinate must be a list")
        if len(obj) != dimensionality + 3:
            raise ValueError(f"coordinate must have {dimensionality + 3} numbers, got {len(obj)}")
        values: list[float] = []
        for item in obj:
            if not _is_number(item):
                raise ValueError("coordinate components must be numbers")
            try:
                value = float(item)
            except OverflowError as exc:  # an int too big for a float
                raise ValueError("coordinate component out of range") from exc
            if not math.isfinite(value):
                raise ValueError("coordinate components must be finite")
            values.append(value)
        *vec, error, adjustment, height = values
        if error < 0.0:
            raise ValueError("coordinate error must not be negative")
        if height < 0.0:
            raise ValueError("coordinate height must not be negative")
        return cls(vec=tuple(vec), error=error, adjustment=adjustment, height=height)

    def _check_compatible(self, other: Coordinate) -> None:
        # serf panics here; a bad peer must not be able to crash us.
        if not self.is_compatible_with(other):
            raise ValueError(f"coordinate dimensionality differs: {len(self.vec)} != {len(other.vec)}")


class CoordinateClient:
    """One node's coordinate, updated from the RTTs it measures (serf coordinate.Client).

    Not thread-safe, unlike serf's: like the rest of ``gossip/`` it is owned
    by a single task.
    """

    def __init__(self, config: CoordinateConfig, rng: random.Random) -> None:
        """``rng`` only breaks the tie of two coordinates in one place.

        It has no default on purpose: clients sharing one fixed seed would all
        leave the origin in the same direction and stay bunched together.
        """
        self.config = config
        self._rng = rng
        self._coord = Coordinate.origin(config)
        self._origin = Coordinate.origin(config)
        self._adjustment_index = 0
        self._adjustment_samples = [0.0] * config.adjustment_window_size
        self._latency_samples: dict[str, list[float]] = {}
        self._stats: dict[str, int] = {"resets": 0, "rejected": 0, "zero_rtt": 0}

    @property
    def coordinate(self) -> Coordinate:
        return self._coord

    @property
    def stats(self) -> dict[str, int]:
        """Counters for operators: ``resets`` (result was invalid, back to the origin),
        ``rejected`` (update refused), ``zero_rtt`` (an RTT of 0, which serf also counts
        because it points at a coarse clock)."""
        return dict(self._stats)

    def forget(self, node: str) -> None:
        """Drop the latency filter of a member that left, so state does not grow with churn."""
        self._latency_samples.pop(node, None)

    def distance_to(self, other: Coordinate) -> float:
        """Estimated RTT to a peer, in seconds."""
        return self._coord.distance_to(other)

    def update(self, node: str, other: Coordinate, rtt: float) -> Coordinate:
        """Move our coordinate after measuring ``rtt`` seconds to ``node``, which claims ``other``.

        Raises ValueError, and changes nothing, for a sample that must not be
        used: an incompatible or invalid peer coordinate, or an RTT outside
        [0, 10] s.  Returns the new coordinate.
        """
        if not self._coord.is_compatible_with(other):
            self._stats["rejected"] += 1
            raise ValueError("dimensions aren't compatible")
        if not other.is_valid():
            self._stats["rejected"] += 1
            raise ValueError("coordinate is invalid")
        # serf: 0 <= rtt <= 10 s.  (The NaN test is ours: Go's Duration
        # cannot be NaN, a float can.)
        if not (0.0 <= rtt <= MAX_RTT):
            self._stats["rejected"] += 1
            raise ValueError(f"round trip time {rtt!r} s is not in [0, {MAX_RTT}] s")
        if rtt == 0.0:
            # serf: seen with coarse monotonic clocks; the maths copes, so it
            # is counted rather than refused.
            self._stats["zero_rtt"] += 1

        rtt = self._latency_filter(node, rtt)
        self._update_vivaldi(other, rtt)
        self._update_adjustment(other, rtt)
        self._update_gravity()
        if not self._coord.is_valid():
            # serf: a coordinate that went NaN/inf would poison every peer
            # that learns it, so start over rather than publish it.
            self._stats["resets"] += 1
            self._coord = Coordinate.origin(self.config)
            # Unlike serf, also empty the adjustment window: the step that
            # went bad has just stored a NaN/inf sample there, which would
            # make each of the next adjustment_window_size updates reset too.
            self._adjustment_samples = [0.0] * self.config.adjustment_window_size
            self._adjustment_index = 0
        return self._coord

    # -- the steps of serf's Client.Update ---------------------------------------

    def _latency_filter(self, node: str, rtt: float) -> float:
        # [2] section 5.1: a moving median over the last few samples of each
        # peer; one spike (a GC pause, a queue) does not move the coordinate.
        samples = self._latency_samples.setdefault(node, [])
        samples.append(rtt)
        if len(samples) > self.config.latency_filter_size:
            del samples[0]
        ordered = sorted(samples)
        # serf takes sorted[len/2]: the upper median for an even count.
        return ordered[len(ordered) // 2]

    def _update_vivaldi(self, other: Coordinate, rtt: float) -> None:
        config = self.config
        coord = self._coord
        dist = coord.distance_to(other)
        rtt = max(rtt, ZERO_THRESHOLD)
        # [1] figure 3: relative error of this sample.
        wrongness = abs(dist - rtt) / rtt
        # [1]: weigh the sample by how sure we are relative to the peer, so an
        # unsure node moves a lot and a sure one is not dragged by a newcomer.
        total_error = max(coord.error + other.error, ZERO_THRESHOLD)
        weight = coord.error / total_error
        # [1]: error is an exponentially weighted moving average of wrongness,
        # capped at error_max (serf).
        error = config.vivaldi_ce * weight * wrongness + coord.error * (1.0 - config.vivaldi_ce * weight)
        error = min(error, config.vivaldi_error_max)
        # [1] adaptive timestep: delta = c_c * w; the spring force is
        # delta * (rtt - predicted), pushing away if we predicted too short.
        delta = config.vivaldi_cc * weight
        force = delta * (rtt - dist)
        moved = _apply_force(config, coord, force, other, self._rng)
        self._coord = Coordinate(vec=moved.vec, error=error, adjustment=moved.adjustment, height=moved.height)

    def _update_adjustment(self, other: Coordinate, rtt: float) -> None:
        window = self.config.adjustment_window_size
        if window == 0:
            return
        # [3] / serf: the adjustment is half the mean of the recent errors
        # rtt - raw distance (the existing adjustments are left out, or the
        # term would feed on itself).  Half, because both ends add theirs.
        dist = self._coord.raw_distance_to(other)
        self._adjustment_samples[self._adjustment_index] = rtt - dist
        self._adjustment_index = (self._adjustment_index + 1) % window
        adjustment = math.fsum(self._adjustment_samples) / (2.0 * window)
        self._coord = Coordinate(
            vec=self._coord.vec, error=self._coord.error, adjustment=adjustment, height=self._coord.height
        )

    def _update_gravity(self) -> None:
        # [2] section 5.3: without an anchor every coordinate drifts in the
        # same direction over time; a pull of (distance / rho)^2 towards the
        # origin, negligible near it, stops that.
        dist = self._origin.distance_to(self._coord)
        force = -1.0 * (dist / self.config.gravity_rho) ** 2
        self._coord = _apply_force(self.config, self._coord, force, self._origin, self._rng)


def _apply_force(
    config: CoordinateConfig, coord: Coordinate, force: float, other: Coordinate, rng: random.Random
) -> Coordinate:
    """Move ``coord`` by ``force`` seconds away from ``other`` (serf Coordinate.ApplyForce)."""
    coord._check_compatible(other)
    unit, mag = _unit_vector_at(coord.vec, other.vec, rng)
    vec = tuple(a + u * force for a, u in zip(coord.vec, unit, strict=True))
    height = coord.height
    if mag > ZERO_THRESHOLD:
        # [2] section 5.2 / serf: the heights take their share of the force in
        # proportion to their share of the predicted distance, never below
        # height_min.  (No height change when the points coincide: the
        # direction was made up.)
        height = max((coord.height + other.height) * force / mag + coord.height, config.height_min)
    return Coordinate(vec=vec, error=coord.error, adjustment=coord.adjustment, height=height)


def _unit_vector_at(
    vec1: Sequence[float], vec2: Sequence[float], rng: random.Random
) -> tuple[tuple[float, ...], float]:
    """Unit vector from vec2 towards vec1, and their distance.

    Two coordinates in one place (every newcomer starts at the origin) need
    some direction to separate in [1]; serf draws a random one.
    """
    ret = _diff(vec1, vec2)
    mag = _magnitude(ret)
    if mag > ZERO_THRESHOLD:
        return tuple(x / mag for x in ret), mag
    ret = tuple(rng.random() - 0.5 for _ in ret)
    rmag = _magnitude(ret)
    if rmag > ZERO_THRESHOLD:
        return tuple(x / rmag for x in ret), 0.0
    # serf: give up and use the first axis; vanishingly rare.
    return (1.0,) + (0.0,) * (len(ret) - 1), 0.0


def _diff(vec1: Sequence[float], vec2: Sequence[float]) -> tuple[float, ...]:
    return tuple(a - b for a, b in zip(vec1, vec2, strict=True))


def _magnitude(vec: Sequence[float]) -> float:
    # hypot instead of sqrt(sum of squares): no overflow to inf for large
    # but finite components.
    return math.hypot(*vec)
