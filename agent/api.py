"""The local HTTP/JSON API, served on trio (framing: agent.api_http).

Local only (127.0.0.1 by default).  Every request passes agent.access's
rules at its head, before its body is read: a refused request's body is
read and thrown away, never buffered or parsed, and nothing changes.  HTTP/1.1 keep-alive is honoured, as
Consul's API does: a script or dashboard polling the agent reuses one
connection instead of paying for a TCP set-up and a new task per request
(about a third of the agent's cost of a small request).  An idle kept-alive
connection is closed after KEEPALIVE_IDLE.  Every failure is a 4xx/5xx with
``{"error": "one-line reason"}`` -- never a traceback on the wire.

A handler may instead reply with a ``Streamed`` body (the monitor does): it is
sent chunked, a piece at a time, for as long as the client stays connected,
and the connection ends with it.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

import trio

from agent import api_http, log
from agent.access import SAFE_METHODS, Refused
from agent.api_http import Request, RequestReader
from agent.durations import parse_duration
from agent.peercred import loopback_peer_uid
from agent.runner import PlaneUnavailable
from agent.services import ServiceError, shown
from agent.store import StoreError
from dataplane.rawsocket import RawSocketStream
from gossip.address import parse_addr
from gossip.frozen import same_class_equality

if TYPE_CHECKING:
    from agent.runner import Agent

REQUEST_TIMEOUT = 10.0
#: How long a kept-alive connection may sit idle between requests.
KEEPALIVE_IDLE = 30.0
#: Requests served on one connection before we close it (bounds its lifetime).
KEEPALIVE_MAX_REQUESTS = 10_000


def _encode(payload: Any) -> bytes:
    """A JSON body; handlers may return one pre-encoded (bytes) to skip this."""
    return (json.dumps(payload) + "\n").encode()


#: The request headers agent.access reads (names in lower case).
_ACCESS_HEADERS = frozenset({b"host", b"origin", b"sec-fetch-site", b"authorization", b"content-type"})


@same_class_equality
class Streamed(NamedTuple):
    """A reply whose body is sent as it is produced, until it ends or the client goes away.

    ``open`` is entered before the response head goes out, so whatever it
    subscribes to is in place by the time the client sees the status; it is
    exited whichever way the stream ends, so a subscription cannot leak.
    """

    open: Callable[[], AbstractContextManager[AsyncIterator[bytes]]]
    content_type: str = "application/x-ndjson"


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


Reply = tuple[int, Any] | tuple[int, Any, list[tuple[str, str]]]
Handler = Callable[[dict[str, list[str]], Any], Awaitable[Reply]]
PrefixHandler = Callable[[str, dict[str, list[str]], Any], Awaitable[Reply]]
Prefix2Handler = Callable[[str, str, dict[str, list[str]], Any], Awaitable[Reply]]
#: Longest a blocking query may wait (Consul caps at 10 minutes too).
MAX_WAIT = 600.0
DEFAULT_WAIT = 300.0


#: Body fields never written to the audit log.
_SECRET_FIELDS = frozenset({"key", "token"})


def _redacted(body: Any) -> Any:
    """What the audit log shows of a request body: secrets replaced, long text cut."""
    if isinstance(body, dict):
        return {k: ("<redacted>" if k in _SECRET_FIELDS else _redacted(v)) for k, v in list(body.items())[:32]}
    if isinstance(body, list):
        return [_redacted(v) for v in body[:32]]
    if isinstance(body, str) and len(body) > 200:
        return body[:200] + "..."
    return body


class ApiServer:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.log = log.get("mesh.api").bind(node=agent.cfg.name)
        self.policy = agent.access
        self.routes: dict[tuple[str, str], Handler] = {
            ("GET", "/v1/health"): self.health,
            ("GET", "/v1/members"): self.members,
            ("GET", "/v1/agent/self"): self.self_info,
            ("POST", "/v1/join"): self.join,
            ("POST", "/v1/leave"): self.leave,
            ("GET", "/v1/services"): self.services,
            ("PUT", "/v1/services"): self.register,
            ("GET", "/v1/upstreams"): self.upstreams,
            ("PUT", "/v1/upstreams"): self.upstream_add,
            ("GET", "/v1/config"): self.config_list,
            ("PUT", "/v1/config"): self.config_write,
            ("GET", "/v1/intentions"): self.intentions,
            ("PUT", "/v1/intentions"): self.intention_put,
            ("GET", "/v1/rtt"): self.rtt,
            ("GET", "/v1/routes"): self.routing_table,
            ("GET", "/v1/tunnels"): self.tunnels,
            ("GET", "/v1/keys"): self.keys_list,
            ("POST", "/v1/keys"): self.keys_op,
            ("GET", "/metrics"): self.metrics,
            ("GET", "/v1/coordinate"): self.coordinate,
            ("GET", "/v1/agent/monitor"): self.monitor,
            ("GET", "/v1/stat"): self.stat,
            ("GET", "/v1/tap"): self.tap,
            ("GET", "/"): self.dashboard,
        }
        #: Routes with one trailing path parameter.
        self.prefixed: dict[tuple[str, str], PrefixHandler] = {
            ("GET", "/v1/services/"): self.service_show,
            ("DELETE", "/v1/services/"): self.deregister,
            ("DELETE", "/v1/upstreams/"): self.upstream_remove,
            ("DELETE", "/v1/intentions/"): self.intention_remove_one,
            ("GET", "/v1/config/"): self.config_kind,
            ("PUT", "/v1/agent/force-leave/"): self.force_leave,
        }
        #: Routes with two trailing path parameters (a source and a destination; a kind and a name,
        #: which for an intention is SOURCE/DESTINATION: the second takes the rest of the path).
        self.prefixed2: dict[tuple[str, str], Prefix2Handler] = {
            ("DELETE", "/v1/intentions/"): self.intention_remove,
            ("GET", "/v1/config/"): self.config_read,
            ("DELETE", "/v1/config/"): self.config_delete,
        }

    # -- routes -------------------------------------------------------------------------

    async def health(self, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        return 200, {"ok": True, "name": self.agent.cfg.name, "status": self.agent.membership.me.status.value}

    async def members(self, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        wanted = query.get("status")
        if not wanted:
            # The whole list is what pollers ask for: the agent keeps it encoded.
            return 200, self.agent.members_json()
        members = self.agent.members_view()
        allowed = {"alive", "suspect", "dead", "left"}
        bad = [s for s in wanted if s not in allowed]
        if bad:
            raise HttpError(400, f"unknown status {bad[0]!r}: use alive, suspect, dead or left")
        return 200, [m for m in members if m["status"] in wanted]

    async def self_info(self, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        return 200, self.agent.self_view()

    async def join(self, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        if not isinstance(body, dict) or not isinstance(body.get("addresses"), list) or not body["addresses"]:
            raise HttpError(400, 'body must be {"addresses": ["host:port", ...]}')
        targets = []
        for a in body["addresses"]:
            if not isinstance(a, str):
                raise HttpError(400, "addresses must be strings")
            try:
                targets.append(parse_addr(a, 7946))
            except ValueError as exc:
                raise HttpError(400, str(exc)) from None
        result = await self.agent.join(targets)
        return 200, result

    async def metrics(self, query: dict[str, list[str]], body: Any) -> Reply:
        from agent import metrics  # prometheus-client loads on the first scrape only

        return 200, metrics.exposition(self.agent), [("content-type", metrics.CONTENT_TYPE)]

    async def keys_list(self, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        return await self._key_op("list", None)

    async def keys_op(self, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        if not isinstance(body, dict) or body.get("op") not in ("install", "use", "remove"):
            raise HttpError(400, 'body must be {"op": "install"|"use"|"remove", "key": BASE64}')
        key = body.get("key")
        if not isinstance(key, str):
            raise HttpError(400, "key must be a base64 string")
        return await self._key_op(body["op"], key)

    async def _key_op(self, op: str, key: str | None) -> tuple[int, Any]:
        from agent.keys import KeyOpError

        try:
            return 200, await self.agent.keys.run(op, key)
        except KeyOpError as exc:
            raise HttpError(400, str(exc)) from None

    async def tunnels(self, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        plane = self.agent.plane
        return 200, [] if plane is None else plane.tunnels.sessions_view()

    async def routing_table(self, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        wanted = query.get("service")
        service = wanted[0] if wanted and wanted[0] else None
        if service is not None and service not in self.agent.upstream_listeners():
            raise HttpError(404, f"no upstream for {service!r} on this agent (see `mesh-agent upstreams`)")
        return 200, self.agent.routes_view(service)

    async def rtt(self, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        to = query.get("to")
        if not to or not to[0]:
            raise HttpError(400, "give ?to=NODE (and optionally &from=NODE)")
        frm = query.get("from")
        a = frm[0] if frm and frm[0] else self.agent.cfg.name
        b = to[0]
        ms = self.agent.membership
        for node in (a, b):
            if node not in ms.members:
                raise HttpError(404, f"no member named {node!r}")
        est = ms.rtt_estimate(a, b)
        if est is None:
            raise HttpError(404, f"no coordinate for {a!r} or {b!r} yet: it has not been probed or gossiped")
        return 200, {"from": a, "to": b, "rtt_ms": round(est[0] * 1000.0, 3), "source": est[1]}

    async def coordinate(self, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        ms = self.agent.membership
        rows = []
        for m in ms.member_list():
            c = ms.coordinate_of(m.name)
            if c is not None:
                rows.append({"node": m.name, "vec": list(c.vec), "error": c.error,
                             "adjustment": c.adjustment, "height": c.height})
        return 200, rows

    async def monitor(self, query: dict[str, list[str]], body: Any) -> Reply:
        wanted = query.get("log_level") or ["info"]
        level = log.level_number(wanted[-1])
        if level is None:
            raise HttpError(400, f"unknown log_level {wanted[-1]!r}: use {', '.join(log.LEVEL_NAMES)}")
        return 200, Streamed(lambda: log.subscribe(level))

    async def stat(self, query: dict[str, list[str]], body: Any) -> Reply:
        from agent import traffic

        try:
            service = traffic.stat_query(query)
        except ValueError as exc:
            raise HttpError(400, str(exc)) from None
        return 200, self.agent.traffic.stat_view(service)

    async def tap(self, query: dict[str, list[str]], body: Any) -> Reply:
        from agent import traffic

        try:
            flt = traffic.tap_query(query)
        except ValueError as exc:
            raise HttpError(400, str(exc)) from None
        if len(self.agent.traffic.taps) >= traffic.MAX_TAPS:
            raise HttpError(429, f"{traffic.MAX_TAPS} taps are open on this agent already; close one")
        return 200, Streamed(lambda: traffic.tap_lines(self.agent.traffic, flt))

    async def dashboard(self, query: dict[str, list[str]], body: Any) -> Reply:
        from agent import dashboard  # read from disk on the first visit only

        return 200, dashboard.page(), dashboard.HEADERS

    async def force_leave(self, node: str, query: dict[str, list[str]], body: Any) -> Reply:
        """Consul's PUT /v1/agent/force-leave/{node}: a member that will never come back shows left."""
        try:
            was = self.agent.membership.force_leave(trio.current_time(), node)
        except KeyError:
            raise HttpError(404, f"no member named {node[:100]!r}") from None
        except ValueError as exc:
            raise HttpError(400, f"{node} is {exc}") from None
        await self.agent.flush()  # the leave goes out now, not at the next gossip round
        note = ("it was alive: if it still is, it refutes and stays" if was in ("alive", "suspect")
                else "it shows left everywhere, and returns only if it rejoins")
        return 200, {"ok": True, "node": node, "was": was, "detail": note}

    async def leave(self, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        if self.agent.membership.leaving:
            return 200, {"ok": True, "detail": "already leaving"}
        self.agent.start_leave()
        return 200, {"ok": True, "detail": "leaving; the agent exits once the leave has spread"}

    async def _blocking(self, query: dict[str, list[str]], key: str, compute: Callable[[], Any]) -> Reply:
        """Consul-style blocking query: with ?index=N, answer once the view's index passes N."""
        raw_index = query["index"][0] if "index" in query else None
        if raw_index is not None and not (raw_index.isascii() and raw_index.isdigit()):
            raise HttpError(400, f"index must be a non-negative integer, got {shown(raw_index[:40])}")
        index = int(raw_index) if raw_index is not None else None
        try:
            wait = parse_duration(query["wait"][0]) if "wait" in query else DEFAULT_WAIT
        except ValueError as exc:
            raise HttpError(400, f"wait: {exc}") from None
        wait = min(max(wait, 0.0), MAX_WAIT)
        services = self.agent.services
        view = compute()
        current = services.indexed(key, view)
        if index is not None and current <= index:
            with trio.move_on_after(wait):
                while current <= index:
                    await services.changed.wait()
                    view = compute()
                    current = services.indexed(key, view)
        return 200, view, [("x-mesh-index", str(current))]

    async def services(self, query: dict[str, list[str]], body: Any) -> Reply:
        return await self._blocking(query, "*", self.agent.services.services)

    async def service_show(self, name: str, query: dict[str, list[str]], body: Any) -> Reply:
        passing = "passing" in query
        return await self._blocking(
            query, f"{name}?passing={passing}",
            lambda: self.agent.services.instances(name, passing_only=passing))

    async def register(self, query: dict[str, list[str]], body: Any) -> Reply:
        # The data plane first: peers route to an instance as soon as gossip tells them of it, and
        # their first streams would otherwise wait for it to load (or go elsewhere meanwhile).
        await self.agent.load_plane()
        reg = self.agent.services.register(body)
        return 200, {"ok": True, "id": reg.id}

    async def deregister(self, iid: str, query: dict[str, list[str]], body: Any) -> Reply:
        reg = self.agent.services.deregister(iid)
        return 200, {"ok": True, "id": iid, "service": reg.name, "node": self.agent.cfg.name}

    async def upstreams(self, query: dict[str, list[str]], body: Any) -> Reply:
        plane = self.agent.plane
        return 200, [] if plane is None else plane.upstreams.view()

    async def upstream_add(self, query: dict[str, list[str]], body: Any) -> Reply:
        return 200, await (await self.agent.load_upstreams()).add(body)

    async def upstream_remove(self, service: str, query: dict[str, list[str]], body: Any) -> Reply:
        return 200, await (await self.agent.load_upstreams()).remove(service)

    async def intentions(self, query: dict[str, list[str]], body: Any) -> Reply:
        return 200, self.agent.intentions.view()

    async def intention_put(self, query: dict[str, list[str]], body: Any) -> Reply:
        return 200, self.agent.intentions.put(body)

    async def intention_remove(self, source: str, destination: str, query: dict[str, list[str]],
                               body: Any) -> Reply:
        return 200, self.agent.intentions.remove(source, destination)

    async def intention_remove_one(self, source: str, query: dict[str, list[str]], body: Any) -> Reply:
        raise HttpError(400, "name the rule by both ends: DELETE /v1/intentions/{source}/{destination}")

    # -- config entries ---------------------------------------------------------------------

    @staticmethod
    def _cas(query: dict[str, list[str]]) -> int | None:
        raw = query.get("cas")
        if not raw:
            return None
        if not raw[-1].isdigit():
            raise HttpError(400, f"cas must be an entry's version (a whole number, 0: must not exist), got {raw[-1]!r}")
        return int(raw[-1])

    async def config_list(self, query: dict[str, list[str]], body: Any) -> Reply:
        kinds = query.get("kind")
        return 200, self.agent.config_entries.listing(kinds[-1] if kinds else None)

    async def config_kind(self, kind: str, query: dict[str, list[str]], body: Any) -> Reply:
        return 200, self.agent.config_entries.listing(kind)

    async def config_read(self, kind: str, name: str, query: dict[str, list[str]], body: Any) -> Reply:
        return 200, self.agent.config_entries.read(kind, name)

    async def config_write(self, query: dict[str, list[str]], body: Any) -> Reply:
        entries = self.agent.config_entries
        cas = self._cas(query)
        if isinstance(body, list):
            if cas is not None:
                raise HttpError(400, "cas applies to one entry: write the entries one by one")
            if not body:
                raise HttpError(400, "an empty list writes nothing")
            return 200, [entries.write(e) for e in body]
        return 200, entries.write(body, cas)

    async def config_delete(self, kind: str, name: str, query: dict[str, list[str]], body: Any) -> Reply:
        return 200, self.agent.config_entries.delete(kind, name, self._cas(query))

    # -- HTTP plumbing ------------------------------------------------------------------------

    async def handle(self, accepted: trio.SocketStream) -> None:
        # Non-blocking syscalls that enter the scheduler only to wait (dataplane.rawsocket):
        # trio.SocketStream's full scheduler pass after every send and receive was a
        # large share of a poll's cost, and monitoring polls every agent often.
        try:
            addrs = (accepted.socket.getpeername()[:2], accepted.socket.getsockname()[:2])
        except OSError:
            addrs = None
        uid_cache: list[int | None] = []

        def peer_uid() -> int | None:
            """Looked up once per connection, and only when a request needs it."""
            if not uid_cache:
                uid_cache.append(None if addrs is None else loopback_peer_uid(*addrs))
            return uid_cache[0]

        stream = RawSocketStream.adopt(accepted)
        reader = RequestReader(functools.partial(self._check_head, peer_uid))
        # One cancel scope for the whole connection, its deadline moved only when a
        # phase must wait: entering and leaving scopes per request, and moving a
        # deadline four times, were over a third of a kept-alive poll's CPU.  The
        # phases: waiting for a kept-alive client's next request (KEEPALIVE_IDLE),
        # reading the rest of a request (REQUEST_TIMEOUT from its first bytes), the
        # handler (no deadline of ours), and sending an answer the kernel did not
        # take at once (REQUEST_TIMEOUT).
        reading = armed = False
        served = 0
        try:
            with trio.CancelScope() as scope:
                while True:
                    if not reader.ready:
                        failed = self._failure(reader)
                        if failed is not None:  # answered, and the connection ends
                            reading = False
                            scope.deadline = trio.current_time() + REQUEST_TIMEOUT
                            await stream.send_all(self._response(*failed, close=True))
                            return
                        if reader.current is None and served:  # a kept-alive client's pause
                            reading = False
                            scope.deadline = trio.current_time() + KEEPALIVE_IDLE
                        elif not armed:  # REQUEST_TIMEOUT from the request's first bytes (or the accept)
                            reading = armed = True
                            scope.deadline = trio.current_time() + REQUEST_TIMEOUT
                        data = await stream.receive_some(65536)
                        if not data:
                            return  # the client went away
                        reader.feed(data)
                        continue
                    request = reader.ready.popleft()
                    reading = armed = False
                    served += 1
                    if request.too_large:
                        await stream.send_all(self._response(413, {"error": "request body too large"}, close=True))
                        return
                    reply = await self._serve_one(request, scope)
                    status, payload, *extra = reply
                    if isinstance(payload, Streamed):
                        scope.deadline = math.inf
                        await self._stream(stream, status, payload, extra[0] if extra else [],
                                           chunked=request.version == "1.1")
                        return  # a stream lasts until the client goes away: the connection ends with it
                    close = not request.keep_alive or status >= 400 or served >= KEEPALIVE_MAX_REQUESTS
                    out = self._response(*reply, close=close, head_only=request.method == "HEAD")
                    sent = stream.try_send(out)
                    if sent < len(out):
                        scope.deadline = trio.current_time() + REQUEST_TIMEOUT
                        await stream.send_all(memoryview(out)[sent:])
                    if close:
                        return  # a close was asked for, or an error may have left the stream out of step
            if scope.cancelled_caught and reading:
                with trio.move_on_after(REQUEST_TIMEOUT):
                    await stream.send_all(self._response(408, {"error": "request not received in time"}, close=True))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    @staticmethod
    def _failure(reader: RequestReader) -> tuple[int, Any] | None:
        """The answer that ends a connection whose next request cannot be read, if so."""
        if reader.current is not None and reader.current.too_large:
            return 413, {"error": "request body too large"}  # answered without reading the rest
        if reader.error is not None:
            return reader.error_status, {"error": f"bad HTTP request: {reader.error}"}
        return None

    def _check_head(self, peer_uid: Callable[[], int | None], request: Request) -> None:
        """The access rules, at a request's head: a refused request's body is counted, never kept."""
        split = urlsplit(request.target.decode("ascii", "replace"))
        path = split.path.rstrip("/") or "/"
        try:
            caller = self.policy.check(request.method, path, *request.facts(_ACCESS_HEADERS), peer_uid)
        except Refused as exc:
            self.policy.count(exc, request.method, path)  # first: a body too large still counts the refusal
            request.body = None
            request.verdict = (path, split.query, exc)
            return
        request.verdict = (path, split.query, caller)

    async def _serve_one(self, request: Request, scope: trio.CancelScope) -> Reply:
        """Answer one request read to its end; the handler runs with ``scope``'s deadline lifted."""
        path, query, caller = request.verdict
        if isinstance(caller, Refused):
            return caller.status, {"error": caller.message}
        if scope.deadline != math.inf:
            scope.deadline = math.inf
        method = request.method
        body = request.body or bytearray()
        reply = await self._dispatch(method, path, query, body)
        if reply[0] < 400 and method not in SAFE_METHODS:
            self.log.info("api_change", method=method, route=path, by=str(caller),
                          change=_redacted(self._json(body)))
        return reply

    @staticmethod
    def _json(body: bytearray) -> Any:
        try:
            return json.loads(body) if body else None
        except (ValueError, UnicodeDecodeError):
            return None

    async def _dispatch(self, method: str, path: str, query: str, body: bytearray) -> Reply:
        handler: Handler | None = self.routes.get((method, path)) or self._match_prefixed(method, path)
        if handler is None:
            known = [p for (_, p) in self.routes] + [
                p for (_, p) in [*self.prefixed, *self.prefixed2] if path.startswith(p) and len(path) > len(p)]
            if any(path == p or (p != "/" and path.startswith(p)) for p in known):
                return 405, {"error": f"method {method} not allowed on {path}"}
            return 404, {"error": f"no such endpoint {path}"}
        parsed: Any = None
        if body:
            try:
                parsed = json.loads(body)
            except (ValueError, UnicodeDecodeError):
                return 400, {"error": "request body is not valid JSON"}
        try:
            return await handler(parse_qs(query, keep_blank_values=True) if query else {}, parsed)
        except HttpError as exc:
            return exc.status, {"error": exc.message}
        except StoreError as exc:  # a change that could not be saved, and so was not made
            return 507, {"error": str(exc)}
        except PlaneUnavailable as exc:  # what needed the data plane was not done; the agent runs on
            return 503, {"error": str(exc)}
        except ServiceError as exc:  # what the registries refuse, with its 4xx status
            if exc.reason is not None:  # a policy refusal (script checks, a public listener): counted
                self.policy.count(Refused(exc.status, exc.reason, str(exc)), method, path)
            return exc.status, {"error": str(exc)}
        except Exception as exc:  # a bug must not take the agent down
            self.log.exception("api_handler_failed", path=path)
            return 500, {"error": f"internal error: {type(exc).__name__}"}

    def _match_prefixed(self, method: str, path: str) -> Handler | None:
        for (m, prefix), h in self.prefixed.items():
            rest = path[len(prefix):]
            if m == method and path.startswith(prefix) and rest and "/" not in rest:
                return functools.partial(h, unquote(rest))
        for (m, prefix), h2 in self.prefixed2.items():
            parts = path[len(prefix):].split("/", 1)
            if m == method and path.startswith(prefix) and len(parts) == 2 and all(parts):
                return functools.partial(h2, unquote(parts[0]), unquote(parts[1]))
        return None

    @staticmethod
    def _response(status: int, payload: Any, extra: list[tuple[str, str]] | None = None, *, close: bool = False,
                  head_only: bool = False) -> bytes:
        data = payload if isinstance(payload, bytes) else _encode(payload)
        # Errors close the connection: after a bad request the stream may be out of step.
        extra = extra or []
        headers = [("content-type", "application/json"), *extra] if all(k != "content-type" for k, _ in extra) \
            else extra
        return api_http.response(status, data, headers, close=close or status >= 400, head_only=head_only)

    async def _stream(self, stream: RawSocketStream, status: int, body: Streamed, extra: list[tuple[str, str]],
                      *, chunked: bool) -> None:
        """Send ``body`` piece by piece until it ends, the client hangs up, or stops reading.

        Without a content-length the body is chunked for an HTTP/1.1 client and
        close-delimited for HTTP/1.0.  A second task reads the socket only to
        notice the client leaving, which would otherwise go unseen until the
        next piece, perhaps much later.
        """
        headers = [("content-type", body.content_type), ("cache-control", "no-store"), ("connection", "close"),
                   *extra]
        with body.open() as chunks:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._until_hangup, stream, nursery.cancel_scope)
                await self._pump(stream, api_http.stream_head(status, headers, chunked), chunks, chunked)
                nursery.cancel_scope.cancel()

    @staticmethod
    async def _until_hangup(stream: RawSocketStream, scope: trio.CancelScope) -> None:
        try:
            while await stream.receive_some(65536):
                pass  # the client may not send anything more; what it sends is ignored
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        scope.cancel()

    @staticmethod
    async def _pump(stream: RawSocketStream, head: bytes, chunks: AsyncIterator[bytes], chunked: bool) -> None:
        try:
            with trio.move_on_after(REQUEST_TIMEOUT) as scope:
                await stream.send_all(head)
            if scope.cancelled_caught:
                return
            async for piece in chunks:
                # A client that stays connected but stops reading is dropped.
                with trio.move_on_after(REQUEST_TIMEOUT) as scope:
                    await stream.send_all(api_http.chunk(piece, chunked))
                if scope.cancelled_caught:
                    return
            if chunked:
                await stream.send_all(api_http.LAST_CHUNK)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
