"""Application state that rides on membership (memberlist's Delegate), and fetching it.

Only a small summary of each member's state (a version and a digest) travels
on its alive; the full state travels over TCP: all of it in push-pull, one
member's on demand, when its summary is news to the delegate.
"""

from __future__ import annotations

from typing import Protocol

from gossip.effects import FetchState
from gossip.member import Member, Status
from gossip.table import MemberTable
from gossip.wire import DecodeError, NodeState, StateReply, decode_stream

#: Other members asked for a node's catalog when the node itself cannot be reached.
_FETCH_FALLBACKS = 2


class Delegate(Protocol):
    """What the membership needs of the application state it carries."""

    def state(self) -> NodeState: ...

    def advertised(self, node: str, version: int, digest: bytes) -> bool: ...

    def dump(self) -> bytes: ...

    def merge_dump(self, data: bytes) -> object: ...

    def encode_node(self, node: str) -> bytes | None: ...

    def apply_node(self, data: bytes) -> object: ...

    def fetch_done(self, node: str, ok: bool = True) -> bool: ...

    def forget(self, node: str) -> None: ...


class StateTransfer:
    """Moves the delegate's state between members: dumps in push-pull, one member's by FetchState."""

    def __init__(self, table: MemberTable, delegate: Delegate | None) -> None:
        self.table = table
        self.delegate = delegate
        #: Catalog fetches that failed and were retried through another member: node -> tries.
        self._fetch_tries: dict[str, int] = {}
        table.on_forget(self._forget)

    def _forget(self, name: str) -> None:
        self._fetch_tries.pop(name, None)
        if self.delegate is not None:
            self.delegate.forget(name)

    def note(self, m: Member) -> None:
        """``m``'s state summary is new to us: fetch its state if the delegate lacks it."""
        if self.delegate is not None and m.state is not None:
            if self.delegate.advertised(m.name, m.state[0], m.state[1]):
                self.table.outbox.append(FetchState(m.name, m.addr))

    def dump(self) -> bytes:
        return self.delegate.dump() if self.delegate else b""

    def merge_dump(self, data: bytes) -> bool:
        """Merge a push-pull's dump; True if there was one to merge (our own state may have to move on)."""
        if self.delegate is None or not data:
            return False
        try:
            self.delegate.merge_dump(data)
        except DecodeError as exc:
            self.table.drop("state_" + exc.reason)
        return True

    def encode_node(self, node: str) -> bytes:
        """What we hold of ``node``'s state, for a state request (empty: nothing)."""
        held = self.delegate.encode_node(node) if self.delegate else None
        return held or b""

    def complete_fetch(self, node: str, reply: bytes | None) -> bool:
        """The reply to a FetchState arrived (or None: it failed)."""
        if self.delegate is None:
            return False
        table = self.table
        ok = self._apply_fetched(reply)
        m = table.members.get(node)
        up = m is not None and m.status.up
        if self.delegate.fetch_done(node, ok and up) and m is not None:
            table.outbox.append(FetchState(node, m.addr))  # it changed again meanwhile
        elif not ok and m is not None and up and m.state is not None:
            # We cannot reach the owner (a firewall, a one-sided partition: its
            # services may still be reachable through a relay): any member that
            # holds its catalog can answer, so ask a couple of others.
            tries = self._fetch_tries.get(node, 0)
            others = [x for x in table.members.values()
                      if x.status is Status.ALIVE and x.name not in (table.name, node)]
            if tries < _FETCH_FALLBACKS and others and self.delegate.advertised(node, m.state[0], m.state[1]):
                self._fetch_tries[node] = tries + 1
                table.outbox.append(FetchState(node, table.rng.choice(others).addr))
        if ok:
            self._fetch_tries.pop(node, None)
        return ok

    def _apply_fetched(self, reply: bytes | None) -> bool:
        assert self.delegate is not None
        if reply is None:
            return False
        try:
            msgs = decode_stream(reply)
        except DecodeError as exc:
            self.table.drop(exc.reason)
            return False
        if len(msgs) != 1 or not isinstance(msgs[0], StateReply) or not msgs[0].data:
            return False
        try:
            self.delegate.apply_node(msgs[0].data)
        except DecodeError as exc:
            self.table.drop("state_" + exc.reason)
            return False
        self.table.counters.stats["state_fetched"] += 1
        return True
