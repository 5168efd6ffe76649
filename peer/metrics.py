"""What a node counts for Prometheus (`/metrics` on the local page listener).

Counters and histograms are bumped where things happen (sync, the peer
server, the FUSE adapter, the collector); figures that are a state rather
than an event (operations behind, blocks wanted, store bytes), and the
collector's own totals, are read when scraped. Each node has a registry of its own, so two nodes in one process
(tests) never mix their figures. Labels: `peer` is the short id of the node
at the other end of a connection (its address until it said who it is);
`origin` is the node that stamped an operation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from crdt.clock import Hlc

PREFIX = "dfs_peer"

# From a LAN's few milliseconds to a laptop that was closed for a day.
DELAY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    3600.0,
    86400.0,
    float("inf"),
)
# A FUSE request answered from memory takes tens of microseconds.
FUSE_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.5,
    1.0,
    5.0,
    float("inf"),
)


@dataclass(frozen=True, slots=True)
class Gauges:
    """What the node is now, read at each scrape."""

    operations: int
    operations_behind: int
    blocks_wanted: int
    store_bytes: int
    peers_known: int
    peers_connected: int
    members_holding_back: int
    # Counters kept by the collector itself.
    collection_runs: int
    collection_freed_bytes: int


class Metrics:
    """One node's counters and histograms, and how to read its gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ops_received = Counter(
            f"{PREFIX}_operations_received",
            "Operations merged here, by the peer they came from",
            ["peer"],
            registry=r,
        )
        self.ops_sent = Counter(
            f"{PREFIX}_operations_sent",
            "Operations (log entries) served to peers, by peer",
            ["peer"],
            registry=r,
        )
        self.blocks_received = Counter(
            f"{PREFIX}_blocks_received",
            "Sealed blocks fetched and verified, by the peer they came from",
            ["peer"],
            registry=r,
        )
        self.blocks_sent = Counter(
            f"{PREFIX}_blocks_sent", "Sealed blocks served to peers, by peer", ["peer"], registry=r
        )
        self.wire_bytes = Counter(
            f"{PREFIX}_wire_bytes",
            "Bytes of peer request and response bodies, by direction (received, sent)",
            ["direction"],
            registry=r,
        )
        self.merge_delay = Histogram(
            f"{PREFIX}_merge_delay_seconds",
            "Time from an operation's stamp (on the node that made it) to its merge "
            "here, by that node; includes clock skew between the two",
            ["origin"],
            buckets=DELAY_BUCKETS,
            registry=r,
        )
        self.fuse_latency = Histogram(
            f"{PREFIX}_fuse_request_seconds",
            "Time to answer a FUSE request, by operation",
            ["operation"],
            buckets=FUSE_BUCKETS,
            registry=r,
        )
        self._fuse_children: dict[str, Histogram] = {}

    # -- events ------------------------------------------------------------------
    def merged(self, peer: str, stamps: Sequence[Hlc], now_ms: int) -> None:
        """`stamps` (of operations from `peer`) were merged at `now_ms`."""
        if not stamps:
            return
        self.ops_received.labels(peer).inc(len(stamps))
        for stamp in stamps:
            origin = stamp.node[:4].hex()
            self.merge_delay.labels(origin).observe(max(0, now_ms - stamp.wall_ms) / 1000)

    def fuse_request(self, operation: str, seconds: float) -> None:
        # Every FUSE request passes here: the labelled child is looked up once
        # per operation, not per request (`labels` takes a lock and builds a key).
        child = self._fuse_children.get(operation)
        if child is None:
            child = self._fuse_children[operation] = self.fuse_latency.labels(operation)
        child.observe(seconds)

    # -- scraping ----------------------------------------------------------------
    def read_gauges_with(self, read: Callable[[], Gauges]) -> None:
        """Report the gauges `read()` returns at each scrape."""
        self.registry.register(_GaugeCollector(read))

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)


_GAUGE_HELP = {
    "operations": "Operations this node holds (merged log)",
    "operations_behind": "Operations connected peers hold that this node has not merged yet",
    "blocks_wanted": "Blocks this node is waiting for from peers",
    "store_bytes": "Bytes of the store on disk (database and write-ahead log)",
    "peers_known": "Peer addresses known (static, remembered, found by mDNS, inbound)",
    "peers_connected": "Peers answering now",
    "members_holding_back": "Members whose lag keeps collection from freeing old versions",
    "collection_runs": "Collections of unused blocks that ran",
    "collection_freed_bytes": "Bytes of blocks collections freed",
}
_COUNTERS = frozenset({"collection_runs", "collection_freed_bytes"})


class _GaugeCollector(Collector):
    def __init__(self, read: Callable[[], Gauges]) -> None:
        self.read = read

    def describe(self) -> Iterable[Metric]:
        return []  # unchecked: read() may need a running node

    def collect(self) -> Iterator[Metric]:
        gauges = self.read()
        for name in Gauges.__dataclass_fields__:
            kind = CounterMetricFamily if name in _COUNTERS else GaugeMetricFamily
            yield kind(f"{PREFIX}_{name}", _GAUGE_HELP[name], getattr(gauges, name))
