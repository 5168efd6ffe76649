"""Causal stability and garbage collection of blocks.

Invariant: a block leaves this node's store only if no version this node keeps
references it, where a version is kept when it is

- a head of its file (the current content, a conflict copy, a write on a
  deleted file), or the content a delete hid while the delete is not stable,
  not past the retention, no longer in force, or the file is visible again;
- superseded, unless one of the versions superseding it is *stable* (every
  current member holds it) and either was written at least the history
  retention ago (`NodeConfig.keep_history_s`, by the superseding stamp's wall
  time) or the version is thinned out (`Thinning`: staggered versioning, every
  version of the last minute, then the newest of each 30 s, hour, day bucket
  as it ages; buckets aligned to absolute time, so every node keeps the same);
- the base of a write still buffered here (an open file), a version an open
  handle reads (a file deleted while open, until its last close), or
  incomplete (its lineage has not arrived: every block it lists is kept).

Stability is an elementwise minimum: the *stable version vector* is the
minimum, over this node and every current member (nodes that announced
themselves with a `Member` op and were not forgotten), of the version vector
this node knows for it: learnt directly from the peer (`/hello`, `/watch`) or
through gossip (every peer passes on the vectors it knows, with the time it
learnt them). A member this node never heard from counts as holding nothing,
so it holds everything back. Known vectors only grow (they are merged
elementwise by max) and are persisted in the store, so a restart does not
forget that a member is behind. A node's seqs grow with its stamps
(`Journal.commit` seals in stamp order), so "entry (n, s) is stable" becomes
"a stamp of n at or below the stamp of (n, s) is stable".

Why this is safe for a node that is away (C in the `gc_safety` scenario):
everything written after C's version vector is unstable, so every version C
may still show, or build on, stays here with its blocks. A write made on top
of an old version by a node that still buffered it (an open file) lists only
the blocks it changed; its other blocks are the old version's, which that node
keeps (its buffer pins them), and peers fetch them from it with the write.

`Forget` (`dfs-peer forget`) is a vote to remove a member for good; once the
member itself or more than half of the others voted (`Replica.forgotten`),
it stops holding back stability, and its entries past the cut are refused by
every node (`Journal.accepts`), because what it writes after being forgotten
may build on history the others have already collected. It must join again
with a fresh data dir, under a new id.

Log entries are not dropped here one by one: a collection also folds the
stable prefix of the log into the checkpoint (`Journal.fold`, once
`FOLD_MIN_ENTRIES` more entries are stable; `peer.storage.checkpoint`), which keeps
every operation that can still matter (all but attributes and member names a
later stable op overrides: `crdt.compact`) with its stamp, so merges, `--at`
and writes buffered elsewhere on old bases behave as with the whole log. What
the checkpoint folds leaves the log in the same transaction; a node that
joins late is sent the checkpoint and the entries after it.

Deleted entries are never dropped from the replica or the checkpoint, and the
tree's move log is never truncated, however stable and old the delete. Stable
here means every *member* holds the delete; it does not mean that every
operation concurrent with it has arrived, which is what dropping needs (the
move-op paper's causal stability, with a fixed set of replicas):

- a member's write made before it received the delete may not be here yet:
  the stable vector says every member holds the delete, not that this node
  holds all each member wrote before it did (that much could be checked:
  each member's own seq in the first vector of it that covers the delete);
- a node nobody has heard of yet is no member: one that synced, went offline
  before anyone pulled its `Member` op, and edited a file there, brings that
  write long after every member holds the delete. Rule 4 then brings the file
  back on every replica that kept it, and on one that dropped it the write
  names an entry it no longer knows: the replicas differ for good, and the
  user's write is lost there;
- a format-2 checkpoint holds each node's entries exactly as signed and
  chained (`peer.storage.checkpoint`): leaving one out breaks the chain that
  lets a receiver check it, so it could only be dropped from memory, and a
  replica rebuilt from the checkpoint would differ from one that dropped.

Since rule 4 looks only at what each batch changed (`crdt.revival`), the trash
costs memory, not time per operation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import cbor2

from crdt.clock import Hlc
from crdt.content import Contents
from crdt.merge import Replica
from crdt.ops import Forget, MalformedOp, decode_op
from peer import pacing
from peer.errors import CorruptEntry, DfsError
from peer.net.auth import wall_ms
from peer.sealing import open_entry
from peer.storage.journal import Journal
from peer.storage.store import ReadOnlyStore

if TYPE_CHECKING:
    from peer.fs.volume import Volume

log = logging.getLogger("peer.gc")

__all__ = [
    "Collection",
    "Collector",
    "Forget",
    "Stability",
    "Thinning",
    "keep_plan",
    "resolve_member",
]

FORGOTTEN_WARNING = (
    "this node was forgotten by the other members of the volume (`dfs-peer forget`): "
    "what it writes now is refused by them; join again with a fresh --data-dir"
)
KNOWN_META = "gc_known"
KNOWN_FORMAT = 1
# Periodic collection: every this often, sooner after a big merge, and never
# more often than the minimum spacing.
COLLECT_EVERY_S = 60.0
CHECK_EVERY_S = 5.0
BIG_MERGE_OPS = 500
# Pages given back per collection; the rest next time (a 20 MiB file is 5,120
# pages of 4 KiB). None: all at once.
RECLAIM_PAGES: int | None = None

VersionVector = dict[bytes, int]


@dataclass(slots=True)
class Known:
    """What this node knows of one member's version vector."""

    vv: VersionVector
    seen_ms: int  # when its newest part was learnt from the member itself (its clock)

    def merge(self, vv: VersionVector, seen_ms: int) -> bool:
        """Fold in a report; True if the vector grew."""
        grew = False
        for node, seq in vv.items():
            if seq > self.vv.get(node, 0):
                self.vv[node] = seq
                grew = True
        self.seen_ms = max(self.seen_ms, seen_ms)
        return grew


@dataclass(frozen=True, slots=True)
class MemberStatus:
    id: str
    name: str
    last_seen: float | None  # unix seconds; None: never heard of
    behind: int  # operations this node holds that the member is not known to hold
    forgotten: bool


@dataclass(frozen=True, slots=True)
class Collection:
    """What one collection did."""

    at: float
    seconds: float
    ran: bool  # False: skipped, nothing changed since the last run
    blocks_freed: int
    bytes_freed: int
    blocks_kept: int
    versions_kept: int
    versions_unstable: int  # superseded, but not by anything stable yet
    versions_in_retention: int  # superseded stably, kept as history
    versions_thinned: int  # superseded stably, dropped by staggered versioning
    log_entries_folded: int
    store_bytes_before: int
    store_bytes_after: int
    store_bytes_reclaimed: int


def with_bases(blocks: Iterable[bytes], bases: dict[bytes, bytes]) -> set[bytes]:
    """`blocks` and every block a patch among them is written over, down each
    chain (`bases`: {patch: its base}, `Store.patch_bases`): what they keep alive."""
    live = set(blocks)
    todo = [bid for bid in live if bid in bases]
    while todo:
        base = bases[todo.pop()]
        if base not in live:
            live.add(base)
            if base in bases:
                todo.append(base)
    return live


def _not_run(store_bytes: int) -> Collection:
    return Collection(
        at=time.time(),
        seconds=0.0,
        ran=False,
        blocks_freed=0,
        bytes_freed=0,
        blocks_kept=0,
        versions_kept=0,
        versions_unstable=0,
        versions_in_retention=0,
        versions_thinned=0,
        log_entries_folded=0,
        store_bytes_before=store_bytes,
        store_bytes_after=store_bytes,
        store_bytes_reclaimed=0,
    )


class Stability:
    """Every member's version vector as this node knows it, and what is stable."""

    def __init__(self, journal: Journal, now_ms: Callable[[], int] = wall_ms) -> None:
        self.journal = journal
        self.store = journal.store
        self.replica: Replica = journal.replica
        self._now = now_ms
        self.known: dict[bytes, Known] = self._load()
        self._dirty = False
        self._stamp_cache: dict[tuple[bytes, int], Hlc] = {}
        # Called when a member's known vector grew (sync wakes its long polls,
        # so the news travels on at once rather than at the next anti-entropy).
        self.grew: list[Callable[[], None]] = []

    # -- learning --------------------------------------------------------------------
    def learn(self, node: bytes, vv: VersionVector, seen_ms: int | None = None) -> None:
        """`node` told us directly that it holds `vv`."""
        if node == self.journal.identity.node_id:
            return
        seen = self._now() if seen_ms is None else seen_ms
        known = self.known.get(node)
        if known is None:
            self.known[node] = Known(dict(vv), seen)
        elif not known.merge(vv, seen):
            return
        self._dirty = True
        for callback in self.grew:
            callback()

    def learn_gossip(self, gossip: dict[bytes, tuple[VersionVector, int]]) -> None:
        """Vectors a peer passed on (node -> (vv, when the peer's source learnt it))."""
        for node, (vv, seen_ms) in gossip.items():
            # A reported time in our future is capped: it only orders reports.
            self.learn(node, vv, min(seen_ms, self._now()))

    def gossip(self) -> dict[bytes, tuple[VersionVector, int]]:
        """What to pass on to peers: every vector known, ours included."""
        out = {node: (dict(k.vv), k.seen_ms) for node, k in self.known.items()}
        out[self.journal.identity.node_id] = (dict(self.journal.vv), self._now())
        return out

    # -- persistence -----------------------------------------------------------------
    def _load(self) -> dict[bytes, Known]:
        raw = self.store.get_meta(KNOWN_META)
        if raw is None:
            return {}
        try:
            version, items = cbor2.loads(raw)
            if version != KNOWN_FORMAT:
                raise ValueError(f"format {version}")
            return {
                bytes(node): Known({bytes(n): int(s) for n, s in vv.items()}, int(seen))
                for node, (vv, seen) in items.items()
            }
        except (ValueError, TypeError, cbor2.CBORDecodeError) as exc:
            # Safe to lose: an unknown member holds everything back.
            log.warning("ignoring malformed known version vectors: %s", exc)
            return {}

    def persist(self) -> None:
        """Save the known vectors if they changed (called now and then, and at exit)."""
        if not self._dirty:
            return
        items = {node: [k.vv, k.seen_ms] for node, k in self.known.items()}
        with self.store.transaction():
            self.store.set_meta(KNOWN_META, cbor2.dumps([KNOWN_FORMAT, items], canonical=True))
        self._dirty = False

    # -- stability -------------------------------------------------------------------
    def vv_of(self, node: bytes) -> VersionVector:
        if node == self.journal.identity.node_id:
            return self.journal.vv
        known = self.known.get(node)
        return known.vv if known is not None else {}

    def stable_vv(self) -> VersionVector:
        """Elementwise minimum of our vector and every current member's."""
        stable = dict(self.journal.vv)
        for member in self.replica.current_members():
            theirs = self.vv_of(member)
            for node, seq in stable.items():
                if theirs.get(node, 0) < seq:
                    stable[node] = theirs.get(node, 0)
        return {node: seq for node, seq in stable.items() if seq > 0}

    def stable_stamps(self, stable: VersionVector | None = None) -> dict[bytes, Hlc]:
        """node -> the stamp of its last stable entry: its ops at or below are stable."""
        out: dict[bytes, Hlc] = {}
        for node, seq in (self.stable_vv() if stable is None else stable).items():
            stamp = self._stamp_of(node, seq)
            if stamp is not None:
                out[node] = stamp
        return out

    def _stamp_of(self, node: bytes, seq: int) -> Hlc | None:
        cached = self._stamp_cache.get((node, seq))
        if cached is not None:
            return cached
        entries = self.store.log_after(node, seq - 1, 1)
        if not entries or entries[0].seq != seq:
            if seq == self.store.covers().get(node):
                # Folded into the checkpoint: its newest op of `node` is a
                # lower bound of the entry's stamp, so at worst less is stable.
                return self.journal.folded_stamp(node)
            return None
        try:
            op = decode_op(
                open_entry(self.journal.keys, entries[0], check_signature=False),
                node=entries[0].node,
            )
        except (MalformedOp, CorruptEntry) as exc:
            log.error("cannot read log entry %s/%d: %s", node.hex()[:8], seq, exc)
            return None
        if len(self._stamp_cache) > 4096:
            self._stamp_cache.clear()
        self._stamp_cache[(node, seq)] = op.hlc
        return op.hlc

    def members(self) -> list[MemberStatus]:
        """Every member (forgotten ones too), with how far behind each is known to be."""
        ours = self.journal.vv
        forgotten = self.replica.forgotten()
        own = self.journal.identity.node_id
        out = []
        for node, name in sorted(self.replica.members().items(), key=lambda kv: kv[1]):
            theirs = self.vv_of(node)
            behind = sum(max(0, seq - theirs.get(n, 0)) for n, seq in ours.items())
            known = self.known.get(node)
            if node == own:
                seen: float | None = self._now() / 1000
            else:
                seen = known.seen_ms / 1000 if known is not None else None
            out.append(MemberStatus(node.hex(), name, seen, behind, node in forgotten))
        return out

    def held_back_by(self, members: list[MemberStatus] | None = None) -> list[MemberStatus]:
        """The current members that keep some operation we hold from being stable
        (of `members`, if already computed)."""
        members = self.members() if members is None else members
        return [m for m in members if m.behind > 0 and not m.forgotten]


# -- forget ------------------------------------------------------------------------------


class NoSuchMember(DfsError):
    """no member of this volume is called {text} (`dfs-peer status --json` lists
    them under gc.members): give a name or the start of an id."""


class AmbiguousMember(DfsError):
    """{text} could be any of {choices}: give more of the id."""


class CannotForgetSelf(DfsError):
    """{text} is this node itself: run `dfs-peer forget` on another node."""


class ForgetReadOnly(DfsError):
    """the node in {data_dir} is read-only: run `dfs-peer forget` on a node
    mounted read-write."""


class AlreadyForgotten(DfsError):
    """{text} ({short}) is already forgotten."""


class AlreadyVoted(DfsError):
    """this node already asked to forget {text} ({short}); it takes {needed} of
    the other members' votes and has {votes}: run `dfs-peer forget` on another."""


def find_member(stability: Stability, text: str) -> bytes:
    """The member `text` names: its display name, or a prefix of its hex id
    (`NoSuchMember`, `AmbiguousMember` otherwise). Used by `forget` and `remove`."""
    members = stability.replica.members()
    candidates = set(members) | set(stability.known)
    wanted = text.strip().lower()
    by_name = {n for n in candidates if members.get(n, "").lower() == wanted}
    by_id = {n for n in candidates if wanted and n.hex().startswith(wanted)}
    found = by_name or by_id
    if not found:
        raise NoSuchMember(text=text)
    if len(found) > 1:
        choices = ", ".join(sorted(f"{members.get(n, '?')} ({n.hex()[:8]})" for n in found))
        raise AmbiguousMember(text=text, choices=choices)
    (node,) = found
    return node


def resolve_member(stability: Stability, text: str) -> bytes:
    """The member `text` names, which this node may vote to forget."""
    replica = stability.replica
    node = find_member(stability, text)
    if node == stability.journal.identity.node_id:
        raise CannotForgetSelf(text=text)
    if node in replica.forgotten():
        raise AlreadyForgotten(text=text, short=node.hex()[:8])
    if stability.journal.identity.node_id in replica.forget_votes().get(node, {}):
        votes, needed = forget_tally(replica, node)
        raise AlreadyVoted(text=text, short=node.hex()[:8], votes=votes, needed=needed)
    return node


def forget_tally(replica: Replica, node: bytes) -> tuple[int, int]:
    """(votes, needed): the votes of other members to forget `node`, and how
    many it takes (more than half of them; see `Replica.forgotten`)."""
    forgotten = replica.forgotten()
    others = [m for m in replica.members() if m != node and m not in forgotten]
    votes = sum(1 for v in replica.forget_votes().get(node, {}) if v in others)
    return votes, len(others) // 2 + 1


def forget_cut(stability: Stability, node: bytes) -> int:
    """The last seq of `node` that still counts: the most anyone is known to hold."""
    cut = stability.journal.vv.get(node, 0)
    for known in stability.known.values():
        cut = max(cut, known.vv.get(node, 0))
    return cut


# -- what to keep ------------------------------------------------------------------------

# Staggered versioning: (age below which, one version per interval), in ms;
# interval 0 keeps every version. Older than the last tier: its interval.
DEFAULT_TIERS: tuple[tuple[int, int], ...] = (
    (60_000, 0),
    (3_600_000, 30_000),
    (86_400_000, 3_600_000),
    (30 * 86_400_000, 86_400_000),
)


@dataclass(frozen=True, slots=True)
class Thinning:
    """Which superseded versions of a file history keeps as they age.

    A version of age A falls in the first tier whose age bound is above A; with
    interval I it is kept only if it is the newest version (content, not a
    delete) of its file, of any age, in its bucket `wall_ms // I`. Buckets are
    aligned to absolute time and each interval divides the next, so the versions
    a coarser tier keeps are among those a finer tier kept, and every node that
    holds the same versions keeps the same ones. No tiers: every version is
    kept."""

    tiers: tuple[tuple[int, int], ...] = DEFAULT_TIERS

    def selected(
        self, contents: Contents, entry: bytes, now_ms: int
    ) -> tuple[set[Hlc], int | None]:
        """(the complete content versions of `entry` the tiers keep now, the
        soonest time one of them moves to a coarser tier)."""
        versions = [
            h
            for h in contents.of(entry)
            if contents.complete(h) and not contents.versions[h].tombstone
        ]
        if not self.tiers:
            return set(versions), None
        # The newest of each bucket among all the versions, whatever their tier,
        # so a bucket's pick never changes as its versions age.
        newest: dict[tuple[int, int], Hlc] = {}
        intervals = {every for _, every in self.tiers if every > 0}
        tier_of: dict[Hlc, int] = {}
        for h in versions:
            age = now_ms - h.wall_ms
            i = next((i for i, (bound, _) in enumerate(self.tiers) if age < bound), None)
            tier_of[h] = len(self.tiers) - 1 if i is None else i
            for every in intervals:
                key = (every, h.wall_ms // every)
                if key not in newest or newest[key] < h:
                    newest[key] = h
        kept: set[Hlc] = set()
        moves: int | None = None
        for h, i in tier_of.items():
            every = self.tiers[i][1]
            if every == 0 or newest[(every, h.wall_ms // every)] == h:
                kept.add(h)
                if i + 1 < len(self.tiers):
                    at = h.wall_ms + self.tiers[i][0]
                    moves = at if moves is None else min(moves, at)
        return kept, moves

    def history_kept(self, contents: Contents, entry: bytes, now_ms: int, keep_ms: int) -> set[Hlc]:
        """The superseded versions of `entry` this node's retention keeps once
        what superseded them is stable (heads aside): the ones worth fetching."""
        if keep_ms <= 0:
            return set()
        selected, _ = self.selected(contents, entry, now_ms)
        heads = set(contents.heads(entry))
        first: dict[Hlc, int] = {}
        for h in contents.of(entry):
            if contents.complete(h):
                for base in contents.versions[h].bases:
                    first[base] = min(first.get(base, h.wall_ms), h.wall_ms)
        return {
            h
            for h in selected
            if h not in heads and (h not in first or now_ms - first[h] < keep_ms)
        }


@dataclass(slots=True)
class KeepPlan:
    """The blocks to keep and why; `next_expiry_ms` is when retention next lets go."""

    blocks: set[bytes] = field(default_factory=set)
    versions_kept: int = 0
    versions_unstable: int = 0
    versions_in_retention: int = 0
    versions_thinned: int = 0  # superseded stably, dropped by `Thinning`
    next_expiry_ms: int | None = None
    kept: set[Hlc] = field(default_factory=set)

    def _expires(self, at_ms: int) -> None:
        if self.next_expiry_ms is None or at_ms < self.next_expiry_ms:
            self.next_expiry_ms = at_ms


def keep_plan(
    replica: Replica,
    stable: dict[bytes, Hlc],
    now_ms: int,
    keep_ms: int,
    pins: Iterable[Hlc] = (),
    thinning: Thinning | None = None,
    entries: Iterable[bytes] | None = None,
) -> KeepPlan:
    """The blocks every version this node keeps references (module docstring);
    `thinning` None keeps every version for the retention. `entries`: only
    those files' versions (`KeepPlan.kept`, for `history`)."""
    contents = replica.contents
    plan = KeepPlan()

    def is_stable(h: Hlc) -> bool:
        bound = stable.get(h.node)
        return bound is not None and h <= bound

    kept: list[Hlc] = []
    thin = thinning if thinning is not None else Thinning(())
    for entry in contents.entries() if entries is None else entries:
        _plan_entry(contents, replica, entry, is_stable, now_ms, keep_ms, plan, kept, thin)
    for pin in pins:
        if pin in contents.versions and contents.complete(pin):
            kept.append(pin)
    # Oldest first, so a version's map extends its (cached) base's.
    for h in sorted(set(kept)):
        plan.blocks.update(contents.block_map(h).values())
    plan.kept = set(kept)
    plan.versions_kept = len(plan.kept)
    return plan


def _plan_entry(
    contents: Contents,
    replica: Replica,
    entry: bytes,
    is_stable: Callable[[Hlc], bool],
    now_ms: int,
    keep_ms: int,
    plan: KeepPlan,
    kept: list[Hlc],
    thinning: Thinning,
) -> None:
    versions = contents.of(entry)
    selected: set[Hlc] | None = None
    superseders: dict[Hlc, list[Hlc]] = {}
    for h in versions:
        if not contents.complete(h):
            # Its lineage has not arrived: keep what it lists; it supersedes nothing yet.
            plan.blocks.update(b for _, b in contents.versions[h].blocks if b is not None)
            continue
        for base in contents.versions[h].bases:
            superseders.setdefault(base, []).append(h)
    heads = set(contents.heads(entry))
    for h in versions:
        if not contents.complete(h):
            continue
        v = contents.versions[h]
        if h in heads:
            if not v.tombstone:
                kept.append(h)
                continue
            # A delete's head: the content it hid is history once the delete
            # is stable, in force, past the retention and the file is gone.
            if (
                not contents.in_force(v)
                or replica.visible(entry)
                or not is_stable(h)
                or now_ms - h.wall_ms < keep_ms
            ):
                if is_stable(h) and contents.in_force(v) and not replica.visible(entry):
                    plan.versions_in_retention += 1
                    plan._expires(h.wall_ms + keep_ms)
                kept.append(h)
            continue
        stable_by = [w.wall_ms for w in superseders.get(h, ()) if is_stable(w)]
        if not stable_by:
            plan.versions_unstable += 1
            kept.append(h)
            continue
        superseded_ms = min(stable_by)
        if now_ms - superseded_ms >= keep_ms:
            continue
        if selected is None:
            selected, moves = thinning.selected(contents, entry, now_ms)
            if moves is not None:
                plan._expires(moves)
        if h not in selected and not v.tombstone:
            plan.versions_thinned += 1
            continue
        plan.versions_in_retention += 1
        plan._expires(superseded_ms + keep_ms)
        kept.append(h)


# -- the collector -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Sweep:
    """The first, synchronous step of a collection (`Collector._sweep`)."""

    t0: float
    stable: VersionVector
    signature: object
    plan: KeepPlan
    freed: int
    freed_bytes: int
    before: int


class Collector:
    """Runs collections (periodically and on demand) and remembers the last one."""

    def __init__(
        self,
        stability: Stability,
        volume: Volume,
        keep_history_s: float,
        now_ms: Callable[[], int] = wall_ms,
        thinning: Thinning | None = None,
    ) -> None:
        self.stability = stability
        self.thinning = Thinning() if thinning is None else thinning
        self.journal = stability.journal
        self.store = stability.store
        self.volume = volume
        self.keep_ms = max(0, int(keep_history_s * 1000))
        self.journal.history_ms = self.keep_ms
        self._now = now_ms
        self.last: Collection | None = None
        self.runs = 0  # collections that ran (for metrics)
        self.bytes_freed = 0  # by all of them
        self._signature: object = None
        self._next_expiry_ms: int | None = None
        self._ops_at_last = 0
        self._wake = asyncio.Event()
        self._collecting = asyncio.Lock()
        self._warned_forgotten = False

    def _pins(self) -> list[Hlc]:
        pins = [h for h in self.volume.buffered_bases() if h is not None]
        return pins + self.volume.open_versions()

    def _current_signature(self, stable: VersionVector, pins: list[Hlc]) -> object:
        return (
            tuple(sorted(self.journal.vv.items())),
            tuple(sorted(stable.items())),
            tuple(sorted(pins)),
        )

    def kept_versions(self, entry: bytes) -> set[Hlc]:
        """The versions of `entry` the next collection keeps (for `history`)."""
        return keep_plan(
            self.journal.replica,
            self.stability.stable_stamps(),
            self._now(),
            self.keep_ms,
            self._pins(),
            self.thinning,
            entries=[entry],
        ).kept

    def collect(self, force: bool = True) -> Collection:
        """Delete every block no kept version references; give the space back.

        Synchronous from start to delete, so no commit or merge can slip in
        between deciding what is live and deleting the rest."""
        sweep = self._sweep(force)
        if isinstance(sweep, Collection):
            return sweep
        fold = self._fold_target(sweep)
        folded = self.journal.fold_to(fold) if fold is not None else 0
        return self._finish(sweep, folded, self._reclaim(sweep.freed, folded))

    async def collect_async(self, force: bool = True) -> Collection:
        """`collect`, with the parts that grow with the volume (folding the log
        into the checkpoint, vacuum) in a worker thread: they touch only the
        store, while the loop goes on answering FUSE."""
        async with self._collecting:
            await self.journal.wait_merged()
            sweep = self._sweep(force)
            if isinstance(sweep, Collection):
                return sweep
            fold = self._fold_target(sweep)
            folded = 0
            if fold is not None:
                with pacing.collector_paused():  # (as when adopting a checkpoint)
                    folded = await pacing.to_thread(self.journal.fold_to, fold)
            reclaimed = await asyncio.to_thread(self._reclaim, sweep.freed, folded)
            return self._finish(sweep, folded, reclaimed)

    def _sweep(self, force: bool) -> Collection | _Sweep:
        """Decide what is live and delete the other blocks (one synchronous step);
        the last collection if nothing changed since (`force=False`)."""
        t0 = time.monotonic()
        if self.journal.merging:
            # A merge in pieces has stored blocks its unmerged ops reference:
            # deciding now would delete them (`collect_async` waits instead).
            return self.last if self.last is not None else _not_run(self.store.stats().db_bytes)
        now = self._now()
        stable = self.stability.stable_vv()
        pins = self._pins()
        signature = self._current_signature(stable, pins)
        expired = self._next_expiry_ms is not None and now >= self._next_expiry_ms
        if not force and signature == self._signature and not expired and self.last is not None:
            return self.last
        before = self.store.stats().db_bytes
        plan = keep_plan(
            self.journal.replica,
            self.stability.stable_stamps(stable),
            now,
            self.keep_ms,
            pins,
            self.thinning,
        )
        live = with_bases(plan.blocks, self.store.patch_bases())
        garbage = [bid for bid in self.store.block_ids() if bid not in live]
        # A wanted block (`peer.net.sync`) no kept version references is wanted no more.
        unwanted = [bid for bid in self.store.wanted_blocks() if bid not in live]
        freed = freed_bytes = 0
        if garbage or unwanted:
            with self.store.transaction():
                freed, freed_bytes = self.store.delete_blocks(garbage)
                self.store.unwant_blocks(unwanted)
        return _Sweep(t0, stable, signature, plan, freed, freed_bytes, before)

    def _fold_target(self, sweep: _Sweep) -> dict[bytes, int] | None:
        if isinstance(self.store, ReadOnlyStore) or self.journal.space.full:
            return None  # (a checkpoint needs room to be written)
        return self.journal.fold_target(sweep.stable)

    def _reclaim(self, freed: int, folded: int) -> int:
        if freed or folded or self.store.free_bytes():
            return self.store.reclaim(RECLAIM_PAGES)
        # Nothing to give back inside the file, but the write-ahead log keeps
        # up to its size limit (4 MiB) after each checkpoint: a collection
        # leaves the store at its size, as `dfs-peer gc` then reports it.
        before = self.store.stats().db_bytes
        self.store.shrink_wal()
        return max(0, before - self.store.stats().db_bytes)

    def _finish(self, sweep: _Sweep, folded: int, reclaimed: int) -> Collection:
        plan, freed, freed_bytes = sweep.plan, sweep.freed, sweep.freed_bytes
        self.stability.persist()
        self._signature = sweep.signature
        self._next_expiry_ms = plan.next_expiry_ms
        self._ops_at_last = sum(self.journal.vv.values())
        result = Collection(
            at=time.time(),
            seconds=round(time.monotonic() - sweep.t0, 4),
            ran=True,
            blocks_freed=freed,
            bytes_freed=freed_bytes,
            blocks_kept=len(plan.blocks),
            versions_kept=plan.versions_kept,
            versions_unstable=plan.versions_unstable,
            versions_in_retention=plan.versions_in_retention,
            versions_thinned=plan.versions_thinned,
            log_entries_folded=folded,
            store_bytes_before=sweep.before,
            store_bytes_after=self.store.stats().db_bytes,
            store_bytes_reclaimed=reclaimed,
        )
        self.last = result
        self.runs += 1
        self.bytes_freed += freed_bytes
        if freed:
            log.info(
                "collected blocks=%d bytes=%d kept=%d seconds=%.3f",
                freed,
                freed_bytes,
                len(plan.blocks),
                result.seconds,
            )
        return result

    def nudge(self) -> None:
        """Wake the periodic task early (a big merge happened)."""
        self._wake.set()

    async def run_periodically(self) -> None:
        """Collect every `COLLECT_EVERY_S`, or sooner after many new operations;
        cheap when nothing changed (see `collect(force=False)`). Not in the
        middle of a burst of local writes: one that many new operations call
        for waits until a check finds none of this node's own since the last."""
        last_run = time.monotonic()
        own = self.journal.identity.node_id
        own_seq = self.journal.vv.get(own, 0)
        while True:
            try:
                async with asyncio.timeout(CHECK_EVERY_S):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            self.stability.persist()
            writing = self.journal.vv.get(own, 0) != own_seq
            own_seq = self.journal.vv.get(own, 0)
            if not self._warned_forgotten and own in self.journal.replica.forgotten():
                self._warned_forgotten = True
                log.warning(FORGOTTEN_WARNING)
            grown = sum(self.journal.vv.values()) - self._ops_at_last
            if time.monotonic() - last_run < COLLECT_EVERY_S and (grown < BIG_MERGE_OPS or writing):
                continue
            last_run = time.monotonic()
            await self.collect_async(force=False)

    def status(self) -> dict[str, Any]:
        """The `gc` object of `status --json`."""
        stable = self.stability.stable_vv()
        ours = self.journal.vv
        members = self.stability.members()
        return {
            "keep_history_s": self.keep_ms / 1000,
            "thin_history": [[age / 1000, every / 1000] for age, every in self.thinning.tiers],
            "stable_version_vector": {n.hex(): s for n, s in sorted(stable.items())},
            "operations_not_stable": sum(max(0, s - stable.get(n, 0)) for n, s in ours.items()),
            "members": [asdict(m) for m in members],
            "held_back_by": [asdict(m) for m in self.stability.held_back_by(members)],
            "forgotten": self.journal.identity.node_id in self.journal.replica.forgotten(),
            # Every `dfs-peer forget` vote, honoured or not: node -> the voters.
            "forget_votes": {
                node.hex(): sorted(v.hex() for v in votes)
                for node, votes in sorted(self.journal.replica.forget_votes().items())
            },
            "last_collection": asdict(self.last) if self.last is not None else None,
        }
