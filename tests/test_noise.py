"""dataplane.noise: Noise_IK_25519_ChaChaPoly_BLAKE2b against cacophony vectors, and its failure modes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nacl.bindings
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane import noise
from dataplane.noise import (
    MAX_MESSAGE,
    MAX_NONCE,
    PROTOCOL_NAME,
    CipherState,
    HandshakeState,
    NoiseError,
    generate_keypair,
)

SETTINGS = settings(derandomize=True, deadline=None, database=None, max_examples=50)

SHARED_VECTORS = Path(__file__).resolve().parents[2] / "shared" / "vectors" / "cacophony.txt"
# The IK vector copied into the repo (public domain), used when shared/ is not beside the checkout.
LOCAL_VECTORS = Path(__file__).resolve().parent / "vectors" / "noise_ik_cacophony.json"
VECTORS_FILE = SHARED_VECTORS if SHARED_VECTORS.exists() else LOCAL_VECTORS
VECTORS_MISSING = f"cacophony test vectors not found at {SHARED_VECTORS} or {LOCAL_VECTORS}"

# Fixed keys for deterministic handshakes (any 32 bytes is a valid X25519 private key).
I_STATIC = bytes(range(1, 33))
R_STATIC = bytes(range(101, 133))
I_EPHEMERAL = bytes(range(201, 233))
R_EPHEMERAL = bytes(range(33, 65))
R_STATIC_PUB = nacl.bindings.crypto_scalarmult_base(R_STATIC)
I_STATIC_PUB = nacl.bindings.crypto_scalarmult_base(I_STATIC)

# X25519 inputs whose DH output is all zeros (RFC 7748 section 6.1; small-order u-coordinates).
LOW_ORDER_POINTS = [
    b"\x00" * 32,
    b"\x01" + b"\x00" * 31,
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
]


def _ik_vectors() -> list[Any]:
    if not VECTORS_FILE.exists():
        return [pytest.param(None, marks=pytest.mark.skip(reason=VECTORS_MISSING))]
    vectors = json.loads(VECTORS_FILE.read_text())["vectors"]
    selected = [v for v in vectors if v.get("protocol_name") == PROTOCOL_NAME.decode()]
    return [pytest.param(v, id=f"vector{i}") for i, v in enumerate(selected)]


def pair(
    prologue: bytes = b"", resp_prologue: bytes | None = None, responder_static: bytes = R_STATIC
) -> tuple[HandshakeState, HandshakeState]:
    """Deterministic initiator/responder, so a message can be regenerated for every tampering case."""
    initiator = HandshakeState.initiator(I_STATIC, R_STATIC_PUB, prologue, I_EPHEMERAL)
    responder = HandshakeState.responder(
        responder_static, prologue if resp_prologue is None else resp_prologue, R_EPHEMERAL
    )
    return initiator, responder


def handshake(
    initiator: HandshakeState, responder: HandshakeState, p1: bytes = b"hello", p2: bytes = b"welcome"
) -> tuple[bytes, bytes]:
    m1 = initiator.write_message(p1)
    assert responder.read_message(m1) == p1
    m2 = responder.write_message(p2)
    assert initiator.read_message(m2) == p2
    return m1, m2


def flip(message: bytes, index: int) -> bytes:
    return message[:index] + bytes([message[index] ^ 0x01]) + message[index + 1 :]


# --- cacophony vectors -------------------------------------------------------------------------


def test_vector_file_has_an_ik_vector() -> None:
    if not VECTORS_FILE.exists():
        pytest.skip(VECTORS_MISSING)
    assert _ik_vectors(), f"no {PROTOCOL_NAME.decode()} vector in {VECTORS_FILE}"


@pytest.mark.parametrize("vector", _ik_vectors())
def test_cacophony_vector(vector: dict[str, Any]) -> None:
    h = bytes.fromhex
    initiator = HandshakeState.initiator(
        h(vector["init_static"]),
        h(vector["init_remote_static"]),
        prologue=h(vector["init_prologue"]),
        ephemeral_private=h(vector["init_ephemeral"]),
    )
    responder = HandshakeState.responder(
        h(vector["resp_static"]),
        prologue=h(vector["resp_prologue"]),
        ephemeral_private=h(vector["resp_ephemeral"]),
    )
    sides = (initiator, responder)
    messages = vector["messages"]
    assert len(messages) >= 2

    # Handshake: IK has two messages, initiator first.
    for i, msg in enumerate(messages[:2]):
        sender, receiver = sides[i % 2], sides[(i + 1) % 2]
        payload, expected = h(msg["payload"]), h(msg["ciphertext"])
        ciphertext = sender.write_message(payload)
        assert ciphertext.hex() == expected.hex(), f"handshake message {i}"
        assert receiver.read_message(ciphertext) == payload

    assert initiator.complete and responder.complete
    assert initiator.handshake_hash.hex() == vector["handshake_hash"]
    assert responder.handshake_hash == initiator.handshake_hash
    assert responder.remote_static == nacl.bindings.crypto_scalarmult_base(h(vector["init_static"]))

    # Transport: still alternating, encrypted with the split cipher states and empty AD.
    init_send, init_recv = initiator.split()
    resp_send, resp_recv = responder.split()
    # Every other pair of messages goes through the tunnel's in-place fast path,
    # which must produce exactly the same transport messages.
    for i, msg in enumerate(messages[2:], start=2):
        send, recv = (init_send, resp_recv) if i % 2 == 0 else (resp_send, init_recv)
        payload, expected = h(msg["payload"]), h(msg["ciphertext"])
        if i % 4 < 2:
            ciphertext = send.encrypt_with_ad(b"", payload)
            assert ciphertext.hex() == expected.hex(), f"transport message {i}"
            assert recv.decrypt_with_ad(b"", ciphertext) == payload
        else:
            framed = bytearray(len(payload) + 18)
            assert send.encrypt_framed_into(memoryview(framed), memoryview(payload)) == len(framed)
            assert bytes(framed) == len(expected).to_bytes(2, "big") + expected, f"transport message {i}"
            assert bytes(recv.decrypt_view(memoryview(framed)[2:])) == payload


# --- round trips -------------------------------------------------------------------------------


@SETTINGS
@given(
    st.binary(max_size=512),
    st.binary(max_size=512),
    st.lists(st.tuples(st.booleans(), st.binary(max_size=2048)), max_size=8),
    st.binary(max_size=64),
)
def test_round_trip_random_keys(p1: bytes, p2: bytes, transport: list[tuple[bool, bytes]], prologue: bytes) -> None:
    i_priv, i_pub = generate_keypair()
    r_priv, r_pub = generate_keypair()
    initiator = HandshakeState.initiator(i_priv, r_pub, prologue)
    responder = HandshakeState.responder(r_priv, prologue)
    assert responder.remote_static is None

    m1 = initiator.write_message(p1)
    assert len(m1) == 32 + 48 + len(p1) + 16
    assert responder.read_message(m1) == p1
    assert responder.remote_static == i_pub
    assert initiator.remote_static == r_pub
    assert not responder.complete
    m2 = responder.write_message(p2)
    assert len(m2) == 32 + len(p2) + 16
    assert initiator.read_message(m2) == p2
    assert initiator.complete and responder.complete
    assert initiator.handshake_hash == responder.handshake_hash
    assert len(initiator.handshake_hash) == 64

    i_send, i_recv = initiator.split()
    r_send, r_recv = responder.split()
    for from_initiator, payload in transport:
        send, recv = (i_send, r_recv) if from_initiator else (r_send, i_recv)
        ciphertext = send.encrypt_with_ad(b"", payload)
        assert len(ciphertext) == len(payload) + 16
        assert recv.decrypt_with_ad(b"", ciphertext) == payload


def test_split_directions_are_independent() -> None:
    initiator, responder = pair()
    handshake(initiator, responder)
    i_send, i_recv = initiator.split()
    r_send, r_recv = responder.split()
    c = i_send.encrypt_with_ad(b"", b"to responder")
    with pytest.raises(NoiseError):
        i_recv.decrypt_with_ad(b"", c)  # a side cannot read its own traffic
    assert r_recv.decrypt_with_ad(b"", c) == b"to responder"
    assert i_recv.decrypt_with_ad(b"", r_send.encrypt_with_ad(b"", b"to initiator")) == b"to initiator"


def test_fresh_ephemerals_give_fresh_sessions() -> None:
    hashes = set()
    for _ in range(3):
        initiator = HandshakeState.initiator(I_STATIC, R_STATIC_PUB)
        responder = HandshakeState.responder(R_STATIC)
        handshake(initiator, responder)
        hashes.add(initiator.handshake_hash)
    assert len(hashes) == 3


def test_generate_keypair() -> None:
    private, public = generate_keypair()
    assert len(private) == len(public) == 32
    assert nacl.bindings.crypto_scalarmult_base(private) == public
    assert generate_keypair()[0] != private


# --- authentication failures -------------------------------------------------------------------


def test_tampering_any_byte_of_message_1_fails() -> None:
    m1 = pair()[0].write_message(b"payload")
    for index in range(len(m1)):
        _, responder = pair()
        with pytest.raises(NoiseError):
            responder.read_message(flip(m1, index))
        assert responder.remote_static is None, "no identity from an unverified message"


def test_tampering_any_byte_of_message_2_fails() -> None:
    initiator, responder = pair()
    responder.read_message(initiator.write_message(b"hello"))
    m2 = responder.write_message(b"payload")
    for index in range(len(m2)):
        initiator, _ = pair()
        initiator.write_message(b"hello")  # deterministic: the same message 1 as above
        with pytest.raises(NoiseError):
            initiator.read_message(flip(m2, index))


def test_truncated_and_extended_messages_fail() -> None:
    initiator, _ = pair()
    m1 = initiator.write_message(b"payload")
    for bad in (b"", m1[:31], m1[:95], m1[:-1], m1 + b"\x00"):
        _, responder = pair()
        with pytest.raises(NoiseError):
            responder.read_message(bad)


def test_wrong_responder_key_fails() -> None:
    other_private, _ = generate_keypair()
    initiator, responder = pair(responder_static=other_private)
    with pytest.raises(NoiseError, match="authentication failed"):
        responder.read_message(initiator.write_message(b"hi"))


def test_prologue_mismatch_fails() -> None:
    initiator, responder = pair(prologue=b"mesh v1", resp_prologue=b"mesh v2")
    with pytest.raises(NoiseError):
        responder.read_message(initiator.write_message(b"hi"))


def test_responder_learns_whichever_static_key_the_initiator_holds() -> None:
    # Any key pair completes message 1: the handshake proves possession, not membership, so the
    # responder must check remote_static against membership itself.
    impostor_private, impostor_public = generate_keypair()
    initiator = HandshakeState.initiator(impostor_private, R_STATIC_PUB)
    responder = HandshakeState.responder(R_STATIC)
    responder.read_message(initiator.write_message(b""))
    assert responder.remote_static == impostor_public != I_STATIC_PUB


@pytest.mark.parametrize("point", LOW_ORDER_POINTS, ids=["zero", "one", "order8"])
def test_low_order_remote_static_is_rejected(point: bytes) -> None:
    initiator = HandshakeState.initiator(I_STATIC, point)
    with pytest.raises(NoiseError, match="invalid DH public key"):
        initiator.write_message(b"")


@pytest.mark.parametrize("point", LOW_ORDER_POINTS, ids=["zero", "one", "order8"])
def test_low_order_ephemeral_is_rejected(point: bytes) -> None:
    m1 = pair()[0].write_message(b"")
    _, responder = pair()
    with pytest.raises(NoiseError, match="invalid DH public key"):
        responder.read_message(point + m1[32:])

    initiator, responder = pair()
    responder.read_message(initiator.write_message(b""))
    m2 = responder.write_message(b"")
    with pytest.raises(NoiseError, match="invalid DH public key"):
        initiator.read_message(point + m2[32:])


# --- state machine -----------------------------------------------------------------------------


def test_out_of_order_calls_raise() -> None:
    initiator, responder = pair()
    with pytest.raises(NoiseError, match="out of order"):
        responder.write_message(b"")
    with pytest.raises(NoiseError, match="out of order"):
        initiator.read_message(b"\x00" * 48)
    m1 = initiator.write_message(b"")
    with pytest.raises(NoiseError, match="out of order"):
        initiator.write_message(b"")
    with pytest.raises(NoiseError, match="not complete"):
        initiator.split()
    with pytest.raises(NoiseError, match="not complete"):
        _ = initiator.handshake_hash
    responder.read_message(m1)
    with pytest.raises(NoiseError, match="out of order"):
        responder.read_message(m1)  # replay of message 1 to the same responder
    # The rejected calls did not disturb either side.
    assert initiator.read_message(responder.write_message(b"ok")) == b"ok"


def test_replayed_message_2_raises() -> None:
    initiator, responder = pair()
    _, m2 = handshake(initiator, responder)
    with pytest.raises(NoiseError, match="complete"):
        initiator.read_message(m2)
    with pytest.raises(NoiseError, match="complete"):
        responder.write_message(b"")


def test_message_2_from_another_handshake_fails() -> None:
    initiator = HandshakeState.initiator(I_STATIC, R_STATIC_PUB)  # fresh ephemeral
    initiator.write_message(b"hello")
    _, m2 = handshake(*pair())  # same static keys, different session
    with pytest.raises(NoiseError, match="authentication failed"):
        initiator.read_message(m2)


def test_message_1_replay_reaches_a_fresh_responder_but_cannot_complete() -> None:
    # IK property (spec section 7.7): message 1 is replayable; liveness comes only from transport data.
    initiator = HandshakeState.initiator(I_STATIC, R_STATIC_PUB)
    m1 = initiator.write_message(b"hello")
    first = HandshakeState.responder(R_STATIC)
    first.read_message(m1)
    initiator.read_message(first.write_message(b""))
    i_send, _ = initiator.split()

    replayed = HandshakeState.responder(R_STATIC)
    assert replayed.read_message(m1) == b"hello"
    replayed.write_message(b"")
    _, replayed_recv = replayed.split()
    with pytest.raises(NoiseError):
        replayed_recv.decrypt_with_ad(b"", i_send.encrypt_with_ad(b"", b"data"))


def test_failed_handshake_stays_failed() -> None:
    initiator, responder = pair()
    m1 = initiator.write_message(b"")
    with pytest.raises(NoiseError):
        responder.read_message(flip(m1, 40))
    with pytest.raises(NoiseError, match="already failed"):
        responder.read_message(m1)


def test_split_only_once() -> None:
    initiator, responder = pair()
    handshake(initiator, responder)
    initiator.split()
    with pytest.raises(NoiseError, match="already split"):
        initiator.split()
    assert len(initiator.handshake_hash) == 64  # still available for channel binding


def test_bytes_like_inputs_are_accepted_but_not_ints() -> None:
    initiator, responder = pair()
    m1 = initiator.write_message(bytearray(b"hi"))  # type: ignore[arg-type]  # runtime leniency for recv buffers
    assert responder.read_message(memoryview(m1)) == b"hi"  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        responder.write_message(5)  # type: ignore[arg-type]  # bytes(5) would be five zero bytes


# --- sizes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: HandshakeState.initiator(I_STATIC[:31], R_STATIC_PUB),
        lambda: HandshakeState.initiator(I_STATIC, R_STATIC_PUB + b"\x00"),
        lambda: HandshakeState.initiator(I_STATIC, R_STATIC_PUB, ephemeral_private=b"\x01" * 16),
        lambda: HandshakeState.responder(b""),
        lambda: HandshakeState.responder(R_STATIC, ephemeral_private=R_EPHEMERAL * 2),
        lambda: CipherState(b"\x00" * 16),
        lambda: CipherState(b"\x00" * 33),
    ],
    ids=["short-static", "long-remote", "short-ephemeral", "empty-responder", "long-ephemeral", "key16", "key33"],
)
def test_wrong_key_sizes_raise(make: Any) -> None:
    with pytest.raises(NoiseError, match="bytes"):
        make()


def test_handshake_message_size_limit() -> None:
    initiator, responder = pair()
    with pytest.raises(NoiseError, match="too long"):
        initiator.write_message(b"\x00" * (MAX_MESSAGE - 96 + 1))
    m1 = initiator.write_message(b"\x00" * (MAX_MESSAGE - 96))  # the failed call left the state usable
    assert len(m1) == MAX_MESSAGE
    responder.read_message(m1)
    with pytest.raises(NoiseError, match="too long"):
        responder.write_message(b"\x00" * (MAX_MESSAGE - 48 + 1))
    assert len(responder.write_message(b"\x00" * (MAX_MESSAGE - 48))) == MAX_MESSAGE

    _, fresh = pair()
    with pytest.raises(NoiseError, match="too long"):
        fresh.read_message(m1 + b"\x00")


def test_transport_message_size_limit() -> None:
    send, recv = CipherState(b"\x07" * 32), CipherState(b"\x07" * 32)
    with pytest.raises(NoiseError, match="too long"):
        send.encrypt_with_ad(b"", b"\x00" * (MAX_MESSAGE - 16 + 1))
    ciphertext = send.encrypt_with_ad(b"", b"\x00" * (MAX_MESSAGE - 16))
    assert len(ciphertext) == MAX_MESSAGE
    assert recv.decrypt_with_ad(b"", ciphertext) == b"\x00" * (MAX_MESSAGE - 16)
    with pytest.raises(NoiseError, match="too long"):
        recv.decrypt_with_ad(b"", b"\x00" * (MAX_MESSAGE + 1))
    with pytest.raises(NoiseError, match="shorter than tag"):
        recv.decrypt_with_ad(b"", b"\x00" * 15)


def test_fast_path_matches_the_bindings_and_keeps_the_rules() -> None:
    """encrypt_framed_into / decrypt_view (OpenSSL, in place) against encrypt_with_ad /
    decrypt_with_ad (PyNaCl's libsodium): same bytes, same limits, and a forgery leaves
    the nonce alone."""
    key = b"\x05" * 32
    fast_send, slow_send = CipherState(key), CipherState(key)
    fast_recv, slow_recv = CipherState(key), CipherState(key)
    # Written at the start of the view it is given, around bytes that must survive.
    buf = bytearray(b"queued" + bytes(MAX_MESSAGE + 2) + b"after")
    room = memoryview(buf)[6:-5]
    for size in (0, 1, 1024, MAX_MESSAGE - 16):
        payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
        for form in (payload, bytearray(payload), memoryview(payload)):
            ciphertext = slow_send.encrypt_with_ad(b"", payload)
            n = fast_send.encrypt_framed_into(room, form)
            assert n == len(ciphertext) + 2
            assert bytes(room[:n]) == len(ciphertext).to_bytes(2, "big") + ciphertext
            assert slow_recv.decrypt_with_ad(b"", ciphertext) == payload
            assert bytes(fast_recv.decrypt_view(room[2:n])) == payload
    assert buf.startswith(b"queued") and buf.endswith(b"after")
    nonce = fast_send.nonce
    with pytest.raises(NoiseError, match="too long"):
        fast_send.encrypt_framed_into(room, b"\x00" * (MAX_MESSAGE - 16 + 1))
    with pytest.raises(ValueError, match="room"):
        fast_send.encrypt_framed_into(room[:1041], b"\x00" * 1024)  # needs 1042
    assert fast_send.nonce == nonce
    with pytest.raises(NoiseError, match="too long"):
        fast_recv.decrypt_view(b"\x00" * (MAX_MESSAGE + 1))
    with pytest.raises(NoiseError, match="shorter than tag"):
        fast_recv.decrypt_view(b"\x00" * 15)
    good = bytearray(slow_send.encrypt_with_ad(b"", b"next"))
    fast_send.encrypt_framed_into(room, b"next")  # keep the two senders in step
    nonce = fast_recv.nonce
    good[3] ^= 0x40
    with pytest.raises(NoiseError, match="authentication failed"):
        fast_recv.decrypt_view(good)
    assert fast_recv.nonce == nonce  # §5.1: only a successful decryption advances it
    good[3] ^= 0x40
    assert bytes(fast_recv.decrypt_view(good)) == b"next" and fast_recv.nonce == nonce + 1
    with pytest.raises(NoiseError, match="no key"):
        CipherState().encrypt_framed_into(room, b"x")
    with pytest.raises(NoiseError, match="no key"):
        CipherState().decrypt_view(b"x" * 16)


def test_rekey_changes_the_fast_paths_key_too() -> None:
    """The transport path keeps its own keyed cipher object: Rekey() (§4.2) must replace it."""
    key = b"\x06" * 32
    fast, slow = CipherState(key), CipherState(key)
    fast.rekey()
    slow.rekey()
    out = bytearray(15 + 18)
    fast.encrypt_framed_into(memoryview(out), b"after the rekey")
    assert bytes(out[2:]) == slow.encrypt_with_ad(b"", b"after the rekey")
    stale = CipherState(key)
    stale.set_nonce(fast.nonce - 1)
    with pytest.raises(NoiseError, match="authentication failed"):
        stale.decrypt_view(out[2:])


# --- CipherState -------------------------------------------------------------------------------


def test_nonce_increments_and_is_the_wire_nonce() -> None:
    key = b"\x09" * 32
    cipher = CipherState(key)
    assert cipher.has_key() and cipher.nonce == 0
    for n in range(3):
        ciphertext = cipher.encrypt_with_ad(b"ad", b"msg")
        assert cipher.nonce == n + 1
        nonce = b"\x00" * 4 + n.to_bytes(8, "little")
        assert ciphertext == nacl.bindings.crypto_aead_chacha20poly1305_ietf_encrypt(b"msg", b"ad", nonce, key)


def test_failed_decrypt_does_not_advance_nonce() -> None:
    send, recv = CipherState(b"\x05" * 32), CipherState(b"\x05" * 32)
    good = send.encrypt_with_ad(b"", b"data")
    with pytest.raises(NoiseError, match="authentication failed"):
        recv.decrypt_with_ad(b"", flip(good, 0))
    with pytest.raises(NoiseError, match="authentication failed"):
        recv.decrypt_with_ad(b"other ad", good)
    assert recv.nonce == 0
    assert recv.decrypt_with_ad(b"", good) == b"data"
    assert recv.nonce == 1


def test_nonce_exhaustion_raises() -> None:
    send, recv = CipherState(b"\x03" * 32), CipherState(b"\x03" * 32)
    send.set_nonce(MAX_NONCE - 1)
    recv.set_nonce(MAX_NONCE - 1)
    last = send.encrypt_with_ad(b"", b"last")  # 2^64-2 is the last usable nonce
    assert send.nonce == MAX_NONCE
    assert recv.decrypt_with_ad(b"", last) == b"last"
    with pytest.raises(NoiseError, match="nonce exhausted"):
        send.encrypt_with_ad(b"", b"one more")
    with pytest.raises(NoiseError, match="nonce exhausted"):
        recv.decrypt_with_ad(b"", last)
    with pytest.raises(NoiseError, match="out of range"):
        send.set_nonce(MAX_NONCE + 1)
    with pytest.raises(NoiseError, match="out of range"):
        send.set_nonce(-1)


def test_rekey_follows_spec_and_keeps_nonce() -> None:
    key = b"\x0b" * 32
    send, recv = CipherState(key), CipherState(key)
    recv.decrypt_with_ad(b"", send.encrypt_with_ad(b"", b"before"))
    send.rekey()
    assert send.nonce == 1  # section 11.3: Rekey does not reset n
    max_nonce = b"\x00" * 4 + MAX_NONCE.to_bytes(8, "little")
    new_key = nacl.bindings.crypto_aead_chacha20poly1305_ietf_encrypt(b"\x00" * 32, b"", max_nonce, key)[:32]
    ciphertext = send.encrypt_with_ad(b"", b"after")
    expected_nonce = b"\x00" * 4 + (1).to_bytes(8, "little")
    assert ciphertext == nacl.bindings.crypto_aead_chacha20poly1305_ietf_encrypt(b"after", b"", expected_nonce, new_key)
    with pytest.raises(NoiseError):
        recv.decrypt_with_ad(b"", ciphertext)  # only one side rekeyed
    recv.rekey()
    assert recv.decrypt_with_ad(b"", ciphertext) == b"after"


def test_unkeyed_cipher_state_is_identity() -> None:
    cipher = CipherState()
    assert not cipher.has_key()
    assert cipher.encrypt_with_ad(b"ad", b"plain") == b"plain"
    assert cipher.decrypt_with_ad(b"ad", b"plain") == b"plain"
    assert cipher.nonce == 0
    with pytest.raises(NoiseError, match="rekey without a key"):
        cipher.rekey()


def test_transport_before_the_fast_cipher_loads_is_the_same_and_moves_to_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Until OpenSSL's cipher is loaded, the transport path seals with libsodium: the same bytes,
    the same nonce rules, and the next message after the load goes through OpenSSL."""
    noise.load_fast_cipher()
    loaded = noise._Fast
    assert loaded is not None
    monkeypatch.setattr(noise, "_Fast", None)
    key = b"\x07" * 32
    send, recv, reference = CipherState(key), CipherState(key), CipherState(key)
    out = bytearray(64)
    for loaded_now in (False, True):
        if loaded_now:
            monkeypatch.setattr(noise, "_Fast", loaded)
        n = send.encrypt_framed_into(memoryview(out), b"message")
        ciphertext = reference.encrypt_with_ad(b"", b"message")
        assert bytes(out[2:n]) == ciphertext
        assert (send._aead is not None) is loaded_now
        forged = bytearray(ciphertext)
        forged[0] ^= 1
        with pytest.raises(NoiseError, match="authentication failed"):
            recv.decrypt_view(forged)
        assert bytes(recv.decrypt_view(ciphertext)) == b"message"
        assert (recv._aead is not None) is loaded_now


def test_the_first_split_asks_for_the_fast_cipher_once(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[None] = []
    monkeypatch.setattr(noise, "_Fast", None)
    monkeypatch.setattr(noise, "_wanted", False)
    monkeypatch.setattr(noise, "fast_cipher_wanted", lambda: asked.append(None))
    for before in ([], [None]):
        init_s, _ = generate_keypair()
        resp_s, resp_pub = generate_keypair()
        i = HandshakeState.initiator(init_s, resp_pub)
        r = HandshakeState.responder(resp_s)
        r.read_message(i.write_message(b""))
        i.read_message(r.write_message(b""))
        assert asked == before  # the handshake's own keys are libsodium's
        i.split()
        r.split()
        assert asked == [None]
