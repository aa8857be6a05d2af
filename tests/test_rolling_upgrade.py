"""A mesh upgraded one node at a time: agents of the release before config entries beside new ones.

The old release is the commit before config entries existed (9078924), run from
a copy of its code made with ``git archive``, with the same installed packages.
"""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
import urllib.error
from pathlib import Path

import pytest
from test_proxy import ECHO, roundtrip

from simulations.harness import ROOT, Cluster, Processes, free_port, wait_for

OLD_RELEASE = "9078924"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def old_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("old-release")
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", OLD_RELEASE, "agent", "gossip",
                          "dataplane", "cli"], capture_output=True, check=True, timeout=60).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(dest, filter="data")
    return dest


def test_old_and_new_agents_keep_membership_catalog_and_traffic(cluster: Cluster, procs: Processes,
                                                                 old_release: Path) -> None:
    old = cluster.start("old1", root=old_release)
    new1 = cluster.start("new1", join=[old.addr])
    new2 = cluster.start("new2", join=[old.addr])
    cluster.wait_converged(["old1", "new1", "new2"])

    # The catalog and traffic cross versions, both ways.
    old_port, new_port = free_port(), free_port()
    procs.python(ECHO, old_port)
    procs.python(ECHO, new_port)
    old.call("PUT", "/v1/services", {"name": "on-old", "port": old_port, "address": "127.0.0.1"})
    new2.call("PUT", "/v1/services", {"name": "on-new", "port": new_port, "address": "127.0.0.1"})
    wait_for(lambda: len(new1.call("GET", "/v1/services/on-old?passing")) == 1
             and len(old.call("GET", "/v1/services/on-new?passing")) == 1, 20, "both catalogs everywhere")
    to_old, to_new = free_port(), free_port()
    new1.call("PUT", "/v1/upstreams", {"service": "on-old", "listen": f"127.0.0.1:{to_old}"})
    old.call("PUT", "/v1/upstreams", {"service": "on-new", "listen": f"127.0.0.1:{to_new}"})
    assert roundtrip(to_old, b"new calls old") == b"new calls old"
    assert roundtrip(to_new, b"old calls new") == b"old calls new"

    # Config entries spread among the new agents; the old one relays the announcement, knows nothing
    # of it, and the new ones say it cannot take entries yet.
    wrote = new1.call("PUT", "/v1/config", {"kind": "service-defaults", "name": "on-new", "protocol": "tcp"})
    wait_for(lambda: any(e["version"] == wrote["version"] for e in new2.call("GET", "/v1/config")), 15,
             "the entry on new2")
    with pytest.raises(urllib.error.HTTPError) as info:
        old.call("GET", "/v1/config")
    assert info.value.code == 404
    wait_for(lambda: new1.info()["config_entries"]["peers_without_config"] == ["old1"], 30,
             "new1 names old1 as unable to take config entries",
             lambda: json.dumps(new1.info()["config_entries"]))
    assert old.running() and old.info()["counters"].get("dropped_total", 0) == 0, old.info()["counters"]["dropped"]
    cluster.wait_converged(["old1", "new1", "new2"])
