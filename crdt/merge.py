"""The merged view of a set of operations: the tree a volume shows.

Invariant: a `Replica` is a function of the *set* of operations it was given.
Two replicas given the same operations, in any order, any number of times,
answer every query identically (DESIGN §4):

1. the tree follows moves in clock order, skipping cycles (`crdt.tree`);
2. live entries that share a name in one directory are all shown: the one
   placed there last keeps the name, the others get a suffix from their id;
3. a file with several live content heads shows the newest, and each other head
   appears beside it as a conflict copy with a deterministic id and name;
4. a deleted entry comes back where it was if it holds something the delete did
   not see: a file with a live head, or a directory with a live child;
5. attributes are last-writer-wins per key.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass

from crdt.clock import Hlc
from crdt.content import Contents, Version
from crdt.ops import (
    ENTRY_ID_BYTES,
    NAME_MAX,
    ROOT,
    TRASH,
    XATTR_PREFIX,
    Create,
    Kind,
    Member,
    Move,
    Op,
    SetAttr,
    Write,
)
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


@dataclass(frozen=True, slots=True)
class Changes:
    """What a batch changed: directories whose listing changed, entries whose
    attributes or content changed."""

    dirs: frozenset[bytes]
    entries: frozenset[bytes]


@dataclass(frozen=True, slots=True)
class _Info:
    hlc: Hlc
    kind: Kind
    target: bytes


@dataclass(frozen=True, slots=True)
class _Copy:
    file: bytes
    version: Hlc


@dataclass(slots=True)
class _Listing:
    by_name: dict[bytes, bytes]
    names: dict[bytes, bytes]  # child id -> shown name


def conflict_copy_id(file: bytes, version: Hlc) -> bytes:
    """The deterministic id of the conflict copy of `file` showing `version`."""
    h = hashlib.blake2b(digest_size=ENTRY_ID_BYTES, person=b"dfs-peer:copy")
    h.update(file)
    h.update(version.wall_ms.to_bytes(8, "big") + version.counter.to_bytes(4, "big"))
    h.update(version.node)
    return h.digest()


def _split_ext(name: bytes) -> tuple[bytes, bytes]:
    dot = name.rfind(b".")
    if dot <= 0:
        return name, b""
    return name[:dot], name[dot:]


def _fit(stem: bytes, tail: bytes) -> bytes:
    return stem[: max(1, NAME_MAX - len(tail))] + tail


def conflict_name(name: bytes, node_name: str, version: Hlc) -> bytes:
    """`<stem>.conflict-<node name>-<UTC yyyymmdd-HHMMSS><ext>`."""
    stem, ext = _split_ext(name)
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in node_name)[:32] or "node"
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(version.wall_ms // 1000))
    return _fit(stem, f".conflict-{safe}-{stamp}".encode() + ext)


def _suffixed(name: bytes, entry: bytes, length: int) -> bytes:
    stem, ext = _split_ext(name)
    return _fit(stem, b"~" + entry[:length].hex().encode() + ext)


class Replica:
    """The merged state of one replica; see the module docstring."""

    def __init__(self) -> None:
        self._ops: set[Hlc] = set()
        self._latest: Hlc | None = None
        self._members: dict[bytes, tuple[Hlc, str]] = {}
        self._info: dict[bytes, _Info] = {}
        self._attrs: dict[bytes, dict[str, tuple[Hlc, int | bytes | None]]] = {}
        self._touched: dict[bytes, Hlc] = {}
        self.tree = Tree()
        self.contents = Contents()
        # Derived views, recomputed when what they depend on changes.
        self._revived: dict[bytes, Place] = {}
        self._revived_into: dict[bytes, set[bytes]] = {}
        self._copies: dict[bytes, _Copy] = {}
        self._copies_of: dict[bytes, tuple[bytes, ...]] = {}
        self._listings: dict[bytes, _Listing] = {}
        self._dir_event: dict[bytes, Hlc | None] = {}

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
        for op in ops:
            if op.hlc in self._ops:
                continue
            self._ops.add(op.hlc)
            if self._latest is None or op.hlc > self._latest:
                self._latest = op.hlc
            if isinstance(op, Member):
                self._lww_member(op)
                self._listings.clear()  # conflict copies are named after members
                continue
            entries.add(op.entry)
            self._touch(op.entry, op.hlc)
            if isinstance(op, Create):
                info = self._info.get(op.entry)
                if info is None or op.hlc < info.hlc:
                    self._info[op.entry] = _Info(op.hlc, op.kind, op.target)
                for key, value in (("mode", op.mode), ("uid", op.uid), ("gid", op.gid)):
                    self._set_attr(op.entry, key, op.hlc, value)
                moves.append(TreeMove(op.hlc, op.entry, op.parent, op.name))
            elif isinstance(op, Move):
                moves.append(TreeMove(op.hlc, op.entry, op.parent, op.name))
                if op.parent == TRASH:
                    self.contents.add(Version(op.hlc, op.entry, op.seen, 0, (), tombstone=True))
                    files.add(op.entry)
            elif isinstance(op, SetAttr):
                self._set_attr(op.entry, op.key, op.hlc, op.value)
            else:
                self.contents.add(Version(op.hlc, op.entry, op.bases, op.size, op.blocks, False))
                files.add(op.entry)
        touched = self.tree.apply(moves)
        return self._refresh(touched, entries, files)

    def _lww_member(self, op: Member) -> None:
        node = op.hlc.node
        cur = self._members.get(node)
        if cur is None or op.hlc > cur[0]:
            self._members[node] = (op.hlc, op.name)

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
        dirs: set[bytes] = set(touched)
        for entry in files:
            self._refresh_copies(entry, dirs)
        if self._trash_relevant(touched | files):
            before = dict(self._revived)
            self._revive()
            for entry in set(before) | set(self._revived):
                if before.get(entry) != self._revived.get(entry):
                    entries.add(entry)
                    for place in (before.get(entry), self._revived.get(entry)):
                        if place is not None:
                            dirs.add(place.parent)
                    # a revived file's conflict copies follow it
                    self._refresh_copies(entry, dirs)
        for d in dirs:
            self._listings.pop(d, None)
            self._dir_event.pop(d, None)
        return Changes(frozenset(dirs), frozenset(entries | files | touched))

    def _refresh_copies(self, file: bytes, dirs: set[bytes]) -> None:
        old = self._copies_of.pop(file, ())
        for cid in old:
            self._copies.pop(cid, None)
        new: tuple[bytes, ...] = ()
        live = self.contents.live_heads(file)
        if len(live) > 1:
            new = tuple(conflict_copy_id(file, v) for v in live[1:])
            for cid, v in zip(new, live[1:], strict=True):
                self._copies[cid] = _Copy(file, v)
            self._copies_of[file] = new
        if old or new:
            p = self._eff_parent(file)
            if p is not None:
                dirs.add(p)

    def _in_trash(self, entry: bytes) -> bool:
        """True if the tree (before revivals) puts `entry` under TRASH."""
        place = self.tree.places.get(entry)
        steps = 0
        while place is not None and steps <= len(self.tree.places):
            if place.parent == TRASH:
                return True
            place = self.tree.places.get(place.parent)
            steps += 1
        return False

    def _trash_relevant(self, ids: set[bytes]) -> bool:
        return bool(self._revived) or any(self._in_trash(i) for i in ids if i not in (ROOT, TRASH))

    def _revive(self) -> None:
        """Recompute which deleted entries come back (rule 4), deterministically."""
        self._revived = {}
        self._revived_into = {}
        trashed = sorted(self.tree.children.get(TRASH, ()))
        queue = [
            e
            for e in trashed
            if self.contents.live_heads(e) or self._has_live_child(e)
        ]
        seen: set[bytes] = set()
        while queue:
            entry = queue.pop(0)
            if entry in seen:
                continue
            seen.add(entry)
            current = self.tree.current(entry)
            old = current.old if current is not None else None
            if old is None or old.parent == TRASH:
                old = Place(ROOT, self.tree.places[entry].name, self.tree.places[entry].hlc)
            if self._eff_is_ancestor(entry, old.parent):
                old = Place(ROOT, old.name, old.hlc)
            self._revived[entry] = old
            self._revived_into.setdefault(old.parent, set()).add(entry)
            # the directory it returns to must itself be live
            holder = self._trash_holder(old.parent)
            if holder is not None and holder not in self._revived:
                queue.append(holder)

    def _has_live_child(self, entry: bytes) -> bool:
        return any(c in self._info for c in self.tree.children.get(entry, ()))

    def _trash_holder(self, entry: bytes) -> bytes | None:
        """The direct child of TRASH that (effectively) holds `entry`, if any."""
        cur = entry
        steps = 0
        while steps <= len(self.tree.places) + 1:
            if cur in (ROOT, TRASH):
                return None
            place = self._eff_place(cur)
            if place is None:
                return None
            if place.parent == TRASH:
                return cur
            cur = place.parent
            steps += 1
        return None

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
        cached = self._listings.get(parent)
        if cached is not None:
            return cached
        # (name, placed stamp, id) of every live child
        found: list[tuple[bytes, Hlc, bytes]] = []
        kids = set(self.tree.children.get(parent, ())) | self._revived_into.get(parent, set())
        for child in kids:
            if child not in self._info:
                continue
            place = self._eff_place(child)
            if place is None or place.parent != parent:
                continue
            found.append((place.name, place.hlc, child))
            for cid in self._copies_of.get(child, ()):
                v = self._copies[cid].version
                node_name = self._members.get(v.node, (v, v.node[:4].hex()))[1]
                found.append((conflict_name(place.name, node_name, v), v, cid))
        # rule 2: the newest keeps the name; older ones get an id suffix
        found.sort(reverse=True)
        by_name: dict[bytes, bytes] = {}
        taken = {name for name, _, _ in found}
        names: dict[bytes, bytes] = {}
        for name, _, child in found:
            shown = name
            if shown in by_name:
                for length in (4, 8, ENTRY_ID_BYTES):
                    shown = _suffixed(name, child, length)
                    if shown not in by_name and shown not in taken:
                        break
            by_name[shown] = child
            names[child] = shown
        listing = _Listing(by_name, names)
        self._listings[parent] = listing
        return listing

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
        return self._attrs.get(entry, {}).get(key)

    def _int_attr(self, entry: bytes, key: str, default: int) -> int:
        got = self._attr(entry, key)
        return got[1] if got is not None and isinstance(got[1], int) else default

    def _dir_changed(self, entry: bytes) -> Hlc | None:
        if entry in self._dir_event:
            return self._dir_event[entry]
        stamps = [self.tree.places[c].hlc for c in self.tree.children.get(entry, ())]
        stamps.extend(self.tree.departures.get(entry, ()))
        result = max(stamps) if stamps else None
        self._dir_event[entry] = result
        return result

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
            event = self._dir_changed(entry)
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

    def conflict_source(self, entry: bytes) -> tuple[bytes, Hlc] | None:
        copy = self._copies.get(entry)
        return (copy.file, copy.version) if copy is not None else None

    def members(self) -> dict[bytes, str]:
        return {node: name for node, (_, name) in self._members.items()}

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
                    content,
                    view.mtime_ns,
                    tuple(sorted(self.xattrs(child).items())),
                )
                if view.kind == "dir":
                    stack.append((child, p))
        return out
