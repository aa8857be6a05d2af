"""The stream multiplexer's wire format: frame types, codes, the frame header, framing checks.

A *record* is one encrypted message of the session.  It holds one or more
whole *frames* (a frame never spans records), so several small frames share a
single cipher call.  The transport must hand records over whole and in order
(the encrypted channel does); frame order is what keeps both ends' stream
accounting in step.  Each frame is an 8-byte big-endian header and a payload::

    type (u8) | stream id (u32) | payload length (u24) | payload

    type            stream id  payload
    DATA 0          stream     1 or more bytes of stream data (flow-controlled)
    WINDOW_UPDATE 1 stream     u32 credit increment, > 0
    OPEN 2          stream     opaque header, at most MAX_OPEN_HEADER bytes
    FIN 3           stream     empty: the sender will send no more data
    RST 4           stream     u32 reset code (ResetCode)
    PING 5          0          8 opaque bytes, echoed in a PONG
    PONG 6          0          the 8 bytes of the PING it answers
    GOAWAY 7        0          u32 code (GoAwayCode)

Types 0x80-0xFF are reserved for the encrypted session below: a record that
starts with one is a control record of :mod:`dataplane.session` (its rekey
messages) and is never handed to the mux.

The rules of a frame's place in a stream's life (credit, ids, FIN and RST)
are :mod:`dataplane.mux`'s; this module checks only what each frame must be
on its own.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from enum import IntEnum
from typing import Final, NamedTuple

__all__ = [
    "DATA",
    "FIXED_LENGTH",
    "FRAME_TYPES",
    "HEADER",
    "HEADER_SIZE",
    "MAX_OPEN_HEADER",
    "MAX_PAYLOAD",
    "MAX_STREAM_ID",
    "PING_LEN",
    "SESSION_FRAMES",
    "U32",
    "Frame",
    "FrameType",
    "GoAwayCode",
    "ProtocolError",
    "ResetCode",
    "decode_record",
    "encode_frame",
    "iter_frames",
]

HEADER: Final = struct.Struct(">BIBH")  # type, stream id, length split as u8 + u16 = u24
U32: Final = struct.Struct(">I")
HEADER_SIZE: Final = HEADER.size
MAX_PAYLOAD: Final = (1 << 24) - 1
MAX_STREAM_ID: Final = (1 << 32) - 1
#: The proxy names its target (service, instance) here; a few hundred bytes at most.
MAX_OPEN_HEADER: Final = 1024
PING_LEN: Final = 8


class FrameType(IntEnum):
    DATA = 0
    WINDOW_UPDATE = 1
    OPEN = 2
    FIN = 3
    RST = 4
    PING = 5
    PONG = 6
    GOAWAY = 7


class ResetCode(IntEnum):
    """RST codes; a peer may send any u32, so events carry a plain ``int``."""

    NO_ERROR = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2
    #: The stream was never processed (e.g. it arrived after our GOAWAY), so the
    #: opener may safely retry it on another session (RFC 9113 §8.7 REFUSED_STREAM).
    REFUSED = 3
    CANCEL = 4
    #: The proxy could not reach the target named in the OPEN header.
    CONNECT_FAILED = 5


class GoAwayCode(IntEnum):
    """yamux's GoAway codes ("Go Away" in yamux spec.md)."""

    NORMAL = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2


#: Wire value -> FrameType: a tuple index is several times cheaper than ``FrameType(v)``,
#: which every received frame would pay.
FRAME_TYPES: Final = tuple(FrameType)
#: FrameType.DATA as a plain int for the per-record paths (struct packs an IntEnum much more slowly).
DATA: Final = int(FrameType.DATA)
SESSION_FRAMES: Final = frozenset({FrameType.PING, FrameType.PONG, FrameType.GOAWAY})
#: Payload lengths that are fixed by the frame type.
FIXED_LENGTH: Final = {
    FrameType.WINDOW_UPDATE: 4,
    FrameType.FIN: 0,
    FrameType.RST: 4,
    FrameType.PING: PING_LEN,
    FrameType.PONG: PING_LEN,
    FrameType.GOAWAY: 4,
}


class ProtocolError(Exception):
    """The peer broke the protocol; the whole session must be closed.

    ``reason`` is a short stable tag suitable as a counter name.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class Frame(NamedTuple):
    type: FrameType
    stream_id: int
    payload: bytes


def encode_frame(ftype: FrameType, stream_id: int, payload: bytes = b"") -> bytes:
    """One frame, unchecked beyond what the header can represent."""
    n = len(payload)
    if n > MAX_PAYLOAD:
        raise ValueError(f"payload of {n} bytes exceeds the u24 length field")
    return HEADER.pack(ftype, stream_id, n >> 16, n & 0xFFFF) + payload


def iter_frames(record: bytes | memoryview) -> Iterator[tuple[FrameType, int, memoryview]]:
    """The structural checks every frame must pass before its type's own rules apply."""
    view = memoryview(record)
    end = len(view)
    off = 0
    while off < end:
        if end - off < HEADER_SIZE:
            raise ProtocolError("truncated", f"{end - off} bytes left, a frame header needs {HEADER_SIZE}")
        raw_type, sid, hi, lo = HEADER.unpack_from(view, off)
        length = (hi << 16) | lo
        off += HEADER_SIZE
        if length > end - off:
            raise ProtocolError("truncated", f"frame claims {length} bytes, record has {end - off}")
        if raw_type >= len(FRAME_TYPES):
            raise ProtocolError("unknown_frame_type", str(raw_type))
        ftype = FRAME_TYPES[raw_type]
        fixed = FIXED_LENGTH.get(ftype)
        if fixed is not None and length != fixed:
            raise ProtocolError("bad_length", f"{ftype.name} of {length} bytes, must be {fixed}")
        if ftype is FrameType.DATA and length == 0:
            # Our sender never makes one; accepting them would let a peer make
            # us spin for free (the "empty frames flood", CVE-2019-9518).
            raise ProtocolError("bad_length", "empty DATA")
        if ftype is FrameType.OPEN and length > MAX_OPEN_HEADER:
            raise ProtocolError("bad_length", f"OPEN header of {length} bytes")
        if (sid == 0) != (ftype in SESSION_FRAMES):
            raise ProtocolError("bad_stream_id", f"{ftype.name} on stream {sid}")
        yield ftype, sid, view[off : off + length]
        off += length


def decode_record(record: bytes) -> list[Frame]:
    """Split a record into frames, with the structural checks of ``receive``."""
    return [Frame(t, sid, bytes(p)) for t, sid, p in iter_frames(record)]
