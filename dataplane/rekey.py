"""In-band key renewal of a tunnel session, sans I/O: the control records and their state machine.

A session renews its keys by a second Noise_IK handshake between the same
static keys, carried as *control records* under the current keys (a decrypted
transport message whose first byte is CONTROL_MIN or more; mux frame types are
0..7).  Each direction gets an explicit switch point: the REPLY for the rekey
responder's sending direction, the SWITCH for the initiator's, so a message is
always read with the key its sender used (docs/dataplane.md, "Rekey").

:class:`Rekey` holds one session's side of it.  The caller encrypts, sends and
reads the records, keeps the time and message limits, and applies what each
received record asks for (a :class:`Step`); this class never touches a
socket, a clock or the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from dataplane.handshake import PREAMBLE
from dataplane.noise import CipherState, HandshakeState, NoiseError

__all__ = [
    "CONTROL_MIN",
    "DEFAULT_REJECT_AFTER_MESSAGES",
    "DEFAULT_REJECT_AFTER_TIME",
    "DEFAULT_REKEY_AFTER_MESSAGES",
    "DEFAULT_REKEY_AFTER_TIME",
    "REKEY_INIT",
    "REKEY_REPLY",
    "REKEY_SWITCH",
    "RESPONDER_REKEY_SLACK",
    "Rekey",
    "RekeyState",
    "Step",
]

#: A decrypted record starting with this byte or more is for the session, never the mux
#: (dataplane.frames reserves 0x80..0xFF for it).
CONTROL_MIN: Final = 0x80
REKEY_INIT: Final = 0xF0
REKEY_REPLY: Final = 0xF1
REKEY_SWITCH: Final = 0xF2
#: Prologue of a rekey handshake, followed by the previous handshake's hash (Noise §6, §11.2).
_REKEY_PROLOGUE: Final = PREAMBLE + b" rekey "

#: WireGuard's REKEY_AFTER_TIME (paper §6.1): renew the keys every two minutes...
DEFAULT_REKEY_AFTER_TIME: Final = 120.0
#: ...or after this many messages under one key, whichever comes first.
DEFAULT_REKEY_AFTER_MESSAGES: Final = 2**20
#: WireGuard's REJECT_AFTER_TIME: a key still in use this long after it began
#: means rekeying failed, and the session is closed loudly.
DEFAULT_REJECT_AFTER_TIME: Final = 180.0
#: The hard cap on mux records under one key (WireGuard's REJECT_AFTER_MESSAGES),
#: 16 times the rekey point and far below Noise's 2^64-1 (§5.1), so a rekey that
#: never completes ends the session long before a nonce could repeat.
DEFAULT_REJECT_AFTER_MESSAGES: Final = 2**24
#: The session's responder renews on time only this much later than its initiator
#: would, as a fallback: normally one side starts and no INITs cross.
RESPONDER_REKEY_SLACK: Final = 1.1

#: "idle"; "initiated" (our INIT is out, we wait for the REPLY); "switching" (we
#: read the REPLY, our SWITCH is queued and our send key changes right after it);
#: "awaiting_switch" (we answered an INIT, our send key changes right after the
#: REPLY, and the peer's SWITCH is still to come).
RekeyState = Literal["idle", "initiated", "switching", "awaiting_switch"]


@dataclass(frozen=True, slots=True)
class Step:
    """What one received control record asks of the session."""

    #: A control record to send ahead of any queued mux record, under the current send key.
    send: bytes | None = None
    #: The send key for everything after ``send``.
    next_send: CipherState | None = None
    #: The receive key for every record after this one.
    recv: CipherState | None = None
    #: A rekey completed here: counted once per rekey on each side (by its
    #: initiator on the REPLY, by its responder on the SWITCH).
    rekeyed: bool = False


class Rekey:
    """One side of a session's key renewals: one rekey at a time, each chained to the last.

    The handshake is IK again, between the session's static keys, so a thief of
    the current traffic keys alone can neither answer nor forge a rekey; its
    prologue holds the previous handshake's hash, so each rekey is valid only
    as the next step of this very session.
    """

    def __init__(self, static_private: bytes, peer_static: bytes, handshake_hash: bytes, *, initiator: bool) -> None:
        self._static_private = static_private
        self._peer_static = peer_static
        self._hs_hash = handshake_hash
        #: Whether this end initiated the session (not the rekey): its rekey wins a collision.
        self._initiator = initiator
        self.state: RekeyState = "idle"
        self._hs: HandshakeState | None = None
        self._next_recv: CipherState | None = None
        #: INITs that crossed ours (both sides started at once), whatever became of them.
        self.collisions = 0

    def start(self) -> bytes | None:
        """The INIT control record that begins a rekey; None if one is under way.

        Mux records keep going out under the current key until the REPLY
        arrives, so no stream waits.
        """
        if self.state != "idle":
            return None
        hs = HandshakeState.initiator(self._static_private, self._peer_static, prologue=self._prologue())
        init = hs.write_message(b"")
        self._hs = hs
        self.state = "initiated"
        return bytes([REKEY_INIT]) + init

    def receive(self, record: bytes | memoryview) -> Step:
        """Handle one control record (its first byte is CONTROL_MIN or more); NoiseError if it
        is unknown, out of turn, or does not verify: the session must end."""
        kind, body = record[0], bytes(record[1:])
        if kind == REKEY_INIT:
            return self._on_init(body)
        if kind == REKEY_REPLY:
            return self._on_reply(body)
        if kind == REKEY_SWITCH and not body:
            return self._on_switch()
        raise NoiseError(f"unknown control record {kind:#x}")

    def send_switched(self) -> None:
        """The caller now sends under the key a Step's ``next_send`` named."""
        if self.state == "switching":
            self.state = "idle"

    def _prologue(self) -> bytes:
        return _REKEY_PROLOGUE + self._hs_hash

    def _on_init(self, body: bytes) -> Step:
        if self.state == "initiated":
            # Both sides started at once.  The session initiator's rekey wins, on
            # both ends and with no extra message: the initiator ignores the
            # responder's INIT, and the responder drops its own handshake and
            # answers (its INIT precedes the REPLY on the wire, so the initiator
            # still has its own handshake pending when it reads that INIT).
            self.collisions += 1
            if self._initiator:
                return Step()
            self._hs = None
        elif self.state != "idle":
            raise NoiseError(f"rekey INIT while {self.state}")
        hs = HandshakeState.responder(self._static_private, prologue=self._prologue())
        hs.read_message(body)
        # Same static keys as the outer handshake, so a thief of the current traffic
        # keys alone can neither answer nor forge a rekey (unlike with NN).
        if hs.remote_static != self._peer_static:
            raise NoiseError("rekey INIT from another static key")
        reply = hs.write_message(b"")
        next_send, next_recv = hs.split()
        self._hs_hash = hs.handshake_hash
        self._next_recv = next_recv
        self.state = "awaiting_switch"
        # The REPLY is our switch point: everything we send after it uses the new key.
        return Step(send=bytes([REKEY_REPLY]) + reply, next_send=next_send)

    def _on_reply(self, body: bytes) -> Step:
        hs = self._hs
        if self.state != "initiated" or hs is None:
            raise NoiseError(f"rekey REPLY while {self.state}")
        hs.read_message(body)
        next_send, next_recv = hs.split()
        self._hs_hash = hs.handshake_hash
        self._hs = None
        self.state = "switching"
        # The peer switched right after its REPLY, so its next message is under the
        # new key.  Our switch point: the SWITCH goes under the old key, everything
        # after it under the new.
        return Step(send=bytes([REKEY_SWITCH]), next_send=next_send, recv=next_recv, rekeyed=True)

    def _on_switch(self) -> Step:
        next_recv = self._next_recv
        if self.state != "awaiting_switch" or next_recv is None:
            raise NoiseError(f"rekey SWITCH while {self.state}")
        self._next_recv = None
        self.state = "idle"
        return Step(recv=next_recv, rekeyed=True)
