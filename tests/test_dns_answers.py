"""The answers module in process: RTT order, shuffling among near-equals, the limit, settings; parsed by dnspython."""

from __future__ import annotations

from collections.abc import Iterable

import dns.message
import dns.rcode
import pytest

from agent.dns_answers import Answers
from agent.dns_settings import DnsSettings, settings_from
from gossip.registry import Instance


class FakeCatalog:
    def __init__(self, rtts: dict[str, float | None]) -> None:
        self.rtts = rtts
        self.v = 1
        self.items = [(node, Instance(f"web-{node}", "web", f"127.0.5.{i + 1}", 80))
                      for i, node in enumerate(rtts)]

    def version(self) -> int:
        return self.v

    def instances(self) -> Iterable[tuple[str, Instance]]:
        return self.items

    def node_address(self, node: str) -> str | None:
        return "10.9.9.9"

    def node_tags(self, node: str) -> dict[str, str]:
        return {}

    def node_names(self) -> Iterable[str]:
        return list(self.rtts)

    def rtt(self, node: str) -> float | None:
        return self.rtts[node]


def ask(answers: Answers, name: str, qtype: str = "A", **kw: object) -> dns.message.Message:
    q = dns.message.make_query(name, qtype, **kw)  # type: ignore[arg-type]
    wire = q.to_wire()
    return dns.message.from_wire(answers.respond(wire, tcp=False).render(wire[:2]))


def order(answers: Answers) -> list[str]:
    r = ask(answers, "web.service.mesh")
    return [line.split()[-1] for line in r.answer[0].to_text().splitlines()] if r.answer else []


def test_nearest_first_and_near_equals_shuffled() -> None:
    # n1 and n2 are about as near (within 25% + 0.5 ms), n3 is far, n4 unknown: last.
    cat = FakeCatalog({"n1": 0.0010, "n2": 0.0012, "n3": 0.050, "n4": None})
    answers = Answers(DnsSettings(), cat)
    seen_first = set()
    for _ in range(64):
        got = order(answers)
        # dnspython keeps the wire order of an RRset's records
        assert sorted(got[:2]) == ["127.0.5.1", "127.0.5.2"] and got[2:] == ["127.0.5.3", "127.0.5.4"]
        seen_first.add(got[0])
    assert seen_first == {"127.0.5.1", "127.0.5.2"}


def test_the_order_follows_the_rtt_when_the_view_changes() -> None:
    cat = FakeCatalog({"n1": 0.050, "n2": 0.001})
    now = [100.0]
    answers = Answers(DnsSettings(), cat, clock=lambda: now[0])
    assert order(answers) == ["127.0.5.2", "127.0.5.1"]
    cat.rtts = {"n1": 0.001, "n2": 0.050}
    assert order(answers) == ["127.0.5.2", "127.0.5.1"]  # the kept answer, until the view changes
    cat.v += 1
    assert order(answers) == ["127.0.5.1", "127.0.5.2"]
    cat.rtts = {"n1": 0.050, "n2": 0.001}
    now[0] += 5.0  # or when a few seconds pass: RTT estimates move without the view changing
    assert order(answers) == ["127.0.5.2", "127.0.5.1"]


def test_the_limit_keeps_the_nearest() -> None:
    cat = FakeCatalog({"n1": 0.001, "n2": 0.020, "n3": 0.040})
    answers = Answers(DnsSettings(answer_limit=2), cat)
    assert order(answers) == ["127.0.5.1", "127.0.5.2"]


def test_the_id_and_the_question_spelling_come_back() -> None:
    answers = Answers(DnsSettings(), FakeCatalog({"n1": 0.0}))
    q = dns.message.make_query("WeB.service.MESH", "A")
    r = dns.message.from_wire(answers.respond(q.to_wire(), False).render(q.to_wire()[:2]))
    assert r.id == q.id and r.question[0].name.to_text() == "WeB.service.MESH."
    assert r.answer[0].name.to_text() == "WeB.service.MESH." and r.rcode() == dns.rcode.NOERROR


def test_settings_are_checked_in_one_line() -> None:
    assert settings_from({"domain": "Consul"}).domain == "consul."
    assert settings_from({}).domain == "mesh."
    for table, message in (
        ({"domain": "bad domain"}, "domain must be a DNS name"),
        ({"domain": ""}, "domain must be a DNS name"),
        ({"ttl": 3}, "unknown setting 'ttl'"),
        ({"only_passing": "yes"}, "only_passing must be true or false"),
        ({"source_qps": 1.5}, "source_qps must be a number"),
        ({"virtual_idle": 0}, "virtual_idle must be a number from 1"),
    ):
        with pytest.raises(ValueError, match=message):
            settings_from(table)
