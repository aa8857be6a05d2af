"""The agent's tunnels: accepts and dials them, keeps one session per peer, opens streams.

Every pair of agents shares at most one long-lived session (dataplane.session):
a TCP connection that has run one Noise_IK handshake (dataplane.handshake) and
then carries the records of a stream multiplexer (dataplane.mux).  Every
proxied connection is a stream on it (dataplane.stream), so a new proxied
connection costs neither a handshake nor a round trip.  This module is the
manager: the listeners, the dials (directly or through a relay), both sides
of the handshake's I/O, and the table of sessions.

See docs/dataplane.md, "Tunnels" (wire format, rekey, who may connect, one
session per pair, failure, tasks).
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any, Final, Protocol

import nacl.bindings
import structlog
import trio

from dataplane import mux, relay
from dataplane.buffers import Reader, TooLong, Truncated
from dataplane.handshake import (
    MAGIC,
    MAX_MESSAGE1,
    MAX_NAME,
    PREAMBLE,
    REFUSAL_REASONS,
    VERSION,
    Initiation,
    Refused,
    ReplayGuard,
    check_preamble,
    decode_hello,
    encode_hello,
    respond,
    tai64n,
)
from dataplane.noise import MAX_NONCE, NoiseError
from dataplane.rawsocket import RawSocketStream
from dataplane.reactor import Reactor
from dataplane.rekey import (
    DEFAULT_REJECT_AFTER_MESSAGES,
    DEFAULT_REJECT_AFTER_TIME,
    DEFAULT_REKEY_AFTER_MESSAGES,
    DEFAULT_REKEY_AFTER_TIME,
)
from dataplane.session import StreamHandler, TunnelSession
from dataplane.stream import StreamResetError, TunnelStream, new_scratch
from dataplane.tunnel_stats import STAT_KEYS as _STAT_KEYS

__all__ = [
    "DEFAULT_MAX_HANDSHAKES",
    "DEFAULT_REJECT_AFTER_MESSAGES",
    "DEFAULT_REJECT_AFTER_TIME",
    "DEFAULT_REKEY_AFTER_MESSAGES",
    "DEFAULT_REKEY_AFTER_TIME",
    "DialAbandoned",
    "MAGIC",
    "PREAMBLE",
    "REFUSAL_REASONS",
    "VERSION",
    "PeerDirectory",
    "StreamHandler",
    "StreamResetError",
    "TunnelError",
    "TunnelManager",
    "TunnelStream",
    "decode_hello",
    "encode_hello",
    "tai64n",
]

_NS: Final = 1_000_000_000
#: Handshakes the listener runs at once; excess connections are closed unread.
DEFAULT_MAX_HANDSHAKES: Final = 256
#: Relays tried, best first, before a dial gives up.
_MAX_RELAYS_TRIED: Final = 2
#: A dial's attempts race (Happy Eyeballs, RFC 8305): the direct TCP connect first, then each relay once the
#: attempt before it has been silent for max(DIAL_RTT_FLOOR, DIAL_RTT_FACTOR x the RTT the mesh estimates for
#: its path) (:func:`dial_bound`), or has failed.  No attempt is given up at that bound: a live but slow peer
#: still answers the attempt that reached it, and the first transport up wins.  A live host's kernel answers a
#: SYN within one RTT, so silence past a few RTTs means the path (or the host) is gone far more often than
#: slow.  3x is RFC 6298's first retransmission timeout from one sample (SRTT + 4 x RTTVAR with
#: RTTVAR = SRTT/2); the floor, which starting a spare relay attempt early costs little, covers a busy
#: dialler's scheduling and the jitter of gossip's RTT samples on a shared machine.
DIAL_RTT_FLOOR: Final = 0.050
DIAL_RTT_FACTOR: Final = 3.0
#: A caller that has another instance to go to waits for a new dial to reach the peer's host (a TCP
#: connection up, directly or through a relay) at most max(DIAL_PATIENCE_FLOOR, DIAL_RTT_FACTOR x RTT) from
#: the dial's start (:meth:`TunnelManager.patience`), and the dial goes on without it.  The host's kernel
#: answers a SYN in one RTT however busy the agent on it is, so only our own scheduling and the network
#: count; once the host has answered, the caller waits for the handshake, which a busy agent answers late
#: but answers.  The floor covers a loaded dialler: docs/dataplane.md, "A vanished host costs an
#: RTT-derived wait", has the figures it rests on.  Giving up too early costs the caller a move to another
#: instance, never a failure (the caller without one waits), and the session still comes up for the next.
DIAL_PATIENCE_FLOOR: Final = 0.020


def dial_bound(rtt: float | None, ceiling: float, floor: float = DIAL_RTT_FLOOR,
               factor: float = DIAL_RTT_FACTOR) -> float:
    """How long an answer from a peer whose estimated RTT is ``rtt`` seconds (None: unknown) may take
    before its silence says something: ``max(floor, factor x rtt)``, never more than ``ceiling`` (which
    alone applies when nothing is known)."""
    if rtt is None or not math.isfinite(rtt) or rtt < 0:
        return ceiling
    return min(ceiling, max(floor, factor * rtt))


class TunnelError(Exception):
    """A stream could not be opened: no route to the peer, a failed dial, or we are not running."""


class DialAbandoned(TunnelError):
    """The caller stopped waiting for a dial at its RTT bound (``alternative``); the dial goes on.

    Not evidence against the peer: a live peer on a busy host may answer a little later, and the
    session it brings up serves the next call.  A peer that has vanished is gossip's to declare.
    """


class PeerDirectory(Protocol):
    """What the tunnel layer may ask membership; the agent implements it, read-only."""

    def member_for_key(self, static_public: bytes) -> str | None:
        """Name of the alive or suspect member holding this tunnel key, else None."""
        ...

    def tunnel_peer(self, name: str) -> tuple[tuple[str, int], bytes] | None:
        """((host, port), static public key) of a member we may dial, else None."""
        ...


def _raw(transport: trio.abc.Stream) -> trio.abc.Stream:
    """A TCP transport is driven by non-blocking syscalls (dataplane.rawsocket); others as they are."""
    if isinstance(transport, trio.SocketStream):
        return RawSocketStream.adopt(transport)
    return transport


class _Dial:
    __slots__ = ("done", "reached", "error", "started", "abandoned")

    def __init__(self, started: float) -> None:
        self.done = trio.Event()
        #: Set once a transport to the peer's host is up (its kernel answered), or the dial is over.
        self.reached = trio.Event()
        self.error: str | None = None
        #: When it began (trio's clock): a caller's patience counts from here, not from its own arrival.
        self.started = started
        #: Callers that stopped waiting for it at their RTT bound.
        self.abandoned = 0


# -- the manager ----------------------------------------------------------------------


class TunnelManager:
    """All of this agent's tunnels: accepts them, dials them, keeps one session per peer.

    Run :meth:`serve` in a nursery (with an empty listener list for an agent
    that only dials); :meth:`open_stream` needs it running.  ``stats`` may be
    any mutable mapping of counters (the agent's own, so they show up in its
    API); the keys used are pre-created at zero.

    Key lifetime (docs/dataplane.md, "Rekey"): a session renews its keys after
    ``rekey_after_messages`` records under one key or ``rekey_after_time``
    seconds, whichever comes first, and is closed loudly if a key reaches
    ``reject_after_messages`` records or ``reject_after_time`` seconds anyway.
    The defaults are WireGuard's times and a message count far below Noise's
    nonce bound; tests shrink them.  Peers enforce the message cap on each
    other, so every agent of a cluster must use the same limits.

    ``max_handshakes`` caps the handshakes in progress on the listeners (a
    flood of half-open connections costs each excess one a closed socket,
    counted as ``handshakes_failed_busy``).  ``connect(host, port)`` opens the
    transport of a dial; tests substitute memory streams.

    ``rtt(peer)``: the mesh's RTT estimate to a member in seconds, or None.
    With it, a dial races its routes (:data:`DIAL_RTT_FLOOR`): a relay joins
    once the direct connect has been silent for :func:`dial_bound` of it
    (counted as ``relays_raced``), so a peer that only a relay reaches costs
    no connect timeout; and a caller of :meth:`open_stream` that says it has
    another instance to go to (``alternative``) waits for a new dial to reach
    the peer's host only :meth:`patience` from its start, counted as ``dials_rtt_bounded``
    (the dial goes on: a session that comes up after all is kept for the next
    call, counted as ``dials_late``).  A caller without one waits for the dial,
    which its own timeout bounds: a live peer that is slow is still reached.
    """

    def __init__(
        self,
        name: str,
        static_private: bytes,
        directory: PeerDirectory,
        *,
        on_stream: StreamHandler | None = None,
        clock: Callable[[], float] = time.time,
        handshake_timeout: float = 5.0,
        idle_timeout: float = 60.0,
        rekey_after_messages: int = DEFAULT_REKEY_AFTER_MESSAGES,
        rekey_after_time: float = DEFAULT_REKEY_AFTER_TIME,
        reject_after_messages: int = DEFAULT_REJECT_AFTER_MESSAGES,
        reject_after_time: float = DEFAULT_REJECT_AFTER_TIME,
        max_handshakes: int = DEFAULT_MAX_HANDSHAKES,
        connect: Callable[[str, int], Awaitable[trio.abc.Stream]] = trio.open_tcp_stream,
        stats: MutableMapping[str, int] | None = None,
        log: Any = None,
        relays: Callable[[str], list[str]] | None = None,
        direct_connect_timeout: float = 2.0,
        direct_retry_after: float = 30.0,
        rtt: Callable[[str], float | None] | None = None,
        use_reactor: bool = True,
        idle_hook: bool = True,
    ) -> None:
        if not 1 <= len(name.encode("utf-8")) <= MAX_NAME:
            raise ValueError(f"node name must be 1..{MAX_NAME} bytes of UTF-8")
        if len(static_private) != 32:
            raise ValueError("static_private must be 32 bytes")
        # A few control records may follow the last mux record of a key; keep them
        # all well inside the nonces Noise allows (§5.1).
        if not 1 <= rekey_after_messages < reject_after_messages <= MAX_NONCE // 2:
            raise ValueError("need 1 <= rekey_after_messages < reject_after_messages <= 2^63")
        if not 0 < rekey_after_time < reject_after_time:
            raise ValueError("need 0 < rekey_after_time < reject_after_time")
        if max_handshakes < 1:
            raise ValueError("max_handshakes must be positive")
        self.name = name
        self._static_private = bytes(static_private)
        self.static_public: bytes = nacl.bindings.crypto_scalarmult_base(self._static_private)
        self.directory = directory
        self.on_stream = on_stream
        self._clock = clock
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.rekey_after_messages = rekey_after_messages
        self.rekey_after_time = rekey_after_time
        self.reject_after_messages = reject_after_messages
        self.reject_after_time = reject_after_time
        self.max_handshakes = max_handshakes
        self._connect = connect
        #: Members that may relay to a peer, best first (dataplane.relay); None: never relay.
        self.relays = relays
        self.direct_connect_timeout = direct_connect_timeout
        self.direct_retry_after = direct_retry_after
        #: Peers whose direct dial failed, and until when we go straight to a relay.
        self._direct_failed: dict[str, float] = {}
        self.rtt = rtt
        self._handshakes = 0
        self.stats: MutableMapping[str, int] = {} if stats is None else stats
        for key in _STAT_KEYS:
            self.stats.setdefault(key, 0)
        self.log: Any = log if log is not None else structlog.get_logger("mesh.tunnel").bind(node=name)
        self._nursery: trio.Nursery | None = None
        self._stopped = trio.Event()
        self._active: dict[str, TunnelSession] = {}
        self._sessions: set[TunnelSession] = set()
        self._pending: dict[str, _Dial] = {}
        #: Last accepted HELLO timestamp per initiator key (WireGuard's replay defence).
        self._replay = ReplayGuard(lambda key: directory.member_for_key(key) is not None)
        self._last_sent_ts = 0
        #: Where the sessions' readers and the proxied sockets' pumps wait while
        #: serve runs (dataplane.reactor); without it, each waits in trio itself.
        self.reactor = Reactor(idle_hook=idle_hook)
        self.use_reactor = use_reactor
        #: The buffer every stream's pump_from reads into (dataplane.stream.new_scratch).
        self.scratch = new_scratch()

    # -- running ----------------------------------------------------------------------

    async def serve(
        self,
        listeners: Sequence[trio.SocketListener] = (),
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept tunnels on ``listeners`` and host every session until cancelled or :meth:`aclose`."""
        if self._nursery is not None or self._stopped.is_set():
            raise RuntimeError("TunnelManager.serve may run only once")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self.use_reactor:
                    await nursery.start(self.reactor.run)
                    self.log.debug("tunnel_reactor", mode=self.reactor.mode)
                if listeners:
                    await nursery.start(trio.serve_listeners, self.handle_connection, list(listeners))
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            for sess in list(self._sessions):
                sess.terminate("tunnel manager stopped", error=False)
            for dial in self._pending.values():
                dial.error = "tunnel manager stopped"
                dial.done.set()
            self._pending.clear()
            self._stopped.set()

    async def aclose(self) -> None:
        """Close every session and stop :meth:`serve`."""
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
            await self._stopped.wait()
        else:
            await trio.lowlevel.checkpoint()

    # -- outgoing ---------------------------------------------------------------------

    async def open_stream(self, peer: str, header: bytes = b"", *, direct_only: bool = False,
                          alternative: Callable[[], bool] | None = None) -> TunnelStream:
        """A new stream to ``peer`` carrying ``header`` in its OPEN.

        Reuses the session to ``peer`` or dials one (concurrent callers share the
        dial).  Raises :class:`TunnelError` if no session can be had.
        ``direct_only``: the session must not itself run through a relay (a
        relay's own session must be direct, or relays could chain).
        ``alternative()``, asked only when there is no session yet: whether
        the caller has another instance, elsewhere, to try.  If so it waits
        for the dial to reach the peer's host only :meth:`patience` from the
        dial's start, then raises :class:`DialAbandoned` while the dial goes
        on (a host that vanished answers no dial at all, and a connect timeout
        of seconds would be paid by every call); once the host has answered,
        it waits for the session.
        """
        if len(header) > mux.MAX_OPEN_HEADER:
            raise ValueError(f"stream header of {len(header)} bytes exceeds {mux.MAX_OPEN_HEADER}")
        if peer == self.name:
            raise TunnelError("cannot open a tunnel to ourselves")
        await trio.lowlevel.checkpoint()
        for _ in range(3):  # a session may start draining between the dial and our open
            if self._nursery is None:
                raise TunnelError("tunnel manager is not running")
            sess = self._active.get(peer)
            if sess is None:
                dial = self._pending.get(peer)
                if dial is None:
                    dial = self._pending[peer] = _Dial(trio.current_time())
                    self._nursery.start_soon(self._dial_task, peer, dial, not direct_only)
                patient = alternative is not None and alternative()
                await self._wait_for(peer, dial, self.patience(peer) if patient else None)
                sess = self._active.get(peer)
                if sess is None:
                    raise TunnelError(dial.error or f"tunnel to {peer} closed right after it opened")
            if direct_only and sess.via is not None:
                raise TunnelError(f"the tunnel to {peer} is relayed through {sess.via}")
            try:
                return sess.open_stream(header)
            except mux.TooManyStreamsError as exc:
                raise TunnelError(f"tunnel to {peer}: {exc}") from None
            except mux.MuxError:
                sess.start_drain("cannot open streams")
        raise TunnelError(f"tunnel to {peer} keeps closing")

    def patience(self, peer: str) -> float | None:
        """How long after a dial to ``peer`` began a caller with another instance to go to stops waiting
        for it to reach the host: :func:`dial_bound` of the RTT estimate with :data:`DIAL_PATIENCE_FLOOR`;
        None (wait for the dial) while no estimate is known."""
        rtt = self.rtt(peer) if self.rtt is not None else None
        bound = dial_bound(rtt, math.inf, DIAL_PATIENCE_FLOOR)
        return None if math.isinf(bound) else bound

    async def _wait_for(self, peer: str, dial: _Dial, patience: float | None) -> None:
        """Wait for ``dial`` to end; with ``patience``, leave if it has not reached the host by then."""
        if patience is None:
            await dial.done.wait()
            return
        with trio.move_on_at(dial.started + patience):
            await dial.reached.wait()
        if dial.reached.is_set():
            await dial.done.wait()  # the host answered: its agent will, however busy
            return
        dial.abandoned += 1
        self.stats["dials_rtt_bounded"] += 1
        if dial.abandoned == 1:  # one line per dial, however many callers leave it
            rtt = self.rtt(peer) if self.rtt is not None else None
            self.log.info("tunnel_dial_rtt_bound", peer=peer, bound_ms=round(patience * 1000, 1),
                          rtt_ms=None if rtt is None else round(rtt * 1000, 2))
        raise DialAbandoned(f"no answer from {peer}'s host within {patience * 1000:.0f} ms of dialling "
                            f"(its RTT bound); the dial goes on")

    async def _dial_task(self, peer: str, dial: _Dial, allow_relay: bool = True) -> None:
        sess: TunnelSession | None = None
        try:
            sess = await self._dial(peer, allow_relay, dial.reached)
            self._register(sess)
            if dial.abandoned:
                self.stats["dials_late"] += 1
                self.log.info("tunnel_dial_late", peer=peer, via=sess.via, abandoned_by=dial.abandoned,
                              after_ms=round((trio.current_time() - dial.started) * 1000, 1))
        except TunnelError as exc:
            dial.error = str(exc)
            self.stats["dials_failed"] += 1
            self.log.info("tunnel_dial_failed", peer=peer, error=str(exc), abandoned_by=dial.abandoned)
        finally:
            if self._pending.get(peer) is dial:
                del self._pending[peer]
            dial.reached.set()
            dial.done.set()
        if sess is not None:
            await sess.run(None)

    async def _transport(self, peer: str, host: str, port: int,
                         allow_relay: bool) -> tuple[trio.abc.Stream, str | None]:
        """A byte stream to ``peer``'s tunnel port: dialled directly, or through a relay, whichever answers first.

        The routes race, staggered (see :data:`DIAL_RTT_FLOOR`): each starts when the one before it failed
        or has been silent past its RTT bound, and none is given up at that bound.  After a failed direct
        dial we go straight to the relays for ``direct_retry_after`` seconds, so every new session does not
        first wait on a dead route; then the direct route is tried again.
        """
        relays = self.relays(peer)[:_MAX_RELAYS_TRIED] if (allow_relay and self.relays is not None) else []
        direct = not relays or self._direct_failed.get(peer, 0.0) <= trio.current_time()
        routes: list[str | None] = ([None] if direct else []) + list(relays)
        errors: list[str] = []
        won: tuple[trio.abc.Stream, str | None] | None = None

        async def attempt(via: str | None, failed: trio.Event) -> None:
            nonlocal won
            try:
                transport = await (self._direct(peer, host, port, bool(relays)) if via is None
                                   else self._relayed(peer, via))
            except TunnelError as exc:
                errors.append(str(exc))
                failed.set()
                return
            if won is None:
                won = (transport, via)
                nursery.cancel_scope.cancel()
            else:
                await trio.aclose_forcefully(transport)  # a slower route that answered in the same instant

        async with trio.open_nursery() as nursery:
            for i, via in enumerate(routes):
                failed = trio.Event()
                nursery.start_soon(attempt, via, failed)
                if i + 1 == len(routes):
                    break
                wait = self._silence(peer, via)
                with trio.move_on_after(wait):
                    await failed.wait()
                if not failed.is_set():
                    self.stats["relays_raced"] += 1
                    self.log.info("tunnel_relay_raced", peer=peer, silent=via or "direct", next=routes[i + 1],
                                  after_ms=round(wait * 1000, 1))
        if won is None:
            if len(errors) == 1 and not relays:
                raise TunnelError(errors[0])
            raise TunnelError(f"cannot reach {peer} directly or through a relay: {'; '.join(errors)}")
        if won[1] is not None:
            self.stats["relayed_dials"] += 1
        return won

    def _silence(self, peer: str, via: str | None) -> float:
        """How long the attempt through ``via`` (None: direct) may be silent before the next route joins."""
        if self.rtt is None:
            return math.inf
        if via is None:
            return dial_bound(self.rtt(peer), math.inf)
        # Through a relay the answer takes our RTT to it, its RTT to the peer (at most its RTT to us
        # plus ours to the peer, by the triangle the estimates keep), and back.
        to_via, to_peer = self.rtt(via), self.rtt(peer)
        return dial_bound(None if to_via is None or to_peer is None else 2 * to_via + to_peer, math.inf)

    async def _direct(self, peer: str, host: str, port: int, relays: bool) -> trio.abc.Stream:
        timeout = self.direct_connect_timeout if relays else self.handshake_timeout
        try:
            with trio.fail_after(timeout):
                transport = _raw(await self._connect(host, port))
            self._direct_failed.pop(peer, None)
            return transport
        except trio.TooSlowError:
            error = f"no answer from {host}:{port} in {timeout:g}s"
        except OSError as exc:
            error = f"{host}:{port}: {exc.strerror or exc}"
        if not relays:
            raise TunnelError(f"cannot reach {peer} at {error}")
        self._direct_failed[peer] = trio.current_time() + self.direct_retry_after
        self.stats["direct_dials_failed"] += 1
        self.log.info("tunnel_direct_failed", peer=peer, error=error)
        raise TunnelError(f"directly: {error}")

    async def _relayed(self, peer: str, via: str) -> trio.abc.Stream:
        try:
            stream = await self.open_stream(via, relay.encode_relay(peer), direct_only=True)
        except TunnelError as exc:
            raise TunnelError(f"via {via}: {exc}") from None
        try:
            await relay.connect_through(stream)
        except relay.RelayError as exc:
            await trio.aclose_forcefully(stream)
            raise TunnelError(f"via {via}: {exc}") from None
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return stream

    async def _dial(self, peer: str, allow_relay: bool = True, reached: trio.Event | None = None) -> TunnelSession:
        target = self.directory.tunnel_peer(peer)
        if target is None:
            raise TunnelError(f"no tunnel route to {peer!r}: not a live member with a tunnel key")
        (host, port), key = target
        try:
            with trio.fail_after(self.handshake_timeout + self.direct_connect_timeout):
                transport, via = await self._transport(peer, host, port, allow_relay)
                if reached is not None:
                    reached.set()
                try:
                    initiation = Initiation(self._static_private, key, self.name, self._next_timestamp())
                    await transport.send_all(initiation.first_flight)
                    reader = Reader(transport)
                    msg2 = await reader.read_message()
                    if msg2 is None:
                        raise TunnelError(f"{peer} refused the handshake")
                    keys = initiation.finish(msg2)
                    if keys.peer != peer:
                        raise TunnelError(f"dialled {peer!r} but the key's holder says it is {keys.peer!r}")
                except BaseException:
                    await trio.aclose_forcefully(transport)
                    raise
        except trio.TooSlowError:
            raise TunnelError(f"handshake with {peer} timed out") from None
        except NoiseError as exc:
            raise TunnelError(f"handshake with {peer} failed: {exc.reason}") from None
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise TunnelError(f"cannot reach {peer} at {host}:{port}: {exc}") from None
        except (Truncated, TooLong, UnicodeDecodeError):
            raise TunnelError(f"malformed handshake reply from {peer}") from None
        self.stats["handshakes_ok"] += 1
        self.log.debug("tunnel_handshake_ok", peer=peer, role="initiator")
        sess = TunnelSession(
            self, keys, initiator=True, transport=transport, reader=reader, static_private=self._static_private
        )
        sess.via = via
        return sess

    def _next_timestamp(self) -> int:
        """Wall-clock nanoseconds, strictly increasing within this process."""
        now = int(self._clock() * _NS)
        self._last_sent_ts = max(now, self._last_sent_ts + 1)
        return self._last_sent_ts

    # -- incoming ---------------------------------------------------------------------

    async def handle_connection(self, transport: trio.abc.Stream) -> None:
        """Responder side of one TCP connection: handshake, then the session's life."""
        transport = _raw(transport)
        if self._nursery is None:
            await trio.aclose_forcefully(transport)
            return
        if self._handshakes >= self.max_handshakes:
            # Half-open connections each hold a task and a socket for up to
            # handshake_timeout: past the cap, refuse at once rather than queue.
            self.stats["handshakes_failed_busy"] += 1
            await trio.aclose_forcefully(transport)
            return
        accepted: tuple[TunnelSession, bytes] | None = None
        self._handshakes += 1
        try:
            accepted = await self._accept(transport)
        finally:
            self._handshakes -= 1
            if accepted is None:
                await trio.aclose_forcefully(transport)
        if accepted is None:
            return
        sess, first_record = accepted
        self._register(sess)
        await sess.run(first_record)

    async def _accept(self, transport: trio.abc.Stream) -> tuple[TunnelSession, bytes] | None:
        reason, detail = "", ""
        try:
            with trio.fail_after(self.handshake_timeout):
                return await self._respond(transport)
        except Refused as exc:
            reason, detail = exc.reason, exc.detail
        except trio.TooSlowError:
            reason = "timeout"
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            reason, detail = "io_error", exc.__class__.__name__
        self.stats[f"handshakes_failed_{reason}"] += 1
        self.log.info("tunnel_handshake_refused", reason=reason, detail=detail)
        return None

    async def _respond(self, transport: trio.abc.Stream) -> tuple[TunnelSession, bytes]:
        reader = Reader(transport)
        check_preamble(await reader.read_exactly(len(PREAMBLE)))
        try:
            msg1 = await reader.read_message(limit=MAX_MESSAGE1)
        except (Truncated, TooLong):
            raise Refused("bad_handshake", "malformed message 1") from None
        if msg1 is None:
            raise Refused("bad_handshake", "closed before message 1")
        keys, reply = respond(self._static_private, self.name, msg1, self.directory.member_for_key, self._replay)
        await transport.send_all(reply)
        # Key confirmation: only the holder of message 1's ephemeral key can produce this.
        try:
            first = await reader.read_message()
        except (Truncated, TooLong):
            raise Refused("bad_handshake", "malformed first record") from None
        if first is None:
            raise Refused("bad_handshake", "closed before the first record")
        try:
            record = keys.recv.decrypt_with_ad(b"", first)
        except NoiseError:
            raise Refused("bad_handshake", "first record did not decrypt") from None
        self.stats["handshakes_ok"] += 1
        self.stats["bytes_in"] += len(first) + 2
        self.log.debug("tunnel_handshake_ok", peer=keys.peer, role="responder")
        sess = TunnelSession(
            self, keys, initiator=False, transport=transport, reader=reader, static_private=self._static_private
        )
        return sess, record

    # -- the session table --------------------------------------------------------------

    def _register(self, sess: TunnelSession) -> None:
        self._sessions.add(sess)
        self.stats["sessions_opened"] += 1
        self.stats["sessions_open"] = len(self._sessions)
        if self._nursery is None:
            sess.terminate("tunnel manager stopped", error=False)
            return
        current = self._active.get(sess.peer)
        if current is None:
            self._active[sess.peer] = sess
            return
        # Two live sessions to one peer (both dialled at once): both ends keep the same one.
        if current.initiator_name != sess.initiator_name:
            winner = current if current.initiator_name < sess.initiator_name else sess
        else:
            winner = sess  # the same side dialled again: it has given up on the old one
        loser = sess if winner is current else current
        self._active[sess.peer] = winner
        self.stats["duplicate_sessions"] += 1
        self.log.debug("tunnel_duplicate_session", peer=sess.peer, kept_initiator=winner.initiator_name)
        loser.start_drain("duplicate session")

    def session_draining(self, sess: TunnelSession) -> None:
        if self._active.get(sess.peer) is sess:
            del self._active[sess.peer]

    def session_ended(self, sess: TunnelSession) -> None:
        self.session_draining(sess)
        self._sessions.discard(sess)
        self.stats["sessions_open"] = len(self._sessions)

    # -- control and views --------------------------------------------------------------

    def drop_peer(self, peer: str, reason: str = "dropped") -> int:
        """Kill every session to ``peer`` now (e.g. membership declared it dead).

        Its streams fail loudly.  Returns how many sessions were closed.
        """
        doomed = [s for s in self._sessions if s.peer == peer]
        for sess in doomed:
            sess.terminate(reason, error=True)
        return len(doomed)

    def rekey(self, peer: str) -> bool:
        """Renew the keys of the session to ``peer`` now; False if there is none or one is under way."""
        sess = self._active.get(peer)
        return sess is not None and sess.start_rekey("requested")

    def sessions_view(self) -> list[dict[str, Any]]:
        """One dict per live session, active or draining, for the API."""
        return sorted((s.view() for s in self._sessions), key=lambda v: (v["peer"], v["draining"]))

    def active_peers(self) -> list[str]:
        return sorted(self._active)

    def route_to(self, peer: str) -> list[str] | None:
        """The members our session to ``peer`` passes through (``[]``: direct; None: no session yet)."""
        sess = self._active.get(peer)
        if sess is None:
            return None
        return [] if sess.via is None else [sess.via]

    def relayed(self, peer: str) -> bool:
        """True while the direct route to ``peer`` is known broken (we go through a relay)."""
        return self._direct_failed.get(peer, 0.0) > trio.current_time()
