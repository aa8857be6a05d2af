"""A joiner whose key (or lack of one) differs from the seed's: both sides say so plainly.

A wrong key is the most common mistake in setting up a cluster, and the join
is where it shows first: over TCP, before any datagram.  Each combination is
run with real agents on loopback, because what matters is what the operator
reads on each side: the joiner's ``join_error`` (and its ``join_retry`` log
line), and the seed's ``undecryptable`` list in ``mesh-agent info`` and its
log line naming the stranger.
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

from gossip.keyring import Keyring, decode_key, generate_key
from gossip.wire import Ping, PushPull, decode_stream, encode_packet, encode_push_pull_stream
from simulations.harness import ROOT, AgentProc, Cluster, wait_for

pytestmark = pytest.mark.slow

WRONG_KEY_JOINER = "the seed answered but its reply does not open with any of our keys: is the cluster key different?"


@pytest.fixture
def other(tmp_path: Path) -> Iterator[Cluster]:
    """Agents with a key of their own, or with none (``other.key = None`` before starting them)."""
    work = tmp_path / "other"
    work.mkdir()
    c = Cluster(work, generate_key())
    try:
        yield c
    finally:
        c.close()


def rows(agent: AgentProc, kind: str) -> list[dict[str, Any]]:
    return [r for r in agent.info()["undecryptable"] if r["kind"] == kind]


def log_lines(agent: AgentProc, event: str) -> list[dict[str, Any]]:
    out = []
    for line in agent.log().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == event:
            out.append(rec)
    return out


def info_text(agent: AgentProc) -> str:
    return subprocess.run([sys.executable, "-m", "cli.main", "info", "--api", agent.api], capture_output=True,
                          text=True, cwd=ROOT, timeout=30).stdout


def wait_retrying(joiner: AgentProc, words: str) -> None:
    wait_for(lambda: words in str(joiner.info()["join_error"]), 15, f"join_error says {words!r}",
             lambda: str(joiner.info()["join_error"]))


def test_a_joiner_with_another_key_is_told_so_and_the_seed_names_it_once_a_minute(
        cluster: Cluster, other: Cluster) -> None:
    seed = cluster.start("seed")
    joiner = other.start("stranger", join=[seed.addr])
    wait_retrying(joiner, WRONG_KEY_JOINER)
    assert not joiner.info()["joined"]
    wait_for(lambda: any(r["packets_last_minute"] >= 3 for r in rows(seed, "wrong_key")), 15,
             "three join attempts counted on the seed", lambda: json.dumps(seed.info()["undecryptable"]))
    [row] = rows(seed, "wrong_key")
    assert row["source"] == "127.0.0.1" and row["transport"] == "tcp"
    assert "opened with no installed key — is its key different?" in row["hint"]
    assert "is its key different?" in info_text(seed)
    # Several attempts, one line (the limit is a minute per source).
    [line] = [x for x in log_lines(seed, "undecryptable") if x["kind"] == "wrong_key"]
    assert line["source"] == "127.0.0.1" and line["transport"] == "tcp" and "is its key different?" in line["detail"]
    assert any(WRONG_KEY_JOINER in x["error"] for x in log_lines(joiner, "join_retry"))
    assert WRONG_KEY_JOINER in info_text(joiner)
    assert seed.members().keys() == {"seed"} and joiner.members().keys() == {"stranger"}
    for a in (seed, joiner):
        assert cluster.key not in a.log() and str(other.key) not in a.log()


def test_an_insecure_joiner_of_an_encrypted_cluster_is_told_so_and_named_by_the_seed(
        cluster: Cluster, other: Cluster) -> None:
    seed = cluster.start("seed")
    other.key = None
    joiner = other.start("plain", join=[seed.addr])
    wait_retrying(joiner, "the seed answered with an encrypted reply, and this agent runs with --insecure")
    assert "--key" in joiner.info()["join_error"]
    wait_for(lambda: bool(rows(seed, "unencrypted")), 15, "the insecure joiner named on the seed",
             lambda: json.dumps(seed.info()["undecryptable"]))
    [row] = rows(seed, "unencrypted")
    assert row["transport"] == "tcp"
    assert f"(node 'plain' at {joiner.addr})" in row["hint"] and "does it run with --insecure?" in row["hint"]
    [line] = [x for x in log_lines(seed, "undecryptable") if x["kind"] == "unencrypted"]
    assert joiner.addr in line["detail"]
    assert seed.members().keys() == {"seed"}
    assert cluster.key not in seed.log()


def test_an_encrypted_joiner_of_an_insecure_seed_is_told_so_and_the_seed_names_it(
        cluster: Cluster, other: Cluster) -> None:
    other.key = None
    seed = other.start("plainseed")
    joiner = cluster.start("keyed", join=[seed.addr])
    wait_retrying(joiner, "the seed answered but its reply is not encrypted: the seed runs with --insecure")
    wait_for(lambda: bool(rows(seed, "encrypted")), 15, "the encrypted joiner named on the insecure seed",
             lambda: json.dumps(seed.info()["undecryptable"]))
    [row] = rows(seed, "encrypted")
    assert row["source"] == "127.0.0.1" and row["transport"] == "tcp"
    assert "encrypted, and this agent runs with --insecure" in row["hint"]
    assert "this agent runs with --insecure" in info_text(seed)
    assert [x["kind"] for x in log_lines(seed, "undecryptable")] == ["encrypted"]
    assert seed.info()["counters"]["dropped"].get("encrypted", 0) >= 1
    assert seed.members().keys() == {"plainseed"} and joiner.members().keys() == {"keyed"}
    assert cluster.key not in joiner.log()


def test_datagrams_across_the_encrypted_insecure_line_are_named_both_ways(
        cluster: Cluster, other: Cluster) -> None:
    keyed = cluster.start("keyed")
    other.key = None
    plain = other.start("plain")
    packet = encode_packet([Ping(1, "x", "y")])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        src = f"127.0.0.1:{s.getsockname()[1]}"
        for _ in range(3):
            s.sendto(packet, ("127.0.0.1", keyed.gossip_port))
            s.sendto(Keyring(decode_key(str(cluster.key))).seal(packet), ("127.0.0.1", plain.gossip_port))
    wait_for(lambda: bool(rows(keyed, "unencrypted")) and bool(rows(plain, "encrypted")), 10, "both counted",
             lambda: json.dumps([keyed.info()["undecryptable"], plain.info()["undecryptable"]]))
    [row] = rows(keyed, "unencrypted")
    assert row["source"] == src and row["transport"] == "udp"
    assert row["hint"].startswith(f"{src}: ") and "does it run with --insecure?" in row["hint"]
    [row] = rows(plain, "encrypted")
    assert row["source"] == src and row["transport"] == "udp"
    assert "this agent runs with --insecure" in row["hint"]
    assert [x["source"] for x in log_lines(keyed, "undecryptable")] == [src]
    assert [x["source"] for x in log_lines(plain, "undecryptable")] == [src]
    assert keyed.running() and plain.running()


def test_the_seed_answers_a_push_pull_it_cannot_open_with_a_refusal_sealed_with_its_key(
        cluster: Cluster) -> None:
    """A joiner mid-rotation (our key installed, but another one primary) can read why it was refused."""
    seed = cluster.start("seed")
    ours = Keyring(decode_key(str(cluster.key)))
    theirs = Keyring(decode_key(generate_key()))
    frame = theirs.seal(encode_push_pull_stream(PushPull("rotating", True, []), []))
    with socket.create_connection(("127.0.0.1", seed.gossip_port), timeout=10) as s:
        s.sendall(len(frame).to_bytes(4, "big") + frame)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    assert len(reply) > 4 and int.from_bytes(reply[:4], "big") == len(reply) - 4
    [msg] = decode_stream(ours.open(reply[4:]))
    assert isinstance(msg, PushPull) and msg.source == "seed" and not msg.members
    assert "opens with none of the keys installed here" in msg.refused
