"""dataplane.handshake: the HELLO codec, the preamble, both sides' checks, and the replay table, without I/O."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane.handshake import (
    MAX_NAME,
    PREAMBLE,
    REFUSAL_REASONS,
    Initiation,
    Refused,
    ReplayGuard,
    check_preamble,
    decode_hello,
    encode_hello,
    framed,
    respond,
    tai64n,
)
from dataplane.noise import HandshakeState, NoiseError, generate_keypair

SETTINGS = settings(derandomize=True, deadline=None, database=None, max_examples=100)

A_PRIVATE, A_PUBLIC = generate_keypair()
B_PRIVATE, B_PUBLIC = generate_keypair()
T0 = 1_700_000_000_123_456_789


def members(**by_name: bytes) -> dict[bytes, str]:
    return {key: name for name, key in by_name.items()}


def unframe(message: bytes) -> bytes:
    n = int.from_bytes(message[:2], "big")
    assert len(message) == 2 + n
    return message[2:]


def message1(initiation: Initiation) -> bytes:
    assert initiation.first_flight.startswith(PREAMBLE)
    return unframe(initiation.first_flight[len(PREAMBLE) :])


def guard(directory: dict[bytes, str]) -> ReplayGuard:
    return ReplayGuard(lambda key: key in directory)


# -- the HELLO ----------------------------------------------------------------------------------


def test_tai64n_counts_from_2_to_the_62_plus_the_1970_offset() -> None:
    assert tai64n(0) == (2**62 + 10).to_bytes(8, "big") + bytes(4)
    assert tai64n(1_500_000_001) == (2**62 + 11).to_bytes(8, "big") + (500_000_001).to_bytes(4, "big")


@SETTINGS
@given(unix_ns=st.integers(0, 2**62), name=st.text(min_size=1, max_size=60).filter(lambda n: len(n.encode()) <= 255))
def test_hello_round_trips(unix_ns: int, name: str) -> None:
    assert decode_hello(encode_hello(unix_ns, name)) == (unix_ns, name)


def test_hello_orders_like_its_timestamps() -> None:
    """Big-endian labels compare as the times they encode, so a newer HELLO is a larger one."""
    assert tai64n(T0) < tai64n(T0 + 1) < tai64n(T0 + 10**9)


@pytest.mark.parametrize("name", ["", "x" * (MAX_NAME + 1), "é" * 128])
def test_encode_hello_refuses_names_outside_1_to_255_bytes(name: str) -> None:
    with pytest.raises(ValueError):
        encode_hello(T0, name)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        tai64n(T0),  # no name
        tai64n(T0) + b"x" * (MAX_NAME + 1),
        (2**62).to_bytes(8, "big") + (10**9).to_bytes(4, "big") + b"a",  # nanoseconds out of range
        tai64n(T0) + b"\xff\xfe",  # not UTF-8
    ],
)
def test_decode_hello_refuses_malformed_payloads(payload: bytes) -> None:
    with pytest.raises(ValueError):
        decode_hello(payload)


def test_framed_prefixes_a_big_endian_length() -> None:
    assert framed(b"abc") == b"\x00\x03abc"
    assert framed(b"x" * 300)[:2] == b"\x01\x2c"


# -- the preamble -------------------------------------------------------------------------------


def test_check_preamble_accepts_ours() -> None:
    check_preamble(PREAMBLE)


@pytest.mark.parametrize(
    ("preamble", "reason"),
    [
        (b"GET /", "bad_magic"),
        (b"\x16\x03\x01\x00\x01", "bad_magic"),  # a TLS client hello
        (b"ME", "bad_handshake"),  # ours so far, then the peer stopped
        (b"", "bad_handshake"),
        (b"MESH\x01", "bad_version"),
        (b"MESH\x03", "bad_version"),
    ],
)
def test_check_preamble_names_the_refusal(preamble: bytes, reason: str) -> None:
    with pytest.raises(Refused) as info:
        check_preamble(preamble)
    assert info.value.reason == reason
    assert reason in REFUSAL_REASONS


# -- both sides ---------------------------------------------------------------------------------


def test_initiation_and_respond_agree_on_keys_and_transcript() -> None:
    directory = members(a=A_PUBLIC, b=B_PUBLIC)
    initiation = Initiation(A_PRIVATE, B_PUBLIC, "a", T0)
    theirs, reply = respond(B_PRIVATE, "b", message1(initiation), directory.get, guard(directory))
    ours = initiation.finish(unframe(reply))
    assert (theirs.peer, theirs.peer_static) == ("a", A_PUBLIC)
    assert (ours.peer, ours.peer_static) == ("b", B_PUBLIC)
    assert ours.handshake_hash == theirs.handshake_hash
    assert theirs.recv.decrypt_with_ad(b"", ours.send.encrypt_with_ad(b"", b"ping")) == b"ping"
    assert ours.recv.decrypt_with_ad(b"", theirs.send.encrypt_with_ad(b"", b"pong")) == b"pong"


def test_the_initiator_is_told_who_answered_and_checks_it_itself() -> None:
    """Established.peer is the responder's own word: the dialler compares it with whom it dialled."""
    directory = members(a=A_PUBLIC, b=B_PUBLIC)
    initiation = Initiation(A_PRIVATE, B_PUBLIC, "a", T0)
    _, reply = respond(B_PRIVATE, "impostor", message1(initiation), directory.get, guard(directory))
    assert initiation.finish(unframe(reply)).peer == "impostor"


def test_a_tampered_message2_does_not_verify() -> None:
    directory = members(a=A_PUBLIC, b=B_PUBLIC)
    initiation = Initiation(A_PRIVATE, B_PUBLIC, "a", T0)
    _, reply = respond(B_PRIVATE, "b", message1(initiation), directory.get, guard(directory))
    msg2 = bytearray(unframe(reply))
    msg2[-1] ^= 1
    with pytest.raises(NoiseError):
        initiation.finish(bytes(msg2))


def refusal(msg1: bytes, directory: dict[bytes, str], replay: ReplayGuard | None = None, name: str = "b") -> str:
    with pytest.raises(Refused) as info:
        respond(B_PRIVATE, name, msg1, directory.get, replay or guard(directory))
    assert info.value.reason in REFUSAL_REASONS
    return info.value.reason


def test_respond_refuses_a_key_membership_does_not_vouch_for() -> None:
    assert refusal(message1(Initiation(A_PRIVATE, B_PUBLIC, "a", T0)), members(b=B_PUBLIC)) == "unknown_key"


def test_respond_refuses_our_own_key() -> None:
    msg1 = message1(Initiation(B_PRIVATE, B_PUBLIC, "b", T0))
    assert refusal(msg1, members(a=A_PUBLIC, b=B_PUBLIC)) == "unknown_key"


def test_respond_refuses_a_member_claiming_another_name() -> None:
    msg1 = message1(Initiation(A_PRIVATE, B_PUBLIC, "c", T0))
    assert refusal(msg1, members(a=A_PUBLIC, b=B_PUBLIC)) == "name_mismatch"


def test_respond_refuses_message1_for_another_responder_or_garbage() -> None:
    other_private, other_public = generate_keypair()
    directory = members(a=A_PUBLIC, b=B_PUBLIC)
    assert refusal(message1(Initiation(A_PRIVATE, other_public, "a", T0)), directory) == "bad_handshake"
    assert refusal(b"\x00" * 120, directory) == "bad_handshake"


def test_respond_refuses_a_malformed_hello() -> None:
    hs = HandshakeState.initiator(A_PRIVATE, B_PUBLIC, prologue=PREAMBLE)
    assert refusal(hs.write_message(b"short"), members(a=A_PUBLIC, b=B_PUBLIC)) == "bad_handshake"


def test_respond_refuses_a_replayed_or_older_hello() -> None:
    directory = members(a=A_PUBLIC, b=B_PUBLIC)
    replay = guard(directory)
    first = message1(Initiation(A_PRIVATE, B_PUBLIC, "a", T0))
    respond(B_PRIVATE, "b", first, directory.get, replay)
    assert refusal(first, directory, replay) == "replay"
    assert refusal(message1(Initiation(A_PRIVATE, B_PUBLIC, "a", T0 - 1)), directory, replay) == "replay"
    respond(B_PRIVATE, "b", message1(Initiation(A_PRIVATE, B_PUBLIC, "a", T0 + 1)), directory.get, replay)


def test_a_refused_hello_leaves_the_replay_table_alone() -> None:
    """Only a HELLO that passed every other check may move a key's timestamp forward."""
    directory = members(a=A_PUBLIC, b=B_PUBLIC)
    replay = guard(directory)
    assert refusal(message1(Initiation(A_PRIVATE, B_PUBLIC, "c", T0)), directory, replay) == "name_mismatch"
    assert len(replay) == 0


# -- the replay table ---------------------------------------------------------------------------


def test_replay_guard_admits_only_newer_timestamps_per_key() -> None:
    replay = ReplayGuard(lambda key: True)
    assert replay.admit(b"k1", 10)
    assert not replay.admit(b"k1", 10)
    assert not replay.admit(b"k1", 9)
    assert replay.admit(b"k2", 5)  # each key has its own clock
    assert replay.admit(b"k1", 11)
    assert set(replay) == {b"k1", b"k2"} and b"k1" in replay


def test_replay_guard_prunes_former_members_when_it_fills() -> None:
    alive = {b"m1", b"m2"}
    replay = ReplayGuard(lambda key: key in alive, minimum=8)
    for key in (b"m1", b"m2", b"g1", b"g2", b"g3", b"g4", b"g5"):
        assert replay.admit(key, 1)
    assert len(replay) == 7 and replay.prune_at == 8  # below the threshold: nobody asked
    assert replay.admit(b"g6", 1)  # the 8th entry: prune
    assert set(replay) == {b"m1", b"m2"}
    assert replay.prune_at == 8  # twice the survivors, but never below the minimum


def test_replay_guard_threshold_doubles_with_what_survives() -> None:
    """Scans stay amortised O(1) per admission when most keys are members."""
    checks = 0

    def is_member(key: bytes) -> bool:
        nonlocal checks
        checks += 1
        return True

    replay = ReplayGuard(is_member, minimum=4)
    for i in range(4):
        replay.admit(bytes([i]), 1)
    assert checks == 4 and replay.prune_at == 8
    for i in range(4, 8):
        replay.admit(bytes([i]), 1)
    assert checks == 12 and replay.prune_at == 16
    for i in range(8, 15):
        replay.admit(bytes([i]), 1)
    assert checks == 12  # no scan until 16 entries
    assert len(replay) == 15


def test_replay_guard_forgets_a_pruned_key_entirely() -> None:
    """A key that left and rejoins starts afresh: a replayed message 1 from before still cannot
    finish a handshake, since the session needs a first record under the ephemeral key."""
    alive = {b"m"}
    replay = ReplayGuard(lambda key: key in alive, minimum=2)
    replay.admit(b"gone", 100)
    replay.admit(b"m", 1)  # prunes b"gone"
    assert b"gone" not in replay
    assert replay.admit(b"gone", 50)
