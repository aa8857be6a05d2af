"""Intentions: which service may call which, decided by the agent that receives the call.

A rule names a source service, a destination service (either may be ``*``)
and allow or deny.  The most specific rule wins, with Consul's precedence:
exact source and destination, then ``*`` source with exact destination, then
exact source with ``*`` destination, then ``*``/``*``; when nothing matches
the call is allowed, so a mesh without intentions behaves as before.

The receiving agent decides, because only it can check who is calling: the
tunnel session authenticates the initiating *node*, and the source service a
stream names counts only if that node has an instance of it registered in the
catalog.  A stream that names a service its node does not have is
*unverified*: it is refused unless the rule that applies to any source (``*``
to this destination, else ``*``/``*``) explicitly allows it, so nobody gains
an identity's permissions by claiming it.  A stream that names no source is
judged by the ``*``-source rules alone (default allow).

Rules come from the config file (``[[intention]]``, re-read at each start) and
from the API/CLI; run-time ones are written under --data-dir so a restart
keeps them.  A run-time rule for a pair the config file also names takes
its place (and, persisted, keeps it); removing a config-file rule at run time
lasts until the next start.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import log, store
from agent.services import SERVICE_NAME_RE, ServiceError, shown

STORE_FILE = "intentions.json"
WILDCARD = "*"
ACTIONS = ("allow", "deny")
FIELDS = {"source", "destination", "action", "description"}
MAX_DESCRIPTION = 512


@dataclass(frozen=True)
class Intention:
    source: str
    destination: str
    action: str
    description: str = ""
    #: "config" rules come back from the config file at each start; "api" ones are persisted.
    origin: str = "api"

    @property
    def precedence(self) -> int:
        """Consul's ordering: a rule naming more exactly wins (9, 8, 6, 5)."""
        exact_src = self.source != WILDCARD
        exact_dst = self.destination != WILDCARD
        if exact_src and exact_dst:
            return 9
        if exact_dst:
            return 8
        if exact_src:
            return 6
        return 5

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "destination": self.destination, "action": self.action,
                "description": self.description, "precedence": self.precedence, "origin": self.origin}


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    #: "allow", "deny", "default" (no rule matched) or "unverified".
    reason: str
    rule: Intention | None = None


def check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not (value == WILDCARD or SERVICE_NAME_RE.match(value)):
        raise ServiceError(f"invalid {what} {shown(value)}: use a service name (a DNS label) or '*'")
    return value


def validate(payload: Any, origin: str = "api") -> Intention:
    """Check a rule fully before anything changes; one-line errors."""
    if not isinstance(payload, dict):
        raise ServiceError("an intention must be an object with source, destination and action")
    unknown = sorted(set(payload) - FIELDS)
    if unknown:
        raise ServiceError(f"unknown field {unknown[0]!r} (allowed: {', '.join(sorted(FIELDS))})")
    source = check_name(payload.get("source"), "source")
    destination = check_name(payload.get("destination"), "destination")
    action = payload.get("action")
    if action not in ACTIONS:
        raise ServiceError(f"action must be allow or deny, got {shown(action)}")
    description = payload.get("description", "")
    if description is None:
        description = ""
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION:
        raise ServiceError(f"description must be a string of at most {MAX_DESCRIPTION} characters")
    return Intention(source, destination, str(action), description, origin)


def match(rules: dict[tuple[str, str], Intention], source: str | None, destination: str) -> Intention | None:
    """The rule that decides a call from ``source`` (None: any-source rules only) to ``destination``."""
    candidates = []
    if source is not None:
        candidates += [(source, destination), (source, WILDCARD)]
    candidates += [(WILDCARD, destination), (WILDCARD, WILDCARD)]
    found = [rules[c] for c in candidates if c in rules]
    return max(found, key=lambda r: r.precedence) if found else None


def decide(rules: dict[tuple[str, str], Intention], source: str | None, destination: str,
           verified: bool) -> Verdict:
    """Whether a call may proceed; ``verified`` says the caller's node holds ``source``."""
    if source is not None and not verified:
        rule = match(rules, None, destination)
        if rule is not None and rule.action == "allow":
            return Verdict(True, "allow", rule)
        return Verdict(False, "unverified", rule)
    rule = match(rules, source, destination)
    if rule is None:
        return Verdict(True, "default")
    return Verdict(rule.action == "allow", rule.action, rule)


class Intentions:
    def __init__(self, data_dir: Path | None, node: str, has_instance: Callable[[str, str], bool]) -> None:
        self.data_dir = data_dir
        #: ``has_instance(node, service)``: is an instance of ``service`` registered on ``node``.
        self.has_instance = has_instance
        self.rules: dict[tuple[str, str], Intention] = {}
        self.log = log.get("mesh.intentions").bind(node=node)
        self.saver = store.Saver(None if data_dir is None else data_dir / STORE_FILE, self.log)

    def load(self, config_intentions: list[dict[str, Any]]) -> None:
        """The config file's rules, then the persisted run-time ones (config errors were caught at start)."""
        for raw in config_intentions:
            rule = validate(raw, origin="config")
            self.rules[(rule.source, rule.destination)] = rule
        for raw in self._read_store():
            try:
                rule = validate(raw)
            except ServiceError as exc:
                self.log.error("stored_intention_invalid", detail=str(exc))
                continue
            self.rules[(rule.source, rule.destination)] = rule

    # -- the data plane asks -------------------------------------------------------------

    def authorize(self, node: str, source: str | None, destination: str) -> Verdict:
        verified = source is not None and self.has_instance(node, source)
        return decide(self.rules, source, destination, verified)

    # -- API -----------------------------------------------------------------------------

    def put(self, payload: Any) -> dict[str, Any]:
        rule = validate(payload)
        self._persist([*(r for k, r in self.rules.items() if k != (rule.source, rule.destination)), rule])
        self.rules[(rule.source, rule.destination)] = rule
        self.log.info("intention_set", source=rule.source, destination=rule.destination, action=rule.action)
        return {"ok": True, **rule.to_dict()}

    def remove(self, source: Any, destination: Any) -> dict[str, Any]:
        source = check_name(source, "source")
        destination = check_name(destination, "destination")
        if (source, destination) not in self.rules:
            raise ServiceError(f"no intention from {source!r} to {destination!r}", 404)
        self._persist([r for k, r in self.rules.items() if k != (source, destination)])
        del self.rules[(source, destination)]
        self.log.info("intention_removed", source=source, destination=destination)
        return {"ok": True, "source": source, "destination": destination}

    def view(self) -> list[dict[str, Any]]:
        rules = sorted(self.rules.values(), key=lambda r: (-r.precedence, r.source, r.destination))
        return [r.to_dict() for r in rules]

    # -- persistence -----------------------------------------------------------------------

    def _read_store(self) -> list[dict[str, Any]]:
        path = None if self.data_dir is None else self.data_dir / STORE_FILE
        return store.read_records(path, self.log, "intention_store_unreadable")

    def _persist(self, rules: Iterable[Intention]) -> None:
        """Save ``rules`` (the state about to be applied); StoreError when they cannot be."""
        body = [{"source": r.source, "destination": r.destination, "action": r.action,
                 "description": r.description} for r in rules if r.origin == "api"]
        self.saver.save(body)
