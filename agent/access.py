"""Who may use the local API, and how a browser is kept from being used against it.

The threat model (README, "Security") has three kinds of caller:

- **A web page in a browser on this host.**  The browser runs as the
  operator's user, so the user alone never tells a page from the operator.
  Three rules stop a page instead.  DNS rebinding makes a page same-origin
  with the API under the attacker's name; the page's requests then carry
  that name in ``Host``, so only this API's own names and addresses are
  served (``host``).  A cross-origin page can still *send* a "simple"
  request (no preflight: ``text/plain``, a form, ``no-cors``); browsers
  mark it with ``Origin`` and ``Sec-Fetch-Site`` (Fetch standard,
  "append a request `Origin` header"; W3C Fetch Metadata), and every
  request that acts (any method but GET, and the GETs that act) is refused
  when either says the page is not this API's own (``origin``).  A
  non-empty body must be ``application/json``, a type no page can send
  cross-origin without a preflight, which gets no CORS headers and so
  fails (``content_type``).  Answers never carry CORS headers, so what a
  cross-origin page makes the API say, it cannot read.
- **Another local user.**  A loopback connection whose socket belongs to
  the agent's own uid, or to root, is the operator (agent.peercred);
  anyone else must send ``Authorization: Bearer TOKEN`` (``credential``).
- **The network.**  The API listens on loopback unless told otherwise, and
  the agent refuses a non-loopback ``--api`` with no token (agent.config).

Without the credential only ``GET /v1/health`` answers, so that a kubelet or
Docker health check needs nothing; the views (members, services, routes,
the monitor's log lines) describe the mesh to whoever holds them, and the
key routes hold secrets or send a query to the whole mesh.

The checks here are pure: the server hands over the request's head and a
way to learn the peer's uid, and gets back who is calling or a ``Refused``.
"""

import hmac
import ipaddress
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from gossip.address import Address, parse_addr
from gossip.frozen import same_class_equality

#: Routes anyone who reaches the API may call: liveness for health checkers.
PUBLIC: frozenset[tuple[str, str]] = frozenset({("GET", "/v1/health")})
#: GET routes that act rather than read, held to the rules for state changes.
ACTING_GETS: frozenset[str] = frozenset({"/v1/keys"})
#: Methods that change nothing (RFC 9110 §9.2.1, safe methods).
SAFE_METHODS = frozenset({"GET", "HEAD"})
#: Refusal reasons, each a counter in /metrics and ``mesh-agent info``.
REASONS = ("host", "origin", "credential", "token", "content_type", "script_checks", "public_listen")
#: A refusal of one reason is logged at most once per this many seconds (the rest are counted).
LOG_EVERY = 10.0


class Refused(Exception):
    """A request the policy refuses: ``status`` (401/403/415), a counter reason, and a one-line message."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


@same_class_equality
class Caller(NamedTuple):
    """Who made an accepted request, as the audit log names it."""

    uid: int | None = None
    token: bool = False

    def __str__(self) -> str:
        if self.token:
            return "token"
        return "anonymous" if self.uid is None else f"uid:{self.uid}"


ANONYMOUS = Caller()


def _authority(value: str, default_port: int) -> Address | None:
    """(host, port) of a ``Host`` header or an origin's authority (RFC 3986 §3.2), or None when malformed."""
    try:
        return parse_addr(value.strip().lower(), default_port)
    except ValueError:
        return None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


#: Allowed Host values remembered as sent (AccessPolicy.host_allowed).
HOSTS_SEEN = 64


class AccessPolicy:
    """The API's rules, with the refusal counters and the rate-limited refusal log."""

    def __init__(self, api: Address, token: str | None, allow_hosts: Iterable[str] = (),
                 agent_uid: int | None = None, log: Any = None) -> None:
        self.port = api[1]
        bound = api[0].lower()
        self.wildcard = bound in ("0.0.0.0", "::", "")
        #: The names and addresses a request's Host may carry (RFC 9110 §7.2).
        self.hosts = {"localhost", "127.0.0.1", "::1", bound}
        self.hosts.update(a[0] for a in (_authority(h, self.port) for h in allow_hosts) if a is not None)
        #: Host values seen allowed, as sent: every poll of a kept-alive client sends the same one.
        #: Only allowed values are kept, and at most HOSTS_SEEN of them, so no client can grow it.
        self._hosts_seen: set[str] = set()
        self._token = token.encode() if token else None
        self.agent_uid = os.geteuid() if agent_uid is None else agent_uid
        self.refused: Counter[str] = Counter({r: 0 for r in REASONS})
        self._log = log
        self._last_logged: dict[str, float] = {}
        self._unlogged: Counter[str] = Counter()

    # -- the rules ---------------------------------------------------------------------------

    def host_allowed(self, host: str | None) -> bool:
        """A missing Host (HTTP/1.0) is no browser's; an IP literal cannot be rebound, so a wildcard bind takes any."""
        if host is None or host in self._hosts_seen:
            return True
        addr = _authority(host, self.port)
        allowed = addr is not None and self._name_allowed(addr[0])
        if allowed and len(self._hosts_seen) < HOSTS_SEEN:
            self._hosts_seen.add(host)
        return allowed

    def _name_allowed(self, name: str) -> bool:
        return name in self.hosts or (self.wildcard and _is_ip(name))

    def own_origin(self, origin: str) -> bool:
        """Whether ``Origin`` names this API itself (RFC 6454 §7: scheme, host, port); "null" never does."""
        scheme, sep, authority = origin.strip().partition("://")
        if not sep or scheme.lower() != "http" or "/" in authority:
            return False
        addr = _authority(authority, 80)
        return addr is not None and addr[1] == self.port and self._name_allowed(addr[0])

    def check(self, method: str, path: str, headers: dict[str, str], body_expected: bool,
              peer_uid: Callable[[], int | None]) -> Caller:
        """Who is calling, or ``Refused``; ``headers`` has lower-case names, the last value of each."""
        if not self.host_allowed(headers.get("host")):
            raise Refused(403, "host", f"host {headers.get('host')!r} is not a name of this API "
                          "(DNS rebinding guard; allow a name with --api-allow-host)")
        acting = method not in SAFE_METHODS or path in ACTING_GETS
        if acting:
            origin = headers.get("origin")
            if origin is not None and not self.own_origin(origin):
                raise Refused(403, "origin", f"cross-origin request from {origin[:100]!r} refused")
            if headers.get("sec-fetch-site") in ("cross-site", "same-site"):
                raise Refused(403, "origin", "cross-site request refused (Sec-Fetch-Site)")
        if (method, path) in PUBLIC:
            return ANONYMOUS
        caller = self._credential(headers.get("authorization"), peer_uid)
        if body_expected:
            ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if ctype != "application/json":
                raise Refused(415, "content_type", "a request body must be sent as Content-Type: application/json")
        return caller

    def _credential(self, authorization: str | None, peer_uid: Callable[[], int | None]) -> Caller:
        if authorization is not None:
            scheme, _, value = authorization.strip().partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise Refused(401, "token", "Authorization must be 'Bearer TOKEN'")
            if self._token is None:
                raise Refused(401, "token", "this agent has no API token (start it with --api-token-file)")
            if not hmac.compare_digest(value.strip().encode(), self._token):
                raise Refused(401, "token", "wrong API token")
            return Caller(token=True)
        uid = peer_uid()
        if uid is not None and uid in (self.agent_uid, 0):
            return Caller(uid=uid)
        who = "a non-loopback client" if uid is None else f"uid {uid}"
        raise Refused(401, "credential", f"{who} needs the API token (Authorization: Bearer TOKEN, "
                      f"or MESH_API_TOKEN for the CLI); only uid {self.agent_uid} and root need none")

    # -- counting and logging refusals --------------------------------------------------------

    def count(self, refusal: Refused, method: str, path: str, now: float | None = None) -> None:
        """Count a refusal; log it unless one of its reason was logged in the last LOG_EVERY seconds."""
        self.refused[refusal.reason] += 1
        if self._log is None:
            return
        now = time.monotonic() if now is None else now
        last = self._last_logged.get(refusal.reason)
        if last is not None and now - last < LOG_EVERY:
            self._unlogged[refusal.reason] += 1
            return
        self._last_logged[refusal.reason] = now
        self._log.warning("api_refused", reason=refusal.reason, status=refusal.status, method=method,
                          route=path[:200], detail=refusal.message,
                          suppressed=self._unlogged.pop(refusal.reason, 0))
