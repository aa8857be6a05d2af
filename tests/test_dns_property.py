"""Every DNS answer agrees with `mesh-agent services show` at the same moment, over random registries.

Hypothesis draws the instances two real agents register (services, addresses
of both families, ports, tags, meta, which node); once both agents hold the
catalog, each name form and record type asked over TCP (the whole answer) must
say exactly what `services show --json` lists, read between two identical DNS
queries.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gossip.keyring import generate_key
from gossip.wire import parse_addr
from simulations.harness import ROOT, AgentProc, Cluster, free_port, wait_for

pytestmark = pytest.mark.slow

SERVICES = ("alpha", "beta", "gamma")
TAGS = ("blue", "green")
ADDRESSES = ("127.0.0.1", "127.0.0.7", "127.0.0.8", "::1", "fd00::5")


@dataclass
class Pair:
    agents: dict[str, AgentProc]
    dns_port: int
    registered: dict[str, list[str]] = field(default_factory=dict)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    cluster = Cluster(tmp_path_factory.mktemp("dnsprop"), generate_key())
    try:
        port = free_port()
        a = cluster.start("q1", extra=["--dns", f"127.0.0.1:{port}"])
        b = cluster.start("q2", join=[a.addr], extra=["--dns", "off"])
        cluster.wait_converged(["q1", "q2"])
        yield Pair({"q1": a, "q2": b}, port)
    finally:
        cluster.close()


instance = st.fixed_dictionaries({
    "node": st.sampled_from(["q1", "q2"]),
    "name": st.sampled_from(SERVICES),
    "address": st.sampled_from(ADDRESSES),
    "port": st.integers(1, 65535),
    "tags": st.lists(st.sampled_from(TAGS), unique=True, max_size=2),
    "meta": st.dictionaries(st.sampled_from(["v", "zone"]), st.text("abc123.-", max_size=12), max_size=2),
})


def show(pair: Pair, name: str) -> list[dict[str, Any]]:
    res = subprocess.run([sys.executable, "-m", "cli.main", "services", "show", name, "--json",
                          "--api", pair.agents["q1"].api], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert res.returncode == 0, res.stderr
    rows: list[dict[str, Any]] = json.loads(res.stdout)
    return rows


def ask(pair: Pair, name: str, qtype: str) -> tuple[int, list[Any]]:
    """The rcode and the answer's records, sorted (a multiset: a duplicate record would show)."""
    q = dns.message.make_query(name, qtype)
    r = dns.query.tcp(q, "127.0.0.1", port=pair.dns_port, timeout=5)
    records: list[Any] = []
    for rrset in r.answer:
        for rd in rrset:
            if rd.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                records.append(rd.address)
            elif rd.rdtype == dns.rdatatype.SRV:
                records.append((rd.port, rd.target.to_text()))
            elif rd.rdtype == dns.rdatatype.TXT:
                records.append(tuple(s.decode() for s in rd.strings))
    return r.rcode(), sorted(records)


def expected(rows: list[dict[str, Any]], qtype: str, node_address: str) -> list[Any]:
    """What `services show` rows say the answer holds: a TXT record per instance, an SRV record per distinct
    address and port, an A/AAAA record per distinct address."""
    out: list[Any] = []
    for row in rows:
        if row["health"] not in ("passing", "warning"):
            continue
        host, port = parse_addr(row["address"])
        ip = ipaddress.ip_address(host)
        if (qtype == "A" and ip.version == 4 or qtype == "AAAA" and ip.version == 6) and host not in out:
            out.append(host)
        elif qtype == "SRV":
            target = f"{row['node']}.node.mesh." if host == node_address else f"{ip.packed.hex()}.addr.mesh."
            if (port, target) not in out:  # an RRset is a set: instances at one address and port share a record
                out.append((port, target))
        elif qtype == "TXT":
            out.append((f"id={row['id']}", f"node={row['node']}", f"port={port}", f"health={row['health']}",
                     *(f"tag={t}" for t in row["tags"]), *(f"meta.{k}={v}" for k, v in row["meta"].items())))
    return sorted(out)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(instance, max_size=8))
def test_answers_agree_with_services_show(pair: Pair, instances: list[dict[str, Any]]) -> None:
    for node, ids in pair.registered.items():
        for iid in ids:
            pair.agents[node].call("DELETE", f"/v1/services/{iid}")
    pair.registered = {"q1": [], "q2": []}
    want: set[tuple[str, str]] = set()
    for i, inst in enumerate(instances):
        node = inst.pop("node")
        iid = f"{inst['name']}-{i}"
        pair.agents[node].call("PUT", "/v1/services", {**inst, "id": iid})
        pair.registered[node].append(iid)
        want.add((node, iid))

    def held() -> bool:
        return {(r["node"], r["id"]) for s in SERVICES for r in pair.agents["q1"].call("GET", f"/v1/services/{s}")} \
            == want

    wait_for(held, 20, "q1 holds the catalog just registered")
    node_address = pair.agents["q1"].members()["q1"]["address"].rsplit(":", 1)[0]
    for service in SERVICES:
        forms: list[tuple[str, str | None]] = [(f"{service}.service.mesh", None),
                                               (f"_{service}._tcp.service.mesh", None)]
        forms += [(f"{tag}.{service}.service.mesh", tag) for tag in TAGS]
        questions = [(name, tag, qtype) for name, tag in forms for qtype in ("A", "AAAA", "SRV", "TXT")]
        before = [ask(pair, name, qtype) for name, _, qtype in questions]
        shown = show(pair, service)
        after = [ask(pair, name, qtype) for name, _, qtype in questions]
        assert before == after  # nothing changed meanwhile: the answers are those of that moment
        for (name, tag, qtype), got in zip(questions, before, strict=True):
            rows = [r for r in shown if tag is None or tag in r["tags"]]
            if not rows:
                assert got == (dns.rcode.NXDOMAIN, []), (name, qtype, got)
                continue
            assert got == (dns.rcode.NOERROR, expected(rows, qtype, node_address)), (name, qtype, shown)
