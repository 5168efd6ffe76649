"""Many replicas, random operations, random delivery: they must converge.

`Replicas` is a hypothesis state machine (the shape of hypothesis's own
`test_database_agreement.py`): three simulated nodes, each with its own clock
read from its own skewable fake wall clock, make operations the way a real node
does (only on entries they can see, deletes recording the heads they saw,
writes based on the version shown), while operations travel between them in
random subsets, duplicated, reordered, across partitions that come and go. So
the runs contain concurrent moves that would form cycles, concurrent writes,
deletes racing writes and renames, and different entries given one name.

After every step, on every replica: the tree has no cycles and equals the
naive replay of `tests/crdt/model.py`; every visible entry is listed under
exactly one parent, under a valid name no sibling shares, and `lookup` finds it
there; and every `Changes` a batch returned named what the batch changed.
`converge_and_compare` delivers everything everywhere and checks that all
replicas, and a fresh replica given everything at once, show the same tree and
that no write was lost (see `assert_no_lost_writes` for exactly what that means).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from crdt.clock import MAX_FORWARD_MS, Hlc, refusal
from crdt.compact import compact
from crdt.merge import Changes, EntryView, Replica
from crdt.ops import (
    BLOCK_SIZE,
    NAME_MAX,
    ROOT,
    TRASH,
    Create,
    Kind,
    Move,
    Op,
    SetAttr,
    Write,
)
from tests.crdt.model import (
    EPOCH_MS,
    SimNode,
    ancestors,
    block,
    lineage,
    moves_of,
    places_of,
    replay,
    shown,
    walk,
)

NAMES = [b"a", b"a.txt", b"b.txt", b"c"]
names = st.sampled_from(NAMES)
replicas = st.integers(0, 2)
links = st.sampled_from([(i, j) for i in range(3) for j in range(3) if i != j])
block_maps = st.dictionaries(
    st.integers(0, 3), st.none() | st.integers(1, 4).map(block), max_size=3
)
attributes = st.one_of(
    st.tuples(st.just("mode"), st.sampled_from([0o600, 0o644, 0o755])),
    st.tuples(st.just("uid"), st.integers(0, 2)),
    st.tuples(st.just("mtime_ns"), st.integers(0, 2 * EPOCH_MS * 1_000_000)),
    st.tuples(st.just("xattr:user.tag"), st.none() | st.sampled_from([b"red", b"blue"])),
)


def suffix_shaped(name: bytes, entry: bytes, length: int) -> bytes:
    """`name` as rule 2 shows it for `entry` (`stem~<hex>.ext`)."""
    dot = name.rfind(b".")
    stem, ext = (name[:dot], name[dot:]) if dot > 0 else (name, b"")
    return stem + b"~" + entry[:length].hex().encode() + ext


# --- checks shared by the machine and the plain tests ---------------------------------------------


def assert_tree_sound(node: SimNode) -> None:
    """No cycles, and the incremental tree equals the naive replay."""
    tree = node.replica.tree
    places = places_of(tree)
    for child in places:
        assert child not in ancestors(places, child), f"{child.hex()} is its own ancestor"
    assert places == replay(moves_of(node.held.values())), f"{node.name}: tree != model"


def assert_listings_sound(replica: Replica, created: Iterable[bytes]) -> None:
    """Every visible entry has one parent and one valid, unique name there."""
    parents: dict[bytes, bytes] = {}
    for parent, name, child in walk(replica):
        assert child not in parents, f"{child.hex()} listed in two directories"
        parents[child] = parent
        assert 0 < len(name) <= NAME_MAX, name
        assert b"/" not in name, name
        assert name not in (b".", b".."), name
        assert replica.lookup(parent, name) == child
        view = replica.entry(child)
        assert view is not None
        assert (view.parent, view.name) == (parent, name)
        assert replica.visible(child)
    for parent in {ROOT, *parents.values()}:
        listed = [name for name, _ in replica.listing(parent)]
        assert len(set(listed)) == len(listed), f"duplicate names in {parent.hex()}"
    for entry in created:
        assert replica.visible(entry) == (entry in parents), f"{entry.hex()} visible but unlisted"


def assert_no_lost_writes(replica: Replica, writes: Iterable[Write]) -> None:
    """After convergence, nothing a user wrote is lost silently.

    What the rules guarantee, for writes made as a node makes them (on a file
    it can see, based on the version it shows): such a write is never dead
    (its content lineage passes through no tombstone in force), and stays so.
    So, in the converged state:

    1. every file with a live head is visible, and its live heads are exactly
       the versions shown by it and by its conflict copies (rules 3 and 4);
    2. hence every such write W is either in the lineage (through any base) of
       a version that a visible file or conflict copy shows, or in the lineage
       of a tombstone of its file: a delete saw W, or a version superseding W,
       and removed it on purpose. Superseded by a resolution also counts: the
       resolving node deleted the conflict copy that showed it.
    """
    views = shown(replica)
    files = {w.entry for w in writes}
    for file in files:
        live = set(replica.contents.live_heads(file))
        if not live:
            continue
        assert file in views, f"{file.hex()} has a live head {sorted(live)} but is not shown"
        showing = {v.version for v in views.values() if file in (v.id, v.conflict_of)}
        assert showing == live, f"{file.hex()}: shown {showing} but live heads are {live}"
    reached: set[Hlc] = set()
    for view in views.values():
        if view.version is not None:
            reached |= lineage(replica, view.version)
    for version in replica.contents.versions.values():
        if version.tombstone:
            reached |= lineage(replica, version.hlc)
    for write in writes:
        assert not replica.contents.dead(write.hlc), f"write {write.hlc} made by a node is dead"
        assert write.hlc in reached, f"write {write.hlc} to {write.entry.hex()} was lost"


def assert_changes_reported(before: Replica, after: Replica, changes: Changes) -> None:
    """`Changes` names what a mount must invalidate: every directory, shown
    before and after, whose listing changed (an entry that appears or vanishes
    changes the listing of some such ancestor), and every entry, shown before
    and after, whose attributes or content changed."""
    old, new = shown_with_root(before), shown_with_root(after)
    for e in old.keys() & new.keys():
        a, b = old[e], new[e]
        if a.kind == "dir" and before.listing(e) != after.listing(e):
            assert e in changes.dirs, f"listing of {e.hex()} changed unreported"
        if attrs_of(a) != attrs_of(b):
            source = a.conflict_of or e
            assert source in changes.entries, f"{e.hex()} changed unreported: {a} -> {b}"


def shown_with_root(replica: Replica) -> dict[bytes, EntryView]:
    views = shown(replica)
    root = replica.entry(ROOT)
    assert root is not None
    views[ROOT] = root
    return views


def attrs_of(view: EntryView) -> tuple[object, ...]:
    return (view.mode, view.uid, view.gid, view.mtime_ns, view.size, view.version)


def copy_of(replica: Replica, ops: Iterable[Op]) -> Replica:
    """A fresh replica given `ops` at once, which must equal `replica` (so no
    incrementally kept view went stale)."""
    fresh = Replica()
    fresh.apply(ops)
    assert fresh.snapshot() == replica.snapshot()
    return fresh


def deliver(to: SimNode, ops: Sequence[Op], rnd: random.Random, check: bool = True) -> None:
    """`ops` with some repeated, shuffled, in a few batches; with `check`, each
    batch's `Changes` is compared with what really changed."""
    batch = list(ops) + rnd.choices(list(to.held.values()) + list(ops), k=rnd.randint(0, 3))
    rnd.shuffle(batch)
    while batch:
        cut = rnd.randint(1, len(batch))
        part, batch = batch[:cut], batch[cut:]
        before = copy_of(to.replica, to.held.values()) if check else None
        changes = to.receive(part)
        if before is not None:
            assert_changes_reported(before, to.replica, changes)


# --- the state machine --------------------------------------------------------------------------------


class Replicas(RuleBasedStateMachine):
    entries = Bundle("entries")

    def __init__(self) -> None:
        super().__init__()
        self.nodes: list[SimNode] = []
        self.cut: set[frozenset[int]] = set()
        self.latest_wall: list[int] = []

    @initialize(
        target=entries,
        skews=st.lists(
            st.integers(-2 * MAX_FORWARD_MS, 2 * MAX_FORWARD_MS), min_size=3, max_size=3
        ),
    )
    def start(self, skews: list[int]) -> object:
        """Three nodes sharing a small tree: /docs/a.txt, /src/lib/, /b.txt."""
        self.nodes = [
            SimNode.named(name, EPOCH_MS + skew)
            for name, skew in zip(("alice", "bob", "carol"), skews, strict=True)
        ]
        self.latest_wall = [node.wall_ms for node in self.nodes]
        alice = self.nodes[0]
        docs, src = alice.mkdir(ROOT, b"docs"), alice.mkdir(ROOT, b"src")
        lib = alice.mkdir(src, b"lib")
        a, b = alice.create(docs, b"a.txt"), alice.create(ROOT, b"b.txt")
        alice.write(a, {0: block(1)}, 100)
        for node in self.nodes[1:]:
            node.sync_from(alice)
        return multiple(ROOT, docs, src, lib, a, b)

    def _diverged(self) -> bool:
        held = [node.held.keys() for node in self.nodes]
        return any(h != held[0] for h in held[1:])

    # -- what a node sees ------------------------------------------------------------------------
    def _pick(self, i: int, hint: bytes, *kinds: Kind) -> EntryView | None:
        """An entry node i shows (not a conflict copy), of one of `kinds`:
        `hint` if it qualifies, else one chosen by `hint` among those that do,
        so that a step is rarely wasted on an entry this node cannot see."""
        node = self.nodes[i]
        views = [
            v
            for v in shown(node.replica).values()
            if v.conflict_of is None and (not kinds or v.kind in kinds)
        ]
        for v in views:
            if v.id == hint:
                return v
        if not views:
            return None
        views.sort(key=lambda v: v.id)
        return views[int.from_bytes(hint[:4], "big") % len(views)]

    def _dir(self, i: int, hint: bytes) -> bytes:
        """A directory node i shows: `hint` if it is one, else ROOT or another."""
        if hint == ROOT:
            return ROOT
        view = self._pick(i, hint, "dir")
        if view is None or (view.id != hint and hint[0] % 2):
            return ROOT
        return view.id

    def _replace(self, i: int, parent: bytes, name: bytes, entry: bytes) -> bool:
        """Make room for `entry` at (parent, name) as rename(2) does; False if it can't."""
        node = self.nodes[i]
        existing = node.replica.lookup(parent, name)
        if existing is None:
            return True
        if existing == entry:
            return False
        mine, theirs = node.view(entry), node.view(existing)
        if mine.kind == "dir" or theirs.kind == "dir":
            return False  # rename onto a directory, or a directory onto a file: refused
        node.delete(existing)
        return node.replica.lookup(parent, name) is None

    def _ancestors(self, i: int, entry: bytes) -> list[bytes]:
        out = []
        while entry != ROOT:
            view = self.nodes[i].replica.entry(entry)
            assert view is not None
            entry = view.parent
            out.append(entry)
        return out

    # -- local operations --------------------------------------------------------------------------
    @rule(
        target=entries,
        i=replicas,
        parent=entries,
        name=names,
        kind=st.sampled_from(["file", "file", "dir", "symlink"]),
    )
    def create(self, i: int, parent: bytes, name: bytes, kind: Kind) -> object:
        node = self.nodes[i]
        where = self._dir(i, parent)
        if node.replica.lookup(where, name) is not None:
            return multiple()  # EEXIST
        return node.create(where, name, kind, target=b"../a" if kind == "symlink" else b"")

    @rule(
        target=entries,
        i=replicas,
        parent=entries,
        name=names,
        like=entries,
        length=st.sampled_from([4, 8]),
    )
    def create_suffix_shaped(
        self, i: int, parent: bytes, name: bytes, like: bytes, length: int
    ) -> object:
        """A file named as rule 2 would show another entry (`a~<its id>.txt`)."""
        return self.create(i, parent, suffix_shaped(name, like, length), "file")

    @rule(i=replicas, entry=entries, name=names, like=entries, length=st.sampled_from([4, 8]))
    def rename_suffix_shaped(
        self, i: int, entry: bytes, name: bytes, like: bytes, length: int
    ) -> None:
        self.rename(i, entry, suffix_shaped(name, like, length))

    @rule(i=replicas)
    def restart(self, i: int) -> None:
        """The node restarts: its replica is rebuilt from its log alone, which
        it replays node by node (as `peer.storage.store.Store.iter_log` reads it)."""
        node = self.nodes[i]
        fresh = Replica()
        fresh.apply(sorted(node.held.values(), key=lambda op: (op.hlc.node, op.hlc)))
        assert fresh.snapshot() == node.replica.snapshot(), f"{node.name} changed on restart"
        node.replica = fresh

    @rule(i=replicas)
    def adopt_checkpoint(self, i: int) -> None:
        """The node goes on from a checkpoint of what it holds (`crdt.compact`,
        which drops overridden ops) instead of its live state."""
        node = self.nodes[i]
        folded = Replica()
        folded.apply(compact(node.held.values()))
        assert folded.snapshot() == node.replica.snapshot(), f"{node.name}: checkpoint differs"
        node.replica = folded

    @rule(i=replicas, entry=entries, blocks=block_maps, tail=st.integers(1, BLOCK_SIZE))
    def write(self, i: int, entry: bytes, blocks: dict[int, bytes | None], tail: int) -> None:
        """A flush: some blocks (or holes) on top of the version shown."""
        view = self._pick(i, entry, "file")
        if view is not None:
            end = max(blocks) * BLOCK_SIZE + tail if blocks else view.size
            self.nodes[i].write(view.id, blocks, max(view.size, end))

    @rule(i=replicas, entry=entries, size=st.integers(0, 4 * BLOCK_SIZE))
    def truncate(self, i: int, entry: bytes, size: int) -> None:
        view = self._pick(i, entry, "file")
        if view is not None:
            self.nodes[i].write(view.id, {}, size)

    @rule(i=replicas, entry=entries, name=names)
    def rename(self, i: int, entry: bytes, name: bytes) -> None:
        view = self._pick(i, entry)
        if view is not None and self._replace(i, view.parent, name, view.id):
            self.nodes[i].rename(view.id, view.parent, name)

    @rule(i=replicas, entry=entries, into=entries, name=names)
    def move(self, i: int, entry: bytes, into: bytes, name: bytes) -> None:
        view = self._pick(i, entry)
        if view is not None:
            self._move(i, view.id, self._dir(i, into), name)

    @rule(link=links, x=entries, y=entries)
    def cross_moves(self, link: tuple[int, int], x: bytes, y: bytes) -> None:
        """Node i moves directory x into y while node j moves y into x: each
        is fine alone, together they would close a cycle."""
        i, j = link
        vx, vy = self._pick(i, x, "dir"), self._pick(j, y, "dir")
        if vx is None or vy is None or vx.id == vy.id:
            return
        if self.nodes[i].replica.entry(vy.id) and self.nodes[j].replica.entry(vx.id):
            self._move(i, vx.id, vy.id, vx.name)
            self._move(j, vy.id, vx.id, vy.name)

    def _move(self, i: int, entry: bytes, where: bytes, name: bytes) -> None:
        """rename(2) of `entry` to (where, name) on node i, refused as it would be."""
        if where == entry or entry in self._ancestors(i, where):
            return  # EINVAL: into itself
        if self._replace(i, where, name, entry):
            self.nodes[i].rename(entry, where, name)

    @rule(i=replicas, entry=entries)
    def delete(self, i: int, entry: bytes) -> None:
        """unlink, or rmdir of a directory this node shows empty."""
        view = self._pick(i, entry)
        node = self.nodes[i]
        if view is None or (view.kind == "dir" and node.replica.listing(view.id)):
            return
        node.delete(view.id)

    @rule(i=replicas, entry=entries)
    def delete_tree(self, i: int, entry: bytes) -> None:
        """rm -r: everything below, deepest first, then the directory."""
        view = self._pick(i, entry, "dir")
        if view is None:
            return
        node = self.nodes[i]

        def remove(entry: bytes) -> None:
            if node.replica.kind(entry) == "dir":
                for _, child in node.replica.listing(entry):
                    remove(child)
            # gone already: a conflict copy that went with its file, or a
            # directory back from the trash only for the child just removed
            if node.replica.entry(entry) is not None:
                node.delete(entry)

        remove(view.id)

    @rule(i=replicas, entry=entries, attr=attributes)
    def set_attr(self, i: int, entry: bytes, attr: tuple[str, int | bytes | None]) -> None:
        view = self._pick(i, entry)
        if view is not None:
            self.nodes[i].set_attr(view.id, *attr)

    @rule(i=replicas, k=st.integers(0, 7))
    def resolve(self, i: int, k: int) -> None:
        """Delete a conflict copy this node shows."""
        node = self.nodes[i]
        copies = sorted(v.id for v in shown(node.replica).values() if v.conflict_of is not None)
        if copies:
            node.delete(copies[k % len(copies)])

    @rule(i=replicas, ms=st.integers(-10_000, 2 * MAX_FORWARD_MS))
    def move_wall_clock(self, i: int, ms: int) -> None:
        """Time passes; sometimes a wall clock is stepped back, or far ahead."""
        self.nodes[i].wall_ms += ms
        self.latest_wall[i] = max(self.latest_wall[i], self.nodes[i].wall_ms)

    # -- the network ---------------------------------------------------------------------------
    @rule(link=links)
    def toggle_partition(self, link: tuple[int, int]) -> None:
        self.cut ^= {frozenset(link)}

    @rule(link=links, rnd=st.randoms(use_true_random=False))
    def deliver(self, link: tuple[int, int], rnd: random.Random) -> None:
        """Some of what i holds reaches j: a random subset, repeated, reordered."""
        i, j = link
        if frozenset(link) in self.cut:
            return
        source, to = self.nodes[i], self.nodes[j]
        pool = [op for h, op in sorted(source.held.items()) if h not in to.held]
        share = rnd.random()
        deliver(to, [op for op in pool if rnd.random() < share], rnd)

    @precondition(lambda self: self._diverged())
    @rule(rnd=st.randoms(use_true_random=False))
    def converge_and_compare(self, rnd: random.Random) -> None:
        everything: dict[Hlc, Op] = {}
        for node in self.nodes:
            everything.update(node.held)
        for node in self.nodes:
            missing = [op for h, op in everything.items() if h not in node.held]
            deliver(node, missing, rnd, check=False)
        fresh = Replica()
        fresh.apply(everything.values())
        expected = fresh.snapshot()
        for node in self.nodes:
            assert node.replica.snapshot() == expected, f"{node.name} differs from a fresh replica"
        writes = [op for node in self.nodes for op in node.made if isinstance(op, Write)]
        assert_no_lost_writes(fresh, writes)
        for node in self.nodes:
            assert_no_lost_writes(node.replica, writes)

    # -- after every step ------------------------------------------------------------------------------
    @invariant()
    def trees_are_sound(self) -> None:
        for node in self.nodes:
            assert_tree_sound(node)

    @invariant()
    def listings_are_sound(self) -> None:
        for node in self.nodes:
            created = [op.entry for op in node.held.values() if isinstance(op, Create)]
            assert_listings_sound(node.replica, created)

    @invariant()
    def clocks_stay_near_their_wall_clocks(self) -> None:
        """A peer far ahead drags a clock at most MAX_FORWARD_MS past the
        latest time its own wall clock showed."""
        for node, wall in zip(self.nodes, self.latest_wall, strict=True):
            assert node.clock.last().wall_ms <= wall + MAX_FORWARD_MS


# As many runs as the profile asks for (dev 100, ci 300), each long enough for
# partitions to heal and concurrent edits to meet.
Replicas.TestCase.settings = settings(stateful_step_count=80, deadline=None)
TestReplicas = Replicas.TestCase


# --- the same operations, any order, any repeats ---------------------------------------------------------

ENTRIES = [bytes([0x40 + n]) * 16 for n in range(5)]
NODES = [bytes([n]) * 32 for n in (1, 2, 3)]
# Names as rule 2 shows entries that share a name (`a~<id>`, `a~<id>.txt`),
# taken by other entries: shown names must still not depend on the order
# the operations came in.
op_names = st.sampled_from(
    NAMES + [suffix_shaped(n, e, k) for n in (b"a", b"a.txt") for e in ENTRIES[:3] for k in (4, 8)]
)


@st.composite
def op_sets(
    draw: st.DrawFn,
    name_pool: st.SearchStrategy[bytes] = op_names,
    entry_pool: Sequence[bytes] = ENTRIES,
) -> list[Op]:
    """Arbitrary operations with unique stamps, not only those a node would
    make: moves before creates, creates inside their own subtree, writes on
    missing bases or on directories. Only one thing holds as it does for real
    ids: each entry is created at most once."""
    stamps = draw(
        st.lists(
            st.builds(Hlc, st.integers(0, 30), st.integers(0, 2), st.sampled_from(NODES)),
            min_size=1,
            max_size=40,
            unique=True,
        )
    )
    ops: list[Op] = []
    created: set[bytes] = set()
    for h in sorted(stamps):
        ops.append(draw_op(draw, h, ops, created, name_pool, entry_pool))
    return ops


def draw_op(
    draw: st.DrawFn,
    h: Hlc,
    ops: Sequence[Op],
    created: set[bytes],
    name_pool: st.SearchStrategy[bytes] = op_names,
    entry_pool: Sequence[bytes] = ENTRIES,
) -> Op:
    """An arbitrary op stamped `h`, on entries `ops` may name; a Create only
    for an entry not in `created` (which it joins)."""
    entry = draw(st.sampled_from(entry_pool))
    kind = draw(st.sampled_from(["create", "create", "move", "delete", "write", "attr"]))
    earlier = [op.hlc for op in ops if getattr(op, "entry", None) == entry]
    if kind == "create" and entry not in created:
        created.add(entry)
        k: Kind = draw(st.sampled_from(["file", "dir", "dir"]))
        parent = draw(st.sampled_from([ROOT, *entry_pool]))
        return Create(h, entry, parent, draw(name_pool), k, 0o644, 0, 0)
    if kind in ("create", "move"):
        parent = draw(st.sampled_from([ROOT, *entry_pool]))
        return Move(h, entry, parent, draw(name_pool))
    if kind == "delete":
        seen = draw(st.lists(st.sampled_from(earlier), max_size=2)) if earlier else []
        return Move(h, entry, TRASH, draw(name_pool), tuple(seen))
    if kind == "write":
        bases = draw(st.lists(st.sampled_from(earlier), max_size=2)) if earlier else []
        return Write(
            h,
            entry,
            tuple(bases),
            draw(st.integers(0, 3 * BLOCK_SIZE)),
            tuple(sorted(draw(block_maps).items())),
        )
    return SetAttr(h, entry, "mode", draw(st.integers(0, 0o777)))


@settings(deadline=None)
@given(op_sets(), st.lists(st.randoms(use_true_random=False), min_size=3, max_size=4))
def test_same_operations_in_any_order_give_identical_replicas(
    ops: list[Op], orders: list[random.Random]
) -> None:
    check_any_order(ops, orders)


def check_any_order(ops: list[Op], orders: list[random.Random]) -> None:
    """Delivered in any order, after a restart and from a checkpoint, `ops`
    show what a fresh replica given them at once shows."""
    reference = Replica()
    reference.apply(ops)
    expected = reference.snapshot()
    for rnd in orders:
        node = SimNode("r", NODES[0])
        deliver(node, ops, rnd)
        assert node.replica.snapshot() == expected
        assert places_of(node.replica.tree) == replay(moves_of(ops))
        assert_listings_sound(node.replica, [op.entry for op in ops if isinstance(op, Create)])
    # A restart replays the log node by node; a checkpoint leaves overridden ops out.
    restarted = Replica()
    restarted.apply(sorted(ops, key=lambda op: (op.hlc.node, op.hlc)))
    assert restarted.snapshot() == expected, "a restart (replay of the log) differs"
    folded = Replica()
    folded.apply(compact(ops))
    assert folded.snapshot() == expected, "a replay of the checkpoint differs"


# --- faulty logs: a node's stamps that repeat or go back -----------------------------------------

# Far past every stamp drawn below: no op is refused for being ahead.
WALL_MS = 10**12


@st.composite
def node_logs(draw: st.DrawFn) -> dict[bytes, list[Op]]:
    """Each node's log in seq order, its stamps drawn freely: they may repeat
    (two different ops under one stamp) or go back, as a node whose clock was
    not restored, or a faulty one, makes them."""
    logs: dict[bytes, list[Op]] = {}
    ops: list[Op] = []
    created: set[bytes] = set()
    for node in NODES:
        stamps = draw(
            st.lists(
                st.builds(Hlc, st.integers(0, 12), st.integers(0, 1), st.just(node)), max_size=12
            )
        )
        logs[node] = []
        for h in stamps:
            op = draw_op(draw, h, ops, created)
            ops.append(op)
            logs[node].append(op)
    return logs


class Receiver:
    """What `peer.storage.journal.Journal.merge_remote` does with peers' entries,
    minus storage: each node's entries in seq order, any number of times; an
    entry whose stamp is not above its node's previous one is refused, with
    the rest of that node's log (`crdt.clock.refusal`)."""

    def __init__(self) -> None:
        self.replica = Replica()
        self.vv: dict[bytes, int] = {}
        self.tops: dict[bytes, Hlc] = {}
        self.refused: set[bytes] = set()
        self.log: dict[bytes, list[Op]] = {}  # what the store holds, node by node

    def receive(self, node: bytes, entries: Sequence[tuple[int, Op]]) -> None:
        batch: list[Op] = []
        for seq, op in entries:
            if seq <= self.vv.get(node, 0) or node in self.refused:
                continue
            assert seq == self.vv.get(node, 0) + 1, "entries of a node arrive in seq order"
            if refusal(self.tops.get(node), op.hlc, WALL_MS) is not None:
                self.refused.add(node)
                continue
            self.vv[node], self.tops[node] = seq, op.hlc
            self.log.setdefault(node, []).append(op)
            batch.append(op)
        self.replica.apply(batch)

    def held(self) -> list[Op]:
        """The stored log in the order a restart replays it (node, then seq)."""
        return [op for node in sorted(self.log) for op in self.log[node]]


def admitted(log: Sequence[Op]) -> list[Op]:
    """The rule, stated directly: the longest prefix whose stamps strictly rise."""
    out: list[Op] = []
    for op in log:
        if out and op.hlc <= out[-1].hlc:
            break
        out.append(op)
    return out


@settings(deadline=None)
@given(node_logs(), st.lists(st.randoms(use_true_random=False), min_size=2, max_size=3))
def test_logs_whose_stamps_repeat_or_go_back_merge_alike_everywhere(
    logs: dict[bytes, list[Op]], orders: list[random.Random]
) -> None:
    spec = [op for node in sorted(logs) for op in admitted(logs[node])]
    reference = Replica()
    reference.apply(spec)
    expected = reference.snapshot()
    for rnd in orders:
        to = Receiver()
        # Pulls of random pieces of random nodes' logs, overlapping what is held.
        while any(to.vv.get(n, 0) < len(log) and n not in to.refused for n, log in logs.items()):
            node = rnd.choice(sorted(logs))
            start = max(0, to.vv.get(node, 0) - rnd.randint(0, 2))
            end = start + rnd.randint(1, 4)
            to.receive(node, list(enumerate(logs[node], 1))[start:end])
        assert sorted(op.hlc for op in to.held()) == sorted(op.hlc for op in spec)
        assert to.replica.snapshot() == expected, "a live merge differs"
        restarted = Replica()
        restarted.apply(to.held())
        assert restarted.snapshot() == expected, "a restart (replay of the log) differs"
        folded = Replica()
        folded.apply(compact(to.held()))
        assert folded.snapshot() == expected, "a replay of the checkpoint differs"


def _squatter_leaves() -> list[Op]:
    """Two files named `a` and a third named as rule 2 shows the older of
    them, which then goes: the older one's suffix must shrink back."""
    e0, e1, e2 = ENTRIES[:3]
    node = NODES[0]
    taken = suffix_shaped(b"a", e0, 4)
    return [
        Create(Hlc(1, 0, node), e0, ROOT, b"a", "file", 0o644, 0, 0),
        Create(Hlc(2, 0, node), e1, ROOT, b"a", "file", 0o644, 0, 0),
        Create(Hlc(3, 0, node), e2, ROOT, taken, "file", 0o644, 0, 0),
        Move(Hlc(4, 0, node), e2, TRASH, taken),
    ]


@settings(deadline=None)
@example(_squatter_leaves(), [random.Random(seed) for seed in range(4)])
@given(
    op_sets(
        st.sampled_from([b"a", b"a", *(suffix_shaped(b"a", e, 4) for e in ENTRIES[:2])]),
        ENTRIES[:3],
    ),
    st.lists(st.randoms(use_true_random=False), min_size=3, max_size=4),
)
def test_suffixed_names_never_depend_on_the_order_of_arrival(
    ops: list[Op], orders: list[random.Random]
) -> None:
    """Every name is `a` or the suffix rule 2 gives two of the entries, so
    groups often avoid another group's name, which later goes."""
    check_any_order(ops, orders)
