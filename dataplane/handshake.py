"""The tunnel's opening handshake, sans I/O: preamble, HELLO, both sides' checks, replay defence.

A session opens with one Noise_IK handshake (:mod:`dataplane.noise`) whose
first message carries a HELLO: a TAI64N timestamp and the initiator's name.
The responder admits only a key that membership vouches for, under the name
membership knows it by, with a timestamp newer than the last it accepted from
that key (WireGuard's replay defence).  The caller moves the bytes; this
module decides (docs/dataplane.md, "Wire format" and "Who may connect").
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from dataplane.noise import CipherState, HandshakeState, NoiseError
from dataplane.tunnel_stats import REFUSAL_REASONS

__all__ = [
    "MAGIC",
    "MAX_MESSAGE1",
    "MAX_NAME",
    "PREAMBLE",
    "REFUSAL_REASONS",
    "VERSION",
    "Established",
    "Initiation",
    "Refused",
    "ReplayGuard",
    "check_preamble",
    "decode_hello",
    "encode_hello",
    "framed",
    "respond",
    "tai64n",
]

MAGIC: Final = b"MESH"
#: 2: sessions rekey in band (tunnel control records); a version-1 agent would
#: take the first rekey record for a mux protocol violation, so the two must not pair.
VERSION: Final = 2
#: Sent unframed before message 1, and used as the Noise prologue.
PREAMBLE: Final = MAGIC + bytes([VERSION])

#: TAI64 labels count from 2^62; TAI was 10 s ahead of UTC in 1970 (as in WireGuard).
_TAI64_BASE: Final = 2**62 + 10
_NS: Final = 1_000_000_000
_HELLO_TS: Final = struct.Struct(">QI")
MAX_NAME: Final = 255
#: Message 1 is 96 bytes of IK overhead plus the HELLO; anything longer is refused unread.
MAX_MESSAGE1: Final = 96 + _HELLO_TS.size + MAX_NAME

#: The replay table is pruned of keys that are no longer members when it
#: reaches twice its size after the last pruning, and never below this many entries.
REPLAY_TABLE_MIN: Final = 256

class Refused(Exception):
    """The responder turns the connection away; ``reason`` is one of REFUSAL_REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


# -- the HELLO ------------------------------------------------------------------------


def tai64n(unix_ns: int) -> bytes:
    """A TAI64N label for a Unix time in nanoseconds (12 bytes, big-endian)."""
    secs, nanos = divmod(unix_ns, _NS)
    return _HELLO_TS.pack(_TAI64_BASE + secs, nanos)


def encode_hello(unix_ns: int, name: str) -> bytes:
    """The payload of message 1: TAI64N timestamp, then the initiator's name."""
    raw = name.encode("utf-8")
    if not 1 <= len(raw) <= MAX_NAME:
        raise ValueError(f"node name must be 1..{MAX_NAME} bytes of UTF-8")
    return tai64n(unix_ns) + raw


def decode_hello(payload: bytes) -> tuple[int, str]:
    """(unix nanoseconds, name) from a message-1 payload; ValueError if malformed."""
    if len(payload) < _HELLO_TS.size + 1 or len(payload) > _HELLO_TS.size + MAX_NAME:
        raise ValueError("hello payload has a bad length")
    label, nanos = _HELLO_TS.unpack_from(payload)
    if nanos >= _NS:
        raise ValueError("hello timestamp has more than 10^9 nanoseconds")
    name = payload[_HELLO_TS.size :].decode("utf-8")  # UnicodeDecodeError is a ValueError
    return (label - _TAI64_BASE) * _NS + nanos, name


def framed(message: bytes) -> bytes:
    """A message as the tunnel carries it: a 2-byte big-endian length, then the bytes."""
    return len(message).to_bytes(2, "big") + message


# -- the two sides ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Established:
    """What a completed handshake leaves a session: who is at the other end, and the keys."""

    #: The peer's name: for the responder, membership's name for its key; for
    #: the initiator, the name the responder gave (the caller compares it).
    peer: str
    #: The peer's static key, proven by the handshake; every rekey must prove it again.
    peer_static: bytes
    #: The transcript hash: the first rekey's prologue binds to it.
    handshake_hash: bytes
    send: CipherState
    recv: CipherState


class Initiation:
    """The initiator's side of one handshake: ``first_flight`` out, then ``finish`` with message 2."""

    def __init__(self, static_private: bytes, peer_static: bytes, name: str, unix_ns: int) -> None:
        self._hs = HandshakeState.initiator(static_private, peer_static, prologue=PREAMBLE)
        self._peer_static = peer_static
        #: The preamble and message 1, sent as one write.
        self.first_flight = PREAMBLE + framed(self._hs.write_message(encode_hello(unix_ns, name)))

    def finish(self, message2: bytes) -> Established:
        """The keys, once message 2 verifies (NoiseError if not; UnicodeDecodeError for a name
        that is not UTF-8).  ``peer`` is the name the responder gave: the caller checks it."""
        name = self._hs.read_message(message2).decode("utf-8")
        send, recv = self._hs.split()
        return Established(name, self._peer_static, self._hs.handshake_hash, send, recv)


def check_preamble(preamble: bytes) -> None:
    """Refused unless ``preamble`` (the first len(PREAMBLE) bytes, fewer if the peer stopped) is ours."""
    if not MAGIC.startswith(preamble[: len(MAGIC)]):
        raise Refused("bad_magic")
    if len(preamble) < len(PREAMBLE):
        raise Refused("bad_handshake", "closed during the preamble")
    if preamble[len(MAGIC)] != VERSION:
        raise Refused("bad_version", f"version {preamble[len(MAGIC)]}")


def respond(
    static_private: bytes,
    name: str,
    message1: bytes,
    member_for_key: Callable[[bytes], str | None],
    replay: ReplayGuard,
) -> tuple[Established, bytes]:
    """The responder's side: the session's keys and the framed message 2 to send, or Refused.

    The initiator is not proven yet: only a first record that decrypts under
    these keys shows it holds message 1's ephemeral key (a replayed message 1
    cannot get that far), so the caller registers the session only then.
    """
    hs = HandshakeState.responder(static_private, prologue=PREAMBLE)
    try:
        payload = hs.read_message(message1)
    except NoiseError as exc:
        raise Refused("bad_handshake", exc.reason) from None
    remote = hs.remote_static
    assert remote is not None  # set by a message 1 that verified
    peer = member_for_key(remote)
    if peer is None or peer == name:
        raise Refused("unknown_key", remote.hex()[:16])
    try:
        ts, claimed = decode_hello(payload)
    except ValueError:
        raise Refused("bad_handshake", "malformed hello") from None
    if claimed != peer:
        raise Refused("name_mismatch", f"key of {peer!r} claims to be {claimed!r}")
    if not replay.admit(remote, ts):
        raise Refused("replay", f"from {peer}: timestamp not newer than the last accepted")
    reply = framed(hs.write_message(name.encode("utf-8")))
    send, recv = hs.split()
    return Established(peer, remote, hs.handshake_hash, send, recv), reply


# -- replay defence -----------------------------------------------------------------------


class ReplayGuard:
    """The last HELLO timestamp accepted from each initiator key, kept about as large as membership.

    Pruning forgets the keys of agents that are no longer members.  Safe
    because a key that is not a member is refused before its timestamp
    matters, and should it rejoin, a replayed message 1 still cannot finish
    the handshake (the session registers only once a record decrypts).  The
    threshold doubles with what survives, so scans are amortised to O(1) per
    admitted HELLO.
    """

    __slots__ = ("_is_member", "_last", "_minimum", "_prune_at")

    def __init__(self, is_member: Callable[[bytes], bool], minimum: int = REPLAY_TABLE_MIN) -> None:
        self._is_member = is_member
        self._minimum = minimum
        self._last: dict[bytes, int] = {}
        self._prune_at = minimum

    def admit(self, key: bytes, timestamp: int) -> bool:
        """Record ``timestamp`` for ``key`` if it is newer than the last one; False (a replay) if not."""
        last = self._last.get(key)
        if last is not None and timestamp <= last:
            return False
        self._last[key] = timestamp
        if len(self._last) >= self._prune_at:
            self._prune()
        return True

    def _prune(self) -> None:
        for key in list(self._last):
            if not self._is_member(key):
                del self._last[key]
        self._prune_at = max(self._minimum, 2 * len(self._last))

    @property
    def prune_at(self) -> int:
        """The size at which the next admission prunes."""
        return self._prune_at

    def __len__(self) -> int:
        return len(self._last)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._last)

    def __contains__(self, key: object) -> bool:
        return key in self._last
