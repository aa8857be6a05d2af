"""The discovery chain on its own: weighted splits, subset filters, failover order."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from dataplane.discovery_chain import DiscoveryChain, Target


@dataclass(frozen=True)
class Inst:
    service: str
    id: str
    tags: tuple[str, ...] = ()
    meta: tuple[tuple[str, str], ...] = ()


PASSING = {
    "web": [Inst("web", "a", ("v1",)), Inst("web", "b", ("v2", "canary"), (("zone", "east"),)),
            Inst("web", "c", ("v2",), (("zone", "west"),))],
    "web-backup": [Inst("web-backup", "z")],
}
RESOLVERS = {
    "web": {"subsets": {"v1": {"tags": ["v1"]}, "v2": {"tags": ["v2"]}, "east": {"meta": {"zone": "east"}},
                        "gone": {"tags": ["none"]}},
            "default_subset": "v1", "failover": [{"subset": "v2"}, {"service": "web-backup"}]},
}


def passing(service: str) -> list[Inst]:
    return list(PASSING.get(service, []))


def test_weights_are_honoured_per_choice() -> None:
    chain = DiscoveryChain("web", {"splits": [{"weight": 75, "subset": "v1"}, {"weight": 25, "subset": "v2"},
                                              {"weight": 0, "service": "web-backup"}]}, RESOLVERS)
    rng = random.Random(7)
    got = Counter(str(chain.choose(rng)) for _ in range(20_000))
    assert set(got) == {"web/v1", "web/v2"}  # a zero weight is never chosen
    assert abs(got["web/v1"] / 20_000 - 0.75) < 0.01


def test_subsets_select_by_tags_and_meta() -> None:
    chain = DiscoveryChain("web", None, RESOLVERS)
    ids = {sub: [e.id for e in chain.resolve(Target("web", sub), passing).endpoints] for sub in ("v1", "v2", "east")}
    assert ids == {"v1": ["a"], "v2": ["b", "c"], "east": ["b"]}
    assert [e.id for e in chain.resolve(Target("web"), passing).endpoints] == ["a", "b", "c"]


def test_no_splitter_means_the_default_subset() -> None:
    chain = DiscoveryChain("web", None, RESOLVERS)
    assert chain.splits == [(100.0, Target("web", "v1"))]
    assert DiscoveryChain("api", None, {}).splits == [(100.0, Target("api"))]


def test_failover_takes_the_first_target_with_a_passing_instance() -> None:
    chain = DiscoveryChain("web", None, RESOLVERS)
    r = chain.resolve(Target("web", "gone"), passing)
    assert (r.used, r.failed_over, [e.id for e in r.endpoints]) == (Target("web", "v2"), True, ["b", "c"])
    only_backup = {"web": [Inst("web", "a", ("v1",))], "web-backup": [Inst("web-backup", "z")]}
    r = chain.resolve(Target("web", "v2"), lambda s: list(only_backup.get(s, [])))
    assert (r.used, [e.id for e in r.endpoints]) == (Target("web-backup"), ["z"])
    r = chain.resolve(Target("web", "v2"), lambda s: [])
    assert (r.endpoints, r.used, r.failed_over) == ([], Target("web", "v2"), False)
