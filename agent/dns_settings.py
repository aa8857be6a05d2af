"""The DNS server's settings: ``--dns`` and the config file's ``[dns_config]`` table.

Apart from agent/dns_answers.py so that reading the configuration does not
load dnspython: the agent loads it when the first query arrives.
"""

import re
from typing import Any, NamedTuple

from gossip.frozen import same_class_equality

#: Consul's DNS port, on loopback: the host's resolver forwards the mesh's domain here.
DEFAULT_DNS = "127.0.0.1:8600"

_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")


@same_class_equality
class DnsSettings(NamedTuple):
    """What the config file's ``[dns_config]`` table may set (Consul's names where it has one)."""

    domain: str = "mesh."
    #: Only passing instances in answers (Consul's ``only_passing``); by default warning ones too.
    only_passing: bool = False
    #: At most this many records in an answer (0: all of them, as fit).
    answer_limit: int = 0
    service_ttl: int = 0
    node_ttl: int = 0
    virtual_ttl: int = 0
    #: Queries a second answered from one source address (0: no limit); a burst of as many is allowed.
    source_qps: int = 5000
    #: A virtual upstream nobody looked up or used for this long is closed (seconds).
    virtual_idle: float = 600.0


_SETTING_KINDS: dict[str, tuple[type, float, float]] = {
    "answer_limit": (int, 0, 1000), "service_ttl": (int, 0, 86400), "node_ttl": (int, 0, 86400),
    "virtual_ttl": (int, 0, 86400), "source_qps": (int, 0, 10_000_000), "virtual_idle": (float, 1, 7 * 86400),
}


def settings_from(table: Any) -> DnsSettings:
    """``[dns_config]`` checked; ValueError says what is wrong in one line."""
    if not isinstance(table, dict):
        raise ValueError("[dns_config] must be a table")
    known = {"domain", "only_passing", *_SETTING_KINDS}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ValueError(f"[dns_config]: unknown setting {unknown[0]!r} (allowed: {', '.join(sorted(known))})")
    values: dict[str, Any] = {}
    if "domain" in table:
        domain = table["domain"]
        labels = domain.strip(".").split(".") if isinstance(domain, str) else []
        if not labels or not all(_LABEL.match(label) for label in labels) or len(domain) > 200:
            raise ValueError(f"[dns_config]: domain must be a DNS name such as \"mesh\", got {domain!r}")
        values["domain"] = ".".join(labels).lower() + "."
    if "only_passing" in table:
        if not isinstance(table["only_passing"], bool):
            raise ValueError("[dns_config]: only_passing must be true or false")
        values["only_passing"] = table["only_passing"]
    for key, (kind, low, high) in _SETTING_KINDS.items():
        if key not in table:
            continue
        raw = table[key]
        ok = type(raw) is int or (kind is float and type(raw) is float)
        if not ok or not low <= raw <= high:
            raise ValueError(f"[dns_config]: {key} must be a number from {low:g} to {high:g}, got {raw!r}")
        values[key] = kind(raw)
    return DnsSettings(**values)
