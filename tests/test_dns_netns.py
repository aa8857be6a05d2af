"""The system resolver finds the mesh: a real dnsmasq forwards the domain to the agent, in a network namespace.

Each host namespace has its own loopback, so its agent keeps DNS on the
default 127.0.0.1:8600 as on a real host, and ``ip netns exec`` mounts
/etc/netns/NS/resolv.conf over /etc/resolv.conf: programs there (getent,
curl) resolve through that host's dnsmasq, which sends ``mesh`` to the agent.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from netns import Lab

from simulations.harness import wait_for

pytestmark = pytest.mark.slow


def in_ns(ns: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *args], capture_output=True, text=True, timeout=30)


def test_getent_and_curl_by_name_through_dnsmasq(lab: Lab, tmp_path: Path) -> None:
    for tool in ("dnsmasq", "curl", "getent"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed (.ci/run installs dnsmasq and curl)")
    config = tmp_path / "agent.toml"
    config.write_text("[dns_config]\nvirtual_idle = 2\n")
    client = lab.start_agent("c1", extra=["--dns", "127.0.0.1:8600", "--config", str(config)])
    server = lab.start_agent("s1", join=[client.addr])
    wait_for(lambda: (client.try_members() or {}).get("s1", {}).get("status") == "alive", 20, "s1 joined")
    s1, c1 = lab.hosts["s1"], lab.hosts["c1"]
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("hello from s1\n")
    lab.run_in(s1, [sys.executable, "-m", "http.server", "8080", "--bind", s1.ip, "--directory", str(site)],
               "http.log")
    server.call("PUT", "/v1/services", {"name": "web", "port": 8080, "address": s1.ip, "tags": ["blue"]})

    # The host's resolver: dnsmasq on its loopback, forwarding the mesh's domain to the agent (the README's recipe).
    lab.write_hosts()
    (Path("/etc/netns") / c1.ns / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    lab.run_in(c1, ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
                    "--listen-address=127.0.0.1", "--bind-interfaces", "--port=53", "--user=root",
                    f"--pid-file={tmp_path / 'dnsmasq.pid'}", "--server=/mesh/127.0.0.1#8600",
                    "--log-queries", "--log-facility=-"], "dnsmasq.log")

    def resolves() -> bool:
        return in_ns(c1.ns, "getent", "hosts", "web.service.mesh").stdout.split()[:1] == [s1.ip]

    wait_for(resolves, 20, "getent hosts web.service.mesh through dnsmasq",
             lambda: (tmp_path / "dnsmasq.log").read_text())
    assert in_ns(c1.ns, "getent", "hosts", "blue.web.service.mesh").stdout.split()[:1] == [s1.ip]
    assert in_ns(c1.ns, "getent", "hosts", "s1.node.mesh").stdout.split()[:1] == [s1.ip]
    assert in_ns(c1.ns, "getent", "hosts", "nothing.service.mesh").returncode == 2  # not found
    assert "query[A] web.service.mesh" in (tmp_path / "dnsmasq.log").read_text()

    # curl by name, straight to the instance.
    wait_for(lambda: in_ns(c1.ns, "curl", "-sf", "--max-time", "5", "http://web.service.mesh:8080/").stdout
             == "hello from s1\n", 20, "curl by the service name")

    # The virtual name: the first lookup opens an upstream on the client's agent, and the request crosses the mesh.
    res = in_ns(c1.ns, "curl", "-sf", "--max-time", "10", "http://web.virtual.mesh:8080/")
    assert res.stdout == "hello from s1\n", res.stderr
    virtual = in_ns(c1.ns, "getent", "hosts", "web.virtual.mesh").stdout.split()[0]
    assert virtual.startswith("127.") and virtual != s1.ip
    ups = {u["service"]: u for u in client.call("GET", "/v1/upstreams")}
    assert ups["web"]["listen"] == f"{virtual}:8080" and ups["web"]["connections"] >= 1
    assert client.info()["dns"]["virtual"] == [{"service": "web", "listen": f"{virtual}:8080"}]
    # Unused, it is reaped; the next lookup opens it again, at the same address.
    wait_for(lambda: not client.call("GET", "/v1/upstreams"), 30, "the idle virtual upstream reaped")
    res = in_ns(c1.ns, "curl", "-sf", "--max-time", "10", "http://web.virtual.mesh:8080/")
    assert res.stdout == "hello from s1\n", res.stderr
    assert in_ns(c1.ns, "getent", "hosts", "web.virtual.mesh").stdout.split()[0] == virtual
