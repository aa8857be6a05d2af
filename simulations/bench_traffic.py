"""What Traffic.record costs the proxy per request, beside NoSink (a sink that keeps nothing).

Prints one table, median of --runs runs: microseconds per record for
  - NoSink: the call alone, the floor any sink pays;
  - Traffic, record only: the append (batches never fill: folded outside the timing);
  - Traffic, amortized: record plus its share of folding (what the proxy's thread pays in all);
  - Traffic, amortized with one tap attached that matches every record;
  - the fold alone, per record;
  - stat_view over the resulting series (milliseconds per call).
Records cycle over 3 services x 8 instances, both directions, with realistic statuses and latencies.

    .venv/bin/python simulations/bench_traffic.py --runs 5
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import trio

from agent.traffic import FOLD_AT, TapFilter, Traffic
from dataplane.observed import INBOUND, OUTBOUND, NoSink, RequestRecord


def records(n: int) -> list[RequestRecord]:
    rnd = random.Random(1)
    now = time.time()
    out = []
    for i in range(n):
        out.append(RequestRecord(
            INBOUND if i % 2 else OUTBOUND, f"svc{i % 3}", f"svc{i % 3}-{i % 8}", f"n{i % 8}",
            "front" if i % 2 else None, "GET", f"/items/{i}", 500 if i % 50 == 0 else 200,
            rnd.lognormvariate(-6, 0.6), now - rnd.random() * 30))
    return out


def per_record(fn: Callable[[RequestRecord], None], recs: list[RequestRecord]) -> float:
    t0 = time.perf_counter()
    for r in recs:
        fn(r)
    return (time.perf_counter() - t0) / len(recs) * 1e6


def one_run(recs: list[RequestRecord]) -> dict[str, float]:
    out: dict[str, float] = {}
    out["NoSink.record"] = per_record(NoSink().record, recs)

    t = Traffic()
    chunk = FOLD_AT - 1
    total = 0.0
    for i in range(0, len(recs), chunk):
        part = recs[i:i + chunk]
        total += per_record(t.record, part) * len(part)
        t.fold()  # outside the timing
    out["Traffic.record (append only)"] = total / len(recs)

    t = Traffic()
    out["Traffic.record (amortized, fold included)"] = per_record(t.record, recs)

    t = Traffic()
    for r in recs:
        t._pending.append(r)
    t0 = time.perf_counter()
    t.fold()
    out["Traffic.fold (per record)"] = (time.perf_counter() - t0) / len(recs) * 1e6

    t0 = time.perf_counter()
    for _ in range(20):
        t.stat_view()
    out["Traffic.stat_view (ms per call)"] = (time.perf_counter() - t0) / 20 * 1e3

    async def with_tap() -> float:
        t = Traffic()
        with t.tap(TapFilter(), buffer=len(recs) + 1):
            return per_record(t.record, recs)

    out["Traffic.record (amortized, 1 tap)"] = trio.run(with_tap)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--records", type=int, default=200_000)
    args = ap.parse_args()
    recs = records(args.records)
    runs = [one_run(recs) for _ in range(args.runs)]
    print(f"{args.records} records, median of {args.runs} runs")
    print(f"{'what':<45} {'us/record':>10}")
    for key in runs[0]:
        print(f"{key:<45} {statistics.median(r[key] for r in runs):>10.3f}")


if __name__ == "__main__":
    main()
