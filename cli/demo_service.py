"""``mesh-agent demo-service`` and ``demo-client``: something to put in a mesh to watch it work.

The service is a tiny HTTP/1.1 server that answers every request with its
instance id (and the node of the agent it registered with), so a client
calling through an upstream can tell which instance the mesh picked.  It is
served with h11 on trio, the same stack as the agent's API, so it needs no
dependency of its own and a SIGTERM (``docker stop``, the demo's Ctrl-C)
cancels everything in one place, after which the instance deregisters itself.

With ``--register NAME`` the service registers itself with its local agent,
retrying until the agent answers: a container or a process can then be
started in any order next to its agent, as a sidecar is, with one command and
no config file.  The client, with ``--upstream SERVICE``, likewise makes sure
its agent has the upstream it calls through.

The client opens a new connection per call, on purpose: the mesh balances
connections (it is an L4 proxy), so keep-alive would pin every call to the
instance the first one reached.
"""

from __future__ import annotations

import http.client
import json
import signal
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import click

from cli.client import ApiError, call

if TYPE_CHECKING:
    import trio

# trio and h11 are imported by the server's functions only: `demo-client` does without them.

#: A connection with no complete request for this long is closed: a stuck
#: client must not hold a task forever.
IDLE_TIMEOUT = 30.0
#: Between registration attempts while the agent is not answering yet.
RETRY_EVERY = 1.0


class BadInput(click.ClickException):
    """Bad input from the command line: one line and exit status 2, like the agent's flags."""

    exit_code = 2


@dataclass
class _Instance:
    instance: str
    service: str | None
    node: str | None = None
    served: int = 0
    registered: bool = False
    api: str = "127.0.0.1:7947"
    errors: list[str] = field(default_factory=list)

    def answer(self, method: str, target: str) -> bytes:
        body = {"instance": self.instance, "service": self.service, "node": self.node,
                "method": method, "path": target}
        return (json.dumps(body) + "\n").encode()


async def _serve_connection(stream: trio.SocketStream, inst: _Instance) -> None:
    import h11
    import trio

    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
    request: h11.Request | None = None
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                with trio.move_on_after(IDLE_TIMEOUT) as scope:
                    data = await stream.receive_some(65536)
                if scope.cancelled_caught:
                    return
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.EndOfMessage) and request is not None:
                body = inst.answer(request.method.decode("ascii", "replace"),
                                   request.target.decode("ascii", "replace"))
                headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
                out = conn.send(h11.Response(status_code=200, headers=headers)) or b""
                out += conn.send(h11.Data(data=body)) or b""
                out += conn.send(h11.EndOfMessage()) or b""
                await stream.send_all(out)
                inst.served += 1
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
                request = None
            elif isinstance(event, h11.ConnectionClosed):
                return
    except h11.RemoteProtocolError:
        # Not HTTP: answer like any server would, then hang up.
        with trio.move_on_after(1):
            await stream.send_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


def _register_once(inst: _Instance, port: int, address: str | None, check_host: str, check_interval: str) -> None:
    """Replace any earlier registration of this id, so a restarted instance is never refused as a duplicate."""
    assert inst.service is not None
    try:
        call(inst.api, "DELETE", f"/v1/services/{quote(inst.instance, safe='')}", timeout=5)
    except ApiError as exc:
        if "no agent answering" in str(exc):
            raise
    # It speaks HTTP/1.1, so the mesh carries it per request (balancing, retries, golden metrics).
    body: dict[str, Any] = {"name": inst.service, "id": inst.instance, "port": port, "protocol": "http",
                            "check": {"type": "http", "target": f"http://{check_host}:{port}/health",
                                      "interval": check_interval}}  # the timeout: 2 s, or the interval if less
    if address:
        body["address"] = address
    call(inst.api, "PUT", "/v1/services", body, timeout=5)
    me = call(inst.api, "GET", "/v1/agent/self", timeout=5)
    inst.node = str(me.get("name")) if isinstance(me, dict) else None


async def _register(inst: _Instance, port: int, address: str | None, check_host: str, check_interval: str,
                    cancel: trio.CancelScope) -> None:
    import trio

    waiting_said = False
    while True:
        try:
            await trio.to_thread.run_sync(_register_once, inst, port, address, check_host, check_interval)
        except ApiError as exc:
            if "no agent answering" not in str(exc):
                inst.errors.append(f"cannot register with the agent at {inst.api}: {exc}")
                cancel.cancel()
                return
            if not waiting_said:
                click.echo(f"waiting for the agent at {inst.api} to register {inst.instance} ...")
                waiting_said = True
            await trio.sleep(RETRY_EVERY)
            continue
        inst.registered = True
        click.echo(f"registered {inst.instance} as service {inst.service} on agent {inst.node}")
        return


def _deregister(inst: _Instance) -> None:
    try:
        call(inst.api, "DELETE", f"/v1/services/{quote(inst.instance, safe='')}", timeout=3)
        click.echo(f"deregistered {inst.instance}")
    except ApiError as exc:
        click.echo(f"could not deregister {inst.instance}: {exc}")


def run_service(host: str, port: int, instance: str, register: str | None, address: str | None, api: str,
                check_interval: str) -> None:
    import trio

    inst = _Instance(instance, register, api=api)

    wildcard = host in ("0.0.0.0", "::", "")
    # The agent runs the check from its own host, which is this one (a sidecar shares its network).
    check_host = address or ("127.0.0.1" if wildcard else host)
    if address is None and not wildcard:
        address = host

    async def main() -> None:
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        click.echo(f"demo-service {instance} listening on {host}:{port}")
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.serve_listeners, _handler(inst), listeners)
                if register:
                    nursery.start_soon(_register, inst, port, address, check_host, check_interval,
                                       nursery.cancel_scope)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break
        if inst.registered:
            await trio.to_thread.run_sync(_deregister, inst)

    trio.run(main)
    if inst.errors:
        raise click.ClickException(inst.errors[0])


def _handler(inst: _Instance) -> Any:
    async def handle(stream: trio.SocketStream) -> None:
        await _serve_connection(stream, inst)

    return handle


# -- the client ----------------------------------------------------------------------------------


def call_once(host: str, port: int, path: str, timeout: float) -> tuple[dict[str, Any] | None, float, str]:
    """One request on a fresh connection: (answer, milliseconds, error line or "")."""
    started = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"connection": "close", "user-agent": "mesh-agent demo-client"})
        resp = conn.getresponse()
        raw = resp.read()
    except (OSError, http.client.HTTPException) as exc:
        reason = (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)) or type(exc).__name__
        return None, (time.perf_counter() - started) * 1000, reason
    finally:
        conn.close()
    elapsed = (time.perf_counter() - started) * 1000
    if resp.status != 200:
        return None, elapsed, f"HTTP {resp.status}"
    try:
        data = json.loads(raw)
    except ValueError:
        return None, elapsed, "answer is not JSON"
    if not isinstance(data, dict):
        return None, elapsed, "answer is not a JSON object"
    return data, elapsed, ""


def format_answer(answer: dict[str, Any] | None, ms: float, error: str) -> str:
    if answer is None:
        return f"error: {error} (after {ms:.1f} ms)"
    node = f" node={answer['node']}" if answer.get("node") else ""
    return f"instance={answer.get('instance')}{node} {ms:.1f} ms"


def parse_url(url: str) -> tuple[str, int, str]:
    """(host, port, path) of an http:// URL; a one-line click error otherwise."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise BadInput(f"--url {url!r}: {exc}") from None
    if parts.scheme != "http" or not parts.hostname:
        raise BadInput(f"--url {url!r}: expected http://HOST[:PORT]/PATH")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return parts.hostname, port or 80, path


def ensure_upstream(api: str, service: str, host: str, port: int) -> None:
    """Make the local agent listen on host:port for SERVICE, waiting for the agent to answer."""
    listen = f"{host}:{port}"
    waiting_said = False
    while True:
        try:
            existing = {u["service"]: u["listen"] for u in call(api, "GET", "/v1/upstreams", timeout=5)}
            if existing.get(service) == listen:
                return
            if service in existing:
                raise click.ClickException(f"the agent at {api} already has an upstream for {service} on "
                                           f"{existing[service]}, not {listen}")
            call(api, "PUT", "/v1/upstreams", {"service": service, "listen": listen}, timeout=5)
            click.echo(f"upstream {listen} -> {service} added on the agent at {api}")
            return
        except ApiError as exc:
            if "no agent answering" not in str(exc):
                raise click.ClickException(f"cannot add the upstream: {exc}") from None
            if not waiting_said:
                click.echo(f"waiting for the agent at {api} ...")
                waiting_said = True
            time.sleep(RETRY_EVERY)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_client(url: str, interval: float, count: int | None, timeout: float, upstream: str | None,
               api: str) -> None:
    host, port, path = parse_url(url)
    # docker stop sends SIGTERM: stop between calls as Ctrl-C does, with exit status 0.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        if upstream:
            ensure_upstream(api, upstream, host, port)
        done = 0
        while count is None or done < count:
            answer, ms, error = call_once(host, port, path, timeout)
            print(format_answer(answer, ms, error), flush=True)
            done += 1
            if count is None or done < count:
                time.sleep(interval)
    except KeyboardInterrupt:
        pass
