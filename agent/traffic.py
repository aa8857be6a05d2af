"""The golden metrics of HTTP traffic: what ``stat``, ``tap``, ``/metrics`` and the dashboard show.

The data plane hands one :class:`~dataplane.observed.RequestRecord` per
finished request to :meth:`Traffic.record`, on the proxy's hot path, so that
call only appends the record to a list and offers it to the tap subscribers
(if any).  Records are folded into per-series aggregates in batches: when
someone reads (a scrape, ``stat``, the dashboard), or when the batch is full.
Each record carries its own wall-clock end, so a late fold puts it in the
right window.

A series is one (direction, service, instance, source) -- outbound per
destination service and instance, inbound per local instance and calling
service -- and keeps, since start, counts by status class, retries, the
mesh's own errors by reason and a Prometheus latency histogram; and, over the
last minute, a ring of six 10-second slots with counts and a fine log-spaced
latency histogram (a flat array, so its size does not depend on the
latencies), from which p50/p95/p99 are read (to within half a bucket, about
2%).  No list of samples is kept, so memory does not grow with traffic.
It does not grow with names either: services, instances, sources and the
mesh's error reasons are capped, overflow is counted under ``_other`` (which
no service name or instance id can be), series idle for an hour are dropped,
and paths are shown by tap only, never kept.

Success is Linkerd's: a response that is not a 5xx, and a response at all
(status 0, a client or stream gone before the end, is a failure).
"""

from __future__ import annotations

import json
import math
import operator
import re
import time
from array import array
from bisect import bisect_left
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import accumulate
from typing import Any, Final

from agent.feed import LossyFeed
from agent.services import INSTANCE_ID_RE, SERVICE_NAME_RE
from dataplane.observed import INBOUND, OUTBOUND, RequestRecord

#: The last minute, as six slots of ten seconds.
SLOT_SECONDS: Final = 10.0
SLOTS: Final = 6
WINDOW_SECONDS: Final = SLOT_SECONDS * SLOTS

#: Status classes by index: status // 100 for 1xx..5xx, and "none" (status 0 or out of range).
CLASSES: Final = ("none", "1xx", "2xx", "3xx", "4xx", "5xx")
_NONE, _5XX = 0, 5

#: Fine latency buckets for percentiles: FINE_PER_OCTAVE per doubling from FINE_BASE seconds.
FINE_BASE: Final = 0.00001
FINE_PER_OCTAVE: Final = 16
_FINE_SCALE: Final = FINE_PER_OCTAVE / math.log(2)
#: Up to FINE_BASE * 2**24 (about 168 s); slower requests share the last bucket.
_FINE_MAX: Final = 24 * FINE_PER_OCTAVE
_FINE_BUCKETS: Final = _FINE_MAX + 1
#: A slot's histogram is a flat array of 32-bit counts (1.5 KiB): its size is known whatever the latencies.
_ZERO_COUNTS: Final = array("I", bytes(4 * _FINE_BUCKETS))
_NO_COUNTS: Final = array("I")

#: Latencies are taken as at most a day (and records as ending at most a day ago): a
#: wrong figure from a broken clock must not reach the arithmetic as inf or NaN.
MAX_LATENCY: Final = 86400.0

#: Prometheus histogram bounds (seconds): 100 us to 30 s.
PROM_BUCKETS: Final = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                       1.0, 2.5, 5.0, 10.0, 30.0)

#: Caps that keep memory bounded whatever the traffic.
MAX_SERIES: Final = 1024
MAX_INSTANCES_PER_SERVICE: Final = 64
MAX_SOURCES_PER_INSTANCE: Final = 16
MAX_ERROR_REASONS: Final = 16
#: What overflow is counted under; no service name or instance id can start with "_".
OTHER: Final = "_other"
#: A series with no request for this long is dropped (a gone instance must not hold a place forever).
IDLE_DROP_SECONDS: Final = 3600.0
#: Records buffered before they are folded in, when nobody reads sooner.
FOLD_AT: Final = 512
#: Records a tap subscriber may fall behind before new ones are dropped for it.
TAP_BUFFER: Final = 1024
#: Tap subscribers at once (each is an API connection).
MAX_TAPS: Final = 32
#: Longest path a tap line shows.
TAP_PATH_MAX: Final = 1024

SeriesKey = tuple[str, str, str, str]


def _fine_value(index: int) -> float:
    """A bucket's representative latency: the geometric middle of its bounds (bucket 0: the base)."""
    if index == 0:
        return FINE_BASE
    return FINE_BASE * 2 ** ((index - 0.5) / FINE_PER_OCTAVE)


class _Slot:
    """Ten seconds of one series."""

    __slots__ = ("counts", "fine", "number")

    def __init__(self) -> None:
        self.number = -1
        self.counts = [0] * len(CLASSES)
        self.fine = _NO_COUNTS


class Series:
    """One (direction, service, instance, source): totals since start and the last minute."""

    __slots__ = ("counts", "errors", "last", "node", "prom", "retries", "slots", "sum")

    def __init__(self) -> None:
        self.counts = [0] * len(CLASSES)
        self.prom = [0] * (len(PROM_BUCKETS) + 1)
        self.sum = 0.0
        self.retries = 0
        self.errors: dict[str, int] = {}
        self.node = ""
        self.last = 0.0
        self.slots = [_Slot() for _ in range(SLOTS)]

    def add(self, rec: RequestRecord, end: float) -> None:
        cls = rec.status // 100  # (this runs once per request: no helper calls)
        if not 1 <= cls <= 5:
            cls = _NONE
        latency = rec.latency if 0.0 < rec.latency < MAX_LATENCY else MAX_LATENCY if rec.latency >= MAX_LATENCY else 0.0
        self.counts[cls] += 1
        self.prom[bisect_left(PROM_BUCKETS, latency)] += 1
        self.sum += latency
        self.retries += rec.retries
        if rec.mesh_error is not None:
            reason = rec.mesh_error if (rec.mesh_error in self.errors
                                        or len(self.errors) < MAX_ERROR_REASONS) else OTHER
            self.errors[reason] = self.errors.get(reason, 0) + 1
        if rec.node:
            self.node = rec.node
        if end > self.last:
            self.last = end
        number = int(end // SLOT_SECONDS)
        slot = self.slots[number % SLOTS]
        if slot.number != number:
            if slot.number > number:
                return  # older than the minute this slot now holds
            slot.number = number
            slot.counts = [0] * len(CLASSES)
            slot.fine = _ZERO_COUNTS[:]
        slot.counts[cls] += 1
        slot.fine[0 if latency <= FINE_BASE else min(int(math.log(latency / FINE_BASE) * _FINE_SCALE) + 1,
                                                       _FINE_MAX)] += 1


@dataclass
class Window:
    """The last minute of one or more series, summed; what ``stat`` shows of them."""

    counts: list[int]
    fine: list[int]

    @classmethod
    def empty(cls) -> Window:
        return cls([0] * len(CLASSES), [0] * _FINE_BUCKETS)

    def add_series(self, s: Series, now_slot: int) -> None:
        live = [slot for slot in s.slots if now_slot - SLOTS < slot.number <= now_slot]
        if live:
            self.counts = list(map(sum, zip(self.counts, *(slot.counts for slot in live), strict=True)))
            self.fine = list(map(sum, zip(self.fine, *(slot.fine for slot in live), strict=True)))

    def add(self, other: Window) -> None:
        if any(other.counts):
            self.counts = list(map(operator.add, self.counts, other.counts))
            self.fine = list(map(operator.add, self.fine, other.fine))

    @property
    def requests(self) -> int:
        return sum(self.counts)

    def success_rate(self) -> float | None:
        total = self.requests
        if not total:
            return None
        return (total - self.counts[_NONE] - self.counts[_5XX]) / total

    def quantiles(self, qs: tuple[float, ...]) -> list[float | None]:
        """The latencies (seconds) below which fractions ``qs`` (ascending) of the window's requests finished."""
        cumulative = list(accumulate(self.fine))
        total = cumulative[-1]
        if not total:
            return [None] * len(qs)
        return [_fine_value(bisect_left(cumulative, max(1, math.ceil(q * total)))) for q in qs]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def _figures(w: Window, span: float) -> dict[str, Any]:
    rate = w.success_rate()
    p50, p95, p99 = w.quantiles((0.50, 0.95, 0.99))
    return {
        "requests": w.requests,
        "success_rate": None if rate is None else round(rate, 4),
        "rps": round(w.requests / span, 3),
        "p50_ms": _ms(p50),
        "p95_ms": _ms(p95),
        "p99_ms": _ms(p99),
        "counts": {name: n for name, n in zip(CLASSES, w.counts, strict=True) if n},
    }


@dataclass(frozen=True)
class TapFilter:
    service: str | None = None
    instance: str | None = None
    method: str | None = None
    path: str | None = None

    def matches(self, rec: RequestRecord) -> bool:
        return ((self.service is None or rec.service == self.service)
                and (self.instance is None or rec.instance == self.instance)
                and (self.method is None or rec.method == self.method)
                and (self.path is None or rec.path.startswith(self.path)))


def tap_line(rec: RequestRecord) -> dict[str, Any]:
    """What a tap subscriber sees of one request."""
    return {
        "time": datetime.fromtimestamp(rec.started, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "direction": rec.direction,
        "source": rec.source,
        "service": rec.service,
        "instance": rec.instance,
        "node": rec.node,
        "method": rec.method,
        "path": rec.path[:TAP_PATH_MAX],
        "status": rec.status,
        "latency_ms": round(rec.latency * 1000.0, 3),
        "mesh_error": rec.mesh_error,
        "retries": rec.retries,
    }


class TapSubscription(LossyFeed[RequestRecord]):
    """One tap's queue of records, read with ``async for`` as dicts (tap_line), gaps announced.

    Records are offered from the proxy's hot path, which must never wait: a
    full queue drops the record and counts it (agent.feed), and the next item
    the reader gets is ``{"event": "tap_dropped", "dropped": N}``, where the gap is.
    """

    def __init__(self, flt: TapFilter, buffer: int) -> None:
        super().__init__(buffer)
        self.filter = flt
        #: A record read behind a gap, handed out after the gap's notice.
        self._held: RequestRecord | None = None

    def offer(self, rec: RequestRecord) -> None:
        if self.filter.matches(rec):
            super().offer(rec)

    def __aiter__(self) -> TapSubscription:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if self._held is not None:
            rec, self._held = self._held, None
            return tap_line(rec)
        missed, rec = await self.next_item()
        if missed:
            self._held = rec
            return {"event": "tap_dropped", "dropped": missed,
                    "detail": "this tap read too slowly; requests were skipped"}
        return tap_line(rec)


class Traffic:
    """The agent's sink of finished requests (dataplane.observed.RequestSink)."""

    def __init__(self, clock: Callable[[], float] = time.time, *, max_series: int = MAX_SERIES) -> None:
        self.clock = clock
        self.max_series = max_series
        self.started = clock()
        self.series: dict[SeriesKey, Series] = {}
        #: Services, instances and sources counted under OTHER because a cap was reached.
        self.overflowed = 0
        self.tap_dropped_closed = 0
        self.taps: tuple[TapSubscription, ...] = ()
        self._pending: list[RequestRecord] = []
        #: Instances per (direction, service) and sources per (direction, service, instance).
        self._instances: dict[tuple[str, str], set[str]] = {}
        self._sources: dict[tuple[str, str, str], set[str]] = {}
        self._services: dict[str, set[str]] = {OUTBOUND: set(), INBOUND: set()}
        #: Keys counted under another series (an overflow), so a lookup finds it at once; bounded.
        self._alias: dict[SeriesKey, Series] = {}
        self._last_drop = -math.inf

    # -- the hot path --------------------------------------------------------------------

    def record(self, rec: RequestRecord) -> None:
        pending = self._pending
        pending.append(rec)
        if len(pending) >= FOLD_AT:
            self.fold()
        for tap in self.taps:
            tap.offer(rec)

    # -- folding ----------------------------------------------------------------------------

    def fold(self) -> None:
        """Fold the buffered records into their series."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        now = self.clock()
        series, alias = self.series, self._alias
        for rec in pending:
            source = (rec.source or "") if rec.direction == INBOUND else ""
            key = (rec.direction, rec.service, rec.instance, source)
            s = series.get(key) or alias.get(key)
            if s is None:
                s = self._new_series(key, now)
            end = rec.started + rec.latency
            if not end < now:  # (a clock step, or NaN: never a slot in the future)
                end = now
            elif not end > now - MAX_LATENCY:
                end = now - MAX_LATENCY
            s.add(rec, end)

    def _new_series(self, key: SeriesKey, now: float) -> Series:
        """The series for a new key, or the overflow series it is counted under once a cap is reached."""
        direction, service, instance, source = key
        if direction != INBOUND:
            direction = OUTBOUND
        if len(self.series) >= self.max_series and now - self._last_drop >= SLOT_SECONDS:
            self._drop_idle(now)
        full = len(self.series) >= self.max_series
        services = self._services[direction]
        if service not in services:
            if full:
                service = OTHER
            else:
                services.add(service)
        instances = self._instances.setdefault((direction, service), set()) if service != OTHER else set()
        if service == OTHER:
            instance, source = OTHER, ""
        elif instance not in instances:
            if full or len(instances) >= MAX_INSTANCES_PER_SERVICE:
                instance, source = OTHER, ""
            else:
                instances.add(instance)
        if source and instance != OTHER:
            sources = self._sources.setdefault((direction, service, instance), set())
            if source not in sources:
                if full or len(sources) >= MAX_SOURCES_PER_INSTANCE:
                    source = OTHER
                else:
                    sources.add(source)
        canonical = (direction, service, instance, source)
        s = self.series.get(canonical)
        if s is None:
            s = self.series[canonical] = Series()
        if canonical != key:
            self.overflowed += 1
            if len(self._alias) >= self.max_series:
                self._alias.clear()
            self._alias[key] = s  # later records of this key find their series at once
        return s

    def _drop_idle(self, now: float) -> None:
        """Forget series with no request for IDLE_DROP_SECONDS (an instance that is gone, say)."""
        self._last_drop = now
        self.series = {k: s for k, s in self.series.items() if now - s.last < IDLE_DROP_SECONDS}
        self._alias.clear()
        self._services = {OUTBOUND: set(), INBOUND: set()}
        self._instances, self._sources = {}, {}
        for direction, service, instance, source in self.series:
            if service == OTHER:
                continue
            self._services[direction].add(service)
            if instance == OTHER:
                continue
            self._instances.setdefault((direction, service), set()).add(instance)
            if source and source != OTHER:
                self._sources.setdefault((direction, service, instance), set()).add(source)

    def tracked(self) -> dict[SeriesKey, Series]:
        """Every series, after folding what is buffered."""
        self.fold()
        return self.series

    # -- views ------------------------------------------------------------------------------

    def stat_view(self, service: str | None = None) -> dict[str, Any]:
        """The last minute per direction, per service and per instance (and per source, inbound)."""
        series = self.tracked()
        now = self.clock()
        now_slot = int(now // SLOT_SECONDS)
        # The window covers the last SLOTS slots, the current one partly; or less since start.
        span = max(now - max(self.started, (now_slot - SLOTS + 1) * SLOT_SECONDS), 1.0)
        groups: dict[str, dict[str, dict[str, Any]]] = {OUTBOUND: {}, INBOUND: {}}
        for (direction, svc, instance, source), s in sorted(series.items()):
            if service is not None and svc != service:
                continue
            g = groups[direction].setdefault(svc, {"all": Window.empty(), "instances": {}, "sources": {},
                                                   "errors": {}, "totals": [0] * len(CLASSES), "nodes": {},
                                                   "inst_totals": {}})
            own = Window.empty()
            own.add_series(s, now_slot)
            g["all"].add(own)
            g["instances"].setdefault(instance, Window.empty()).add(own)
            if source:
                g["sources"].setdefault(source, Window.empty()).add(own)
            for reason, n in s.errors.items():
                g["errors"][reason] = g["errors"].get(reason, 0) + n
            g["totals"] = list(map(operator.add, g["totals"], s.counts))
            g["inst_totals"][instance] = g["inst_totals"].get(instance, 0) + sum(s.counts)
            if s.node:
                g["nodes"][instance] = s.node
        out: dict[str, Any] = {"window_seconds": WINDOW_SECONDS, "span_seconds": round(span, 3)}
        for direction in (OUTBOUND, INBOUND):
            rows = []
            for svc, g in groups[direction].items():
                row = {"service": svc, **_figures(g["all"], span),
                       "total_requests": sum(g["totals"]),
                       "total_counts": {c: n for c, n in zip(CLASSES, g["totals"], strict=True) if n},
                       "mesh_errors": dict(sorted(g["errors"].items())),
                       "instances": [{"instance": inst, "node": g["nodes"].get(inst, ""), **_figures(w, span),
                                      "total_requests": g["inst_totals"][inst]}
                                     for inst, w in sorted(g["instances"].items())]}
                if direction == INBOUND:
                    row["sources"] = [{"source": src, **_figures(w, span)} for src, w in sorted(g["sources"].items())]
                rows.append(row)
            out[direction] = rows
        return out

    # -- tap --------------------------------------------------------------------------------

    @contextmanager
    def tap(self, flt: TapFilter, buffer: int = TAP_BUFFER) -> Iterator[TapSubscription]:
        """Receive every matching request while the block runs (call from the trio thread)."""
        sub = TapSubscription(flt, buffer)
        self.taps = (*self.taps, sub)
        try:
            yield sub
        finally:
            self.taps = tuple(t for t in self.taps if t is not sub)
            self.tap_dropped_closed += sub.dropped
            sub.close()

    @property
    def tap_dropped(self) -> int:
        return self.tap_dropped_closed + sum(t.dropped for t in self.taps)


# -- the API's questions ------------------------------------------------------------------------

_METHOD_RE = re.compile(r"^[A-Z]{1,20}$")


def _one(query: dict[str, list[str]], allowed: tuple[str, ...], where: str) -> dict[str, str]:
    """The query's parameters, the last value of each, refusing any not in ``allowed``."""
    for name in query:
        if name not in allowed:
            raise ValueError(f"unknown parameter {name[:40]!r}: {where} takes {', '.join(allowed)}")
    return {name: values[-1] for name, values in query.items()}


def _service(value: str) -> str:
    if not SERVICE_NAME_RE.match(value):
        raise ValueError(f"service must be a service name (a DNS label), got {value[:80]!r}")
    return value


def stat_query(query: dict[str, list[str]]) -> str | None:
    """GET /v1/stat's one parameter, ``service``; ValueError says what is wrong."""
    got = _one(query, ("service",), "/v1/stat")
    return _service(got["service"]) if "service" in got else None


def tap_query(query: dict[str, list[str]]) -> TapFilter:
    """GET /v1/tap's parameters: ``service`` (required), ``instance``, ``method``, ``path`` (a prefix)."""
    got = _one(query, ("service", "instance", "method", "path"), "/v1/tap")
    if "service" not in got:
        raise ValueError("give ?service=NAME (and optionally &instance=ID&method=GET&path=/prefix)")
    instance = got.get("instance")
    if instance is not None and not INSTANCE_ID_RE.match(instance):
        raise ValueError(f"instance must be an instance id, got {instance[:80]!r}")
    method = got.get("method")
    if method is not None:
        method = method.upper()
        if not _METHOD_RE.match(method):
            raise ValueError(f"method must be an HTTP method such as GET, got {method[:40]!r}")
    path = got.get("path")
    if path is not None and (not path.startswith("/") or len(path) > TAP_PATH_MAX):
        raise ValueError(f"path must be a prefix starting with / (at most {TAP_PATH_MAX} characters)")
    return TapFilter(_service(got["service"]), instance, method, path)


async def _rendered(sub: TapSubscription) -> AsyncIterator[bytes]:
    async for item in sub:
        yield (json.dumps(item) + "\n").encode()


@contextmanager
def tap_lines(traffic: Traffic, flt: TapFilter) -> Iterator[AsyncIterator[bytes]]:
    """A tap as the API streams it: one JSON line per request."""
    with traffic.tap(flt) as sub:
        yield _rendered(sub)
