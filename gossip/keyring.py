"""The cluster keyring: seal with the primary key, open with any installed.

Holding several keys at once is what makes rotation possible without a
partition (install everywhere, switch primary, then remove), exactly as
memberlist's keyring does.  The cipher is XChaCha20-Poly1305 (PyNaCl ``Aead``):
its 24-byte nonce is large enough to draw at random for every packet.
"""

from __future__ import annotations

import base64
import binascii

import nacl.exceptions
import nacl.secret
import nacl.utils

KEY_SIZE = 32
#: First byte of every sealed payload, so the cipher can change later.
SEAL_VERSION = 1
NONCE_SIZE = nacl.secret.Aead.NONCE_SIZE
#: Bytes sealing adds: version + nonce + Poly1305 tag.
SEAL_OVERHEAD = 1 + NONCE_SIZE + nacl.secret.Aead.MACBYTES


class KeyError_(ValueError):
    """A key that is not 32 bytes of base64."""


class OpenError(Exception):
    """Nothing in the keyring authenticates this payload."""


def decode_key(text: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise KeyError_("key is not valid base64") from None
    if len(raw) != KEY_SIZE:
        raise KeyError_(f"key must be {KEY_SIZE} bytes, got {len(raw)}")
    return raw


def encode_key(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def generate_key() -> str:
    return encode_key(nacl.utils.random(KEY_SIZE))


class Keyring:
    def __init__(self, primary: bytes, others: list[bytes] | None = None) -> None:
        if len(primary) != KEY_SIZE:
            raise KeyError_(f"key must be {KEY_SIZE} bytes")
        self._keys: list[bytes] = [primary]
        self._boxes: list[nacl.secret.Aead] = [nacl.secret.Aead(primary)]
        for k in others or []:
            self.install(k)

    @property
    def primary(self) -> bytes:
        return self._keys[0]

    @property
    def keys(self) -> list[bytes]:
        return list(self._keys)

    def install(self, key: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise KeyError_(f"key must be {KEY_SIZE} bytes")
        if key not in self._keys:
            self._keys.append(key)
            self._boxes.append(nacl.secret.Aead(key))

    def use(self, key: bytes) -> None:
        if key not in self._keys:
            raise KeyError_("key is not installed")
        i = self._keys.index(key)
        self._keys.insert(0, self._keys.pop(i))
        self._boxes.insert(0, self._boxes.pop(i))

    def remove(self, key: bytes) -> None:
        if key == self._keys[0]:
            raise KeyError_("refusing to remove the primary key")
        if key in self._keys:
            i = self._keys.index(key)
            del self._keys[i]
            del self._boxes[i]

    def seal(self, plaintext: bytes, aad: bytes = b"") -> bytes:
        nonce = nacl.utils.random(NONCE_SIZE)
        sealed = self._boxes[0].encrypt(plaintext, aad, nonce)
        return bytes([SEAL_VERSION]) + bytes(sealed)

    def open(self, payload: bytes, aad: bytes = b"") -> bytes:
        if len(payload) < SEAL_OVERHEAD or payload[0] != SEAL_VERSION:
            raise OpenError("not a sealed payload")
        body = payload[1:]
        for box in self._boxes:
            try:
                return box.decrypt(body, aad)
            except nacl.exceptions.CryptoError:
                continue
        raise OpenError("no installed key opens this payload")
