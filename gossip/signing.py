"""Names bound to keys: every member signs its own alive messages (Ed25519).

The cluster key only says "this packet comes from a member"; any member can
still write an alive message about any other.  That is how, in memberlist and
Serf, one misconfigured or compromised node can take over a live member's name
("Node name conflicts with another node") or keep a dead one alive by
refuting on its behalf.  Here each member's alive messages -- the only
messages that change who a name is, where it lives and which incarnation is
current -- carry the member's Ed25519 public key and its signature over
exactly those fields.  The first key seen for a name is bound to it (trust on
first use); afterwards an alive for that name must be signed by that key,
while it is alive.  (A first sighting is checked a moment later, not on
arrival: gossip.state.VERIFY_DELAY says why that gives nothing away.)
Suspect and dead messages stay unsigned: any member must be able to accuse
another, which is what failure detection is.

PyNaCl's ``signing`` module does the cryptography; pure functions, no I/O.
"""

from __future__ import annotations

import nacl.exceptions
import nacl.signing
from msgpack import packb

from gossip.wire import Address, NodeState, Tunnel

#: Domain separation: a signature over an alive is never valid as anything else.
_CONTEXT = "mesh-agent alive v1"
PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
#: Verified signatures remembered (a gossiped alive arrives many times).
_CACHE_MAX = 8192


def alive_bytes(name: str, addr: Address, incarnation: int, tags: dict[str, str], state: NodeState | None,
                tunnel: Tunnel | None) -> bytes:
    """The canonical encoding of what an alive signature covers."""
    fields = [
        _CONTEXT, name, [addr[0], addr[1]], incarnation, sorted(tags.items()),
        None if state is None else [state[0], state[1]],
        None if tunnel is None else [tunnel[0][0], tunnel[0][1], tunnel[1]],
    ]
    out: bytes = packb(fields, use_bin_type=True)
    return out


class Signer:
    """This agent's identity key."""

    def __init__(self, seed: bytes) -> None:
        self._key = nacl.signing.SigningKey(seed)
        self.public: bytes = bytes(self._key.verify_key)

    def sign(self, data: bytes) -> bytes:
        sig: bytes = self._key.sign(data).signature
        return sig


class Verifier:
    """Checks signatures, remembering the ones it has seen valid (each costs ~0.1 ms)."""

    def __init__(self) -> None:
        self._valid: dict[bytes, tuple[bytes, bytes]] = {}
        self.checked = 0

    def verify(self, public: bytes, data: bytes, sig: bytes) -> bool:
        if len(public) != PUBLIC_KEY_SIZE or len(sig) != SIGNATURE_SIZE:
            return False
        seen = self._valid.get(sig)
        if seen is not None:
            return seen == (public, data)
        self.checked += 1
        try:
            nacl.signing.VerifyKey(public).verify(data, sig)
        except (nacl.exceptions.BadSignatureError, nacl.exceptions.CryptoError, ValueError, TypeError):
            return False
        if len(self._valid) >= _CACHE_MAX:
            self._valid.clear()
        self._valid[sig] = (public, data)
        return True
