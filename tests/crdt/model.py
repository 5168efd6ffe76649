"""Reference models the CRDT tests compare the real code against.

- `replay` is the naive model of the tree (the Move_Code pattern of the
  move-op paper): sort every move by HLC and apply them from scratch to an empty
  tree, skipping each move that would make an entry its own ancestor. It shares
  no code with `crdt.tree`, whose incremental undo/redo engine must equal it.
- `SimNode` is a simulated node: its own `Clock` read from a fake, skewable
  wall clock, its own `Replica`, and methods that make operations the way
  `peer/fs/volume.py` does (only on entries the node can see, deletes that record
  the heads they saw, writes based on the version shown). Tests drive several
  of them and move operations between them by hand.
- `walk` lists what a replica shows, and `lineage` follows content versions
  through every base; the convergence tests state their properties with them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from crdt.clock import Clock, Hlc
from crdt.merge import Changes, EntryView, Replica
from crdt.ops import ROOT, TRASH, Create, Kind, Member, Move, Op, SetAttr, Write
from crdt.tree import Tree

# 2024-01-02 03:04:05 UTC: fake wall clocks start here, so a conflict copy's
# name carries a date a test can spell out.
EPOCH_MS = 1_704_164_645_000


# --- the tree -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, order=True)
class ModelMove:
    """`child` goes into `parent` as `name` at time `hlc` (a Create or a Move)."""

    hlc: Hlc
    child: bytes
    parent: bytes
    name: bytes


Places = dict[bytes, tuple[bytes, bytes]]


def moves_of(ops: Iterable[Op]) -> list[ModelMove]:
    """The tree moves among `ops`: every Create and every Move."""
    return [
        ModelMove(op.hlc, op.entry, op.parent, op.name)
        for op in ops
        if isinstance(op, Create | Move)
    ]


def _is_ancestor(places: Places, ancestor: bytes, node: bytes) -> bool:
    seen: set[bytes] = set()
    while node in places:
        assert node not in seen, "the model itself made a cycle"
        seen.add(node)
        node = places[node][0]
        if node == ancestor:
            return True
    return False


def replay(moves: Iterable[ModelMove]) -> Places:
    """child -> (parent, name) after applying `moves` in HLC order from scratch.

    A move of ROOT or TRASH, or of an entry into itself or its own descendant,
    is skipped; a stamp seen twice is one operation.
    """
    places: Places = {}
    last: Hlc | None = None
    for move in sorted(moves):
        if move.hlc == last:
            continue
        last = move.hlc
        if (
            move.child in (ROOT, TRASH)
            or move.child == move.parent
            or _is_ancestor(places, move.child, move.parent)
        ):
            continue
        places[move.child] = (move.parent, move.name)
    return places


def places_of(tree: Tree) -> Places:
    """What the real tree holds, in the model's shape."""
    return {child: (p.parent, p.name) for child, p in tree.places.items()}


def ancestors(places: Places, node: bytes) -> list[bytes]:
    """`node`'s strict ancestors, nearest first; fails on a cycle."""
    out: list[bytes] = []
    while node in places:
        node = places[node][0]
        assert node not in out, f"cycle through {node.hex()}: {[a.hex() for a in out]}"
        out.append(node)
    return out


# --- content --------------------------------------------------------------------------------


def lineage(replica: Replica, version: Hlc) -> set[Hlc]:
    """`version` and every version it supersedes, through all its bases."""
    out: set[Hlc] = set()
    todo = [version]
    while todo:
        cur = todo.pop()
        if cur in out:
            continue
        out.add(cur)
        known = replica.contents.versions.get(cur)
        if known is not None:
            todo.extend(known.bases)
    return out


# --- what a replica shows -------------------------------------------------------------------


def walk(replica: Replica) -> Iterator[tuple[bytes, bytes, bytes]]:
    """Every listed (directory, name, child), depth first from ROOT."""
    stack = [ROOT]
    while stack:
        parent = stack.pop()
        for name, child in replica.listing(parent):
            yield parent, name, child
            if replica.kind(child) == "dir":
                stack.append(child)


def shown(replica: Replica) -> dict[bytes, EntryView]:
    """Every visible entry (files, directories, symlinks, conflict copies)."""
    out: dict[bytes, EntryView] = {}
    for _, _, child in walk(replica):
        view = replica.entry(child)
        assert view is not None, f"{child.hex()} is listed but has no view"
        out[child] = view
    return out


# --- a simulated node -------------------------------------------------------------------------


def block(n: int) -> bytes:
    """A recognisable 32-byte block id."""
    return bytes([n % 256]) * 32


@dataclass
class SimNode:
    """One node of a simulated volume; ops are made here and delivered by hand."""

    name: str
    node: bytes
    wall_ms: int = EPOCH_MS
    clock: Clock = field(init=False)
    replica: Replica = field(default_factory=Replica)
    made: list[Op] = field(default_factory=list)
    held: dict[Hlc, Op] = field(default_factory=dict)
    _ids: int = 0

    def __post_init__(self) -> None:
        self.clock = Clock(self.node)

    @classmethod
    def named(cls, name: str, wall_ms: int = EPOCH_MS) -> SimNode:
        # readable ids that sort like the names: at equal times bob's stamps
        # come after alice's
        sim = cls(name, name.encode().ljust(32, b"."), wall_ms)
        sim.commit(Member(sim.stamp(), name))
        return sim

    # -- plumbing ---------------------------------------------------------------------------
    def stamp(self) -> Hlc:
        return self.clock.tick(self.wall_ms)

    def commit(self, *ops: Op) -> None:
        self.replica.apply(ops)
        self.made.extend(ops)
        self.held.update((op.hlc, op) for op in ops)

    def receive(self, ops: Iterable[Op]) -> Changes:
        """One batch from peers: the clock observes each stamp, the replica merges."""
        batch = list(ops)
        for op in batch:
            self.clock.observe(op.hlc, self.wall_ms)
        self.held.update((op.hlc, op) for op in batch)
        return self.replica.apply(batch)

    def sync_from(self, *others: SimNode) -> None:
        """Receive everything the others hold."""
        for other in others:
            self.receive(other.held.values())

    def new_id(self) -> bytes:
        self._ids += 1
        return hashlib.blake2b(self.node + self._ids.to_bytes(8, "big"), digest_size=16).digest()

    def view(self, entry: bytes) -> EntryView:
        view = self.replica.entry(entry)
        assert view is not None, f"{self.name} cannot see {entry.hex()}"
        return view

    # -- what a user does -------------------------------------------------------------------
    def create(
        self,
        parent: bytes,
        name: bytes,
        kind: Kind = "file",
        mode: int | None = None,
        target: bytes = b"",
    ) -> bytes:
        entry = self.new_id()
        if mode is None:
            mode = 0o755 if kind == "dir" else 0o644
        self.commit(Create(self.stamp(), entry, parent, name, kind, mode, 1000, 1000, target))
        return entry

    def mkdir(self, parent: bytes, name: bytes) -> bytes:
        return self.create(parent, name, "dir")

    def write(self, entry: bytes, blocks: Mapping[int, bytes | None], size: int) -> Write:
        """A new version of `entry` on top of the one shown (a flush of dirty blocks)."""
        base = self.replica.contents.shown(entry)
        op = Write(
            self.stamp(), entry, (base,) if base else (), size, tuple(sorted(blocks.items()))
        )
        self.commit(op)
        return op

    def size(self, entry: bytes) -> int:
        return self.view(entry).size

    def content(self, entry: bytes) -> dict[int, bytes]:
        version = self.view(entry).version
        return dict(self.replica.block_map(version)) if version else {}

    def rename(self, entry: bytes, parent: bytes, name: bytes) -> Move:
        op = Move(self.stamp(), entry, parent, name)
        self.commit(op)
        return op

    def delete(self, entry: bytes) -> Op:
        """unlink/rmdir: a move into TRASH that records the heads it saw; for a
        conflict copy, a resolution instead."""
        view = self.view(entry)
        if view.conflict_of is not None:
            return self.resolve(entry)
        seen = self.replica.heads(entry) if view.kind == "file" else ()
        op = Move(self.stamp(), entry, TRASH, view.name, seen)
        self.commit(op)
        return op

    def resolve(self, copy: bytes) -> Write:
        """Deleting a conflict copy: a version with the shown content that
        supersedes the copy's version."""
        source = self.replica.conflict_source(copy)
        assert source is not None, f"{copy.hex()} is not a conflict copy"
        file, loser = source
        winner = self.replica.contents.shown(file)
        assert winner is not None
        op = Write(self.stamp(), file, (winner, loser), self.replica.version_size(winner), ())
        self.commit(op)
        return op

    def set_attr(self, entry: bytes, key: str, value: int | bytes | None) -> SetAttr:
        op = SetAttr(self.stamp(), entry, key, value)
        self.commit(op)
        return op
