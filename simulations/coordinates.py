"""How well gossip.coordinate's Vivaldi coordinates predict RTTs, in a network whose RTTs we know.

The latency model is deliberately not a perfect fit for the coordinates: nodes
sit in a few regions on a plane (the core network), each node has its own
access-link delay that is added to every RTT it takes part in (what the
height of [Ledlie et al.] models), every pair's core path is stretched by its
own fixed factor (routing detours, so the triangle inequality does not hold
and no embedding is exact), and every measurement is perturbed
multiplicatively, with rare large spikes (a queue, a GC pause) that the
latency filter has to ride out.  Then, as SWIM does, every node probes one
random peer per round and feeds the measured RTT and the peer's current
coordinate to its own CoordinateClient.  Finally every pair's estimate is
compared with the true RTT.

    .venv/bin/python simulations/coordinates.py --nodes 50 --rounds 300 --seed 1

Prints a Markdown table.  Virtual time only: the run is the same for the
same arguments.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
from dataclasses import dataclass

from gossip.coordinate import DEFAULT, Coordinate, CoordinateClient, CoordinateConfig


@dataclass(frozen=True)
class CoordinateSimResult:
    nodes: int
    rounds: int
    seed: int
    #: Median over all node pairs of |estimated - true| / true.
    median_rel_error: float
    #: 90th percentile of the same.
    p90_rel_error: float
    #: CoordinateClient resets summed over all nodes (should be 0).
    resets: int


@dataclass(frozen=True)
class LatencySpace:
    """Known true RTTs, in seconds: stretched core distance on a plane plus both access links."""

    positions: list[tuple[float, float]]
    access: list[float]
    #: stretch[min(a, b)][max(a, b)]: the detour factor of that pair's route.
    stretch: list[list[float]]

    def rtt(self, a: int, b: int) -> float:
        (xa, ya), (xb, yb) = self.positions[a], self.positions[b]
        lo, hi = min(a, b), max(a, b)
        return math.hypot(xa - xb, ya - yb) * self.stretch[lo][hi] + self.access[a] + self.access[b]


def make_latency_space(
    nodes: int,
    rng: random.Random,
    regions: int = 4,
    region_spread: float = 0.060,
    intra_jitter: float = 0.004,
    access_min: float = 0.0005,
    access_max: float = 0.008,
    max_stretch: float = 1.3,
) -> LatencySpace:
    """Regions scattered over a ``region_spread`` (s) square, nodes a few ms around their region.

    Each pair's core distance is multiplied by its own U(1, ``max_stretch``).
    """
    centres = [(rng.uniform(0.0, region_spread), rng.uniform(0.0, region_spread)) for _ in range(regions)]
    positions = []
    for i in range(nodes):
        cx, cy = centres[i % regions]
        positions.append((cx + rng.gauss(0.0, intra_jitter), cy + rng.gauss(0.0, intra_jitter)))
    access = [rng.uniform(access_min, access_max) for _ in range(nodes)]
    stretch = [[rng.uniform(1.0, max_stretch) for _ in range(nodes)] for _ in range(nodes)]
    return LatencySpace(positions=positions, access=access, stretch=stretch)


def relative_errors(space: LatencySpace, coords: list[Coordinate]) -> list[float]:
    """|estimate - truth| / truth for every unordered pair of nodes."""
    errors = []
    for a in range(len(coords)):
        for b in range(a + 1, len(coords)):
            true = space.rtt(a, b)
            errors.append(abs(coords[a].distance_to(coords[b]) - true) / true)
    return errors


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in [0, 1]."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def simulate(
    nodes: int = 50,
    rounds: int = 300,
    seed: int = 1,
    noise: float = 0.05,
    spike_rate: float = 0.02,
    config: CoordinateConfig = DEFAULT,
) -> CoordinateSimResult:
    """Run the probing rounds and score the final coordinates against the true RTTs.

    Each sample is ``true * U(1 - noise, 1 + noise)``; with probability
    ``spike_rate`` it is multiplied by U(1.5, 4) on top.
    """
    if nodes < 2:
        raise ValueError("need at least 2 nodes")
    rng = random.Random(seed)
    space = make_latency_space(nodes, rng)
    names = [f"node-{i}" for i in range(nodes)]
    clients = [CoordinateClient(config, random.Random(rng.getrandbits(64))) for _ in range(nodes)]
    order = list(range(nodes))
    for _ in range(rounds):
        rng.shuffle(order)
        for a in order:
            b = rng.randrange(nodes - 1)
            b += b >= a  # any peer but itself
            sample = space.rtt(a, b) * rng.uniform(1.0 - noise, 1.0 + noise)
            if rng.random() < spike_rate:
                sample *= rng.uniform(1.5, 4.0)
            clients[a].update(names[b], clients[b].coordinate, min(sample, 10.0))
    errors = relative_errors(space, [c.coordinate for c in clients])
    return CoordinateSimResult(
        nodes=nodes,
        rounds=rounds,
        seed=seed,
        median_rel_error=statistics.median(errors),
        p90_rel_error=percentile(errors, 0.9),
        resets=sum(c.stats["resets"] for c in clients),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    result = simulate(nodes=args.nodes, rounds=args.rounds, seed=args.seed)
    print("| nodes | rounds | seed | median relative error | p90 relative error |")
    print("|------:|-------:|-----:|----------------------:|-------------------:|")
    print(
        f"| {result.nodes} | {result.rounds} | {result.seed} "
        f"| {result.median_rel_error:.3f} | {result.p90_rel_error:.3f} |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
