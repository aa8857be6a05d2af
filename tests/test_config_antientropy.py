"""What config anti-entropy costs: a converged mesh exchanges digests only, whatever it holds.

Runs the real gossip state machines in the simulator (simulations/scenarios.py,
SimConfig), whose config pulls are encoded as the agent sends them and counted.
"""

from __future__ import annotations

from typing import Any

from gossip import hlc
from gossip.config_store import DEFAULT_TOMBSTONE_TTL_MS, Entry
from gossip.signing import Signer
from simulations.scenarios import WARMUP, Params, SimConfig, build, config_bytes, config_entries

P = Params(nodes=6, seconds=60.0, seed=3, progress=0.0)


def converged_run(entries: int) -> dict[str, Any]:
    r = config_bytes(Params(nodes=P.nodes, seconds=P.seconds, seed=P.seed, progress=0.0, entries=entries))
    return r


def test_a_converged_mesh_sends_the_same_bytes_with_400_entries_as_with_none() -> None:
    r = converged_run(400)
    assert r["none_push_pulls"] > 5 and r["with_push_pulls"] == r["none_push_pulls"], r
    # Nothing but the digest: no node pulls, so no summary (which grows with the entries) is sent ...
    assert r["with_config_pulls"] == 0 and r["none_config_pulls"] == 0, r
    # ... and the push-pulls weigh the same (a few bytes of deflate noise per exchange at most),
    # where a summary of 400 entries alone would add tens of kilobytes to each.
    noise = 4 * 2 * r["with_push_pulls"] / (P.nodes * P.seconds)
    assert abs(r["with_stream_bytes_per_node_per_s"] - r["none_stream_bytes_per_node_per_s"]) <= noise, r
    assert r["summary_bytes"] > 10_000


def test_a_node_missing_one_entry_pulls_it_and_then_the_mesh_goes_quiet() -> None:
    entries = config_entries(400)
    sim = build(P)
    nodes = SimConfig(sim)
    nodes.preload(entries[:-1])
    for name, store in nodes.stores.items():
        if name != "n0":
            store.apply(entries[-1])
    assert len(nodes.digests()) == 2
    sim.run(WARMUP + P.seconds)
    assert len(nodes.digests()) == 1  # caught up at a push-pull, by a pull ...
    assert nodes.pulls > 0 and nodes.pull_bytes > 0
    pulls, pull_bytes = nodes.pulls, nodes.pull_bytes
    sim.run(P.seconds)
    assert (nodes.pulls, nodes.pull_bytes) == (pulls, pull_bytes)  # ... and once converged, no more pulls


def test_tombstones_dropped_at_different_moments_do_not_travel_back() -> None:
    # Each node drops expired tombstones by its own timer (agent.config_spread.upkeep): here half
    # of the nodes a minute before the other half.  In between their digests differ and they pull
    # from each other; what the first half dropped must not come back to it from the second.
    signer = Signer(bytes(32))
    live = Entry.write(signer, "n0", "intention", "web/db", {"action": "deny"}, hlc.make(5_000))
    tombstones = [Entry.write(signer, "n0", "intention", f"svc{i}/db", None, hlc.make(1_000 + i)) for i in range(50)]
    sim = build(P)
    nodes = SimConfig(sim)
    nodes.preload([live, *tombstones])
    expiry_ms = 1_000 + 50 + DEFAULT_TOMBSTONE_TTL_MS + 1
    names = sorted(nodes.stores)
    early, late = names[: len(names) // 2], names[len(names) // 2:]
    sim.run(WARMUP)
    for n in early:
        nodes.stores[n].purge(expiry_ms)
    sim.run(60.0)
    assert nodes.pulls > 0  # the halves did differ, and pulled from each other
    for n in late:
        nodes.stores[n].purge(expiry_ms)
    sim.run(60.0)
    assert {n: [e.name for e in s] for n, s in nodes.stores.items()} == {n: ["web/db"] for n in names}
    assert len(nodes.digests()) == 1
