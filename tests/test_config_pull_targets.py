"""agent.config_spread: a pull goes only to a member known to speak config (gossip.wire.ConfigPull's rule).

A restarted agent may pass news on (config_sync's "News travels on") before it has push-pulled with
every member; a member it has not heard a digest from yet may be of the release before config
entries, which would drop the pull as an unknown message (the rolling upgrade test caught one).
"""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace
from typing import Any

import trio

from agent.config_spread import ConfigSpread
from gossip.member import Status
from gossip.wire import ConfigPull


async def test_news_is_passed_on_only_to_members_whose_push_pull_carried_a_digest() -> None:
    members = {name: SimpleNamespace(name=name, status=Status.ALIVE, addr=(f"127.0.0.{i}", 7946))
               for i, name in enumerate(["me", "new-1", "new-2", "old-1", "unheard"], start=1)}
    membership = SimpleNamespace(name="me", members=members, drop=lambda reason: None)
    entries = SimpleNamespace(stats=Counter(), pull_request=lambda: ConfigPull("me", [], False),
                              digest=lambda: b"d" * 32, in_step_with=lambda digest: None)
    asked: list[Any] = []

    async def exchange(addr: Any, data: bytes) -> bytes:
        asked.append(addr)
        raise OSError("refused")  # each pull ends at once; news stops after a few dull ones

    async def flush() -> None:
        pass

    log = SimpleNamespace(debug=lambda *a, **k: None, info=lambda *a, **k: None)
    spread = ConfigSpread(entries, membership, exchange, flush, lambda: None, log, 1.0)  # type: ignore[arg-type]
    spread.observed("new-1", members["new-1"].addr, b"d" * 32)  # in step: no pull of its own
    spread.observed("new-2", members["new-2"].addr, b"d" * 32)
    spread.observed("old-1", members["old-1"].addr, None)
    async with trio.open_nursery() as nursery:
        spread.nursery = nursery
        for _ in range(40):
            spread._pull_next(after="new-2", dull=0)
            await trio.sleep(0)
    assert asked, "no news was passed on"
    assert set(asked) <= {members["new-1"].addr, members["new-2"].addr}, asked
    assert spread.peers_without_config() == ["old-1"]
