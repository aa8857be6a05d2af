"""How long a new tunnel takes to come up: the figure DIAL_PATIENCE_FLOOR (dataplane.tunnel) rests on.

A caller that has another instance to go to waits for a new session to a peer only a bound derived from
the peer's RTT, with a floor.  The floor must cover what the RTT does not: a TCP connect and one Noise_IK
round trip need two RTTs, the handshake's CPU on both ends, and both ends' scheduling, which on a loaded
host is most of it.  Here two processes (a responder and a dialler, each a TunnelManager as an agent runs
it) on loopback or across two network namespaces; the dialler opens a session, one stream on it, closes
the session, again, ``--dials`` times; idle, then with ``--burners`` processes spinning on the CPU
(``nice 0``, as a busy neighbour would).  Prints percentiles of the dial time per setting.

    python simulations/bench_dial.py [--dials 300] [--burners 4] [--netns]   (--netns: root, ip)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import trio  # noqa: E402

from dataplane.noise import generate_keypair  # noqa: E402
from dataplane.tunnel import TunnelManager  # noqa: E402


class Directory:
    def __init__(self, members: dict[str, tuple[tuple[str, int], bytes]]) -> None:
        self.members = members

    def member_for_key(self, static_public: bytes) -> str | None:
        return next((n for n, (_, k) in self.members.items() if k == static_public), None)

    def tunnel_peer(self, name: str) -> tuple[tuple[str, int], bytes] | None:
        return self.members.get(name)


async def respond(host: str, port: int, private: bytes, dialler_public: bytes) -> None:
    public = generate_keypair()[1]  # unused: the responder's own key is derived from private
    del public
    directory = Directory({"d": ((host, 1), dialler_public)})

    async def on_stream(peer: str, header: bytes, stream: trio.abc.Stream) -> None:
        await stream.aclose()

    manager = TunnelManager("r", private, directory, on_stream=on_stream)
    listeners = await trio.open_tcp_listeners(port, host=host)
    await manager.serve(listeners)


async def dial(host: str, port: int, private: bytes, responder_public: bytes, n: int) -> list[float]:
    directory = Directory({"r": ((host, port), responder_public)})
    manager = TunnelManager("d", private, directory, handshake_timeout=5.0)
    times: list[float] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.serve)
        for _ in range(n):
            started = time.perf_counter()
            stream = await manager.open_stream("r", b"x")
            times.append(time.perf_counter() - started)
            await stream.aclose()
            manager.drop_peer("r", "bench")
            await trio.sleep(0.005)
        await manager.aclose()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dials", type=int, default=300)
    parser.add_argument("--burners", type=int, default=4)
    parser.add_argument("--netns", action="store_true", help="responder and dialler in two namespaces")
    parser.add_argument("--role", choices=["respond", "dial"], help=argparse.SUPPRESS)
    parser.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--keys", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        keys = json.loads(args.keys)
        if args.role == "respond":
            trio.run(respond, args.host, args.port, bytes.fromhex(keys["r"]), bytes.fromhex(keys["d_pub"]))
        else:
            times = trio.run(dial, args.host, args.port, bytes.fromhex(keys["d"]), bytes.fromhex(keys["r_pub"]),
                             args.dials)
            print("RESULT " + json.dumps(times))  # the tunnel's own log lines go to stdout too
        return
    r_priv, r_pub = generate_keypair()
    d_priv, d_pub = generate_keypair()
    keys = json.dumps({"r": r_priv.hex(), "d": d_priv.hex(), "r_pub": r_pub.hex(), "d_pub": d_pub.hex()})
    wrap_r: list[str] = []
    wrap_d: list[str] = []
    host = "127.0.0.1"
    namespaces = [f"bdial{os.getpid()}{x}" for x in "rd"]
    if args.netns:
        setup_netns(namespaces)
        host = "10.250.0.1"
        wrap_r = ["ip", "netns", "exec", namespaces[0]]
        wrap_d = ["ip", "netns", "exec", namespaces[1]]
    port = 17981
    me = [sys.executable, str(Path(__file__).resolve())]
    common = ["--host", host, "--port", str(port), "--keys", keys]
    responder = subprocess.Popen([*wrap_r, *me, "--role", "respond", *common], start_new_session=True,
                                 stdout=subprocess.DEVNULL)
    rows = []
    try:
        time.sleep(1.5)
        for burners in (0, args.burners):
            spin = [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
                    for _ in range(burners)]
            try:
                out = subprocess.run([*wrap_d, *me, "--role", "dial", "--dials", str(args.dials), *common],
                                     capture_output=True, text=True, check=True, timeout=600).stdout
            finally:
                for p in spin:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
            times = sorted(json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:]))
            rows.append((burners, times))
    finally:
        os.killpg(responder.pid, signal.SIGKILL)
        responder.wait()
        if args.netns:
            for ns in namespaces:
                subprocess.run(["ip", "netns", "del", ns], check=False)
    where = "two network namespaces (veth)" if args.netns else "loopback"
    print(f"\nnew tunnel (TCP connect + Noise_IK + one stream), {args.dials} dials, {where}; "
          f"load average before: {os.getloadavg()[0]:.2f}")
    print(f"{'CPU burners':>12}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'max ms':>9}")
    for burners, times in rows:
        def q(f: float, t: list[float] = times) -> float:
            return t[min(len(t) - 1, int(f * len(t)))] * 1000
        print(f"{burners:>12}{statistics.median(times) * 1000:>9.2f}{q(0.9):>9.2f}{q(0.99):>9.2f}"
              f"{times[-1] * 1000:>9.2f}")


def setup_netns(names: list[str]) -> None:
    r, d = names
    for ns in names:
        subprocess.run(["ip", "netns", "add", ns], check=True)
    subprocess.run(["ip", "link", "add", "bd-r", "netns", r, "type", "veth", "peer", "name", "bd-d", "netns", d],
                   check=True)
    for ns, dev, ip in ((r, "bd-r", "10.250.0.1/24"), (d, "bd-d", "10.250.0.2/24")):
        subprocess.run(["ip", "-n", ns, "addr", "add", ip, "dev", dev], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)


if __name__ == "__main__":
    main()
