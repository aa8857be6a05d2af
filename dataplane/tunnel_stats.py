"""The tunnel manager's counters, by name.

Apart from dataplane/tunnel.py so that an agent whose data plane is not
loaded yet (agent/plane.py) shows them at zero, as one whose is, without
importing the handshake and the cipher.
"""

from __future__ import annotations

from typing import Final

#: Why a responder refused a connection: each is a ``handshakes_failed_<reason>`` counter.
REFUSAL_REASONS: Final = (
    "bad_magic", "bad_version", "bad_handshake", "name_mismatch", "unknown_key", "replay", "timeout", "io_error",
    "busy",
)  # fmt: skip

#: Every counter the tunnel manager keeps, present from the start.
STAT_KEYS: Final = (
    "handshakes_ok", *(f"handshakes_failed_{r}" for r in REFUSAL_REASONS), "dials_failed",
    "sessions_open", "sessions_opened", "sessions_closed", "sessions_failed", "duplicate_sessions",
    "streams_opened", "streams_accepted", "streams_refused", "bytes_in", "bytes_out",
    "decrypt_failures", "protocol_errors", "handler_errors", "rekeys", "rekey_collisions", "rekey_failures",
    "direct_dials_failed", "relayed_dials", "dials_rtt_bounded", "dials_late", "relays_raced",
)  # fmt: skip
