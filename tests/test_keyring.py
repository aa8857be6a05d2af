"""gossip.keyring: sealing, opening with any installed key, rotation rules."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip.keyring import (
    KEY_SIZE,
    NONCE_SIZE,
    SEAL_OVERHEAD,
    SEAL_VERSION,
    KeyError_,
    Keyring,
    OpenError,
    decode_key,
    encode_key,
    generate_key,
)

SETTINGS = settings(derandomize=True, deadline=None, database=None, max_examples=50)

K1, K2, K3 = (bytes([i]) * KEY_SIZE for i in (1, 2, 3))


def test_seal_overhead_is_version_nonce_and_tag() -> None:
    assert SEAL_OVERHEAD == 1 + NONCE_SIZE + 16
    sealed = Keyring(K1).seal(b"hello")
    assert len(sealed) == len(b"hello") + SEAL_OVERHEAD
    assert sealed[0] == SEAL_VERSION
    assert b"hello" not in sealed


@SETTINGS
@given(st.binary(max_size=2000), st.binary(max_size=32))
def test_seal_open_round_trip(plaintext: bytes, aad: bytes) -> None:
    ring = Keyring(K1)
    sealed = ring.seal(plaintext, aad)
    assert len(sealed) == len(plaintext) + SEAL_OVERHEAD
    assert ring.open(sealed, aad) == plaintext


def test_nonces_are_fresh() -> None:
    ring = Keyring(K1)
    assert len({ring.seal(b"same") for _ in range(50)}) == 50


def test_open_with_any_installed_key() -> None:
    old, new = Keyring(K1), Keyring(K2)
    both = Keyring(K2, [K1])
    assert both.open(old.seal(b"from old")) == b"from old"
    assert both.open(new.seal(b"from new")) == b"from new"
    # Sealing uses the primary only: a node with just the old key cannot read it.
    with pytest.raises(OpenError):
        old.open(both.seal(b"x"))
    assert new.open(both.seal(b"x")) == b"x"


def test_foreign_key_cannot_open() -> None:
    with pytest.raises(OpenError):
        Keyring(K1, [K2]).open(Keyring(K3).seal(b"secret"))


def test_wrong_associated_data_cannot_open() -> None:
    ring = Keyring(K1)
    with pytest.raises(OpenError):
        ring.open(ring.seal(b"x", b"udp"), b"tcp")


@SETTINGS
@given(st.binary(min_size=1, max_size=200), st.data())
def test_any_tampered_byte_is_rejected(plaintext: bytes, data: st.DataObject) -> None:
    ring = Keyring(K1)
    sealed = bytearray(ring.seal(plaintext))
    i = data.draw(st.integers(min_value=0, max_value=len(sealed) - 1), label="index")
    flip = data.draw(st.integers(min_value=1, max_value=255), label="xor")
    sealed[i] ^= flip
    with pytest.raises(OpenError):
        ring.open(bytes(sealed))


@pytest.mark.parametrize("payload", [b"", b"\x01", bytes([SEAL_VERSION]) * (SEAL_OVERHEAD - 1),
                                     b"\x02" + bytes(SEAL_OVERHEAD), b"plain text packet" * 4])
def test_short_or_unversioned_payloads_are_rejected(payload: bytes) -> None:
    with pytest.raises(OpenError):
        Keyring(K1).open(payload)


@SETTINGS
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_open_error(payload: bytes) -> None:
    with pytest.raises(OpenError):
        Keyring(K1).open(payload)


def test_rotation_use_and_remove() -> None:
    ring = Keyring(K1)
    ring.install(K2)
    ring.install(K2)  # installing twice is a no-op
    assert ring.keys == [K1, K2] and ring.primary == K1
    ring.use(K2)
    assert ring.primary == K2 and ring.keys == [K2, K1]
    assert Keyring(K1).open(Keyring(K1, [K2]).seal(b"a")) == b"a"
    assert Keyring(K2).open(ring.seal(b"b")) == b"b"  # sealed with the new primary
    ring.remove(K1)
    assert ring.keys == [K2]
    with pytest.raises(OpenError):
        ring.open(Keyring(K1).seal(b"old"))
    with pytest.raises(KeyError_, match="not installed"):
        ring.remove(K3)  # said, so that nobody is told it was removed
    assert ring.keys == [K2]


def test_removing_the_primary_is_refused() -> None:
    ring = Keyring(K1, [K2])
    with pytest.raises(KeyError_):
        ring.remove(K1)
    assert ring.keys == [K1, K2]
    assert ring.open(ring.seal(b"still works")) == b"still works"


def test_use_requires_an_installed_key() -> None:
    ring = Keyring(K1)
    with pytest.raises(KeyError_):
        ring.use(K2)
    assert ring.primary == K1


@pytest.mark.parametrize("bad", [b"", b"short", bytes(KEY_SIZE + 1)])
def test_keys_must_be_32_bytes(bad: bytes) -> None:
    with pytest.raises(KeyError_):
        Keyring(bad)
    with pytest.raises(KeyError_):
        Keyring(K1).install(bad)
    with pytest.raises(KeyError_):
        Keyring(K1, [bad])


def test_generate_encode_decode_key() -> None:
    text = generate_key()
    raw = decode_key(text)
    assert len(raw) == KEY_SIZE and encode_key(raw) == text
    assert decode_key(f"  {text}\n") == raw
    assert generate_key() != text


@pytest.mark.parametrize("text", [
    "",
    "not base64!",
    base64.b64encode(bytes(16)).decode(),  # valid base64, wrong length
    base64.b64encode(bytes(33)).decode(),
    base64.b64encode(bytes(KEY_SIZE)).decode()[:-1],  # bad padding
    "é" * 44,  # not ASCII
])
def test_decode_key_errors(text: str) -> None:
    with pytest.raises(KeyError_):
        decode_key(text)


def test_key_error_is_a_value_error() -> None:
    assert issubclass(KeyError_, ValueError)
