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

Rules are the mesh-wide ``intention`` config entries (agent.config_entries):
written on any node, through these commands, ``mesh-agent config`` or the
config file's ``[[intention]]`` tables, and the same on every node.  The
destination's agent stays the authority, for the reason above; the caller's
agent knows the same rules, so a denied call can be refused before it leaves.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from agent import entry_kinds, log, store
from agent.config_entries import ConfigEntries
from agent.services import SERVICE_NAME_RE, ServiceError, shown
from gossip import hlc
from gossip.frozen import same_class_equality

STORE_FILE = "intentions.json"
WILDCARD = "*"
ACTIONS = ("allow", "deny")
FIELDS = {"source", "destination", "action", "description"}
MAX_DESCRIPTION = 512


@same_class_equality
class Intention(NamedTuple):
    source: str
    destination: str
    action: str
    description: str = ""
    #: The node that wrote the config entry this rule is, and its version.
    writer: str = ""
    version: int = 0

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
                "description": self.description, "precedence": self.precedence, "writer": self.writer,
                "version": self.version}


@same_class_equality
class Verdict(NamedTuple):
    allowed: bool
    #: "allow", "deny", "default" (no rule matched) or "unverified".
    reason: str
    rule: Intention | None = None


def check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not (value == WILDCARD or SERVICE_NAME_RE.match(value)):
        raise ServiceError(f"invalid {what} {shown(value)}: use a service name (a DNS label) or '*'")
    return value


def validate(payload: Any) -> Intention:
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
    return Intention(source, destination, str(action), description)


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


#: Versions given to rules migrated from a node's own intentions.json: older than any
#: write made since (a hybrid-logical timestamp of now), and a deny's newer than an
#: allow's, so that where nodes held conflicting rules for a pair, deny wins everywhere.
MIGRATED_VERSION = {"allow": hlc.make(1), "deny": hlc.make(2)}


class Intentions:
    """The mesh-wide ``intention`` config entries, as the rules this agent enforces."""

    def __init__(self, entries: ConfigEntries, data_dir: Path | None, node: str,
                 has_instance: Callable[[str, str], bool]) -> None:
        self.entries = entries
        self.data_dir = data_dir
        #: ``has_instance(node, service)``: is an instance of ``service`` registered on ``node``.
        self.has_instance = has_instance
        self.rules: dict[tuple[str, str], Intention] = {}
        #: Verdicts for calls that name no source, for the rules they were decided on.
        self._anonymous: tuple[dict[tuple[str, str], Intention], dict[str, Verdict]] = (self.rules, {})
        self.log = log.get("mesh.intentions").bind(node=node)

    def refresh(self) -> None:
        """Rebuild the rules from the entries (after any change to them)."""
        rules = {}
        for e in self.entries.live(entry_kinds.INTENTION):
            body = e.body or {}
            rule = Intention(body["source"], body["destination"], body["action"], body.get("description", ""),
                             writer=e.writer, version=e.version)
            rules[(rule.source, rule.destination)] = rule
        self.rules = rules

    def migrate(self) -> None:
        """Once, at the first start of a mesh-wide version: this node's own intentions.json becomes entries."""
        path = None if self.data_dir is None else self.data_dir / STORE_FILE
        if path is None or not path.exists():
            return
        migrated = 0
        for raw in store.read_records(path, self.log, "intention_store_unreadable"):
            try:
                rule = validate(raw)
            except ServiceError as exc:
                self.log.error("stored_intention_invalid", detail=str(exc))
                continue
            body = {"source": rule.source, "destination": rule.destination, "action": rule.action}
            if rule.description:
                body["description"] = rule.description
            self.entries.write_migrated(entry_kinds.INTENTION, entry_kinds.intention_name(rule.source,
                                                                                          rule.destination),
                                        body, MIGRATED_VERSION[rule.action])
            migrated += 1
        path.rename(path.with_name(STORE_FILE + ".migrated"))
        self.refresh()
        self.log.warning("intentions_migrated", rules=migrated,
                         detail=f"this node's intentions are now mesh-wide config entries; {path.name} was "
                                f"renamed {path.name}.migrated")

    # -- the data plane asks -------------------------------------------------------------

    def authorize(self, node: str, source: str | None, destination: str) -> Verdict:
        if source is None:
            # Asked per HTTP request: without a source the verdict depends on the rules alone, which
            # refresh replaces whole, so it is kept until they are.
            rules, verdicts = self._anonymous
            if rules is not self.rules:
                self._anonymous = rules, verdicts = self.rules, {}
            verdict = verdicts.get(destination)
            if verdict is None:
                verdict = verdicts[destination] = decide(rules, None, destination, False)
            return verdict
        return decide(self.rules, source, destination, self.has_instance(node, source))

    # -- API: a front for the intention entries ---------------------------------------------

    def put(self, payload: Any) -> dict[str, Any]:
        rule = validate(payload)
        body: dict[str, Any] = {"kind": entry_kinds.INTENTION, "source": rule.source,
                                "destination": rule.destination, "action": rule.action}
        if rule.description:
            body["description"] = rule.description
        view = self.entries.write(body)
        return {"ok": True, **self._rule_view(view)}

    def remove(self, source: Any, destination: Any) -> dict[str, Any]:
        source = check_name(source, "source")
        destination = check_name(destination, "destination")
        if (source, destination) not in self.rules:
            raise ServiceError(f"no intention from {source!r} to {destination!r}", 404)
        self.entries.delete(entry_kinds.INTENTION, entry_kinds.intention_name(source, destination))
        return {"ok": True, "source": source, "destination": destination}

    def view(self) -> list[dict[str, Any]]:
        rules = sorted(self.rules.values(), key=lambda r: (-r.precedence, r.source, r.destination))
        return [r.to_dict() for r in rules]

    @staticmethod
    def _rule_view(entry_view: dict[str, Any]) -> dict[str, Any]:
        rule = Intention(entry_view["source"], entry_view["destination"], entry_view["action"],
                         entry_view.get("description", ""), writer=entry_view["writer"],
                         version=entry_view["version"])
        return rule.to_dict()
