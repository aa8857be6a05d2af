"""The static tunnel key: created once, 0600, stable, spread by gossip."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import nacl.bindings
import pytest

from agent.identity import KEY_FILE, IdentityError, load_or_create
from simulations.harness import Cluster


def test_key_is_created_0600_and_reused(tmp_path: Path) -> None:
    priv, pub, warnings = load_or_create(tmp_path)
    assert warnings == []
    path = tmp_path / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert nacl.bindings.crypto_scalarmult_base(priv) == pub
    assert load_or_create(tmp_path)[:2] == (priv, pub)


def test_without_data_dir_the_key_is_ephemeral_and_said_so() -> None:
    a, b = load_or_create(None), load_or_create(None)
    assert a[1] != b[1]
    assert "no --data-dir" in a[2][0]


def test_unusable_key_file_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / KEY_FILE).write_text("not base64!\n")
    with pytest.raises(IdentityError, match="cannot read tunnel key"):
        load_or_create(tmp_path)
    (tmp_path / KEY_FILE).write_text(base64.b64encode(b"short").decode())
    with pytest.raises(IdentityError, match="32 bytes"):
        load_or_create(tmp_path)


@pytest.mark.slow
def test_tunnel_keys_spread_and_survive_restart(cluster: Cluster, tmp_path: Path) -> None:
    a = cluster.start("k1", extra=["--data-dir", str(tmp_path / "k1")])
    b = cluster.start("k2", join=[a.addr], extra=["--data-dir", str(tmp_path / "k2")])
    cluster.wait_converged(["k1", "k2"])
    seen = a.members()["k2"]
    own = b.members()["k2"]
    assert seen["tunnel_key"] == own["tunnel_key"] and len(base64.b64decode(seen["tunnel_key"])) == 32
    assert seen["tunnel"].startswith("127.0.0.1:") and not seen["tunnel"].endswith(":0")
    assert own["tunnel_key"] not in b.log()  # public, but still not logged
    b.signal(15)
    assert b.popen.wait(15) == 0
    b2 = cluster.start("k2", join=[a.addr], gossip_port=b.gossip_port, api_port=b.api_port,
                       extra=["--data-dir", str(tmp_path / "k2")])
    cluster.wait_converged(["k1", "k2"])
    assert b2.members()["k2"]["tunnel_key"] == own["tunnel_key"]
