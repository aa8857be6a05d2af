"""The dashboard at GET /, in a real headless Chromium: it follows the cluster without a reload."""

from __future__ import annotations

import shutil
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from simulations.harness import Cluster, free_port

pytestmark = pytest.mark.slow

CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM = shutil.which("chromium")

if CHROMIUM is None or not Path(CHROMEDRIVER).exists():
    pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
                allow_module_level=True)

webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install -e '.[test]')")
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

#: The page, read atomically in the browser: a row is re-rendered every second.
SNAPSHOT_JS = """
const members = {};
for (const tr of document.querySelectorAll('#members tr[data-member]')) {
  members[tr.dataset.member] = {status: tr.querySelector('td.status').textContent.trim(),
                                history: tr.dataset.history};
}
return {
  members,
  nodes: Array.from(document.querySelectorAll('#coords g[data-node]')).map(g => g.dataset.node).sort(),
  instances: Object.fromEntries(Array.from(document.querySelectorAll('#services tr[data-instance]'))
    .map(tr => [tr.dataset.instance, tr.querySelector('td.health').textContent.trim()])),
  routes: Object.fromEntries(Array.from(document.querySelectorAll('#routes tr[data-route]'))
    .map(tr => [tr.dataset.route, tr.dataset.state])),
  events: Array.from(document.querySelectorAll('#events li')).map(li => li.dataset.event),
  config: Array.from(document.querySelectorAll('#config tr[data-entry]')).map(tr => tr.dataset.entry),
  traffic: Array.from(document.querySelectorAll('#traffic tr[data-traffic]')).map(tr => tr.dataset.traffic),
  trafficEmpty: document.querySelector('#traffic tr.empty-row td')?.textContent || null,
  conn: document.getElementById('conn').dataset.state,
  marker: window.__testMarker || null,
};
"""


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-background-networking",
                "--window-size=1400,1300"):
        options.add_argument(arg)
    # The system driver: selenium must not try to fetch one.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def snapshot(driver: Any) -> dict[str, Any]:
    result: dict[str, Any] = driver.execute_script(SNAPSHOT_JS)
    return result


def wait_page(driver: Any, timeout: float, what: str, pred: Any) -> dict[str, Any]:
    """Wait until ``pred(snapshot)``; on time-out, say what the page showed last."""
    last: list[dict[str, Any]] = [{}]

    def check(d: Any) -> bool:
        last[0] = snapshot(d)
        return bool(pred(last[0]))

    try:
        WebDriverWait(driver, timeout, poll_frequency=0.2).until(check)
    except Exception as exc:
        raise AssertionError(f"page never showed: {what}\nlast snapshot: {last[0]}") from exc
    return last[0]


def test_dashboard_follows_members_live(cluster: Cluster, browser: Any, tmp_path: Path) -> None:
    a1 = cluster.start("a1")
    a2 = cluster.start("a2", join=[a1.addr])
    a3 = cluster.start("a3", join=[a1.addr])
    cluster.wait_converged(["a1", "a2", "a3"])
    a2.call("PUT", "/v1/services", {"name": "web", "port": free_port()})
    a1.call("PUT", "/v1/upstreams", {"service": "web", "listen": f"127.0.0.1:{free_port()}"})

    with urllib.request.urlopen(f"http://{a1.api}/", timeout=5) as resp:
        assert resp.headers["content-type"].startswith("text/html")
        assert b"<script>" in resp.read()

    browser.get(f"http://{a1.api}/")
    names = ["a1", "a2", "a3"]
    page = wait_page(browser, 20, "a1, a2, a3 alive, each placed in the coordinates picture",
                     lambda s: {n: m["status"] for n, m in s["members"].items()} == dict.fromkeys(names, "alive")
                     and s["nodes"] == names)
    assert page["conn"] == "live"
    # The HTTP traffic panel polls /v1/stat: no HTTP requests yet, and it says so.
    assert page["traffic"] == [] and page["trafficEmpty"].startswith("no HTTP requests yet"), page
    wait_page(browser, 20, "web-a2 passing and routed from a1",
              lambda s: s["instances"].get("web-a2") == "passing" and s["routes"].get("web/a2/web-a2") == "active")
    browser.execute_script("window.__testMarker = 'same page'")
    # A config entry written on another node is listed on this one's page.
    written = a2.call("PUT", "/v1/config", {"kind": "intention", "source": "api", "destination": "web",
                                            "action": "deny"})
    wait_page(browser, 20, "the intention written on a2 listed on a1's page",
              lambda s: s["config"] == [f"intention/api/web/{written['version']}"])

    a3.signal(signal.SIGKILL)
    page = wait_page(browser, 30, "a3 dead, after being shown suspect",
                     lambda s: s["members"]["a3"]["status"] == "dead")
    history = page["members"]["a3"]["history"].split()
    assert history[0] == "alive" and "suspect" in history and history[-1] == "dead", history
    assert page["marker"] == "same page"  # updated in place, not reloaded
    assert {"a1": "alive", "a2": "alive"} == {n: page["members"][n]["status"] for n in ("a1", "a2")}
    # The event list comes from the monitor stream.
    assert "member_suspect" in page["events"] and "member_dead" in page["events"]

    shot = tmp_path / "dashboard.png"
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dashboard_traffic_panel_follows_requests(cluster: Cluster, browser: Any, procs: Any) -> None:
    import http.client

    from test_traffic_api import HTTP_SERVER

    from simulations.harness import wait_for, wait_port

    a1 = cluster.start("h1")
    a2 = cluster.start("h2", join=[a1.addr])
    cluster.wait_converged(["h1", "h2"])
    port = free_port()
    procs.python(HTTP_SERVER, port, "web-h2")
    wait_port(port, "the http server")
    a2.call("PUT", "/v1/services", {"name": "web", "id": "web-h2", "port": port, "address": "127.0.0.1",
                                    "protocol": "http"})
    wait_for(lambda: len(a1.call("GET", "/v1/services/web?passing")) == 1, 20, "web-h2 passing on h1")
    listen = free_port()
    a1.call("PUT", "/v1/upstreams", {"service": "web", "listen": f"127.0.0.1:{listen}"})
    wait_port(listen, "the upstream")
    browser.get(f"http://{a1.api}/")
    wait_page(browser, 20, "the page live", lambda s: s["conn"] == "live")

    conn = http.client.HTTPConnection("127.0.0.1", listen, timeout=20)
    for i in range(10):
        conn.request("GET", "/fail" if i % 2 else "/ok")
        conn.getresponse().read()
    conn.close()
    page = wait_page(browser, 20, "outbound web and web-h2 rows with 10 requests",
                     lambda s: {"outbound/web/*", "outbound/web/web-h2"} <= set(s["traffic"]))
    figures = browser.execute_script(
        "return Array.from(document.querySelectorAll('#traffic tr[data-traffic]')).map(tr => "
        "[tr.dataset.traffic, tr.dataset.requests, tr.dataset.success])")
    assert ["outbound/web/web-h2", "10", "0.5"] in figures, (figures, page)
