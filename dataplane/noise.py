"""Noise_IK_25519_ChaChaPoly_BLAKE2b, following the Noise Protocol Framework, revision 34.

Spec: https://noiseprotocol.org/noise.html (rev 34, 2018-07-11).  Section
numbers in comments ("§5.2") refer to that published text (an earlier rev-34
draft numbered the §7 subsections differently).

Why IK: every agent already learns its peers' static public keys from the
membership it gossips, so the initiator *knows* the responder's key before it
dials (the ``<- s`` pre-message) and the handshake finishes in one round trip,
with the initiator's identity encrypted in the first message.  The responder
learns that identity (``remote_static``) from message 1 and checks it against
membership; nothing else in the handshake says who the initiator is.

Only IK is implemented, so the token interpreter below is driven by a fixed
table rather than a parsed pattern; the object and method names otherwise
mirror §5 so the code can be read side by side with the spec.

This module is sans-I/O: it turns bytes into bytes and never touches sockets,
clocks or an event loop.  Noise messages carry no length or type fields (§3),
so framing (§13 recommends a 16-bit big-endian length prefix), timeouts and
retries belong to the caller.

Every failure raises :class:`NoiseError`.  Callers should treat a handshake
that raised as dead and start over; :class:`HandshakeState` enforces this.

One module past 700 lines because it is one spec's §5 (CipherState,
SymmetricState, HandshakeState), which read best side by side with it.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import nacl.bindings
import nacl.exceptions
import nacl.public

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

# The transport messages' cipher is the same ChaCha20-Poly1305 (RFC 8439) as the
# handshake's, but computed by OpenSSL through the ``cryptography`` package:
# OpenSSL's vectorised code is much faster than libsodium's (what PyNaCl
# ships), and its ``encrypt_into`` / ``decrypt_into`` write into buffers we
# own, so a message costs no allocation.  Bulk traffic spends a large share of
# each agent's CPU in this cipher, so its speed is the proxy's speed
# (docs/dataplane.md, "The cipher").  The ciphertexts are byte-identical
# (tests/test_noise.py checks both against each other and against the
# vectors), so a transport key can move from one to the other between any two
# messages: until OpenSSL's bindings are loaded, transport messages go through
# libsodium.  Those bindings are a large shared library, about 7 MiB of a
# process's RSS once mapped, so they load with the first transport key (the
# first session), never for an agent that only has services registered; an
# application with an event loop loads them off it (``fast_cipher_wanted``).


__all__ = [
    "BLOCKLEN",
    "DHLEN",
    "HASHLEN",
    "KEYLEN",
    "MAX_MESSAGE",
    "MAX_NONCE",
    "PROTOCOL_NAME",
    "TAGLEN",
    "CipherState",
    "HandshakeState",
    "NoiseError",
    "SymmetricState",
    "generate_keypair",
]


class _NotLoaded(Exception):
    """Stands for cryptography's InvalidTag until the first key loads it."""


#: cryptography's InvalidTag once load_fast_cipher has run (no OpenSSL cipher can fail before).
_InvalidTag: type[Exception] = _NotLoaded
#: OpenSSL's ChaCha20-Poly1305 once load_fast_cipher has run.
_Fast: type[ChaCha20Poly1305] | None = None
#: Whether the first transport key has asked for _Fast.
_wanted = False
#: Called (once, with no arguments) by the first transport key instead of loading OpenSSL's
#: bindings there: the agent loads them in a worker thread, so that tens of milliseconds of
#: mapping a shared library do not stall its event loop inside a handshake.  Left None, the
#: first transport key loads them itself.
fast_cipher_wanted: Callable[[], None] | None = None


def load_fast_cipher() -> None:
    """Load OpenSSL's cipher: every transport key uses it from its next message on.

    It is taken only once it has sealed a message exactly as libsodium's does;
    otherwise this raises and libsodium's stays in use: the cryptography package
    missing or broken, or an OpenSSL that refuses ChaCha20-Poly1305 (FIPS mode
    does, at the first key).
    """
    global _Fast, _InvalidTag
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    key, message = bytes(range(KEYLEN)), b"mesh-agent: the fast cipher's check"
    if ChaCha20Poly1305(key).encrypt(_nonce(0), message, b"") != _encrypt(key, 0, b"", message):
        raise NoiseError("OpenSSL's ChaCha20-Poly1305 does not seal as libsodium's does")
    _InvalidTag = InvalidTag
    _Fast = ChaCha20Poly1305  # last: a key that sees it may already fail with InvalidTag


def _want_fast_cipher() -> None:
    global _wanted
    if _Fast is not None or _wanted:
        return
    _wanted = True
    if fast_cipher_wanted is None:
        try:
            load_fast_cipher()
        except Exception:  # noqa: BLE001  # no agent to tell: libsodium's keeps sealing, byte for byte the same
            pass
    else:
        fast_cipher_wanted()

PROTOCOL_NAME: Final = b"Noise_IK_25519_ChaChaPoly_BLAKE2b"  # §8
#: §3: every Noise message, handshake or transport, is at most 65535 bytes.
MAX_MESSAGE: Final = 65535
#: §12.1: X25519 keys and DH outputs are 32 bytes.
DHLEN: Final = 32
#: §12.3: ChaChaPoly keys are 32 bytes; §4.2: the AEAD tag is 16 bytes.
KEYLEN: Final = 32
TAGLEN: Final = 16
#: §12.8: BLAKE2b with a 64-byte digest over 128-byte blocks.
HASHLEN: Final = 64
BLOCKLEN: Final = 128
#: §5.1: nonce 2^64-1 is reserved (it is the Rekey nonce, §4.2), so it can never
#: be used for a message.
MAX_NONCE: Final = 2**64 - 1

_ZEROS32: Final = b"\x00" * 32
# The transport receive path's output buffer (see CipherState.decrypt_view):
# allocated once; a call fills a slice of exactly the plaintext's size.
_DEC_VIEW: Final = memoryview(bytearray(MAX_MESSAGE))


class NoiseError(Exception):
    """The single failure type, so a tunnel needs one ``except`` to drop a peer.

    ``reason`` is a short, fixed phrase suitable for a log field or a counter
    label; it never contains key material or peer-controlled bytes.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _as_bytes(data: bytes) -> bytes:
    # Accept any bytes-like buffer (the data plane reads into bytearrays) but
    # never bytes(int), which would silently become a run of zero bytes.
    if isinstance(data, bytes):
        return data
    if isinstance(data, bytearray | memoryview):
        return bytes(data)
    raise TypeError(f"expected a bytes-like object, got {type(data).__name__}")


def _check_key(name: str, key: bytes) -> bytes:
    # PyNaCl's crypto_scalarmult does not check lengths before handing the
    # buffers to C, so a short key would read past its end: check here.
    if not isinstance(key, bytes | bytearray | memoryview) or len(key) != DHLEN:
        raise NoiseError(f"{name} must be {DHLEN} bytes")
    return bytes(key)


def generate_keypair() -> tuple[bytes, bytes]:
    """GENERATE_KEYPAIR() of §4.1 / §12.1, as (private, public) raw bytes.

    Raw bytes rather than PyNaCl objects because keys are stored in config
    files and exchanged through gossip, both of which want plain bytes.
    """
    sk = nacl.public.PrivateKey.generate()
    return bytes(sk), bytes(sk.public_key)


def _public_key(private: bytes) -> bytes:
    return nacl.bindings.crypto_scalarmult_base(private)


def _dh(private: bytes, public: bytes) -> bytes:
    """DH() of §4.1 / §12.1 (X25519, RFC 7748).

    For low-order public keys §12.1 allows (while discouraging) signalling an
    error instead of returning an all-zero output.  libsodium always does so
    and PyNaCl offers no way round it; we keep the rejection because such a
    key can only come from a broken or hostile peer, and failing at the DH
    gives the data plane a clearer reason than a later MAC failure would.
    """
    try:
        return nacl.bindings.crypto_scalarmult(private, public)
    except nacl.exceptions.CryptoError:
        raise NoiseError("invalid DH public key") from None


#: §12.3: 32 bits of zeros followed by the 64-bit little-endian counter
#: (one C call: the nonce is built for every transport message).
_nonce: Final = struct.Struct("<4xQ").pack


def _encrypt(k: bytes, n: int, ad: bytes, plaintext: bytes) -> bytes:
    # ENCRYPT(k, n, ad, plaintext), §4.2 / §12.3 (RFC 8439 ChaCha20-Poly1305).
    return nacl.bindings.crypto_aead_chacha20poly1305_ietf_encrypt(plaintext, ad, _nonce(n), k)


def _decrypt(k: bytes, n: int, ad: bytes, ciphertext: bytes) -> bytes:
    # DECRYPT(k, n, ad, ciphertext), §4.2 / §12.3.
    if len(ciphertext) < TAGLEN:
        raise NoiseError("ciphertext shorter than tag")
    try:
        return nacl.bindings.crypto_aead_chacha20poly1305_ietf_decrypt(ciphertext, ad, _nonce(n), k)
    except nacl.exceptions.CryptoError:
        raise NoiseError("authentication failed") from None


def _hash(data: bytes) -> bytes:
    # HASH(), §4.3 / §12.8.  BLAKE2b's built-in keyed mode is deliberately not
    # used: §4.3 defines HMAC over the plain hash, and interoperability depends
    # on that.
    return hashlib.blake2b(data, digest_size=HASHLEN).digest()


def _hmac(key: bytes, data: bytes) -> bytes:
    # HMAC-HASH(key, data), §4.3: RFC 2104 over HASH with BLOCKLEN 128, which is
    # hashlib.blake2b's block_size.
    return hmac.new(key, data, hashlib.blake2b).digest()


def _hkdf(chaining_key: bytes, input_key_material: bytes, num_outputs: int) -> tuple[bytes, ...]:
    # HKDF(chaining_key, input_key_material, num_outputs), §4.3.
    temp_key = _hmac(chaining_key, input_key_material)
    output1 = _hmac(temp_key, b"\x01")
    output2 = _hmac(temp_key, output1 + b"\x02")
    if num_outputs == 2:
        return output1, output2
    output3 = _hmac(temp_key, output2 + b"\x03")
    return output1, output2, output3


class CipherState:
    """A key and its nonce counter (§5.1); also the transport cipher after Split.

    Nonces are implicit: both sides count messages, so a transport message must
    be decrypted in the order it was encrypted, and a lost or reordered message
    makes every later one fail.  That suits a reliable stream; a datagram
    transport must carry the counter itself and call :meth:`set_nonce` (§11.4).

    One CipherState must never encrypt for two streams: reusing a (key, nonce)
    pair breaks ChaCha20-Poly1305 entirely.
    """

    __slots__ = ("_aead", "_k", "_n")

    def __init__(self, key: bytes | None = None) -> None:
        self._k: bytes | None = None
        #: The transport path's cipher object for ``_k`` (keyed once, not per message).
        self._aead: ChaCha20Poly1305 | None = None
        self._n = 0
        self.initialize_key(key)

    # §5.1 InitializeKey(key)
    def initialize_key(self, key: bytes | None) -> None:
        if key is not None:
            if not isinstance(key, bytes | bytearray | memoryview) or len(key) != KEYLEN:
                raise NoiseError(f"cipher key must be {KEYLEN} bytes")
            key = bytes(key)  # a private copy: the caller's buffer may change
        self._set_key(key)
        self._n = 0

    def _set_key(self, key: bytes | None) -> None:
        self._k = key
        self._aead = None if key is None or _Fast is None else _Fast(key)

    # §5.1 HasKey()
    def has_key(self) -> bool:
        return self._k is not None

    @property
    def nonce(self) -> int:
        """The nonce the next message will use: a transport over an unordered
        medium sends it alongside the ciphertext (§11.4)."""
        return self._n

    # §5.1 SetNonce(nonce)
    def set_nonce(self, nonce: int) -> None:
        """Needed only for out-of-order transports (§11.4); the caller is then
        responsible for rejecting replays, which the cipher cannot detect."""
        if not 0 <= nonce <= MAX_NONCE:
            raise NoiseError("nonce out of range")
        self._n = nonce

    def _check_usable(self) -> None:
        # §5.1: once n reaches 2^64-1 the CipherState must refuse further use.
        if self._n >= MAX_NONCE:
            raise NoiseError("nonce exhausted")

    # §5.1 EncryptWithAd(ad, plaintext)
    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        """Before a key is mixed in this is the identity (§5.1), which is what
        lets the same code path serve the early, cleartext handshake tokens."""
        plaintext = _as_bytes(plaintext)
        if self._k is None:
            if len(plaintext) > MAX_MESSAGE:
                raise NoiseError("message too long")
            return plaintext
        if len(plaintext) + TAGLEN > MAX_MESSAGE:
            raise NoiseError("message too long")
        self._check_usable()
        ciphertext = _encrypt(self._k, self._n, _as_bytes(ad), plaintext)
        self._n += 1
        return ciphertext

    def _late_aead(self) -> ChaCha20Poly1305 | None:
        """OpenSSL's cipher for this key if it has loaded since the key was set (kept from then on),
        else None: libsodium's, until it does."""
        if self._k is None:
            raise NoiseError("no key")
        if _Fast is not None:
            self._aead = _Fast(self._k)
        return self._aead

    def encrypt_framed_into(self, into: memoryview, plaintext: bytes | bytearray | memoryview) -> int:
        """Write ``len(c).to_bytes(2, "big") + c``, for ``c = EncryptWithAd(b"", plaintext)``,
        at the start of ``into``; return how many bytes that is.

        The transport's sending path, with the 2-byte length prefix the
        transport frames messages with (§7.5's suggestion for TCP).  OpenSSL's
        cipher writes straight into the caller's send buffer, so a sealed byte is
        never copied in Python (libsodium's, until OpenSSL's is loaded, is
        copied once).  ``into`` must hold ``len(plaintext) + 18`` bytes;
        on any error nothing is written and the nonce does not advance.
        """
        aead = self._aead
        if aead is None:
            aead = self._late_aead()
        clen = len(plaintext) + TAGLEN
        if clen > MAX_MESSAGE:
            raise NoiseError("message too long")
        if len(into) < clen + 2:
            raise ValueError(f"{len(into)} bytes of room for a framed message of {clen + 2}")
        self._check_usable()
        if aead is not None:
            aead.encrypt_into(_nonce(self._n), plaintext, None, into[2 : clen + 2])
        else:
            assert self._k is not None
            into[2 : clen + 2] = _encrypt(self._k, self._n, b"", bytes(plaintext))
        into[0] = clen >> 8
        into[1] = clen & 0xFF
        self._n += 1
        return clen + 2

    def decrypt_view(self, ciphertext: bytes | bytearray | memoryview) -> memoryview:
        """DecryptWithAd(b"", ciphertext), as a view of a buffer the next call reuses.

        The transport's receiving path: ``ciphertext`` may be a view into the
        receive buffer, and the plaintext lands in a preallocated buffer, so a
        message costs no allocation.  The view is valid until the next
        ``decrypt_view`` on any CipherState (the data plane runs on one thread
        and handles each message before reading the next); copy what you keep.
        As with :meth:`decrypt_with_ad`, the nonce advances only on success.
        """
        aead = self._aead
        if aead is None:
            aead = self._late_aead()
        clen = len(ciphertext)
        if clen > MAX_MESSAGE:
            raise NoiseError("message too long")
        if clen < TAGLEN:
            raise NoiseError("ciphertext shorter than tag")
        self._check_usable()
        opened = _DEC_VIEW[: clen - TAGLEN]
        if aead is not None:
            try:
                aead.decrypt_into(_nonce(self._n), ciphertext, None, opened)
            except _InvalidTag:
                raise NoiseError("authentication failed") from None
        else:
            assert self._k is not None
            opened[:] = _decrypt(self._k, self._n, b"", bytes(ciphertext))
        self._n += 1
        return opened

    # §5.1 DecryptWithAd(ad, ciphertext)
    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        """The counter advances only on success (§5.1), so a forged message
        injected into a stream cannot desynchronise the two sides' nonces."""
        ciphertext = _as_bytes(ciphertext)
        if len(ciphertext) > MAX_MESSAGE:
            raise NoiseError("message too long")
        if self._k is None:
            return ciphertext
        self._check_usable()
        plaintext = _decrypt(self._k, self._n, _as_bytes(ad), ciphertext)
        self._n += 1
        return plaintext

    # §5.1 Rekey(), §4.2 REKEY(k), §11.3
    def rekey(self) -> None:
        """One-way key update for forward secrecy within a long-lived tunnel.

        Both sides must rekey at the same message boundary (the spec leaves the
        signalling to the application, §11.3).  The nonce is deliberately not
        reset (§11.3), so nonce exhaustion still bounds the tunnel's lifetime.
        """
        if self._k is None:
            raise NoiseError("rekey without a key")
        # REKEY(k) = first 32 bytes of ENCRYPT(k, maxnonce, zerolen, zeros).
        self._set_key(_encrypt(self._k, MAX_NONCE, b"", _ZEROS32)[:KEYLEN])


class SymmetricState:
    """The running transcript hash ``h`` and chaining key ``ck`` (§5.2).

    Everything a handshake message contains is hashed into ``h`` and used as AD
    for the next encryption, which is what makes any change to an earlier
    message (or to the prologue) surface as an authentication failure later.
    """

    __slots__ = ("_cipher", "_ck", "_h")

    # §5.2 InitializeSymmetric(protocol_name)
    def __init__(self, protocol_name: bytes) -> None:
        if len(protocol_name) <= HASHLEN:
            self._h = protocol_name.ljust(HASHLEN, b"\x00")
        else:
            self._h = _hash(protocol_name)
        self._ck = self._h
        self._cipher = CipherState(None)

    @property
    def cipher_state(self) -> CipherState:
        return self._cipher

    # §5.2 MixKey(input_key_material)
    def mix_key(self, input_key_material: bytes) -> None:
        self._ck, temp_k = _hkdf(self._ck, input_key_material, 2)
        # HASHLEN is 64, so temp_k is truncated to the cipher's 32-byte key.
        self._cipher.initialize_key(temp_k[:KEYLEN])

    # §5.2 MixHash(data)
    def mix_hash(self, data: bytes) -> None:
        self._h = _hash(self._h + data)

    # §5.2 MixKeyAndHash(input_key_material); only PSK patterns (§9) use it,
    # kept so the object is complete per the spec.
    def mix_key_and_hash(self, input_key_material: bytes) -> None:
        self._ck, temp_h, temp_k = _hkdf(self._ck, input_key_material, 3)
        self.mix_hash(temp_h)
        self._cipher.initialize_key(temp_k[:KEYLEN])

    # §5.2 GetHandshakeHash()
    def get_handshake_hash(self) -> bytes:
        return self._h

    # §5.2 EncryptAndHash(plaintext)
    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = self._cipher.encrypt_with_ad(self._h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    # §5.2 DecryptAndHash(ciphertext)
    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        plaintext = self._cipher.decrypt_with_ad(self._h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    # §5.2 Split()
    def split(self) -> tuple[CipherState, CipherState]:
        """(c1, c2): c1 encrypts initiator-to-responder, c2 the reverse (§5)."""
        temp_k1, temp_k2 = _hkdf(self._ck, b"", 2)
        _want_fast_cipher()
        return CipherState(temp_k1[:KEYLEN]), CipherState(temp_k2[:KEYLEN])


# §7.5, pattern IK:
#     <- s
#     ...
#     -> e, es, s, ss
#     <- e, ee, se
# Message i is written by the initiator when i is even.
_IK_MESSAGES: Final[tuple[tuple[str, ...], ...]] = (
    ("e", "es", "s", "ss"),
    ("e", "ee", "se"),
)


def _message_overhead(index: int) -> int:
    """Bytes a handshake message adds around its payload (all keyed in IK)."""
    size = TAGLEN  # the payload's tag: by then a key has always been mixed in
    for token in _IK_MESSAGES[index]:
        if token == "e":
            size += DHLEN
        elif token == "s":
            size += DHLEN + TAGLEN
    return size


class HandshakeState:
    """One side of a single IK handshake (§5.3), used once and then split.

    The object is a strict state machine: messages must be written and read in
    pattern order, and any failure while processing a message leaves it
    permanently failed (§5: on a DECRYPT or DH error "the handshake has
    failed").  Retrying on the same state would mean re-using an ephemeral
    key and a half-updated transcript, so the only recovery is a new handshake.

    Construct with :meth:`initiator` or :meth:`responder`.
    """

    __slots__ = (
        "_complete",
        "_e",
        "_failed",
        "_handshake_hash",
        "_index",
        "_initiator",
        "_re",
        "_rs",
        "_s",
        "_split_done",
        "_symmetric",
    )

    def __init__(
        self,
        *,
        initiator: bool,
        static_private: bytes,
        remote_static_public: bytes | None,
        prologue: bytes,
        ephemeral_private: bytes | None,
    ) -> None:
        static_private = _check_key("static private key", static_private)
        self._initiator = initiator
        self._s = (static_private, _public_key(static_private))
        self._e: tuple[bytes, bytes] | None = None
        if ephemeral_private is not None:
            ephemeral_private = _check_key("ephemeral private key", ephemeral_private)
            self._e = (ephemeral_private, _public_key(ephemeral_private))
        self._rs = None if remote_static_public is None else _check_key("remote static key", remote_static_public)
        self._re: bytes | None = None
        self._index = 0
        self._complete = False
        self._failed = False
        self._split_done = False
        self._handshake_hash: bytes | None = None

        # §5.3 Initialize(): InitializeSymmetric(protocol_name), then
        # MixHash(prologue) (§6: both sides must agree on it, or the first
        # decryption fails), then the pre-message public keys in order.
        self._symmetric: SymmetricState | None = SymmetricState(PROTOCOL_NAME)
        self._symmetric.mix_hash(_as_bytes(prologue))
        # IK pre-message "<- s": the responder's static key, hashed by both.
        responder_static = self._rs if initiator else self._s[1]
        if responder_static is None:
            raise NoiseError("initiator needs the responder's static key")
        self._symmetric.mix_hash(responder_static)

    @classmethod
    def initiator(
        cls,
        static_private: bytes,
        remote_static_public: bytes,
        prologue: bytes = b"",
        ephemeral_private: bytes | None = None,
    ) -> HandshakeState:
        """The dialling side, which must already know the responder's key.

        ``ephemeral_private`` exists only so test vectors can be reproduced.
        Supplying it in production is dangerous: reusing an ephemeral key across
        handshakes forfeits forward secrecy and can reuse cipher keys.
        """
        return cls(
            initiator=True,
            static_private=static_private,
            remote_static_public=remote_static_public,
            prologue=prologue,
            ephemeral_private=ephemeral_private,
        )

    @classmethod
    def responder(
        cls,
        static_private: bytes,
        prologue: bytes = b"",
        ephemeral_private: bytes | None = None,
    ) -> HandshakeState:
        """The accepting side; it learns who is calling from message 1.

        ``ephemeral_private`` is for test vectors only, as for :meth:`initiator`.
        """
        return cls(
            initiator=False,
            static_private=static_private,
            remote_static_public=None,
            prologue=prologue,
            ephemeral_private=ephemeral_private,
        )

    @property
    def is_initiator(self) -> bool:
        return self._initiator

    @property
    def complete(self) -> bool:
        """True once the last handshake message has been written or read."""
        return self._complete

    @property
    def remote_static(self) -> bytes | None:
        """The peer's static public key: the identity to check against membership.

        For the initiator it is the key it was given.  For the responder it is
        None until message 1 has been read.  Message 1 proves the sender knew
        the initiator's static private key (via ``ss``) but it is replayable
        (§7.7: IK's first payload has destination property 2 / source 1), so a
        responder should treat the peer as live only once the first transport
        message from it decrypts, which requires the initiator's ephemeral key.
        """
        return self._rs

    @property
    def handshake_hash(self) -> bytes:
        """The transcript hash ``h`` (§5.2 GetHandshakeHash) for channel binding
        (§11.2); only meaningful, and so only available, once complete."""
        if self._handshake_hash is None:
            raise NoiseError("handshake not complete")
        return self._handshake_hash

    def _my_turn_to_write(self) -> bool:
        # Even-numbered messages go initiator -> responder (§7.1 "->").
        return (self._index % 2 == 0) == self._initiator

    def _begin(self, writing: bool) -> SymmetricState:
        if self._failed:
            raise NoiseError("handshake already failed")
        if self._complete or self._symmetric is None:
            raise NoiseError("handshake already complete")
        if self._my_turn_to_write() != writing:
            raise NoiseError("message out of order")
        return self._symmetric

    def _dh_token(self, token: str) -> bytes:
        # §5.3 WriteMessage/ReadMessage, DH tokens.  The letter order is
        # (initiator key, responder key); each side supplies its own private
        # half, which is why "es" and "se" swap roles on the responder.
        local_e = self._e[0] if self._e is not None else None
        mine, theirs = (token[0], token[1]) if self._initiator else (token[1], token[0])
        private = local_e if mine == "e" else self._s[0]
        public = self._re if theirs == "e" else self._rs
        if private is None or public is None:  # unreachable with the IK table
            raise NoiseError("missing key for DH")
        return _dh(private, public)

    # §5.3 WriteMessage(payload, message_buffer)
    def write_message(self, payload: bytes) -> bytes:
        """Produce the next handshake message carrying ``payload``.

        In IK the message-1 payload is encrypted but, unlike transport data,
        has weaker guarantees (§7.7): it can be replayed to the responder and
        is not forward-secret against compromise of the responder's static key.
        Keep it to things like a protocol version or a membership epoch.
        """
        symmetric = self._begin(writing=True)
        payload = _as_bytes(payload)
        # §3: reject before touching any state, so the caller can retry with a
        # smaller payload on the same handshake.
        if len(payload) + _message_overhead(self._index) > MAX_MESSAGE:
            raise NoiseError("message too long")
        try:
            out = bytearray()
            for token in _IK_MESSAGES[self._index]:
                if token == "e":
                    # §5.3 "e": GENERATE_KEYPAIR() unless a fixed key was given
                    # (test vectors), append e.public_key, MixHash it.
                    if self._e is None:
                        self._e = generate_keypair()
                    out += self._e[1]
                    symmetric.mix_hash(self._e[1])
                elif token == "s":
                    # §5.3 "s": EncryptAndHash(s.public_key).
                    out += symmetric.encrypt_and_hash(self._s[1])
                else:
                    symmetric.mix_key(self._dh_token(token))
            out += symmetric.encrypt_and_hash(payload)
        except BaseException:
            self._failed = True
            raise
        self._advance()
        return bytes(out)

    # §5.3 ReadMessage(message, payload_buffer)
    def read_message(self, message: bytes) -> bytes:
        """Consume the peer's next handshake message and return its payload."""
        symmetric = self._begin(writing=False)
        message = _as_bytes(message)
        try:
            if len(message) > MAX_MESSAGE:
                raise NoiseError("message too long")
            if len(message) < _message_overhead(self._index):
                raise NoiseError("message too short")
            offset = 0
            for token in _IK_MESSAGES[self._index]:
                if token == "e":
                    # §5.3 "e": re = next DHLEN bytes; MixHash(re.public_key).
                    self._re = message[offset : offset + DHLEN]
                    offset += DHLEN
                    symmetric.mix_hash(self._re)
                elif token == "s":
                    # §5.3 "s": next DHLEN + 16 bytes (a key is always set by
                    # the time IK sends "s"); rs = DecryptAndHash(temp).
                    length = DHLEN + TAGLEN if symmetric.cipher_state.has_key() else DHLEN
                    self._rs = symmetric.decrypt_and_hash(message[offset : offset + length])
                    offset += length
                else:
                    symmetric.mix_key(self._dh_token(token))
            payload = symmetric.decrypt_and_hash(message[offset:])
        except BaseException:
            self._failed = True
            if not self._initiator:
                # Never expose an identity from a message that did not verify.
                self._rs = None
            raise
        self._advance()
        return payload

    def _advance(self) -> None:
        self._index += 1
        if self._index == len(_IK_MESSAGES):
            assert self._symmetric is not None
            self._complete = True
            self._handshake_hash = self._symmetric.get_handshake_hash()

    # §5.3: after the last message, Split() yields the transport ciphers.
    def split(self) -> tuple[CipherState, CipherState]:
        """Return ``(send, receive)`` from this side's point of view.

        Transport messages use empty associated data (§5).  On nonce
        exhaustion the tunnel must be torn down and a new handshake run (§5).

        Spec-wise (§5.2 Split) c1 carries initiator-to-responder traffic and c2
        the reverse, so the initiator gets ``(c1, c2)`` and the responder
        ``(c2, c1)``: the caller never has to know which role it played.

        Allowed once: a second pair would share keys and nonces with the first,
        and encrypting with both would reuse nonces.  The chaining key and
        private keys are dropped afterwards (Python cannot truly erase them,
        but nothing here keeps them reachable).
        """
        if not self._complete or self._symmetric is None:
            raise NoiseError("handshake already split" if self._split_done else "handshake not complete")
        c1, c2 = self._symmetric.split()
        self._split_done = True
        self._symmetric = None
        self._e = None
        self._s = (b"", self._s[1])
        return (c1, c2) if self._initiator else (c2, c1)
