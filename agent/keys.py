"""Cluster-wide key rotation, as ``serf keys`` does it: one command, every member.

Rotating the gossip key without a partition takes three steps run on every
member -- install the new key, make it primary, remove the old one -- and an
operator cannot log in to every node to do it.  Each step here is a gossip
query (gossip.swim.start_query): it spreads to all members sealed with the
current primary, each applies it to its own keyring and answers the origin,
and the command reports how many acknowledged and names the rest.

The keyring persists under ``--data-dir`` (``keyring.json``, mode 0600), so
an agent restarted after a rotation comes back with the keys the cluster
uses; once that file exists the key given with ``--key``/``--key-file`` is
ignored (with a warning when it is not in the file), so an old start-up
script can neither undo a rotation nor bring a removed key back.  Keys are
secrets: they are never logged, only their short fingerprints.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import trio

from agent import store
from gossip.keyring import KeyError_, Keyring, decode_key, encode_key
from gossip.member import Status
from gossip.swim import Membership

KEYRING_FILE = "keyring.json"
QUERY_NAME = "keys"
OPS = ("list", "install", "use", "remove")
#: How long the origin waits for every alive member to answer.
DEFAULT_TIMEOUT = 5.0


class KeyOpError(Exception):
    """A request that cannot even start (bad key, insecure agent, removing our primary); 4xx."""


def fingerprint(key: bytes) -> str:
    """Short, non-secret name of a key for logs: the first 8 hex digits of its SHA-256."""
    return hashlib.sha256(key).hexdigest()[:8]


class KeyManager:
    def __init__(self, keyring: Keyring | None, data_dir: Path | None, membership: Membership, log: Any,
                 wake: Callable[[], None]) -> None:
        self.keyring = keyring
        self.data_dir = data_dir
        self.membership = membership
        self.log = log
        self._wake = wake
        self.saver = store.Saver(None if data_dir is None or keyring is None else data_dir / KEYRING_FILE, log)
        #: Queries we originated: id -> an event set when every expected member answered.
        self._waiting: dict[int, tuple[set[str], trio.Event]] = {}

    # -- persistence --------------------------------------------------------------------

    def load(self) -> None:
        """Take the persisted keyring if there is one; the configured key joins it as a secondary."""
        if self.keyring is None or self.data_dir is None:
            return
        path = self.data_dir / KEYRING_FILE
        if not path.exists():
            try:
                self._persist()
            except store.StoreError:
                pass  # logged and shown in info; the next key operation tries again
            return
        try:
            data = json.loads(path.read_text())
            keys = [decode_key(k) for k in data["keys"]]
            if not keys:
                raise ValueError("no keys")
        except (OSError, ValueError, KeyError, TypeError, KeyError_) as exc:
            self.log.error("keyring_unreadable", path=str(path), error=str(exc),
                           detail="using the configured key only")
            return
        if self.keyring.primary not in keys:
            # A rotation removed it: taking it back would reopen the cluster to it.
            self.log.warning("configured_key_not_in_keyring", path=str(path),
                             detail="the --key/--key-file key was rotated out; using the persisted keyring")
        self.keyring.replace(keys)
        self.log.info("keyring_loaded", keys=len(keys), primary=fingerprint(keys[0]))

    def _persist(self) -> None:
        """Save the keyring (mode 0600); StoreError when it cannot be written."""
        if self.keyring is not None:
            self.saver.save({"keys": [encode_key(k) for k in self.keyring.keys]})

    # -- the member side: a query arrived -------------------------------------------------

    def answer(self, payload: bytes) -> bytes:
        """Apply one key operation to our keyring; the answer goes back to the origin."""
        try:
            req = msgpack.unpackb(payload, raw=False)
            op, key_text = req["op"], req.get("key")
            if op not in OPS:
                raise ValueError(f"unknown operation {op!r}")
        except Exception as exc:  # noqa: BLE001 - a malformed request is answered, not raised
            return _pack({"ok": False, "error": f"malformed request ({type(exc).__name__})"})
        if self.keyring is None:
            return _pack({"ok": False, "error": "this agent runs without encryption (--insecure)"})
        if op == "list":
            return _pack({"ok": True, "keys": [encode_key(k) for k in self.keyring.keys],
                          "primary": encode_key(self.keyring.primary)})
        before = list(self.keyring.keys)
        try:
            key = decode_key(str(key_text))
            if op == "install":
                self.keyring.install(key)
            elif op == "use":
                self.keyring.use(key)
            else:
                self.keyring.remove(key)
            self._persist()
        except KeyError_ as exc:
            self.log.warning("key_op_refused", op=op, reason=str(exc))
            return _pack({"ok": False, "error": str(exc)})
        except store.StoreError as exc:
            # Not saved, so not applied: a restart would otherwise bring the old keyring back.
            self.keyring.replace(before)
            return _pack({"ok": False, "error": str(exc)})
        self.log.info("key_op", op=op, key=fingerprint(key), primary=fingerprint(self.keyring.primary))
        return _pack({"ok": True})

    def on_event(self, fields: dict[str, Any]) -> None:
        """A ``query`` event from membership: answer it if it is ours to answer."""
        if fields["name"] != QUERY_NAME:
            return
        now = trio.current_time()
        reply = self.answer(fields["payload"])
        self.membership.respond_query(now, fields["origin"], fields["origin_addr"], fields["id"], reply)
        self._wake()

    def note_responses(self) -> None:
        """After packets were handled: wake any operation whose members have all answered."""
        for qid, (expected, done) in self._waiting.items():
            answers = self.membership.query_responses.get(qid, {})
            if expected <= answers.keys():
                done.set()

    # -- the origin side: run one operation across the cluster ---------------------------

    async def run(self, op: str, key_text: str | None, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        if op not in OPS:
            raise KeyOpError(f"unknown operation {op!r}: use {', '.join(OPS)}")
        if self.keyring is None:
            raise KeyOpError("this agent runs without encryption (--insecure): there are no keys to manage")
        body: dict[str, Any] = {"op": op}
        if op != "list":
            if not key_text:
                raise KeyOpError(f"{op} needs a key (base64 of 32 bytes, see `mesh-agent keygen`)")
            try:
                key = decode_key(key_text)
            except KeyError_ as exc:
                raise KeyOpError(f"unusable key: {exc}") from None
            if op == "remove" and key == self.keyring.primary:
                raise KeyOpError("refusing to remove the primary key: make another key primary first "
                                 "(`mesh-agent keys use NEWKEY`)")
            if op == "use" and key not in self.keyring.keys:
                raise KeyOpError("that key is not installed here: `mesh-agent keys install` it first")
            body["key"] = encode_key(key)
        ms = self.membership
        expected = {m.name for m in ms.members.values() if m.status is Status.ALIVE}
        now = trio.current_time()
        qid = ms.start_query(now, QUERY_NAME, _pack(body))
        done = trio.Event()
        self._waiting[qid] = (expected, done)
        self._wake()
        try:
            with trio.move_on_after(timeout):
                self.note_responses()
                await done.wait()
        finally:
            del self._waiting[qid]
            answers = ms.finish_query(qid)
        return self._report(op, expected, answers)

    def _report(self, op: str, expected: set[str], answers: dict[str, bytes]) -> dict[str, Any]:
        failed: dict[str, str] = {}
        counts: dict[str, int] = {}
        primaries: dict[str, int] = {}
        for name, raw in sorted(answers.items()):
            try:
                res = msgpack.unpackb(raw, raw=False)
                ok = res.get("ok") is True
            except Exception:  # noqa: BLE001 - a member's garbage answer counts as a failure
                failed[name] = "malformed answer"
                continue
            if not ok:
                failed[name] = str(res.get("error", "failed"))
                continue
            if op == "list":
                for k in res.get("keys", []):
                    counts[str(k)] = counts.get(str(k), 0) + 1
                p = str(res.get("primary"))
                primaries[p] = primaries.get(p, 0) + 1
        missing = sorted(expected - answers.keys())
        acked = len(answers) - len(failed)
        out: dict[str, Any] = {
            "ok": not failed and not missing,
            "op": op,
            "members": len(expected),
            "acked": acked,
            "failed": failed,
            "missing": missing,
        }
        if op == "list":
            out["keys"] = counts
            out["primary"] = primaries
        self.log.info("key_op_done", op=op, members=len(expected), acked=acked, failed=sorted(failed),
                      missing=missing)
        return out


def _pack(obj: dict[str, Any]) -> bytes:
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed
