"""``python -m simulations run --scenario NAME ...`` and ``python -m simulations report ...``.

``run`` prints progress on stderr and, with ``--json``, one JSON summary object
on stdout (otherwise ``key: value`` lines).  ``report`` runs the standard
scenarios and writes a Markdown table and PNG plots (see simulations/report.py).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys

from gossip.config import PROFILES
from simulations.scenarios import SCENARIOS, Params


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m simulations", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run one scenario")
    run.add_argument("--scenario", required=True, choices=sorted(SCENARIOS))
    run.add_argument("--nodes", type=int, default=100)
    run.add_argument("--seconds", type=float, default=60.0, help="virtual seconds (after warm-up)")
    run.add_argument("--seed", type=int, default=1)
    run.add_argument("--loss", type=float, default=0.0, help="packet loss probability, 0..1")
    run.add_argument("--profile", default="lan", choices=sorted(PROFILES))
    run.add_argument("--no-lifeguard", action="store_true", help="plain SWIM (GossipConfig.lifeguard=False)")
    run.add_argument("--no-tcp-fallback", action="store_true", help="no fallback ping over TCP (UDP probes only)")
    run.add_argument("--starve", type=float, default=0.0, help="fraction of nodes periodically paused")
    run.add_argument("--regions", type=int, default=3)
    run.add_argument("--churn", type=float, default=0.01, help="fraction of nodes that leave, crash and join (churn)")
    run.add_argument("--entries", type=int, default=1000, help="config entries every node holds (config_bytes)")
    run.add_argument("--check-packets", action="store_true", help="decode every datagram (slow)")
    run.add_argument("--cprofile", type=int, default=0, metavar="K", help="print the top K functions on stderr")
    run.add_argument("--json", action="store_true")
    rep = sub.add_parser("report", help="run the standard scenarios, write results.md and plots")
    rep.add_argument("--sizes", default="100,1000,10000")
    rep.add_argument("--out", default="simulations/results")
    rep.add_argument("--seed", type=int, default=1)
    rep.add_argument("--fp-nodes", type=int, default=100)
    rep.add_argument("--fp-seconds", type=float, default=300.0)
    rep.add_argument("--partition-sizes", default="100,300,1000")
    rep.add_argument("--churn-sizes", default="1000", help="1%% churn (leave, crash, join) at these sizes")
    args = ap.parse_args(argv)

    if args.cmd == "report":
        from simulations.report import run_report

        sizes = [int(s) for s in args.sizes.split(",") if s]
        psizes = [int(s) for s in args.partition_sizes.split(",") if s]
        csizes = [int(s) for s in args.churn_sizes.split(",") if s]
        run_report(sizes, args.out, seed=args.seed, fp_nodes=args.fp_nodes, fp_seconds=args.fp_seconds,
                   partition_sizes=psizes, churn_sizes=csizes)
        return 0

    p = Params(nodes=args.nodes, seconds=args.seconds, seed=args.seed, loss=args.loss, profile=args.profile,
               lifeguard=not args.no_lifeguard, tcp_fallback=not args.no_tcp_fallback,
               check_packets=args.check_packets, regions=args.regions, starve=args.starve, churn=args.churn,
               entries=args.entries)
    print(f"{args.scenario}: {p.nodes} nodes, {p.seconds:g} s, seed {p.seed}, loss {p.loss:g}, "
          f"lifeguard {'on' if p.lifeguard else 'off'}", file=sys.stderr, flush=True)
    prof = cProfile.Profile() if args.cprofile else None
    if prof is not None:
        prof.enable()
    summary = SCENARIOS[args.scenario](p)
    if prof is not None:
        prof.disable()
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(args.cprofile)
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        for k, v in summary.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
