"""The service registry, replicated by gossip with one writer per node.

Every agent is the only writer of its own instances, so there is nothing to
resolve: a node's catalog is versioned by its owner, and a higher version
simply replaces a lower one.  Only a small (version, digest) pair rides on the
owner's gossip alive messages; an agent that sees a version newer than the one
it holds fetches that node's catalog over TCP, and push-pull carries every
catalog, so a registry far larger than a datagram still spreads.

A restarted owner may start counting below what others remember of it; like a
refuted suspicion, it notices its own older catalog in a push-pull and jumps
its version past it.  Nothing here does I/O.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgpack

from gossip.frozen import same_class_equality
from gossip.wire import MAX_NAME_LEN, DecodeError

HEALTH_STATES = ("passing", "warning", "critical")
DIGEST_SIZE = 8
#: Caps on what a peer may hand us, so a hostile catalog cannot exhaust memory.
MAX_INSTANCES_PER_NODE = 10_000
MAX_TAGS = 64
MAX_META = 64
MAX_META_KEY = 128
MAX_META_VALUE = 512
#: A failing check's output, as carried to every member (agent.health cuts it to one line first).
MAX_OUTPUT = 512


@same_class_equality
class Instance(NamedTuple):
    id: str
    service: str
    address: str
    port: int
    tags: tuple[str, ...] = ()
    meta: tuple[tuple[str, str], ...] = ()
    health: str = "passing"
    #: Why a check is not passing: its output when the health last changed (Consul shows it too).
    output: str = ""

    def to_obj(self) -> list[Any]:
        obj = [self.id, self.service, self.address, self.port, list(self.tags),
               [list(kv) for kv in self.meta], self.health]
        if self.output:
            obj.append(self.output)  # only then: a passing catalog encodes as it always did
        return obj

    @staticmethod
    def from_obj(obj: Any) -> Instance:
        if not isinstance(obj, list) or len(obj) not in (7, 8):
            raise DecodeError("malformed", "bad instance record")
        iid, service, address, port, tags, meta, health = obj[:7]
        output = obj[7] if len(obj) == 8 else ""
        if not isinstance(output, str) or len(output) > MAX_OUTPUT:
            raise DecodeError("malformed", "bad instance check output")
        if not all(isinstance(x, str) and 0 < len(x) <= MAX_NAME_LEN for x in (iid, service)):
            raise DecodeError("malformed", "bad instance id or service")
        if not isinstance(address, str) or len(address) > 255:
            raise DecodeError("malformed", "bad instance address")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise DecodeError("malformed", "bad instance port")
        if (not isinstance(tags, list) or len(tags) > MAX_TAGS
                or not all(isinstance(t, str) and len(t) <= MAX_META_VALUE for t in tags)):
            raise DecodeError("malformed", "bad instance tags")
        if not isinstance(meta, list) or len(meta) > MAX_META:
            raise DecodeError("malformed", "bad instance meta")
        pairs = []
        for kv in meta:
            if (not isinstance(kv, list) or len(kv) != 2 or not isinstance(kv[0], str)
                    or not isinstance(kv[1], str) or len(kv[0]) > MAX_META_KEY or len(kv[1]) > MAX_META_VALUE):
                raise DecodeError("malformed", "bad instance meta entry")
            pairs.append((kv[0], kv[1]))
        if health not in HEALTH_STATES:
            raise DecodeError("malformed", "bad instance health")
        return Instance(iid, service, address, port, tuple(tags), tuple(pairs), health, output)


def catalog_digest(instances: dict[str, Instance]) -> bytes:
    """A short digest of a catalog, independent of insertion order."""
    canon = [instances[k].to_obj() for k in sorted(instances)]
    packed: bytes = msgpack.packb(canon, use_bin_type=True)
    return hashlib.blake2b(packed, digest_size=DIGEST_SIZE).digest()


EMPTY_DIGEST = catalog_digest({})


@dataclass
class NodeCatalog:
    version: int = 0
    digest: bytes = EMPTY_DIGEST
    instances: dict[str, Instance] = field(default_factory=dict)

    def to_obj(self) -> list[Any]:
        return [self.version, self.digest, [i.to_obj() for i in self.instances.values()]]

    @staticmethod
    def from_obj(obj: Any) -> NodeCatalog:
        if not isinstance(obj, list) or len(obj) != 3:
            raise DecodeError("malformed", "bad catalog")
        version, digest, raw = obj
        if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version < 2**63:
            raise DecodeError("malformed", "bad catalog version")
        if not isinstance(digest, bytes) or len(digest) != DIGEST_SIZE:
            raise DecodeError("malformed", "bad catalog digest")
        if not isinstance(raw, list) or len(raw) > MAX_INSTANCES_PER_NODE:
            raise DecodeError("malformed", "bad catalog instances")
        if not raw:  # most nodes offer no service: no need to hash nothing again
            if digest != EMPTY_DIGEST:
                raise DecodeError("malformed", "catalog does not match its digest")
            return NodeCatalog(version, digest, {})
        instances = {}
        for r in raw:
            inst = Instance.from_obj(r)
            instances[inst.id] = inst
        if catalog_digest(instances) != digest:
            raise DecodeError("malformed", "catalog does not match its digest")
        return NodeCatalog(version, digest, instances)


class Registry:
    def __init__(self, node: str, initial_version: int = 0) -> None:
        self.node = node
        self.local = NodeCatalog(version=initial_version)
        self.remote: dict[str, NodeCatalog] = {}
        #: node -> newest (version, digest) advertised that we do not hold yet.
        self.wanted: dict[str, tuple[int, bytes]] = {}
        #: Nodes whose catalog is being fetched: a burst of changes on one node
        #: costs one fetch at a time, not one per change per observer.
        self.inflight: set[str] = set()
        #: Bumped on every change of what this agent knows; drives blocking queries.
        self.index = 1
        self.stats: dict[str, int] = {"applied": 0, "stale": 0, "duplicate": 0, "rejected": 0}

    # -- the owner's writes -------------------------------------------------------------

    def state(self) -> tuple[int, bytes]:
        """What rides on our alive messages."""
        return self.local.version, self.local.digest

    def _changed_local(self) -> None:
        self.local.version += 1
        self.local.digest = catalog_digest(self.local.instances)
        self.index += 1

    def start_after(self, version: int) -> None:
        """Move our version past ``version`` (one persisted before a restart)."""
        if version >= self.local.version:
            self.local.version = version
            self._changed_local()

    def put(self, inst: Instance) -> None:
        self.local.instances[inst.id] = inst
        self._changed_local()

    def remove(self, instance_id: str) -> bool:
        if self.local.instances.pop(instance_id, None) is None:
            return False
        self._changed_local()
        return True

    def set_health(self, instance_id: str, health: str, output: str = "") -> bool:
        """A check's new health; ``output`` (kept unless passing) says why, to every member."""
        inst = self.local.instances.get(instance_id)
        kept = "" if health == "passing" else output[:MAX_OUTPUT]
        if inst is None or (inst.health == health and (inst.output or not kept)):
            return False  # no news: the same health, and its reason already given
        self.local.instances[instance_id] = Instance(
            inst.id, inst.service, inst.address, inst.port, inst.tags, inst.meta, health, kept)
        self._changed_local()
        return True

    # -- others' catalogs ------------------------------------------------------------------

    def held(self, node: str) -> NodeCatalog | None:
        return self.local if node == self.node else self.remote.get(node)

    def advertised(self, node: str, version: int, digest: bytes) -> bool:
        """A node advertised (version, digest); True if we must fetch its catalog."""
        if node == self.node:
            if version > self.local.version or (version == self.local.version and digest != self.local.digest):
                # Others remember a catalog of ours from before a restart: move past it.
                self.local.version = version
                self._changed_local()
            return False
        held = self.remote.get(node)
        if held is None and digest == EMPTY_DIGEST:
            return False  # nothing there to fetch
        if held is not None and (version < held.version or (version == held.version and digest == held.digest)):
            return False
        want = self.wanted.get(node)
        if want is None or version > want[0]:
            self.wanted[node] = (version, digest)
        if node in self.inflight:
            return False  # fetch_done() will ask again if this one comes back stale
        self.inflight.add(node)
        return True

    def fetch_done(self, node: str, ok: bool = True) -> bool:
        """A fetch of ``node`` ended; True if a newer one is wanted and should start now.

        After a failed fetch nothing is retried at once: the owner's next
        advertisement, or the next push-pull, brings the catalog.
        """
        self.inflight.discard(node)
        if not ok:
            return False
        want = self.wanted.get(node)
        held = self.remote.get(node)
        if want is not None and (held is None or want[0] > held.version):
            self.inflight.add(node)
            return True
        return False

    def apply(self, node: str, catalog: NodeCatalog) -> bool:
        """Store a fetched catalog unless it is older than, or the same as, what we hold."""
        if node == self.node:
            self.advertised(node, catalog.version, catalog.digest)
            return False
        if self._not_newer(node, catalog.version):
            return False
        self.remote[node] = catalog
        want = self.wanted.get(node)
        if want is not None and want[0] <= catalog.version:
            del self.wanted[node]
        self.stats["applied"] += 1
        self.index += 1
        return True

    def _not_newer(self, node: str, version: int) -> bool:
        """True, and counted, when the catalog we hold for ``node`` is as new as ``version``."""
        held = self.remote.get(node)
        if held is None or version > held.version:
            return False
        self.stats["duplicate" if version == held.version else "stale"] += 1
        return True

    def apply_node(self, data: bytes) -> bool:
        """Store one node's catalog as fetched over TCP (``encode_node``'s output)."""
        node, catalog = self.decode_node(data)
        return self.apply(node, catalog)

    def forget(self, node: str) -> None:
        """The member was reaped: its catalog goes too."""
        if self.remote.pop(node, None) is not None:
            self.index += 1
        self.wanted.pop(node, None)
        self.inflight.discard(node)

    # -- encoding for TCP (push-pull and fetch) ------------------------------------------------

    def dump(self) -> bytes:
        """Every catalog we hold, ours included, for push-pull."""
        everything = {self.node: self.local.to_obj()}
        everything.update({n: c.to_obj() for n, c in self.remote.items()})
        packed: bytes = msgpack.packb(everything, use_bin_type=True)
        return packed

    def merge_dump(self, data: bytes) -> list[str]:
        """Merge a push-pull dump; returns the nodes whose catalogs changed."""
        try:
            obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
        except Exception as exc:
            raise DecodeError("malformed", "bad registry dump") from exc
        if not isinstance(obj, dict):
            raise DecodeError("malformed", "registry dump is not a map")
        changed = []
        for node, raw in obj.items():
            if not isinstance(node, str) or not node or len(node) > MAX_NAME_LEN:
                raise DecodeError("malformed", "bad node name in dump")
            if node != self.node and type(raw) is list and len(raw) == 3 and type(raw[0]) is int \
                    and self._not_newer(node, raw[0]):
                # What apply() would refuse anyway: skip decoding it and hashing it again
                # (every push-pull of a 50-member join burst carries every catalog).
                continue
            try:
                cat = NodeCatalog.from_obj(raw)
            except DecodeError:
                self.stats["rejected"] += 1
                continue
            if self.apply(node, cat):
                changed.append(node)
        return changed

    def encode_node(self, node: str) -> bytes | None:
        held = self.held(node)
        if held is None:
            return None
        packed: bytes = msgpack.packb([node, held.to_obj()], use_bin_type=True)
        return packed

    @staticmethod
    def decode_node(data: bytes) -> tuple[str, NodeCatalog]:
        try:
            obj = msgpack.unpackb(data, raw=False)
        except Exception as exc:
            raise DecodeError("malformed", "bad catalog message") from exc
        if not isinstance(obj, list) or len(obj) != 2 or not isinstance(obj[0], str):
            raise DecodeError("malformed", "bad catalog message")
        return obj[0], NodeCatalog.from_obj(obj[1])

    # -- queries ------------------------------------------------------------------------

    def all_instances(self) -> list[tuple[str, Instance]]:
        out = [(self.node, i) for i in self.local.instances.values()]
        for node, cat in self.remote.items():
            out.extend((node, i) for i in cat.instances.values())
        return out
