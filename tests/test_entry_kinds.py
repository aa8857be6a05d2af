"""Config entries are checked, field by field and against each other, before they spread."""

from __future__ import annotations

from typing import Any

import pytest

from agent.entry_kinds import check_delete, intention_name, validate
from agent.services import ServiceError


class Entries:
    """A stand-in for the store: what validate looks other entries up in."""

    def __init__(self) -> None:
        self.held: dict[tuple[str, str], dict[str, Any]] = {}

    def __call__(self, kind: str, name: str) -> dict[str, Any] | None:
        return self.held.get((kind, name))

    def write(self, kind: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        out = validate(kind, name, body, self)
        self.held[(kind, name)] = out
        return out


def refused(store: Entries, kind: Any, name: Any, body: Any, needle: str, status: int = 400) -> None:
    with pytest.raises(ServiceError) as info:
        validate(kind, name, body, store)
    assert needle in str(info.value), str(info.value)
    assert info.value.status == status
    assert "\n" not in str(info.value)


def test_a_whole_canary_set_up_is_accepted() -> None:
    s = Entries()
    assert s.write("service-defaults", "web", {"protocol": "http", "lb": "least_connections",
                                               "connect_timeout": "2s"})["protocol"] == "http"
    resolver = s.write("service-resolver", "web", {
        "subsets": {"v2": {"meta": {"version": "2"}}, "v1": {"tags": ["v1", "v1"]}},
        "default_subset": "v1", "failover": [{"service": "web-backup"}]})
    assert list(resolver["subsets"]) == ["v1", "v2"] and resolver["subsets"]["v1"] == {"tags": ["v1"]}
    split = s.write("service-splitter", "web", {"splits": [{"weight": 90, "subset": "v1"},
                                                           {"weight": 10, "subset": "v2"}]})
    assert split["splits"][1] == {"weight": 10, "service": "web", "subset": "v2"}
    router = s.write("service-router", "web", {"routes": [
        {"match": {"path_prefix": "/api", "methods": ["POST", "GET"]}, "destination": {"subset": "v2"}},
        {"match": {"header": {"name": "X-Canary", "exact": "1"}}, "destination": {"service": "web-canary"}}]})
    assert router["routes"][0]["match"]["methods"] == ["GET", "POST"]
    assert router["routes"][1]["match"]["header"] == {"name": "x-canary", "exact": "1"}
    assert s.write("intention", "web/db", {"source": "web", "destination": "db", "action": "deny"}) == {
        "source": "web", "destination": "db", "action": "deny"}
    assert intention_name("*", "db") == "*/db"


@pytest.mark.parametrize(("kind", "name", "body", "needle"), [
    ("service-mesh", "web", {}, "unknown kind"),
    ("intention", "web/db", {"source": "web", "destination": "db", "action": "maybe"}, "allow or deny"),
    ("intention", "db/web", {"source": "web", "destination": "db", "action": "allow"}, "'web/db'"),
    ("intention", "Web/db", {"source": "Web", "destination": "db", "action": "allow"}, "not a service name"),
    ("service-defaults", "web", {"protocol": "grpc"}, "tcp or http"),
    ("service-defaults", "web", {"lb": "fastest"}, "lb must be one of"),
    ("service-defaults", "web", {"colour": "blue"}, "unknown field 'colour'"),
    ("service-defaults", "web", {"connect_timeout": "0s"}, "connect_timeout"),
    ("service-defaults", "Bad_Name", {}, "not a service name"),
    ("service-resolver", "web", {"subsets": {"all": {}}}, "selects every instance"),
    ("service-resolver", "web", {"subsets": {"v1": {"tags": ["a"]}}, "default_subset": "v9"}, "default_subset"),
    ("service-resolver", "web", {"failover": [{"service": "web"}]}, "the service itself"),
    ("service-resolver", "web", {"failover": [{"service": "db", "subset": "v1"}]}, "db has no subset 'v1'"),
    ("service-splitter", "web", {"splits": [{"weight": 90}, {"weight": 9, "service": "canary"}]}, "add up to 99"),
    ("service-splitter", "web", {"splits": [{"weight": 101}]}, "from 0 to 100"),
    ("service-splitter", "web", {"splits": [{"weight": 100, "subset": "v1"}]}, "web has no subset 'v1'"),
    ("service-splitter", "web", {"splits": []}, "1 to 32"),
    ("service-router", "web", {"routes": [{"match": {"path_prefix": "/"}, "destination": {}}]}, "protocol http"),
])
def test_bad_entries_are_refused_with_one_line_naming_the_field(kind: str, name: str, body: dict[str, Any],
                                                                 needle: str) -> None:
    refused(Entries(), kind, name, body, needle)


def test_router_checks_its_matches_once_the_service_speaks_http() -> None:
    s = Entries()
    s.write("service-defaults", "web", {"protocol": "http"})
    for match, needle in (({"path_prefix": "api"}, "start with '/'"), ({"methods": ["FETCH"]}, "methods"),
                          ({"header": {"name": "x"}}, "exact or present"), ({}, "an object with")):
        refused(s, "service-router", "web", {"routes": [{"match": match, "destination": {"service": "api"}}]},
                needle)


def test_a_service_with_a_router_cannot_go_back_to_tcp() -> None:
    s = Entries()
    s.write("service-defaults", "web", {"protocol": "http"})
    s.write("service-router", "web", {"routes": [{"match": {"path_prefix": "/"}, "destination": {"service": "x"}}]})
    refused(s, "service-defaults", "web", {"protocol": "tcp"}, "delete the router first", 409)


def test_failover_loops_through_other_services_are_refused() -> None:
    s = Entries()
    s.write("service-resolver", "b", {"failover": [{"service": "c"}]})
    s.write("service-resolver", "c", {"failover": [{"service": "a"}]})
    refused(s, "service-resolver", "a", {"failover": [{"service": "b"}]}, "failover loop")
    s.write("service-resolver", "a", {"failover": [{"service": "d"}]})  # no way back: fine


def test_a_resolver_whose_subsets_are_in_use_cannot_be_deleted() -> None:
    s = Entries()
    s.write("service-resolver", "web", {"subsets": {"v1": {"tags": ["v1"]}}})
    check_delete("service-resolver", "web", s)  # nothing uses it yet
    s.write("service-splitter", "web", {"splits": [{"weight": 100, "subset": "v1"}]})
    with pytest.raises(ServiceError, match="delete or change it first"):
        check_delete("service-resolver", "web", s)
