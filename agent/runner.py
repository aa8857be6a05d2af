"""The agent's trio nursery: it owns the sockets and drives the gossip machine.

One nursery, one owner per task: the UDP reader, the TCP acceptor, the
protocol timer, the local API and the signal watcher.  The gossip machine
itself never awaits; every task feeds it and then ``flush()``es what it asked
for.  A graceful leave cancels the nursery only after the leave has spread.

Over 700 lines because it is the one place where the machine's effects meet
sockets and tasks (UDP, the TCP exchanges, the stranger accounting behind
them, the views the API shows); each concern beside it has its own module.
"""

from __future__ import annotations

import base64
import errno
import json
import signal
import time
from collections import Counter, deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from agent import identity, log, store
from agent.access import AccessPolicy
from agent.config import AgentConfig, describe
from agent.config_entries import ConfigEntries
from agent.config_spread import ConfigSpread
from agent.directory import MeshDirectory
from agent.dns import DnsBindError, DnsServer
from agent.entry_kinds import SERVICE_DEFAULTS
from agent.intentions import Intentions
from agent.keys import KeyManager
from agent.services import LocalServices
from agent.transport import (
    DEFERRED_ICMP,
    ENCRYPTED,
    UNENCRYPTED,
    UNREADABLE,
    WRONG_KEY,
    DatagramSocket,
    FrameError,
    FrameServer,
    Mismatch,
    OpenError,
    Sealer,
    normalize,
    open_tcp_listeners,
    open_udp,
    receive_frame,
    send_frame,
)
from dataplane.rawsocket import connect_tcp
from dataplane.tunnel_stats import STAT_KEYS
from gossip import config_sync
from gossip.keyring import Keyring
from gossip.member import Status
from gossip.registry import Registry
from gossip.signing import Signer
from gossip.swim import EventKind, FetchState, Membership, Purpose, SendPacket, StartPushPull, TcpProbe
from gossip.wire import (
    PROTOCOL_VERSION,
    Address,
    DecodeError,
    PushPull,
    decode_stream,
    encode_push_pull_stream,
    format_addr,
)

if TYPE_CHECKING:
    from agent.plane import DataPlane
    from agent.traffic import Traffic
    from agent.upstreams import Upstreams
    from dataplane.proxy import UpstreamListener

#: Datagrams handled per wake-up, at most, before the agent flushes and yields.
UDP_BURST = 32


#: Sources of unopenable datagrams remembered at most, and arrivals kept per source.
_MAX_NO_KEY_SOURCES = 1024
_NO_KEY_KEEP = 10_000
#: A stranger is logged at most once per source in this many seconds, and no more
#: than _STRANGER_LOG_BURST strangers in all in that time (spoofed UDP sources are free).
_STRANGER_LOG_EVERY = 60.0
_STRANGER_LOG_BURST = 20

#: What a joiner is told when the seed's reply does not open, by what its bytes say.
_JOIN_MISMATCH = {
    WRONG_KEY: "the seed answered but its reply does not open with any of our keys: is the cluster key different?",
    UNENCRYPTED: "the seed answered but its reply is not encrypted: the seed runs with --insecure, "
                 "and this agent has a cluster key",
    ENCRYPTED: "the seed answered with an encrypted reply, and this agent runs with --insecure: "
               "the cluster has a key (start this agent with --key or --key-file)",
    UNREADABLE: "the seed answered but its reply is not gossip: is that the gossip port of a mesh-agent?",
}
#: The refusal a stranger's push-pull is answered with; only a peer that holds our
#: primary key (a keyring mid-rotation) can read it, the others learn from its bytes alone.
_STRANGER_REFUSAL = {
    WRONG_KEY: "your push-pull opens with none of the keys installed here: is your primary key installed "
               "on this member?",
    UNENCRYPTED: "this cluster is encrypted and your push-pull was not: start with the cluster key",
    ENCRYPTED: "this member runs with --insecure and your push-pull was encrypted",
}


#: (transport, host, port (0 for TCP), what its bytes say: transport.WRONG_KEY ...)
_StrangerKey = tuple[str, str, int, str]
#: Unencrypted streams larger than this are not decoded just to name their sender.
_NAME_DECODE_MAX = 64 * 1024


class _Stranger:
    """A source of input that no installed key opens, as ``mesh-agent info`` and the log name it."""

    __slots__ = ("times", "kind", "label", "logged_at")

    def __init__(self, kind: str) -> None:
        #: Arrival times in the last minute.
        self.times: deque[float] = deque()
        self.kind = kind
        #: Who it says it is, where its bytes tell (plain gossip): " (node n at host:port)".
        self.label = ""
        self.logged_at: float | None = None


class StartupError(Exception):
    """The agent cannot start (e.g. a port in use); worded as one line."""


#: How long a data plane that failed to build answers with its cause before it is tried again (s).
PLANE_RETRY_AFTER = 5.0


class PlaneUnavailable(Exception):
    """The data plane could not be built (load_plane); worded as one line, with the cause."""


class _PlaneAttempt:
    """One build of the data plane, which its callers wait for."""

    __slots__ = ("at", "done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: str | None = None
        self.at = 0.0  # when it failed

    def unavailable(self) -> PlaneUnavailable:
        """What its callers get when it failed."""
        return PlaneUnavailable(f"the data plane could not start: {self.error}")


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.log = log.get("mesh.agent").bind(node=cfg.name)
        self.sealer = Sealer(Keyring(cfg.key) if cfg.key else None)
        self.registry = Registry(cfg.name)
        #: Where the identity keys are kept, and the lock that keeps other agents out of it.
        self.identity_dir, self._identity_lock = self._claim_identity_dir(cfg)
        try:
            self.tunnel_private, self.tunnel_public, id_warnings = identity.load_or_create(self.identity_dir)
            identity_seed, more = identity.load_or_create_secret(self.identity_dir, identity.IDENTITY_FILE,
                                                                 "identity key")
            id_warnings += [w for w in more if "no --data-dir" not in w]
        except identity.IdentityError as exc:
            raise StartupError(str(exc)) from None
        cfg.warnings.extend(id_warnings)
        self._tunnel_host = cfg.advertise[0] if cfg.tunnel[0] in ("0.0.0.0", "::") else cfg.tunnel[0]
        signer = Signer(identity_seed)
        self.membership = Membership(
            cfg.name,
            cfg.advertise,
            cfg.gossip,
            tags=cfg.tags,
            now=trio.current_time(),
            delegate=self.registry,
            tunnel=((self._tunnel_host, cfg.tunnel[1]), self.tunnel_public),
            signer=signer,
        )
        self.services = LocalServices(
            cfg.name, cfg.advertise[0], cfg.data_dir, self.registry, self.membership, self._wake,
            script_checks=cfg.enable_script_checks,
        )
        self.directory = MeshDirectory(self.membership, self.services)
        self.services.declared_protocol = self._declared_protocol
        #: The tunnel manager's counters: shown at zero before the data plane is loaded, as after.
        self.dp_stats: Counter[str] = Counter(dict.fromkeys(STAT_KEYS, 0))
        self._traffic: Traffic | None = None
        #: Mesh-wide config entries (agent.config_entries), signed with the identity alives are signed with.
        self.config_entries = ConfigEntries(cfg.data_dir, cfg.name, signer)
        self.config_entries.on_change = self._config_changed
        self.config_spread = ConfigSpread(self.config_entries, self.membership, self._exchange, self.flush,
                                          self._wake, self.log, cfg.gossip.tcp_timeout)
        self.config_entries.on_written = self.config_spread.announce
        self.membership.set_config_peer(self.config_spread)
        self.intentions = Intentions(self.config_entries, cfg.data_dir, cfg.name, self.directory.has_instance)
        #: The proxy, the tunnel manager and the upstreams (agent.plane): None until the first
        #: local service, upstream or tunnel connection needs them (load_plane).
        self.plane: DataPlane | None = None
        #: Saves nothing: what `info` and /metrics show for upstreams.json before the data plane exists.
        self._no_upstreams_saver = store.Saver(None, self.log)
        #: The DNS server (agent.dns), None with --dns off.
        self.dns = DnsServer.for_agent(self)
        self.keys = KeyManager(self.sealer.keyring, cfg.data_dir, self.membership, self.log, self._wake)
        self.keys.load()
        self._registry_index = self.registry.index
        self.io: Counter[str] = Counter()
        #: The local API's rules and refusal counters (the API server applies them; info and metrics show them).
        self.access = AccessPolicy(cfg.api, cfg.api_token, cfg.api_allow_hosts,
                                   log=log.get("mesh.api").bind(node=cfg.name))
        self.started_wall = time.time()
        self._udp: DatagramSocket | None = None
        self._members_view: tuple[tuple[int, int], list[dict[str, Any]], bytes] | None = None
        #: name -> (what the entry shows, tags, the entry, its JSON): a poll after a
        #: change re-renders only the members that changed, not all of them.
        self._member_entries: dict[str, tuple[tuple[Any, ...], dict[str, str], dict[str, Any], bytes]] = {}
        self._nursery: trio.Nursery | None = None
        self._kick = trio.Event()
        self._sleep_until = 0.0
        self._leave_done = trio.Event()
        #: The data plane's build under way (load_plane): its other callers wait for it.
        self._plane_attempt: _PlaneAttempt | None = None
        #: The last build that failed, while its cause is the answer (PLANE_RETRY_AFTER).
        self._plane_failed: _PlaneAttempt | None = None
        #: Sources of input no installed key opens: (transport, host, port, kind) -> what is known of them.
        #: A TCP stream comes from a new port every time, so TCP sources are kept by host (port 0).
        self._no_key: dict[_StrangerKey, _Stranger] = {}
        #: When strangers were last logged (any of them), for the overall limit.
        self._stranger_logs: deque[float] = deque()

    @staticmethod
    def _claim_identity_dir(cfg: AgentConfig) -> tuple[Path | None, int | None]:
        """The data dir, or without one the default identity place (agent.identity), locked for this process.

        Two agents never share one: an explicit --data-dir in use is a start-up
        error; a default place in use (or unusable) means keys new at this start.
        """
        if cfg.data_dir is not None:
            try:
                return cfg.data_dir, identity.claim_dir(cfg.data_dir)
            except identity.DirInUse as exc:
                raise StartupError(f"--data-dir {exc}") from None
            except identity.IdentityError as exc:
                cfg.warnings.append(f"--data-dir not locked: {exc}")
                return cfg.data_dir, None
        default = identity.default_dir(cfg.name, cfg.bind)
        if default is None:
            cfg.warnings.append("no --data-dir and no home directory: the identity keys are new at every start")
            return None, None
        try:
            return default, identity.claim_dir(default)
        except identity.IdentityError as exc:
            cfg.warnings.append(f"no --data-dir, and the default identity place: {exc}: "
                                "the identity keys are new at this start")
            return None, None

    # -- lifecycle ----------------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        from agent.api import ApiServer  # deferred: keeps the gossip path import-light

        raise_open_files_limit(self.log)
        self._udp = await self._bind_udp()
        try:
            tcp_listeners = await self._bind_tcp(self.cfg.bind, "gossip TCP")
            api_listeners = await self._bind_tcp(self.cfg.api, "API")
            tunnel_listeners = await self._bind_tcp(self.cfg.tunnel, "tunnel")
            if self.dns is not None and not await self.dns.bind():
                self.dns = None
        except DnsBindError as exc:
            self._udp.close()
            raise StartupError(str(exc)) from None
        except StartupError:
            self._udp.close()
            raise
        api = ApiServer(self)
        # With --tunnel HOST:0 the OS picks the port; peers must learn that one.
        bound_port = int(tunnel_listeners[0].socket.getsockname()[1])
        self.membership.set_tunnel(((self._tunnel_host, bound_port), self.tunnel_public))
        self.services.load(self.cfg.services)
        self._load_config_entries()
        self.membership.state_changed()
        if self.cfg.data_dir is None:
            self.log.warning("no_data_dir", detail="run-time service registrations will not survive a restart")
        for w in self.cfg.warnings:
            self.log.warning("config_warning", detail=w)
        if self.cfg.insecure:
            self.log.warning("insecure_mode", detail="gossip is NOT encrypted or authenticated (--insecure)")
        self.log.info("agent_started", **describe(self.cfg),
                      identity=str(self.identity_dir) if self.identity_dir else "new at every start")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.config_spread.start(nursery)
                self.services.start(nursery)
                nursery.start_soon(self._accept_tunnels, tunnel_listeners)
                if self.services.registrations:
                    # Before anything is sent: peers learn of our instances once we can take their streams.
                    await self._plane_at_start()
                if self.cfg.upstreams or self._saved_upstreams():
                    await self._open_upstreams()
                nursery.start_soon(self._udp_loop)
                nursery.start_soon(self._timer_loop)
                nursery.start_soon(self._signal_loop)
                frames = FrameServer.adopt(tcp_listeners, self._answer_frames, self.membership.drop, self.flush,
                                           self.io, self.cfg.gossip.tcp_timeout)
                nursery.start_soon(frames.serve)
                nursery.start_soon(trio.serve_listeners, api.handle, api_listeners)
                if self.dns is not None:
                    nursery.start_soon(self.dns.serve)
                if self.cfg.join:
                    self.membership.join(trio.current_time(), self.cfg.join)
                    await self.flush()
                task_status.started()
                await self._leave_done.wait()
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # trio wraps what the nursery's body raised: a start that fails in there (the data
            # plane, an upstream) leaves as the StartupError it is, as the binds' above do.
            startup, rest = group.split(StartupError)
            if startup is None or rest is not None:
                raise
            first: BaseException = startup
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from None
        finally:
            self._udp.close()
        self.log.info("agent_stopped")

    # -- the data plane (agent.plane) ---------------------------------------------------

    async def load_plane(self) -> DataPlane:
        """The data plane, built and started by its first caller; the others wait until it runs.

        If it cannot be built, the agent stays up without it: every caller waiting for
        that attempt gets :class:`PlaneUnavailable` with the cause, and so does every
        call for PLANE_RETRY_AFTER; the first call after that tries again (what was
        missing may have been put back), so a peer that keeps dialling our tunnel port
        cannot make us rebuild, and log, in a loop.
        """
        if self.plane is not None:
            return self.plane
        attempt = self._plane_attempt
        if attempt is None:
            failed = self._plane_failed
            if failed is not None and trio.current_time() - failed.at < PLANE_RETRY_AFTER:
                raise failed.unavailable()
            attempt = self._plane_attempt = _PlaneAttempt()
            try:
                # Shielded: a first caller cancelled here (its client gone) must not leave the
                # data plane half built for every later one.
                with trio.CancelScope(shield=True):
                    self.plane = await self._build_plane()
            except Exception as exc:  # whatever it was, nothing of the data plane was kept
                attempt.error = f"{type(exc).__name__}: {exc}"
                attempt.at = trio.current_time()
                self._plane_failed = attempt
                self._plane_attempt = None
                self.log.error("data_plane_failed", detail=attempt.error)
            finally:
                attempt.done.set()
        await attempt.done.wait()
        if self.plane is None:
            raise attempt.unavailable()
        return self.plane

    async def _plane_at_start(self) -> DataPlane:
        """The data plane for what the configuration asks of it at start: without it, no start."""
        try:
            return await self.load_plane()
        except PlaneUnavailable as exc:
            raise StartupError(str(exc)) from None

    async def _build_plane(self) -> DataPlane:
        assert self._nursery is not None
        # Its modules and the tunnel cipher load in a worker thread: a running agent
        # keeps answering probes meanwhile (the interpreter switches threads every few
        # ms), where an import on the event loop would stall its acks for the whole
        # load and show in its peers' RTT to it, which the balancers prefer low.
        await trio.to_thread.run_sync(_import_plane)
        from agent.plane import DataPlane
        from dataplane import noise

        # OpenSSL's cipher waits for the first session (it is most of the data plane's
        # memory), then loads in a worker thread too; libsodium seals the session's
        # messages meanwhile.
        noise.fast_cipher_wanted = self._load_fast_cipher

        plane = DataPlane(self)
        plane.proxy.start(self._nursery)
        await self._nursery.start(plane.tunnels.serve)
        self.directory.tunnel_route = plane.tunnels.route_to
        return plane

    def _load_fast_cipher(self) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(self._fast_cipher)

    async def _fast_cipher(self) -> None:
        from dataplane import noise

        try:
            await trio.to_thread.run_sync(noise.load_fast_cipher)
        except Exception as exc:  # libsodium's cipher keeps sealing: byte for byte the same, only slower
            self.log.warning("fast_cipher_unavailable", detail=f"{type(exc).__name__}: {exc}",
                             sealing_with="libsodium")

    async def _accept_tunnels(self, listeners: list[trio.SocketListener]) -> None:
        """The tunnel port accepts from the start: a peer may dial us before we carry traffic
        (we relay for it, or it saw our service before we did), and its connection loads the data plane."""

        async def handle(stream: trio.SocketStream) -> None:
            try:
                plane = await self.load_plane()
            except PlaneUnavailable:  # logged where it failed; the peer sees its tunnel closed
                await stream.aclose()
                return
            await plane.tunnels.handle_connection(stream)

        await trio.serve_listeners(handle, listeners)

    def _saved_upstreams(self) -> bool:
        """Whether --data-dir holds upstreams to reopen (or a file that cannot be read: opening it says why)."""
        if self.cfg.data_dir is None:
            return False
        try:
            return (self.cfg.data_dir / "upstreams.json").read_text().strip() != "[]"
        except FileNotFoundError:
            return False
        except (OSError, UnicodeDecodeError):
            return True

    async def _open_upstreams(self) -> None:
        """The configured and the saved upstreams, at start: one that cannot open stops the agent."""
        from dataplane.proxy import ProxyError

        plane = await self._plane_at_start()
        try:
            await plane.upstreams.load(self.cfg.upstreams)
        except ProxyError as exc:
            raise StartupError(f"upstream: {exc}") from None

    @property
    def traffic(self) -> Traffic:
        """The golden metrics of HTTP requests, fed by the proxy (its RequestSink): stat, tap, /metrics."""
        if self._traffic is None:
            from agent.traffic import Traffic

            self._traffic = Traffic()
        return self._traffic

    async def load_upstreams(self) -> Upstreams:
        """The upstream machinery, loading the data plane if it is not yet."""
        return (await self.load_plane()).upstreams

    def upstream_listeners(self) -> dict[str, UpstreamListener]:
        """The open upstreams by service (none while the data plane is not loaded); callers must not modify it."""
        return {} if self.plane is None else self.plane.proxy.upstreams

    async def _bind_udp(self) -> DatagramSocket:
        try:
            return await open_udp(self.cfg.bind)
        except OSError as exc:
            raise StartupError(_bind_error("gossip UDP", self.cfg.bind, exc)) from None

    async def _bind_tcp(self, addr: Address, what: str) -> list[trio.SocketListener]:
        try:
            return await open_tcp_listeners(addr[0], addr[1])
        except OSError as exc:
            raise StartupError(_bind_error(what, addr, exc)) from None

    def start_leave(self) -> None:
        """Begin a graceful leave in the agent's own nursery: it outlives the request that asked for it."""
        if self._nursery is None:
            raise RuntimeError("the agent is not running")
        self._nursery.start_soon(self.leave)

    async def leave(self) -> None:
        """Graceful leave: broadcast it, give it time to spread, then stop."""
        if self.membership.leaving:
            return
        self.log.info("leaving", detail="announcing graceful leave")
        self.membership.leave(trio.current_time())
        await self.flush()
        with trio.move_on_after(self.cfg.gossip.leave_propagate_timeout):
            while not self.membership.leave_spread(trio.current_time()):
                await trio.sleep(self.cfg.gossip.gossip_interval / 2)
        # One more gossip interval lets the last packets leave the socket.
        await trio.sleep(self.cfg.gossip.gossip_interval)
        self._leave_done.set()

    async def _signal_loop(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                if self.membership.leaving:
                    self.log.warning("forced_exit", signal=signal.Signals(signum).name)
                    self._leave_done.set()
                    return
                self.log.info("signal", signal=signal.Signals(signum).name)
                assert self._nursery is not None
                self._nursery.start_soon(self.leave)

    # -- driving the machine -------------------------------------------------------------

    async def flush(self) -> None:
        """Do what the machine asked for, log its events, and re-arm the timer."""
        effects, events = self.membership.drain()
        for ev in events:
            if ev.kind is EventKind.QUERY:
                if ev.fields["name"] == config_sync.QUERY_NAME:
                    self.config_spread.on_query(ev.fields)
                else:
                    self.keys.on_event(ev.fields)
                continue
            self._log_event(ev.kind, ev.fields)
            if ev.kind is EventKind.MEMBER and ev.fields["status"] in ("dead", "left") and self.plane is not None:
                # Streams to a member gossip gave up on fail now, not at a TCP timeout.
                self.plane.tunnels.drop_peer(ev.fields["name"], f"member {ev.fields['status']}")
        if self.registry.index != self._registry_index or any(ev.kind is EventKind.MEMBER for ev in events):
            self._registry_index = self.registry.index
            self.services.notify()
        for eff in effects:
            if isinstance(eff, SendPacket):
                await self._send_udp(eff.addr, eff.payload)
            elif isinstance(eff, StartPushPull) and self._nursery is not None:
                self._nursery.start_soon(self._push_pull, eff.target, eff.purpose)
            elif isinstance(eff, FetchState) and self._nursery is not None:
                self._nursery.start_soon(self._fetch_state, eff.node, eff.addr)
            elif isinstance(eff, TcpProbe) and self._nursery is not None:
                self._nursery.start_soon(self._tcp_probe, eff)
        self.keys.note_responses()
        if self.membership.next_deadline() < self._sleep_until:
            self._kick.set()

    def _wake(self) -> None:
        """Local state changed outside a flush: let the timer loop send it."""
        self._kick.set()

    async def _timer_loop(self) -> None:
        while True:
            self.membership.tick(trio.current_time())
            await self.flush()
            self._sleep_until = self.membership.next_deadline()
            with trio.move_on_at(self._sleep_until):
                await self._kick.wait()
            self._kick = trio.Event()

    async def _send_udp(self, addr: Address, payload: bytes) -> None:
        assert self._udp is not None
        data = self.sealer.seal(payload)
        try:
            await self._udp.sendto(data, addr)
        except OSError as exc:
            self.io["send_errors"] += 1
            self.log.debug("udp_send_failed", to=format_addr(addr), error=exc.strerror)
            return
        self.io["udp_packets_out"] += 1
        self.io["udp_bytes_out"] += len(data)

    async def _udp_loop(self) -> None:
        assert self._udp is not None
        udp = self._udp
        while True:
            await udp.wait_readable()
            # A burst (a join, a round of gossip from several members) is
            # handled in one wake-up and answered with one flush.
            received = 0
            errors = False
            for _ in range(UDP_BURST):
                try:
                    more = udp.recv_nowait()
                except OSError as exc:
                    # Mostly a pending ICMP error, reported once: the error queue
                    # has its details (below) and the next receive goes on.
                    self.io["udp_icmp_errors" if exc.errno in DEFERRED_ICMP else "recv_errors"] += 1
                    errors = True
                    continue
                if more is None:
                    break
                received += 1
                self._receive_datagram(*more)
            # The error queue is read only when something says it has an entry: a
            # receive or send reported an error, or we were woken with no datagram
            # (epoll reports a non-empty error queue as readable, until it is read).
            if errors or received == 0 or udp.errors_pending:
                for addr in udp.unreachable():
                    self.io["udp_unreachable"] += 1
                    self.membership.port_unreachable(trio.current_time(), addr)
            await self.flush()

    def _receive_datagram(self, data: bytes, raw_src: tuple[object, ...]) -> None:
        self.io["udp_packets_in"] += 1
        self.io["udp_bytes_in"] += len(data)
        if len(data) > self.cfg.gossip.udp_packet_size:
            self.membership.drop("oversized")
            return
        try:
            plain = self.sealer.open(data)
        except OpenError:
            self._unopened("udp", normalize(raw_src), data)
            return
        self.membership.receive(trio.current_time(), normalize(raw_src), plain)

    def _unopened(self, transport: str, src: Address, payload: bytes) -> str:
        """Count input our keys do not open, and note its sender so `info` and the log can name it.

        Returns what the bytes say about the sender (transport.WRONG_KEY, ...).
        """
        self.membership.drop("decrypt" if self.sealer.keyring is not None else "encrypted")
        kind = self.sealer.mismatch(payload)
        now = trio.current_time()
        key = (transport, src[0], src[1] if transport == "udp" else 0, kind)
        row = self._no_key.get(key)
        if row is None:
            if len(self._no_key) >= _MAX_NO_KEY_SOURCES:
                self._prune_no_key(now)
                if len(self._no_key) >= _MAX_NO_KEY_SOURCES:
                    return kind
            row = self._no_key[key] = _Stranger(kind)
        times = row.times
        times.append(now)
        while times and times[0] < now - 60.0:
            times.popleft()
        if len(times) > _NO_KEY_KEEP:
            times.popleft()
        self._log_stranger(now, key, row, payload)
        return kind

    def _log_stranger(self, now: float, key: _StrangerKey, row: _Stranger, payload: bytes) -> None:
        """One line per stranger a minute: enough to be seen, never a flood."""
        if row.logged_at is not None and now - row.logged_at < _STRANGER_LOG_EVERY:
            return
        logs = self._stranger_logs
        while logs and logs[0] <= now - _STRANGER_LOG_EVERY:
            logs.popleft()
        if len(logs) >= _STRANGER_LOG_BURST:
            self.io["undecryptable_logs_suppressed"] += 1
            return
        logs.append(now)
        row.logged_at = now
        if key[0] == "tcp" and row.kind == UNENCRYPTED:
            # Streams come from any port: the push-pull itself says which agent sent it.
            # Decoded only here, so unauthenticated input costs a decode at most as often as a log line.
            row.label = _plain_sender(payload) or row.label
        view = _stranger_row(key, row, len(row.times))
        self.log.warning("undecryptable", source=view["source"], transport=view["transport"],
                         kind=view["kind"], detail=view["hint"])

    def _prune_no_key(self, now: float) -> None:
        for src in [s for s, r in self._no_key.items() if not r.times or r.times[-1] < now - 60.0]:
            del self._no_key[src]

    def no_key_view(self) -> list[dict[str, Any]]:
        now = trio.current_time()
        self._prune_no_key(now)
        rows = []
        for key, row in sorted(self._no_key.items(), key=lambda kv: -len(kv[1].times)):
            n = sum(1 for t in row.times if t >= now - 60.0)
            if n:
                rows.append(_stranger_row(key, row, n))
        return rows

    def _answer_frames(self, frames: list[tuple[Address, bytes]]) -> list[bytes | None]:
        """Responder side of push-pull (and TCP pings, state requests), for a batch of streams."""
        replies: list[bytes | None] = [None] * len(frames)
        opened: list[int] = []
        requests: list[tuple[Address, bytes]] = []
        for i, (peer, frame) in enumerate(frames):
            try:
                requests.append((peer, self.sealer.open(frame)))
                opened.append(i)
            except OpenError:
                # Answered, not just closed: a joiner with another key (or none) can
                # then tell from the reply's bytes which it is, instead of "truncated".
                replies[i] = self._stranger_reply(self._unopened("tcp", peer, frame))
        for i, reply in zip(opened, self.membership.handle_streams(trio.current_time(), requests), strict=True):
            if reply is not None:
                replies[i] = self.sealer.seal(reply)
        return replies

    def _stranger_reply(self, kind: str) -> bytes | None:
        """A refusal sealed as we seal everything (plain when --insecure), for a push-pull we could not open."""
        reason = _STRANGER_REFUSAL.get(kind)
        if reason is None:
            return None  # not gossip at all: nothing to explain to it
        return self.sealer.seal(encode_push_pull_stream(PushPull(self.cfg.name, False, [], reason), []))

    async def _push_pull(self, target: Address, purpose: Purpose) -> tuple[bool, str]:
        """Initiator side of push-pull: one frame out, one frame back."""
        reply: bytes | None = None
        error = "timed out"
        refused = False
        with trio.move_on_after(self.cfg.gossip.tcp_timeout):
            try:
                reply = await self._exchange(target, self.membership.push_pull_payload(
                    purpose is Purpose.JOIN, lite=purpose is Purpose.SYNC))
                error = ""
            except Mismatch as exc:
                error = _JOIN_MISMATCH[exc.kind]
            except FrameError as exc:
                error = f"bad reply ({exc.reason})"
            except OSError as exc:
                error = exc.strerror or str(exc)
                refused = _refused(exc)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                error = "connection closed"
        ok, reason = self.membership.complete_push_pull(
            trio.current_time(), target, purpose, reply, error, refused
        )
        await self.flush()
        return ok, reason

    async def _exchange(self, target: Address, payload: bytes) -> bytes:
        """One sealed frame out, one back, on a fresh TCP stream."""
        stream = await connect_tcp(target[0], target[1])
        try:
            sealed = self.sealer.seal(payload)
            await send_frame(stream, sealed)
            self.io["tcp_bytes_out"] += len(sealed) + 4
            frame = await receive_frame(stream)
            self.io["tcp_bytes_in"] += len(frame) + 4
            try:
                return self.sealer.open(frame)
            except OpenError:
                self.membership.drop("decrypt" if self.sealer.keyring is not None else "encrypted")
                raise Mismatch(self.sealer.mismatch(frame)) from None
        finally:
            stream.close_now()

    async def _tcp_probe(self, eff: TcpProbe) -> None:
        """memberlist's fallback ping: the same Ping over TCP, answered before the probe ends."""
        reply: bytes | None = None
        refused = False
        with trio.move_on_at(eff.deadline):
            try:
                reply = await self._exchange(eff.addr, eff.payload)
            except OSError as exc:
                refused = _refused(exc)
            except (OpenError, FrameError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        self.membership.complete_tcp_probe(trio.current_time(), eff.seq, reply, refused)
        await self.flush()

    async def _fetch_state(self, node: str, addr: Address) -> None:
        """A member advertised a newer catalog: fetch it from the member itself."""
        reply: bytes | None = None
        with trio.move_on_after(self.cfg.gossip.tcp_timeout):
            try:
                reply = await self._exchange(addr, self.membership.state_request_payload(node))
            except (OSError, OpenError, FrameError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.log.debug("state_fetch_failed", member=node, error=str(exc))
        self.membership.complete_fetch(trio.current_time(), node, reply)
        await self.flush()

    async def join(self, targets: list[Address]) -> dict[str, Any]:
        """Explicit join (API/CLI): push-pull with each target, report per target."""
        results: dict[str, str] = {}

        async def one(t: Address) -> None:
            ok, reason = await self._push_pull(t, Purpose.EXPLICIT)
            results[format_addr(t)] = "ok" if ok else reason

        async with trio.open_nursery() as n:
            for t in targets:
                n.start_soon(one, t)
        joined = sum(1 for r in results.values() if r == "ok")
        return {"ok": joined > 0, "joined": joined,
                "errors": {k: v for k, v in results.items() if v != "ok"}}

    # -- views for the API ------------------------------------------------------------------

    def members_view(self) -> list[dict[str, Any]]:
        """The member table as the API shows it; callers must not modify it."""
        return self._members()[1]

    def members_json(self) -> bytes:
        """``members_view()`` as the API's JSON body (``json.dumps`` of it, plus a newline)."""
        return self._members()[2]

    def _members(self) -> tuple[tuple[int, int], list[dict[str, Any]], bytes]:
        version = self.membership.view_version()
        if self._members_view is not None and self._members_view[0] == version:
            return self._members_view
        old = self._member_entries
        entries = {}
        out = []
        blocked = self.membership.udp_blocked
        for m in self.membership.member_list():
            key = (m.addr, m.status, m.incarnation, m.rtt, m.tunnel, m.name in blocked)
            entry = old.get(m.name)
            if entry is None or entry[0] != key or entry[1] != m.tags:
                view = {
                    "name": m.name,
                    "address": format_addr(m.addr),
                    "status": m.status.value,
                    "incarnation": m.incarnation,
                    "tags": dict(m.tags),
                    "rtt_ms": None if m.rtt is None else round(m.rtt * 1000, 3),
                    "tunnel": None if m.tunnel is None else format_addr(m.tunnel[0]),
                    "tunnel_key": None if m.tunnel is None else base64.b64encode(m.tunnel[1]).decode(),
                    # Reached over TCP while UDP probes fail: a firewall, most likely.
                    "udp_blocked": m.name in blocked,
                }
                entry = (key, dict(m.tags), view, json.dumps(view).encode())
            entries[m.name] = entry
            out.append(entry[2])
        self._member_entries = entries
        # json.dumps of a list is its items' dumps joined by ", ", in brackets.
        body = b"[" + b", ".join(e[3] for e in entries.values()) + b"]\n"
        self._members_view = (version, out, body)
        return self._members_view

    # -- relays (dataplane.relay) ------------------------------------------------------------

    def relays_for(self, peer: str) -> list[str]:
        """Members that may carry our session to ``peer``, best first.

        Alive members with a tunnel; one we already hold a direct session to
        comes first (no extra handshake), then the lowest estimated RTT
        through it (our RTT to it plus its coordinate distance to the peer).
        """
        ms = self.membership
        assert self.plane is not None
        ranked: list[tuple[int, float, str]] = []
        for m in ms.members.values():
            if m.name in (ms.name, peer) or m.status is not Status.ALIVE or m.tunnel is None:
                continue
            route = self.plane.tunnels.route_to(m.name)
            if route:  # itself relayed: relays do not chain
                continue
            leg1 = ms.rtt_estimate(ms.name, m.name)
            leg2 = ms.rtt_estimate(m.name, peer)
            cost = (leg1[0] if leg1 else 1.0) + (leg2[0] if leg2 else 1.0)
            ranked.append((0 if route == [] else 1, cost, m.name))
        return [name for _, _, name in sorted(ranked)]

    def _declared_protocol(self, service: str) -> str | None:
        defaults = self.config_entries.lookup(SERVICE_DEFAULTS, service)
        protocol = None if defaults is None else defaults.get("protocol")
        return protocol if isinstance(protocol, str) else None

    def routes_view(self, service: str | None = None) -> list[dict[str, Any]]:
        """The routing table: every passing instance of each upstream's service, as its router sees it."""
        now = trio.current_time()
        rows: list[dict[str, Any]] = []
        if self.plane is None:
            return rows
        proxy = self.plane.proxy
        for name, up in sorted(proxy.upstreams.items()):
            if service is not None and name != service:
                continue
            protocol, conflict = proxy.protocol(up), self.services.protocol_of(name)[1]
            first = len(rows)
            self._route_rows(rows, name, up, now)
            for row in rows[first:]:
                row["protocol"] = protocol
                if conflict is not None:
                    row["protocol_conflict"] = conflict
        return rows

    def _route_rows(self, rows: list[dict[str, Any]], name: str, up: UpstreamListener, now: float) -> None:
        chain = self.config_entries.chain_for(name)
        if chain is None:
            rows += up.router.view(now, self.directory.passing_endpoints(name), self.directory, self.cfg.name)
            return
        # Shaped by config entries: each split's instances, and which target (and weight) chose them.
        for weight, target in chain.splits:
            resolved = chain.resolve(target, self.directory.passing_endpoints)
            for row in up.router.view(now, resolved.endpoints, self.directory, self.cfg.name):
                row["service"] = name
                row["target"] = str(resolved.used)
                row["split_weight"] = weight
                row["failover_from"] = str(target) if resolved.failed_over else None
                rows.append(row)
        # http: the service-router's routes, each with the instances its destination resolves to.
        for i, (match, target) in enumerate(chain.routes):
            resolved = chain.resolve(target, self.directory.passing_endpoints)
            for row in up.router.view(now, resolved.endpoints, self.directory, self.cfg.name):
                row["service"] = name
                row["target"] = str(resolved.used)
                row["route"] = {"index": i, "match": dict(match)}
                row["failover_from"] = str(target) if resolved.failed_over else None
                rows.append(row)

    def _load_config_entries(self) -> None:
        """Saved entries, then a per-node intentions.json carried over (once), then the config file's."""
        self.config_entries.load()
        self.intentions.migrate()
        from_file = [{"kind": "intention", **r} for r in self.cfg.intentions] + self.cfg.config_entries
        try:
            written = self.config_entries.apply_file(from_file)
        except store.StoreError as exc:
            self.log.error("config_file_entries_not_saved", detail=str(exc))
        else:
            if written:
                self.log.info("config_file_entries_written", entries=written)
        self.intentions.refresh()

    def _config_changed(self, changed: list[Any]) -> None:
        self.intentions.refresh()
        if any(e.kind == SERVICE_DEFAULTS for e in changed) and self.plane is not None:
            self.plane.upstreams.defaults_changed()

    def savers(self) -> dict[str, store.Saver]:
        """The files under --data-dir that run-time changes are saved to, by file name (agent.store)."""
        upstreams = self._no_upstreams_saver if self.plane is None else self.plane.upstreams.saver
        return {"services.json": self.services.saver, "upstreams.json": upstreams,
                "keyring.json": self.keys.saver, "config_entries.json": self.config_entries.saver}

    def self_view(self) -> dict[str, Any]:
        ms = self.membership
        stats = dict(ms.counters.stats)
        stats.update(self.io)
        stats.update({f"dataplane.{k}": v for k, v in self.dp_stats.items()})
        if self.plane is not None:
            stats.update({f"proxy.{k}": v for k, v in self.plane.proxy.stats.items()})
        return {
            "name": self.cfg.name,
            "address": format_addr(self.cfg.advertise),
            "bind": format_addr(self.cfg.bind),
            "api": format_addr(self.cfg.api),
            "tunnel": format_addr(ms.me.tunnel[0]) if ms.me.tunnel else None,
            "dns": None if self.dns is None else self.dns.view(),
            "status": ms.me.status.value,
            "incarnation": ms.me.incarnation,
            "tags": dict(ms.me.tags),
            "profile": self.cfg.profile,
            "encrypted": not self.cfg.insecure,
            "protocol_version": PROTOCOL_VERSION,
            "joined": ms.joined,
            "join_error": ms.join_error,
            "health_score": ms.awareness.score,
            "members": ms.count_by_status(),
            "udp_blocked": sorted(ms.udp_blocked),
            "undecryptable": self.no_key_view(),
            "counters": {
                "dropped": dict(sorted(ms.counters.drops.items())),
                "dropped_total": sum(ms.counters.drops.values()),
                "api_refused": dict(sorted(self.access.refused.items())),
                "api_refused_total": sum(self.access.refused.values()),
                **dict(sorted(stats.items())),
            },
            "uptime_s": round(time.time() - self.started_wall, 1),
            "store": {name.removesuffix(".json"): saver.view() for name, saver in self.savers().items()},
            # Members that cannot take config entries yet (an older release): they keep
            # membership, catalog and traffic, but neither hold nor enforce the entries.
            "config_entries": {**self.config_entries.summary_view(),
                               "peers_without_config": self.config_spread.peers_without_config()},
        }

    # -- logging ---------------------------------------------------------------------------

    def _log_event(self, kind: EventKind, fields: dict[str, Any]) -> None:
        if kind is EventKind.MEMBER:
            self.log.info("member_" + fields["status"], **fields)
            return
        level = _EVENT_LEVELS.get(kind, "debug")
        getattr(self.log, level)(kind.value, **fields)


#: The level each membership event is logged at (the rest: debug).
_EVENT_LEVELS: dict[EventKind, str] = {
    EventKind.NAME_CONFLICT: "error", EventKind.JOIN_REFUSED: "error", EventKind.JOIN_REFUSED_BY_PEER: "error",
    EventKind.MEMBER_FORGED: "error",
    EventKind.JOIN_RETRY: "warning", EventKind.UDP_BLOCKED: "warning", EventKind.ADDRESS_MISMATCH: "warning",
    EventKind.BROADCASTS_DROPPED: "warning", EventKind.PREVIOUS_IDENTITY: "warning",
    EventKind.REFUTE: "info", EventKind.MEMBER_MOVED: "info", EventKind.MEMBER_REKEYED: "info",
    EventKind.UDP_RESTORED: "info",
}


def _stranger_row(key: _StrangerKey, row: _Stranger, n: int) -> dict[str, Any]:
    """A stranger as `info` shows it: the hint says in plain words what probably differs."""
    transport, host, port, _ = key
    source = format_addr((host, port)) if transport == "udp" else (f"[{host}]" if ":" in host else host)
    what = ("packet" if transport == "udp" else "TCP stream") + ("" if n == 1 else "s")
    if transport == "tcp":
        what += " (joins, push-pulls)"
    were = "was" if n == 1 else "were"
    who = source + row.label
    if row.kind == WRONG_KEY:
        hint = f"{who}: {n} {what} in the last minute opened with no installed key — is its key different?"
    elif row.kind == UNENCRYPTED:
        hint = (f"{who}: {n} {what} in the last minute {were} not encrypted — does it run with --insecure? "
                "This agent has a cluster key")
    elif row.kind == ENCRYPTED:
        hint = (f"{who}: {n} {what} in the last minute {were} encrypted, and this agent runs with --insecure "
                "— does the cluster have a key?")
    else:
        hint = f"{who}: {n} {what} in the last minute {were} neither gossip nor sealed with an installed key"
    return {"source": source, "transport": transport, "kind": row.kind, "packets_last_minute": n, "hint": hint}


def _plain_sender(payload: bytes) -> str:
    """Who an unencrypted push-pull says it is, for the operator of an encrypted agent: " (node n at a:p)"."""
    if len(payload) > _NAME_DECODE_MAX:
        return ""
    try:
        msgs = decode_stream(payload)
    except DecodeError:
        return ""
    if len(msgs) != 1 or not isinstance(msgs[0], PushPull):
        return ""
    msg = msgs[0]
    own = next((r for r in msg.members if r.name == msg.source), None)
    return f" (node {msg.source!r}" + (f" at {format_addr(own.addr)})" if own is not None else ")")


def raise_open_files_limit(logger: Any) -> None:
    """Lift the soft limit on open files to the hard one, as Go's runtime does at start.

    Every API client, tunnel stream and proxied connection is a descriptor;
    the usual soft limit of 1024 would let a burst of idle API connections
    (or a busy proxy) starve the rest of the agent of sockets.
    """
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            # Linux refuses RLIM_INFINITY above fs.nr_open: keep a finite ceiling then.
            target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            logger.debug("open_files_limit", soft=target, hard=hard)
    except (ImportError, ValueError, OSError) as exc:
        logger.warning("open_files_limit_unchanged", detail=str(exc))


def _import_plane() -> None:
    """What building the data plane needs loaded (load_plane runs it in a worker thread)."""
    import agent.plane  # noqa: F401


def _refused(exc: OSError) -> bool:
    """Was this connect refused by the far host?  trio.open_tcp_stream wraps the
    attempts' errors in an ExceptionGroup, the cause of the OSError it raises."""
    if isinstance(exc, ConnectionRefusedError):
        return True
    group = exc.__cause__
    errors = group.exceptions if isinstance(group, BaseExceptionGroup) else ()
    return bool(errors) and all(isinstance(e, ConnectionRefusedError) for e in errors)


def _bind_error(what: str, addr: Address, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"cannot bind {what} on {format_addr(addr)}: port already in use"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot bind {what} on {format_addr(addr)}: address not available on this host"
    return f"cannot bind {what} on {format_addr(addr)}: {exc.strerror or exc}"
