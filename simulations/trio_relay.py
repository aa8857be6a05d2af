"""A plain TCP relay on trio: the floor under any proxy written on the agents' stack.

``bench_proxy.py`` chains two of these (client -> relay -> relay -> server) beside the mesh.
They use the agents' own socket layer (``dataplane.rawsocket.RawSocketStream``, imported
from the same snapshot of the code) and large reads, but no cipher, no multiplexing, no
flow control and no policy: one task per direction per connection, ``receive_some`` then
``send_all``.  Its column is what trio costs a proxy written the plain way, one trip
through the scheduler per readable socket: the agents beat it at 16 connections only
because their data plane waits in its own reactor instead (``dataplane/reactor.py``),
and what they still lose to it at one connection is the price of the cipher and the
multiplexing.

    PYTHONPATH=<snapshot> python simulations/trio_relay.py LISTEN_PORT TARGET_PORT
"""

from __future__ import annotations

import sys

import trio

from dataplane.rawsocket import RawSocketStream, connect_tcp

HOST = "127.0.0.1"
CHUNK = 256 * 1024  # as the agents' proxy reads


async def _pump(src: RawSocketStream, dst: RawSocketStream) -> None:
    try:
        while data := await src.receive_some(CHUNK):
            await dst.send_all(data)
        await dst.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def _handle(accepted: trio.SocketStream, target: int) -> None:
    client = RawSocketStream.adopt(accepted)
    try:
        upstream = await connect_tcp(HOST, target)  # as the agents' far end connects
    except OSError:
        await client.aclose()
        return
    async with client, upstream, trio.open_nursery() as nursery:
        nursery.start_soon(_pump, client, upstream)
        nursery.start_soon(_pump, upstream, client)


async def _serve(listen: int, target: int) -> None:
    listeners = await trio.open_tcp_listeners(listen, host=HOST)
    await trio.serve_listeners(lambda s: _handle(s, target), listeners)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: trio_relay.py LISTEN_PORT TARGET_PORT", file=sys.stderr)
        return 2
    trio.run(_serve, int(argv[0]), int(argv[1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
