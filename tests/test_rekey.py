"""dataplane.rekey: the in-band rekey state machine, two ends wired back to back without I/O.

The records travel between the two machines as the session would carry them
(control records, in wire order); the keys each Step names are checked by
encrypting with one end and decrypting with the other.
"""

from __future__ import annotations

import pytest

from dataplane.handshake import PREAMBLE, Initiation, ReplayGuard, respond
from dataplane.noise import CipherState, NoiseError, generate_keypair
from dataplane.rekey import CONTROL_MIN, REKEY_INIT, REKEY_REPLY, REKEY_SWITCH, Rekey, Step

A_PRIVATE, A_PUBLIC = generate_keypair()
B_PRIVATE, B_PUBLIC = generate_keypair()


class End:
    """One session end: its current keys and its rekey machine, updated as a session would."""

    def __init__(self, rekey: Rekey, send: CipherState, recv: CipherState) -> None:
        self.rekey = rekey
        self.send = send
        self.recv = recv

    def apply(self, step: Step) -> bytes | None:
        """Take a step's receive key now, and its send key right after its record goes out."""
        if step.recv is not None:
            self.recv = step.recv
        if step.next_send is not None:
            self.send = step.next_send
            self.rekey.send_switched()
        return step.send


def session() -> tuple[End, End]:
    """Both ends of a fresh session: ``a`` initiated it."""
    directory = {A_PUBLIC: "a", B_PUBLIC: "b"}
    initiation = Initiation(A_PRIVATE, B_PUBLIC, "a", 1)
    msg1 = initiation.first_flight[len(PREAMBLE) + 2 :]  # past the preamble and the length
    b_keys, reply = respond(B_PRIVATE, "b", msg1, directory.get, ReplayGuard(lambda key: True))
    a_keys = initiation.finish(reply[2:])
    a = End(Rekey(A_PRIVATE, B_PUBLIC, a_keys.handshake_hash, initiator=True), a_keys.send, a_keys.recv)
    b = End(Rekey(B_PRIVATE, A_PUBLIC, b_keys.handshake_hash, initiator=False), b_keys.send, b_keys.recv)
    return a, b


def in_step(x: End, y: End) -> bool:
    """Each direction's sender and receiver share a key."""
    return (
        y.recv.decrypt_with_ad(b"", x.send.encrypt_with_ad(b"", b"x->y")) == b"x->y"
        and x.recv.decrypt_with_ad(b"", y.send.encrypt_with_ad(b"", b"y->x")) == b"y->x"
    )


def keys(end: End) -> tuple[bytes | None, bytes | None]:
    return end.send._k, end.recv._k


def rekey(starter: End, other: End) -> None:
    init = starter.rekey.start()
    assert init is not None and init[0] == REKEY_INIT and init[0] >= CONTROL_MIN
    reply = other.apply(other.rekey.receive(init))
    assert reply is not None and reply[0] == REKEY_REPLY
    switch = starter.apply(starter.rekey.receive(reply))
    assert switch == bytes([REKEY_SWITCH])
    assert other.apply(other.rekey.receive(switch)) is None


def test_one_rekey_switches_each_direction_at_its_own_record() -> None:
    a, b = session()
    before_a, before_b = keys(a), keys(b)
    init = a.rekey.start()
    assert init is not None and a.rekey.state == "initiated"
    assert a.rekey.start() is None  # one rekey at a time

    step = b.rekey.receive(init)
    assert b.rekey.state == "awaiting_switch"
    assert step.send is not None and step.send[0] == REKEY_REPLY
    assert step.next_send is not None and step.recv is None and not step.rekeyed
    b.apply(step)  # b sends under the new key right after its REPLY...

    step = a.rekey.receive(step.send)
    assert step.recv is not None and step.rekeyed  # ...so a reads with it right after the REPLY
    assert step.send == bytes([REKEY_SWITCH]) and step.next_send is not None
    assert a.rekey.state == "switching"
    a.recv = step.recv
    a.send = step.next_send
    a.rekey.send_switched()
    assert a.rekey.state == "idle"

    step = b.rekey.receive(bytes([REKEY_SWITCH]))
    assert step.recv is not None and step.rekeyed and step.send is None and step.next_send is None
    b.recv = step.recv
    assert b.rekey.state == "idle"
    assert keys(a) != before_a and keys(b) != before_b
    assert in_step(a, b)


def test_rekeys_chain_and_keep_both_ends_in_step() -> None:
    a, b = session()
    seen = {keys(a)}
    for starter, other in [(a, b), (b, a), (a, b), (a, b), (b, a)]:
        rekey(starter, other)
        assert starter.rekey.state == other.rekey.state == "idle"
        assert in_step(a, b)
        assert keys(a) not in seen
        seen.add(keys(a))


def test_crossing_inits_resolve_to_the_session_initiators_rekey() -> None:
    a, b = session()
    init_a, init_b = a.rekey.start(), b.rekey.start()
    assert init_a is not None and init_b is not None
    # b's INIT was sent before b read a's: a, the session's initiator, ignores it.
    assert a.rekey.receive(init_b) == Step()
    assert a.rekey.state == "initiated" and a.rekey.collisions == 1
    # b drops its own handshake and answers a's.
    reply = b.apply(b.rekey.receive(init_a))
    assert reply is not None and b.rekey.state == "awaiting_switch" and b.rekey.collisions == 1
    switch = a.apply(a.rekey.receive(reply))
    assert switch is not None
    b.apply(b.rekey.receive(switch))
    assert a.rekey.state == b.rekey.state == "idle"
    assert in_step(a, b)
    rekey(b, a)  # and the next one starts from a clean state
    assert in_step(a, b)


@pytest.mark.parametrize(
    "record",
    [
        bytes([REKEY_REPLY]) + bytes(48),  # no rekey started
        bytes([REKEY_SWITCH]),  # nothing to switch to
        bytes([REKEY_SWITCH, 0]),  # a SWITCH carries nothing
        bytes([0x81]),  # unknown control record
        bytes([0xFF]) + b"future",
    ],
)
def test_records_out_of_turn_or_unknown_fail(record: bytes) -> None:
    _, b = session()
    with pytest.raises(NoiseError):
        b.rekey.receive(record)


def test_an_init_while_awaiting_the_switch_fails() -> None:
    a, b = session()
    init = a.rekey.start()
    assert init is not None
    b.rekey.receive(init)
    with pytest.raises(NoiseError, match="while awaiting_switch"):
        b.rekey.receive(init)


def test_a_reply_while_switching_fails() -> None:
    a, b = session()
    init = a.rekey.start()
    assert init is not None
    reply = b.rekey.receive(init).send
    assert reply is not None
    a.rekey.receive(reply)
    with pytest.raises(NoiseError):
        a.rekey.receive(reply)


def test_a_corrupt_init_or_reply_does_not_verify() -> None:
    a, b = session()
    init = a.rekey.start()
    assert init is not None
    with pytest.raises(NoiseError):
        b.rekey.receive(init[:-1] + bytes([init[-1] ^ 1]))
    a, b = session()
    init = a.rekey.start()
    assert init is not None
    reply = b.rekey.receive(init).send
    assert reply is not None
    with pytest.raises(NoiseError):
        a.rekey.receive(reply[:-1] + bytes([reply[-1] ^ 1]))


def test_only_the_peers_static_key_can_rekey() -> None:
    """A thief of the traffic keys, without the peer's static key, cannot start a rekey."""
    a, b = session()
    thief_private, _ = generate_keypair()
    thief = Rekey(thief_private, B_PUBLIC, a.rekey._hs_hash, initiator=True)
    init = thief.start()
    assert init is not None
    with pytest.raises(NoiseError, match="another static key"):
        b.rekey.receive(init)


def test_a_rekey_binds_to_this_session_transcript() -> None:
    """An INIT made for another session (another handshake hash) does not verify here."""
    _, b = session()
    other_a, _ = session()
    init = other_a.rekey.start()
    assert init is not None
    with pytest.raises(NoiseError):
        b.rekey.receive(init)


def test_send_switched_ends_only_the_initiators_switching_state() -> None:
    """The rekey responder switches its send key after its REPLY, but still waits for the SWITCH."""
    a, b = session()
    init = a.rekey.start()
    assert init is not None
    b.rekey.receive(init)
    b.rekey.send_switched()
    assert b.rekey.state == "awaiting_switch"
