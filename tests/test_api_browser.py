"""A web page in a real headless Chromium tries to use the agent's API; the dashboard keeps working.

The page is served from another origin on loopback (another port), as any
site the operator visits would be, and sends every request a page can send
without a CORS preflight, plus the preflighted ones, plus a form post.  The
browser runs as the agent's own user (root here), so the uid check alone
would let it in: the Origin, Fetch-metadata and content-type rules must not.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_dashboard import browser, wait_page  # noqa: F401 - the fixture is used by name

from gossip.keyring import generate_key
from simulations.harness import Cluster, free_port, wait_for, wait_port

pytestmark = pytest.mark.slow

EVIL_PAGE = """<!doctype html>
<html><body>
<iframe name="sink" style="display:none"></iframe>
<form id="f" method="POST" target="sink" enctype="text/plain">
  <input name='{"addresses": ["127.0.0.1:1"], "x": "' value='"}'>
</form>
<script>
const API = "http://127.0.0.1:%(port)d";
const marker = "%(marker)s";
const results = [];
const evil = {name: "x", port: 1, check: {type: "exec", target: "touch " + marker, interval: "1s"}};
const key = "%(key)s";
const bodies = {
  "/v1/services": JSON.stringify(evil),
  "/v1/upstreams": JSON.stringify({service: "x", listen: "0.0.0.0:%(listen)d", public: true}),
  "/v1/intentions": JSON.stringify({source: "a", destination: "b", action: "deny"}),
  "/v1/keys": JSON.stringify({op: "install", key: key}),
  "/v1/join": JSON.stringify({addresses: ["127.0.0.1:1"]}),
};
const targets = [
  ["PUT", "/v1/services"], ["DELETE", "/v1/services/web-1"], ["PUT", "/v1/upstreams"],
  ["DELETE", "/v1/upstreams/web"], ["PUT", "/v1/intentions"], ["DELETE", "/v1/intentions/a0/b0"],
  ["POST", "/v1/keys"], ["POST", "/v1/join"], ["POST", "/v1/leave"], ["POST", "/v1/services"],
];
const types = ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", null, "application/json"];
async function attack() {
  for (const [method, path] of targets) {
    for (const type of types) {
      for (const mode of ["no-cors", "cors"]) {
        const init = {method, mode, credentials: "include"};
        if (bodies[path]) init.body = bodies[path];
        if (type) init.headers = {"Content-Type": type};
        try {
          const r = await fetch(API + path, init);
          results.push([method, path, type, mode, r.type, r.status]);
        } catch (e) {
          results.push([method, path, type, mode, "error", String(e)]);
        }
      }
    }
  }
  // GETs a page can make that act: the keyring query, as fetch and as an image.
  try { await fetch(API + "/v1/keys", {mode: "no-cors"}); } catch (e) {}
  await new Promise(done => { const i = new Image(); i.onload = i.onerror = done; i.src = API + "/v1/keys"; });
  // A classic form post (a navigation in a hidden frame) at /v1/join and /v1/leave.
  for (const path of ["/v1/join", "/v1/leave"]) {
    const f = document.getElementById("f");
    f.action = API + path;
    await new Promise(done => { document.querySelector("iframe").onload = done; f.submit(); setTimeout(done, 3000); });
  }
  window.__done = results;
}
attack();
</script>
</body></html>
"""


@pytest.fixture
def evil_site(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A plain static web server on another loopback port: another origin."""
    site = tmp_path / "site"
    site.mkdir()
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port),
                          "--directory", str(site)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, "the other origin's web server")
        yield port, site
    finally:
        p.kill()
        p.wait(timeout=5)


def test_a_page_from_another_origin_changes_nothing_and_the_dashboard_still_works(
        cluster: Cluster, browser: Any, evil_site: tuple[int, Path], tmp_path: Path) -> None:  # noqa: F811
    a = cluster.start("br-a", extra=["--data-dir", str(tmp_path / "data")])
    b = cluster.start("br-b", join=[a.addr])
    cluster.wait_converged(["br-a", "br-b"])
    a.call("PUT", "/v1/services", {"name": "web", "port": 8080, "id": "web-1"})
    a.call("PUT", "/v1/upstreams", {"service": "web", "listen": f"127.0.0.1:{free_port()}"})
    a.call("PUT", "/v1/intentions", {"source": "a0", "destination": "b0", "action": "deny"})

    def state() -> Any:
        keys = a.call("GET", "/v1/keys", timeout=15)
        return (a.call("GET", "/v1/services/web"), a.call("GET", "/v1/services/x"),
                [(u["service"], u["listen"]) for u in a.call("GET", "/v1/upstreams")],
                a.call("GET", "/v1/intentions"), sorted(keys["keys"]),
                sorted((m["name"], m["status"]) for m in a.call("GET", "/v1/members")))

    before = state()
    changes_before = a.log().count('"api_change"')
    refused_before = a.info()["counters"]["api_refused_total"]
    marker = tmp_path / "owned"
    port, site = evil_site
    (site / "index.html").write_text(EVIL_PAGE % {"port": a.api_port, "marker": marker, "key": generate_key(),
                                                  "listen": free_port()})
    browser.get(f"http://127.0.0.1:{port}/")
    results: list[list[Any]] = []

    def done() -> bool:
        results[:] = browser.execute_script("return window.__done || []")
        return bool(results)

    wait_for(done, 60, "the page's requests all sent")
    # Every fetch got through to the agent (none was blocked by the browser before sending) or was a
    # preflight that failed: either way the agent's answer was refused or unreadable.
    assert len(results) == 10 * 5 * 2
    readable = [r for r in results if r[4] == "cors" or r[4] == "basic"]
    assert not readable, readable
    wait_for(lambda: a.info()["counters"]["api_refused_total"] - refused_before >= 40, 10,
             "the agent refused and counted the page's requests",
             lambda: json.dumps(a.info()["counters"]["api_refused"]))
    assert not marker.exists()
    assert a.running() and state() == before
    assert b.members()["br-a"]["status"] == "alive"
    assert a.log().count('"api_change"') == changes_before  # nothing was accepted

    # The dashboard, opened the documented way (its own URL on loopback), still follows the mesh.
    browser.get(f"http://{a.api}/")
    page = wait_page(browser, 20, "br-a and br-b alive",
                     lambda s: {n: m["status"] for n, m in s["members"].items()} == {"br-a": "alive", "br-b": "alive"})
    assert page["conn"] == "live"
    b.signal(9)
    wait_page(browser, 30, "br-b dead, live", lambda s: s["members"]["br-b"]["status"] == "dead")
    # The same page under a rebound name is refused outright.
    with socket.create_connection(("127.0.0.1", a.api_port)) as s:
        s.sendall(f"GET / HTTP/1.1\r\nHost: rebound.example:{a.api_port}\r\nConnection: close\r\n\r\n".encode())
        assert s.recv(100).startswith(b"HTTP/1.1 403 ")
