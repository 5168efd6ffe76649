"""The merged view of a set of operations: the tree a volume shows.

Invariant: a `Replica` is a function of the *set* of operations it was given.
Two replicas given the same operations, in any order, any number of times,
answer every query identically (DESIGN §4):

1. the tree follows moves in clock order, skipping cycles (`crdt.tree`);
2. live entries that share a name in one directory are all shown: the one
   placed there last keeps the name, the others get a suffix from their id
   (never one another name of the directory holds; when that name goes, the
   suffix shrinks back). Files that race (`Replica._racing`: one brought back
   by rule 4 to a name that a file placed after its delete holds, as when an
   editor's save by rename races an edit in place) are named as rule 3 names
   heads: the newest content keeps the name, the other shows as a conflict
   copy name;
3. a file with several live content heads shows the newest, and each other head
   appears beside it as a conflict copy with a deterministic id and name;
4. a deleted entry comes back where it was if it holds something the delete did
   not see: a file with a live head, or a directory with a live child;
   an entry cut off from ROOT by no delete at all comes back too (`_detached`);
5. attributes are last-writer-wins per key.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from crdt.clock import Hlc
from crdt.content import Contents, Version
from crdt.copies import Copies, _Copy
from crdt.listing import Listings, _Listing
from crdt.ops import ROOT, TRASH, XATTR_PREFIX, Create, Forget, Kind, Member, Move, Op, SetAttr
from crdt.revival import Revival
from crdt.tree import Place, Tree, TreeMove

MS = 1_000_000  # nanoseconds per millisecond


@dataclass(frozen=True, slots=True)
class EntryView:
    """What the tree shows for one visible entry."""

    id: bytes
    kind: Kind
    parent: bytes
    name: bytes
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    ctime_ns: int
    size: int
    target: bytes
    version: Hlc | None
    conflict_of: bytes | None
    rdev: int = 0  # device number of a character or block device node
    atime_ns: int = 0  # as set on purpose (utimensat), else mtime_ns


@dataclass(frozen=True, slots=True)
class Changes:
    """What a batch changed: directories whose listing changed, entries whose
    attributes or content changed, and the (directory, shown name) pairs that
    now name another entry or none (a rename, a delete, a sibling's `~hex`
    suffix coming or going)."""

    dirs: frozenset[bytes]
    entries: frozenset[bytes]
    names: frozenset[tuple[bytes, bytes]] = frozenset()


@dataclass(frozen=True, slots=True)
class _Info:
    """An entry's creation: kind, target and rdev from its earliest `Create` (`hlc`),
    and the mode, uid and gid of its latest (`made`).

    A `Create` sets three attributes with one stamp, so last-writer-wins over
    Creates is just the latest one; keeping it here, not as three entries of
    `Replica._attrs`, saves ~400 bytes per entry (`_attr` merges the two).
    """

    hlc: Hlc
    kind: Kind
    target: bytes
    made: Hlc
    mode: int
    uid: int
    gid: int
    rdev: int = 0


# The attributes a `Create` sets, kept in `_Info`.
_CREATE_ATTRS = frozenset({"mode", "uid", "gid"})
_NO_ATTRS: dict[str, tuple[Hlc, int | bytes | None]] = {}


class Replica(Listings, Copies, Revival):
    """The merged state of one replica; see the module docstring."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget every operation: the state of a new replica (before a rebuild)."""
        self._ops: set[Hlc] = set()
        self._latest: Hlc | None = None
        self._members: dict[bytes, tuple[Hlc, str]] = {}
        # node -> {voter: greatest `upto` of the voter's Forget ops of it}
        self._forget_votes: dict[bytes, dict[bytes, int]] = {}
        self._forgotten: dict[bytes, int] | None = None  # derived: `forgotten()`
        self._info: dict[bytes, _Info] = {}
        # Attributes set by `SetAttr` (those a `Create` sets are in `_info`).
        self._attrs: dict[bytes, dict[str, tuple[Hlc, int | bytes | None]]] = {}
        self._touched: dict[bytes, Hlc] = {}
        self.tree = Tree()
        self.contents = Contents()
        # Derived views, recomputed when what they depend on changes.
        self._revived: dict[bytes, Place] = {}
        self._revived_into: dict[bytes, set[bytes]] = {}
        # Rule 4's candidates, kept up to date entry by entry: the children of
        # TRASH (in the tree) that hold something live (`_holds_live`). The
        # rest of the trash is never looked at again, however large it grew.
        self._seeds: set[bytes] = set()
        # Entries rule 4 looked at (candidates checked, revivals computed):
        # grows with what each batch changes, not with the trash's size.
        self.revival_checks = 0
        # Entries cut off from ROOT though no delete put them out (see `_is_detached`).
        self._detached: set[bytes] = set()
        self._copies: dict[bytes, _Copy] = {}
        self._copies_of: dict[bytes, tuple[bytes, ...]] = {}
        self._lists: dict[bytes, _Listing] = {}
        self._listed_in: dict[bytes, bytes] = {}  # child id -> directory listing it
        # Scratch of one `apply`: (directory, shown name) pairs that changed.
        self._names_changed: set[tuple[bytes, bytes]] = set()
        # Name groups where files race (`_racing`): named after members too.
        self._raced: set[tuple[bytes, bytes]] = set()

    # -- applying ------------------------------------------------------------------
    def has(self, hlc: Hlc) -> bool:
        return hlc in self._ops

    def latest(self) -> Hlc | None:
        return self._latest

    def apply(self, ops: Iterable[Op]) -> Changes:
        """Merge operations in; idempotent and order-independent."""
        moves: list[TreeMove] = []
        entries: set[bytes] = set()
        files: set[bytes] = set()
        created: set[bytes] = set()
        renamed = False
        for op in ops:
            if op.hlc in self._ops:
                continue
            self._ops.add(op.hlc)
            if self._latest is None or op.hlc > self._latest:
                self._latest = op.hlc
            if isinstance(op, Member):
                self._lww_member(op)
                self._forgotten = None  # who may vote changed
                renamed = True
                continue
            if isinstance(op, Forget):
                votes = self._forget_votes.setdefault(op.node, {})
                voter = op.hlc.node
                votes[voter] = max(op.upto, votes.get(voter, -1))
                self._forgotten = None
                continue
            entries.add(op.entry)
            self._touch(op.entry, op.hlc)
            if isinstance(op, Create):
                self._created(op)
                created.add(op.entry)
                moves.append(TreeMove(op.hlc, op.entry, op.parent, op.name))
                if op.parent != TRASH:
                    self.contents.placed(op.entry, op.hlc)
                # Refresh it even if the tree skips this move: a newly known
                # entry is listed (and may keep a trashed directory, rule 4)
                # where moves that arrived before its creation put it.
                files.add(op.entry)
            elif isinstance(op, Move):
                moves.append(TreeMove(op.hlc, op.entry, op.parent, op.name))
                if op.parent == TRASH:
                    self.contents.add(Version(op.hlc, op.entry, op.seen, 0, (), tombstone=True))
                    files.add(op.entry)
                elif self.contents.placed(op.entry, op.hlc):
                    # a move that sorts after a delete voids its tombstone
                    files.add(op.entry)
            elif isinstance(op, SetAttr):
                self._set_attr(op.entry, op.key, op.hlc, op.value)
            else:
                self.contents.add(Version(op.hlc, op.entry, op.bases, op.size, op.blocks, False))
                files.add(op.entry)
        if renamed:
            files.update(self._copies_of)  # conflict copies are named after members
            for parent, name in self._raced:
                files.update(c for _, c in self._listing(parent).groups.get(name, ()))
        touched = self.tree.apply(moves)
        self._update_detached(touched, created)
        return self._refresh(touched, entries, files)

    def _lww_member(self, op: Member) -> None:
        node = op.hlc.node
        cur = self._members.get(node)
        if cur is None or op.hlc > cur[0]:
            self._members[node] = (op.hlc, op.name)

    def _created(self, op: Create) -> None:
        info = self._info.get(op.entry)
        if info is None:
            info = _Info(op.hlc, op.kind, op.target, op.hlc, op.mode, op.uid, op.gid, op.rdev)
        else:
            if op.hlc < info.hlc:
                info = replace(info, hlc=op.hlc, kind=op.kind, target=op.target, rdev=op.rdev)
            if op.hlc > info.made:
                info = replace(info, made=op.hlc, mode=op.mode, uid=op.uid, gid=op.gid)
        self._info[op.entry] = info

    def _touch(self, entry: bytes, hlc: Hlc) -> None:
        cur = self._touched.get(entry)
        if cur is None or hlc > cur:
            self._touched[entry] = hlc

    def _set_attr(self, entry: bytes, key: str, hlc: Hlc, value: int | bytes | None) -> None:
        attrs = self._attrs.setdefault(entry, {})
        cur = attrs.get(key)
        if cur is None or hlc > cur[0]:
            attrs[key] = (hlc, value)

    # -- derived views -----------------------------------------------------------
    def _refresh(self, touched: set[bytes], entries: set[bytes], files: set[bytes]) -> Changes:
        self._names_changed.clear()
        dirs: set[bytes] = set(touched)
        changed = touched | files
        relist = set(changed)
        for entry in files:
            relist.update(self._refresh_copies(entry))
        seeds_changed = self._update_seeds(changed)
        if seeds_changed or self._trash_relevant(changed):
            before = dict(self._revived)
            self._revive()
            for entry in set(before) | set(self._revived):
                if before.get(entry) != self._revived.get(entry):
                    entries.add(entry)
                    relist.add(entry)
                    relist.update(self._refresh_copies(entry))  # copies follow their file
        dirs |= self._relist(relist)
        names = frozenset(self._names_changed)
        self._names_changed.clear()
        return Changes(frozenset(dirs), frozenset(entries | changed), names)

    def _is_file(self, entry: bytes) -> bool:
        info = self._info.get(entry)
        return info is not None and info.kind == "file" and entry not in self._copies

    def _content_stamp(self, entry: bytes) -> Hlc:
        """The stamp of a file's shown content, or of its creation if it has none."""
        shown = self.contents.shown(entry)
        return shown if shown is not None else self._info[entry].hlc

    def _eff_place(self, entry: bytes) -> Place | None:
        revived = self._revived.get(entry)
        return revived if revived is not None else self.tree.places.get(entry)

    def _eff_parent(self, entry: bytes) -> bytes | None:
        copy = self._copies.get(entry)
        if copy is not None:
            entry = copy.file
        place = self._eff_place(entry)
        return place.parent if place is not None else None

    def _eff_is_ancestor(self, ancestor: bytes, node: bytes) -> bool:
        cur = node
        steps = 0
        while steps <= len(self.tree.places) + 1:
            if cur == ancestor:
                return True
            place = self._eff_place(cur)
            if place is None:
                return False
            cur = place.parent
            steps += 1
        return True  # a loop: treat as an ancestor so the caller avoids it

    # -- queries -------------------------------------------------------------------
    def visible(self, entry: bytes) -> bool:
        if entry == ROOT:
            return True
        copy = self._copies.get(entry)
        if copy is not None:
            return self.visible(copy.file)
        if entry not in self._info:
            return False
        cur = entry
        steps = 0
        while steps <= len(self.tree.places) + 1:
            place = self._eff_place(cur)
            if place is None or place.parent == TRASH:
                return False
            if place.parent == ROOT:
                return True
            parent = self._info.get(place.parent)
            if parent is None or parent.kind != "dir":
                return False
            cur = place.parent
            steps += 1
        return False

    def _listing(self, parent: bytes) -> _Listing:
        return self._lists.get(parent) or _Listing()

    def lookup(self, parent: bytes, name: bytes) -> bytes | None:
        if not self.visible(parent) or self.kind(parent) != "dir":
            return None
        return self._listing(parent).by_name.get(name)

    def listing(self, parent: bytes) -> list[tuple[bytes, bytes]]:
        if not self.visible(parent) or self.kind(parent) != "dir":
            return []
        return sorted(self._listing(parent).by_name.items())

    def kind(self, entry: bytes) -> Kind | None:
        if entry == ROOT:
            return "dir"
        copy = self._copies.get(entry)
        if copy is not None:
            return "file"
        info = self._info.get(entry)
        return info.kind if info is not None else None

    def _attr(self, entry: bytes, key: str) -> tuple[Hlc, int | bytes | None] | None:
        """The last write of attribute `key`: by a `SetAttr` or a `Create`."""
        explicit = self._attrs.get(entry, _NO_ATTRS).get(key)
        if key in _CREATE_ATTRS:
            info = self._info.get(entry)
            if info is not None and (explicit is None or info.made > explicit[0]):
                value: int = getattr(info, key)
                return info.made, value
        return explicit

    def _int_attr(self, entry: bytes, key: str, default: int) -> int:
        got = self._attr(entry, key)
        return got[1] if got is not None and isinstance(got[1], int) else default

    def subdirs(self, entry: bytes) -> int:
        """How many directories a directory holds (for its link count)."""
        return self._listing(entry).subdirs

    def entry(self, entry: bytes) -> EntryView | None:
        """The visible entry `entry`, or None."""
        if not self.visible(entry):
            return None
        copy = self._copies.get(entry)
        source = copy.file if copy is not None else entry
        kind = self.kind(entry)
        assert kind is not None
        if entry == ROOT:
            parent, name = ROOT, b""
        else:
            parent_id = self._eff_parent(entry)
            assert parent_id is not None
            parent = parent_id
            name = self._listing(parent).names[entry]
        info = self._info.get(source)
        version: Hlc | None = None
        size = 0
        # mtime: the newest of an explicit set (utimens) and an implicit change
        event: Hlc | None = None
        if copy is not None:
            version = copy.version
            event = version
        elif kind == "file":
            version = self.contents.shown(entry)
            event = version
        elif kind == "dir":
            event = self.tree.latest_event(entry)
        if version is not None:
            size = self.contents.size(version)
        if kind == "symlink" and info is not None:
            size = len(info.target)
        explicit = self._attr(source, "mtime_ns")
        if copy is not None:
            explicit = None
        mtime_ns = 0
        if explicit is not None and (event is None or explicit[0] > event):
            mtime_ns = explicit[1] if isinstance(explicit[1], int) else 0
        elif event is not None:
            mtime_ns = event.wall_ms * MS
        elif info is not None:
            mtime_ns = info.hlc.wall_ms * MS
        atime = self._attr(source, "atime_ns") if copy is None else None
        atime_ns = atime[1] if atime is not None and isinstance(atime[1], int) else mtime_ns
        touched = self._touched.get(source)
        ctime_ns = max(touched.wall_ms * MS if touched else 0, mtime_ns)
        if event is not None:
            ctime_ns = max(ctime_ns, event.wall_ms * MS)
        return EntryView(
            id=entry,
            kind=kind,
            parent=parent,
            name=name,
            mode=self._int_attr(source, "mode", 0o755 if kind == "dir" else 0o644) & 0o7777,
            uid=self._int_attr(source, "uid", 0),
            gid=self._int_attr(source, "gid", 0),
            mtime_ns=mtime_ns,
            ctime_ns=ctime_ns,
            size=size,
            target=info.target if info is not None else b"",
            version=version,
            conflict_of=copy.file if copy is not None else None,
            rdev=info.rdev if info is not None else 0,
            atime_ns=atime_ns,
        )

    def xattrs(self, entry: bytes) -> dict[str, bytes]:
        copy = self._copies.get(entry)
        source = copy.file if copy is not None else entry
        out: dict[str, bytes] = {}
        for key, (_, value) in self._attrs.get(source, {}).items():
            if key.startswith(XATTR_PREFIX) and isinstance(value, bytes):
                out[key[len(XATTR_PREFIX) :]] = value
        return out

    def block_map(self, version: Hlc) -> dict[int, bytes]:
        return self.contents.block_map(version)

    def version_size(self, version: Hlc) -> int:
        return self.contents.size(version)

    def heads(self, entry: bytes) -> tuple[Hlc, ...]:
        """Every head of a file, tombstones included, the shown one first."""
        heads = self.contents.heads(entry)
        shown = self.contents.shown(entry)
        return tuple(sorted(heads, key=lambda h: (h != shown, h)))

    def members(self) -> dict[bytes, str]:
        """Every node that announced itself, forgotten ones included (for names)."""
        return {node: name for node, (_, name) in self._members.items()}

    def forgotten(self) -> dict[bytes, int]:
        """Forgotten node -> the last seq of its log that still counts.

        A `Forget` is a vote. Node N is forgotten once N itself voted (it
        left), or more than half of the members other than N did (members:
        nodes that announced themselves and are not forgotten, so the rule is
        applied until nothing changes; adding a forgotten node only shrinks
        the others, so the result does not depend on the order). Its cut is
        the greatest `upto` among the votes that count. One member alone
        therefore forgets no one in a team of three or more, and anyone in a
        team of two. A function of the set of ops, like everything here."""
        if self._forgotten is None:
            self._forgotten = self._tally()
        return dict(self._forgotten)

    def _tally(self) -> dict[bytes, int]:
        out: dict[bytes, int] = {}
        changed = True
        while changed:
            changed = False
            for node, votes in self._forget_votes.items():
                if node in out:
                    continue
                others = {m for m in self._members if m != node and m not in out}
                counted = [v for v in votes if v in others]
                if node in votes or 2 * len(counted) > len(others):
                    if node in votes:
                        counted.append(node)
                    out[node] = max(votes[v] for v in counted)
                    changed = True
        return out

    def forget_votes(self) -> dict[bytes, dict[bytes, int]]:
        """Node -> {voter: upto}: every `Forget`, honoured or not (for `status`)."""
        return {n: dict(v) for n, v in self._forget_votes.items()}

    def current_members(self) -> dict[bytes, str]:
        """The members that hold back causal stability: announced, not forgotten."""
        forgotten = self.forgotten()
        return {n: name for n, name in self.members().items() if n not in forgotten}

    def everything(self) -> Changes:
        """A `Changes` naming every directory and entry (after a rebuild)."""
        dirs = set(self._lists) | {ROOT}
        return Changes(frozenset(dirs), frozenset(set(self._info) | set(self._copies) | dirs))

    def counts(self) -> tuple[int, int]:
        """(operations held, entries ever created)."""
        return len(self._ops), len(self._info)

    def snapshot(self) -> dict[bytes, tuple[object, ...]]:
        """Every visible path -> what it shows; equal snapshots mean equal trees."""
        out: dict[bytes, tuple[object, ...]] = {}
        stack: list[tuple[bytes, bytes]] = [(ROOT, b"")]
        while stack:
            dir_id, path = stack.pop()
            for name, child in self.listing(dir_id):
                view = self.entry(child)
                assert view is not None
                p = path + b"/" + name
                content: object = None
                if view.version is not None:
                    content = tuple(sorted(self.block_map(view.version).items()))
                out[p] = (
                    view.kind,
                    child,
                    view.mode,
                    view.size,
                    view.target,
                    view.rdev,
                    content,
                    view.mtime_ns,
                    tuple(sorted(self.xattrs(child).items())),
                )
                if view.kind == "dir":
                    stack.append((child, p))
        return out
