"""The cluster keyring: seal with the primary key, open with any installed.

Holding several keys at once is what makes rotation possible without a
partition (install everywhere, switch primary, then remove), exactly as
memberlist's keyring does.  The cipher is XChaCha20-Poly1305 (PyNaCl ``Aead``):
its 24-byte nonce is large enough to draw at random for every packet.

Sealing calls libsodium through ``nacl.bindings`` rather than the ``Aead``
class: every gossip packet is sealed and opened once, and the class's
argument checks and ``EncryptedMessage`` wrapper cost more than the cipher
does on a 1,400-byte packet.  The bytes on the wire are the same.
"""

from __future__ import annotations

import base64
import binascii
import os

import nacl.bindings
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
        for k in others or []:
            self.install(k)

    @property
    def primary(self) -> bytes:
        return self._keys[0]

    @property
    def keys(self) -> list[bytes]:
        return list(self._keys)

    def replace(self, keys: list[bytes]) -> None:
        """Take a whole keyring (e.g. restored from disk), primary first."""
        if not keys or any(len(k) != KEY_SIZE for k in keys):
            raise KeyError_(f"need at least one key, each {KEY_SIZE} bytes")
        self._keys = list(dict.fromkeys(keys))

    def install(self, key: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise KeyError_(f"key must be {KEY_SIZE} bytes")
        if key not in self._keys:
            self._keys.append(key)

    def use(self, key: bytes) -> None:
        if key not in self._keys:
            raise KeyError_("key is not installed")
        i = self._keys.index(key)
        self._keys.insert(0, self._keys.pop(i))

    def remove(self, key: bytes) -> None:
        if key == self._keys[0]:
            raise KeyError_("refusing to remove the primary key")
        if key not in self._keys:
            # Said, not ignored: a remove that found nothing must not be reported as done.
            raise KeyError_("that key is not installed")
        del self._keys[self._keys.index(key)]

    def seal(self, plaintext: bytes, aad: bytes = b"") -> bytes:
        """version || nonce || XChaCha20-Poly1305(plaintext), the layout of ``Aead.encrypt``."""
        nonce = os.urandom(NONCE_SIZE)
        return _VERSION_BYTE + nonce + _encrypt(plaintext, aad or None, nonce, self._keys[0])

    def open(self, payload: bytes, aad: bytes = b"") -> bytes:
        if len(payload) < SEAL_OVERHEAD or payload[0] != SEAL_VERSION:
            raise OpenError("not a sealed payload")
        nonce = payload[1:1 + NONCE_SIZE]
        ciphertext = payload[1 + NONCE_SIZE:]
        for key in self._keys:
            try:
                return _decrypt(ciphertext, aad or None, nonce, key)
            except nacl.exceptions.CryptoError:
                continue
        raise OpenError("no installed key opens this payload")


_VERSION_BYTE = bytes([SEAL_VERSION])
_encrypt = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt
_decrypt = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt
