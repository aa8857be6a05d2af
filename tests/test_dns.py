"""The DNS server asked by a client nobody here wrote: Debian's `dig` (bind9-dnsutils), against real agents."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gossip.keyring import generate_key
from simulations.harness import ROOT, AgentProc, Cluster, Processes, free_port, wait_for

pytestmark = pytest.mark.slow

#: Instances of "big": more A records than fit a 512-byte datagram (16 bytes each, 60 of them).
BIG = 60


def dig(port: int, *args: str) -> str:
    if shutil.which("dig") is None:
        pytest.fail("dig is not installed (apt-get install bind9-dnsutils; .ci/run installs it)")
    res = subprocess.run(["dig", "@127.0.0.1", "-p", str(port), "+time=3", "+tries=2", *args],
                         capture_output=True, text=True, timeout=30)
    return res.stdout


def short(port: int, *args: str) -> list[str]:
    return sorted(line for line in dig(port, "+short", *args).splitlines() if line)


def answers(port: int, *args: str) -> list[list[str]]:
    """The answer section as split lines: [name, ttl, class, type, data...]."""
    out = dig(port, "+noall", "+answer", *args)
    return [line.split() for line in out.splitlines() if line and not line.startswith(";")]


def status(out: str) -> str:
    m = re.search(r"status: (\w+)", out)
    assert m, out
    return m.group(1)


def flags(out: str) -> set[str]:
    m = re.search(r";; flags: ([a-z ]+);", out)
    assert m, out
    return set(m.group(1).split())


def section(out: str, name: str) -> list[list[str]]:
    """One section of dig's full output, as split lines."""
    m = re.search(rf";; {name} SECTION:\n(.*?)(?:\n\n|\Z)", out, re.S)
    return [] if m is None else [line.split() for line in m.group(1).splitlines() if line]


@dataclass
class Mesh:
    cluster: Cluster
    a: AgentProc
    b: AgentProc
    dns_a: int
    dns_b: int


HTTP_429 = r"""
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(429); self.send_header("content-length", "0"); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    workdir = tmp_path_factory.mktemp("dns")
    cluster = Cluster(workdir, generate_key())
    procs = Processes()
    try:
        dns_a, dns_b = free_port(), free_port()
        a = cluster.start("d1", extra=["--dns", f"127.0.0.1:{dns_a}"])
        b = cluster.start("d2", join=[a.addr], extra=["--dns", f"127.0.0.1:{dns_b}"])
        cluster.wait_converged(["d1", "d2"])
        a.call("PUT", "/v1/services", {"name": "web", "port": 8080, "address": "127.0.0.1", "tags": ["v1"],
                                       "meta": {"version": "1.4"}})
        b.call("PUT", "/v1/services", {"name": "web", "port": 8080, "address": "127.0.0.2", "tags": ["v2"]})
        b.call("PUT", "/v1/services", {"name": "db", "port": 5432, "address": "::1"})
        for i in range(BIG):
            a.call("PUT", "/v1/services", {"name": "big", "id": f"big-{i}", "port": 9000,
                                           "address": f"127.10.0.{i + 1}"})
        # Health: "down" fails its TCP check (critical); "busy" answers 429 (warning, still in answers).
        closed = free_port()
        a.call("PUT", "/v1/services", {"name": "down", "port": closed, "address": "127.0.0.1",
                                       "check": {"type": "tcp", "target": f"127.0.0.1:{closed}", "interval": "0.2s"}})
        busy_port = free_port()
        procs.python(HTTP_429, busy_port, log_path=workdir / "busy.log")
        a.call("PUT", "/v1/services", {"name": "busy", "port": busy_port, "address": "127.0.0.1",
                                       "check": {"type": "http", "target": f"http://127.0.0.1:{busy_port}/",
                                                 "interval": "0.2s"}})

        def seen() -> bool:
            rows = {(i["service"], i["health"]) for i in b.call("GET", "/v1/services/down")
                    + b.call("GET", "/v1/services/busy")}
            return rows == {("down", "critical"), ("busy", "warning")} and len(
                b.call("GET", "/v1/services/big")) == BIG and len(a.call("GET", "/v1/services/web")) == 2
        wait_for(seen, 20, "catalogs and health spread to both agents")
        yield Mesh(cluster, a, b, dns_a, dns_b)
    finally:
        procs.close()
        cluster.close()


def test_service_name_forms(mesh: Mesh) -> None:
    for port in (mesh.dns_a, mesh.dns_b):
        assert short(port, "web.service.mesh") == ["127.0.0.1", "127.0.0.2"]
        assert short(port, "WEB.Service.MESH") == ["127.0.0.1", "127.0.0.2"]  # names are case-blind
        assert short(port, "v1.web.service.mesh") == ["127.0.0.1"]
        assert short(port, "v2.web.service.mesh") == ["127.0.0.2"]
        assert short(port, "db.service.mesh", "AAAA") == ["::1"]
        assert short(port, "db.service.mesh", "A") == []
        # The answer echoes the question's own spelling (0x20-style case randomisation keeps working).
        assert answers(port, "wEb.SeRvIcE.mesh")[0][0] == "wEb.SeRvIcE.mesh."


def test_srv_records_name_their_targets_with_addresses(mesh: Mesh) -> None:
    for name in ("web.service.mesh", "_web._tcp.service.mesh"):
        out = dig(mesh.dns_a, name, "SRV")
        assert status(out) == "NOERROR"
        srv = sorted((r[4], r[5], r[6], r[7]) for r in section(out, "ANSWER"))
        # d1's instance is at its node's address (target: the node's name); d2's is elsewhere (an addr name).
        assert srv == [("1", "1", "8080", "7f000002.addr.mesh."), ("1", "1", "8080", "d1.node.mesh.")]
        extra = sorted((r[0], r[3], r[4]) for r in section(out, "ADDITIONAL") if r[3] in ("A", "AAAA"))
        assert extra == [("7f000002.addr.mesh.", "A", "127.0.0.2"), ("d1.node.mesh.", "A", "127.0.0.1")]
    # The RFC 2782 form with a tag in place of the protocol filters like TAG.NAME does.
    assert [r[-1] for r in answers(mesh.dns_a, "_web._v2.service.mesh", "SRV")] == ["7f000002.addr.mesh."]
    assert [r[-2] for r in answers(mesh.dns_a, "db.service.mesh", "SRV")] == ["5432"]
    # The targets resolve as names too.
    assert short(mesh.dns_a, "7f000002.addr.mesh") == ["127.0.0.2"]
    assert short(mesh.dns_a, "d1.node.mesh") == ["127.0.0.1"]


def test_txt_carries_tags_and_meta(mesh: Mesh) -> None:
    rows = short(mesh.dns_b, "v1.web.service.mesh", "TXT")
    assert rows == ['"id=web-d1" "node=d1" "port=8080" "health=passing" "tag=v1" "meta.version=1.4"']
    assert len(short(mesh.dns_b, "web.service.mesh", "TXT")) == 2


def test_node_names(mesh: Mesh) -> None:
    assert short(mesh.dns_a, "d2.node.mesh") == ["127.0.0.1"]
    out = dig(mesh.dns_a, "d2.node.mesh", "AAAA")
    assert status(out) == "NOERROR" and section(out, "ANSWER") == []
    assert status(dig(mesh.dns_a, "nobody.node.mesh")) == "NXDOMAIN"


def test_negative_answers_carry_the_soa(mesh: Mesh) -> None:
    for name, qtype, expected in (
        ("nothing.service.mesh", "A", "NXDOMAIN"),         # no such service
        ("v9.web.service.mesh", "A", "NXDOMAIN"),          # no instance with that tag
        ("x.unknown.mesh", "A", "NXDOMAIN"),                # no such kind of name
        ("web.service.mesh", "AAAA", "NOERROR"),            # known name, no record of that type
        ("web.service.mesh", "MX", "NOERROR"),
        ("down.service.mesh", "A", "NOERROR"),              # known service, no instance passing
        ("service.mesh", "A", "NOERROR"),                   # an empty non-terminal
    ):
        out = dig(mesh.dns_a, name, qtype)
        assert status(out) == expected, (name, qtype, out)
        assert section(out, "ANSWER") == [], out
        soa = section(out, "AUTHORITY")
        assert [r[:4] for r in soa] == [["mesh.", "0", "IN", "SOA"]], out
        assert "aa" in flags(out)
    assert [r[3] for r in answers(mesh.dns_a, "mesh", "SOA")] == ["SOA"]


def test_warning_instances_answer_critical_ones_do_not(mesh: Mesh) -> None:
    assert short(mesh.dns_a, "busy.service.mesh") == ["127.0.0.1"]
    assert short(mesh.dns_a, "down.service.mesh") == []


def test_names_outside_the_domain_are_refused(mesh: Mesh) -> None:
    for name in ("example.com", "localhost", "mesh.example.com", "."):
        out = dig(mesh.dns_a, name)
        assert status(out) == "REFUSED", out
        assert section(out, "ANSWER") == []


def test_udp_truncates_and_tcp_gets_everything(mesh: Mesh) -> None:
    # No EDNS: 512 bytes at most over UDP.  +ignore shows the truncated datagram itself.
    out = dig(mesh.dns_a, "big.service.mesh", "+noedns", "+ignore")
    assert "tc" in flags(out)
    shown = section(out, "ANSWER")
    assert 0 < len(shown) < BIG
    # Without +ignore dig does what resolvers do: it asks again over TCP, and gets all of them.
    out = dig(mesh.dns_a, "big.service.mesh", "+noedns")
    assert "Truncated, retrying in TCP mode" in out
    assert len(section(out, "ANSWER")) == BIG and "tc" not in flags(out)
    assert len(answers(mesh.dns_a, "big.service.mesh", "+tcp")) == BIG
    expected = sorted(f"127.10.0.{i + 1}" for i in range(BIG))
    assert short(mesh.dns_a, "big.service.mesh", "+tcp") == expected


def test_edns_buffer_sizes_are_honoured(mesh: Mesh) -> None:
    full = dig(mesh.dns_a, "big.service.mesh", "+bufsize=4096", "+ignore")
    assert "tc" not in flags(full) and len(section(full, "ANSWER")) == BIG
    assert "; EDNS: version: 0" in full and "udp: 1232" in full  # the size this agent accepts
    small = dig(mesh.dns_a, "big.service.mesh", "+bufsize=700", "+ignore")
    assert "tc" in flags(small)
    kept = len(section(small, "ANSWER"))
    assert 512 // 16 < kept < 700 // 16  # more than plain DNS allows, less than everything
    # An EDNS version this agent does not speak gets BADVERS.
    assert status(dig(mesh.dns_a, "web.service.mesh", "+edns=1", "+noednsnegotiation")) == "BADVERS"


def test_metrics_and_info_show_the_dns_server(mesh: Mesh) -> None:
    short(mesh.dns_b, "web.service.mesh", "SRV")
    short(mesh.dns_b, "nothing.service.mesh")
    text = mesh.b.call_text("/metrics")
    values = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(mesh_dns_queries_total\{[^}]*\}) (\S+)$",
                                                                 text, re.M)}
    assert values['mesh_dns_queries_total{rcode="NOERROR",type="SRV"}'] >= 1
    assert values['mesh_dns_queries_total{rcode="NXDOMAIN",type="A"}'] >= 1
    assert 'mesh_dns_dropped_total{reason="rate_limited"}' in text
    res = subprocess.run([sys.executable, "-m", "cli.main", "info", "--api", mesh.b.api], capture_output=True,
                         text=True, cwd=ROOT, timeout=30)
    assert f"dns:         127.0.0.1:{mesh.dns_b}  (domain mesh." in res.stdout, res.stdout
    assert mesh.b.info()["dns"]["address"] == f"127.0.0.1:{mesh.dns_b}"


def test_a_killed_instance_leaves_the_answers_when_its_node_is_declared_dead(cluster: Cluster) -> None:
    dns_port = free_port()
    a = cluster.start("k1", extra=["--dns", f"127.0.0.1:{dns_port}"])
    b = cluster.start("k2", join=[a.addr])
    c = cluster.start("k3", join=[a.addr])
    cluster.wait_converged(["k1", "k2", "k3"])
    b.call("PUT", "/v1/services", {"name": "api", "port": 7000, "address": "127.0.0.22"})
    c.call("PUT", "/v1/services", {"name": "api", "port": 7000, "address": "127.0.0.33"})
    wait_for(lambda: short(dns_port, "api.service.mesh") == ["127.0.0.22", "127.0.0.33"], 15, "both answered")
    b.signal(signal.SIGKILL)
    # While gossip still holds k2 up (alive or suspect), so does DNS; once k1 declares it dead,
    # its instance is gone from the very next answer.
    cluster.wait_status("k2", "dead", 30, observers=[a])
    assert short(dns_port, "api.service.mesh") == ["127.0.0.33"]
    assert short(dns_port, "k2.node.mesh") == []


def test_dns_flag_default_off_and_taken(cluster: Cluster, tmp_path: Path) -> None:
    # --dns off: no server, and info says so.
    a = cluster.start("o1", extra=["--dns", "off"])
    assert a.info()["dns"] is None
    # An explicit address that cannot be bound stops the agent with one line.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        b = cluster.start("o2", extra=["--dns", f"127.0.0.1:{port}"], wait=False)
        assert b.popen.wait(timeout=30) == 1
        assert f"cannot bind DNS on 127.0.0.1:{port}: port already in use" in b.log()
        assert "Traceback" not in b.log()
    # The default address taken (as when several agents share a host): the agent runs without DNS.
    config = tmp_path / "agent.toml"
    config.write_text("[dns_config]\nonly_passing = true\n")
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        try:
            holder.bind(("127.0.0.1", 8600))
        except OSError:
            pass  # someone else holds it already: the same situation
        c = cluster.start("o3", extra=["--config", str(config)])
        assert c.info()["dns"] is None
        wait_for(lambda: "dns_off" in c.log(), 10, "the agent says it runs without DNS")
    finally:
        holder.close()
    # A bad [dns_config] is a one-line configuration error.
    config.write_text("[dns_config]\nanswer_limit = -1\n")
    d = cluster.start("o4", extra=["--config", str(config)], wait=False)
    assert d.popen.wait(timeout=30) == 2
    assert "answer_limit must be a number from 0 to 1000, got -1" in d.log()


def test_dns_config_domain_limit_ttl_and_only_passing(cluster: Cluster, tmp_path: Path, procs: Processes) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('[dns_config]\ndomain = "Corp.Example."\nonly_passing = true\nanswer_limit = 2\n'
                      'service_ttl = 30\nnode_ttl = 7\n')
    port = free_port()
    a = cluster.start("c1", extra=["--dns", f"127.0.0.1:{port}", "--config", str(config)])
    for i in range(3):
        a.call("PUT", "/v1/services", {"name": "web", "id": f"web-{i}", "port": 80, "address": f"127.0.1.{i + 1}"})
    busy = free_port()
    procs.python(HTTP_429, busy, log_path=tmp_path / "busy.log")
    check = {"type": "http", "target": f"http://127.0.0.1:{busy}/", "interval": "0.2s"}
    a.call("PUT", "/v1/services", {"name": "busy", "port": busy, "address": "127.0.0.1", "check": check})
    wait_for(lambda: [i["health"] for i in a.call("GET", "/v1/services/busy")] == ["warning"], 15, "busy warning")
    rows = answers(port, "web.service.corp.example", "+tcp")
    assert len(rows) == 2 and {r[1] for r in rows} == {"30"}
    assert {r[4] for r in rows} < {"127.0.1.1", "127.0.1.2", "127.0.1.3"}
    seen: set[str] = set()
    for _ in range(40):  # the limit picks among the shuffled records: over many answers, all of them show
        seen |= {r[4] for r in answers(port, "web.service.corp.example")}
    assert seen == {"127.0.1.1", "127.0.1.2", "127.0.1.3"}
    assert answers(port, "c1.node.corp.example")[0][1] == "7"
    out = dig(port, "busy.service.corp.example")  # only passing: the warning instance is left out
    assert status(out) == "NOERROR" and section(out, "ANSWER") == []
    assert status(dig(port, "web.service.mesh")) == "REFUSED"


def test_a_virtual_name_that_cannot_listen_gets_servfail_then_works(mesh: Mesh) -> None:
    from agent.virtual import VIRTUAL_NET, stable_hash

    offset = stable_hash("db") % VIRTUAL_NET.num_addresses
    assert offset & 0xFF not in (0, 255)  # else the address moves on: this test's arithmetic would not hold
    virtual = str(VIRTUAL_NET.network_address + offset)
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind((virtual, 5432))  # the port db's instances use, on db's virtual address: taken
    holder.listen(1)
    try:
        out = dig(mesh.dns_a, "db.virtual.mesh")
        assert status(out) == "SERVFAIL" and section(out, "ANSWER") == []
        assert "virtual_upstream_failed" in mesh.a.log()
        assert 'mesh_dns_virtual_upstream_events_total{event="failed"} 1.0' in mesh.a.call_text("/metrics")
    finally:
        holder.close()
    # Free again: a lookup after the retry pause opens it, and the answer is the service's virtual address.
    wait_for(lambda: short(mesh.dns_a, "db.virtual.mesh") == [virtual], 20, "db.virtual.mesh answered")
    ups = {u["service"]: u for u in mesh.a.call("GET", "/v1/upstreams")}
    assert ups["db"]["listen"] == f"{virtual}:5432"
    assert short(mesh.dns_a, "db.virtual.mesh", "AAAA") == []
    assert status(dig(mesh.dns_a, "nothing.virtual.mesh")) == "NXDOMAIN"
    mesh.a.call("DELETE", "/v1/upstreams/db")
