"""Simulated join bursts: N nodes join through one seed within 0.3 s (tests/test_simulator.py's
burst), on the real gossip/ machines and a virtual clock.  Per N, over 8 seeds: when all agree
that all are alive (median and max, from the first join), and the datagrams and push-pulls the
cluster sent in its first 3 s.  A benchmark: it prints, whatever the numbers.

    .venv/bin/python simulations/bench_join_burst.py --sizes 25,50,100
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gossip.config import LAN  # noqa: E402
from simulations.sim import NetModel, Sim  # noqa: E402

BURST = 0.3
SEEDS = 8


def burst(n: int, seed: int) -> tuple[float, int, int]:
    sim = Sim(LAN, seed=seed, net=NetModel(regions=1, region_radius=0.0, node_spread=0.0, base=5e-5, jitter=3e-4))
    sim.add("n0")
    for i in range(1, n):
        sim.at(BURST * i / n, functools.partial(sim.add, f"n{i}", seeds=["n0"]))
    sim.run(BURST + 0.01)
    everyone = functools.partial(sim.agree_all_alive, [f"n{i}" for i in range(n)])
    agreed = sim.now if sim.run_until(everyone, 30.0) else float("inf")
    sim.run(max(0.0, 3.0 - sim.now))
    nodes = sim.by_name.values()
    return (agreed, sum(nd.m.counters.stats["packets_out"] for nd in nodes),
            sum(nd.m.counters.stats["push_pull_out"] for nd in nodes))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="25,33,50,100")
    args = ap.parse_args(argv)
    print("| N | all agree (s), median | max | datagrams in 3 s | push-pulls |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for n in (int(s) for s in args.sizes.split(",") if s):
        runs = [burst(n, seed) for seed in range(1, SEEDS + 1)]
        agreed = [r[0] for r in runs]
        print(f"| {n} | {statistics.median(agreed):.3f} | {max(agreed):.3f} | "
              f"{statistics.median(r[1] for r in runs):.0f} | {statistics.median(r[2] for r in runs):.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
