"""agent.peercred: the uid owning a loopback client's socket, by sock_diag and by /proc, on real sockets."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from agent.peercred import is_loopback, loopback_peer_uid, uid_by_proc, uid_by_sock_diag

NOBODY = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="making a socket as another user needs root")


@contextmanager
def accepted(family: int, host: str, uid: int | None = None) -> Iterator[tuple[tuple[str, int], tuple[str, int]]]:
    """A connection whose client socket was created as ``uid``: (client address, server address) as accepted."""
    with socket.socket(family) as srv:
        srv.bind((host, 0))
        srv.listen()
        if uid is not None:
            os.seteuid(uid)  # a socket's owner is its creator's fsuid, fixed at creation
        try:
            client = socket.socket(family)
        finally:
            os.seteuid(0)
        with client:
            client.connect(srv.getsockname()[:2])
            conn, _ = srv.accept()
            with conn:
                yield conn.getpeername()[:2], conn.getsockname()[:2]


@pytest.mark.parametrize("family,host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
@pytest.mark.parametrize("uid", [0, NOBODY])
def test_both_lookups_name_the_clients_creator(family: int, host: str, uid: int) -> None:
    with accepted(family, host, uid) as (peer, local):
        assert uid_by_sock_diag(peer, local) == uid
        assert uid_by_proc(peer, local) == uid
        assert loopback_peer_uid(peer, local) == uid


def test_a_client_gone_or_never_there_is_unknown() -> None:
    with accepted(socket.AF_INET, "127.0.0.1") as (_, local):
        ghost = ("127.0.0.1", 1)
        assert uid_by_sock_diag(ghost, local) is None
        assert uid_by_proc(ghost, local) is None
        assert loopback_peer_uid(ghost, local) is None


def test_the_server_end_is_not_mistaken_for_the_client() -> None:
    # Swapped addresses name the agent's own accepted socket: it must not be taken for the client's.
    with accepted(socket.AF_INET, "127.0.0.1", NOBODY) as (peer, local):
        assert uid_by_sock_diag(local, peer) == 0  # the server side, created by root
        assert loopback_peer_uid(peer, local) == NOBODY


def test_only_loopback_peers_are_looked_up() -> None:
    assert loopback_peer_uid(("192.0.2.7", 40000), ("127.0.0.1", 7947)) is None
    assert loopback_peer_uid(("127.0.0.1", 40000), ("192.0.2.1", 7947)) is None
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:127.0.0.1")
    assert is_loopback("localhost") and is_loopback("127.8.9.10")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("example.com")


def test_an_ipv4_client_of_a_dual_stack_listener_is_found() -> None:
    with socket.socket(socket.AF_INET6) as srv:
        srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        srv.bind(("::", 0))
        srv.listen()
        os.seteuid(NOBODY)
        try:
            client = socket.socket(socket.AF_INET)
        finally:
            os.seteuid(0)
        with client:
            client.connect(("127.0.0.1", srv.getsockname()[1]))
            conn, _ = srv.accept()
            with conn:
                peer, local = conn.getpeername()[:2], conn.getsockname()[:2]
                assert peer[0] == "::ffff:127.0.0.1"
                assert loopback_peer_uid(peer, local) == NOBODY
