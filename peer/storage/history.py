"""History: a file's versions, the volume as it was at a time, and restores.

Invariant: nothing here changes history. Listing and time travel only read the
log and the merged state; the volume at time T is a fresh `Replica` given
exactly the operations stamped at or before T (wall time of their HLC), the
same merge a live node would have made of those operations, and causally
closed because a stamp is always greater than the stamps its node had seen. A
restore is an ordinary new version (a `Write`, after a `Create` when the path is
gone) whose block map is the old version's: the same block ids, no data copied,
and it syncs to peers like any write.
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from crdt.clock import Hlc
from crdt.content import blocks_for
from crdt.merge import Replica
from crdt.ops import MAX_BLOCKS_PER_WRITE, ROOT, Create, Op, Write
from peer.errors import DfsError
from peer.identity import NodeIdentity
from peer.keys import VolumeKeys
from peer.storage.journal import Journal
from peer.storage.store import Store

DEFAULT_KEEP_HISTORY_S = 7 * 86400.0

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


class BadDuration(DfsError):
    """--keep-history {text}: not a duration; use 0 (keep none) or a number
    with a unit: 90s, 10m, 12h, 7d, 2w."""


class BadThinning(DfsError):
    """--thin-history {text}: give AGE:EVERY pairs, ages growing, each EVERY
    dividing the next (e.g. 1m:0,1h:30s,1d:1h,30d:1d: every version for a
    minute, then one per 30 s up to an hour old, ...), or `off` to keep every
    version."""


DEFAULT_THIN_HISTORY = "1m:0,1h:30s,1d:1h,30d:1d"


class BadTime(DfsError):
    """{text} is not a time: use ISO 8601 (2026-11-25T14:00:00Z, or local time
    without the Z), @UNIX seconds, or how long ago (-10m, -2h, -3d)."""


class AtNeedsReadOnly(DfsError):
    """--at mounts the volume as it was, which cannot be written: add
    --read-only."""


class NoVolumeHere(DfsError):
    """{data_dir} holds no volume: --at shows the history a node kept there
    (check --data-dir)."""


class NoSuchPath(DfsError):
    """{path} does not exist in the volume now (for a deleted file, give --at
    a time when it existed)."""


class NotAtTime(DfsError):
    """nothing was at {path} at {time}: check the path and the time
    (`dfs-peer history` lists a file's versions)."""


class NotAFile(DfsError):
    """{path} is a {kind}: history and restore work on files only (restoring a
    directory is not supported: restore the files in it one by one)."""


class PathOutsideMount(DfsError):
    """{path} is not inside the mount {mountpoint}: give a path inside it, or
    one relative to the volume root."""


class ParentMissing(DfsError):
    """cannot restore {path}: its directory {parent} does not exist now
    (restoring directories is not supported: create it, then restore again)."""


class ConflictCopyInTheWay(DfsError):
    """{path} is now a conflict copy: rename it (to keep it) or delete it, then
    restore again."""


class VersionCollected(DfsError):
    """the version of {path} at {time} is no longer held here (its blocks were
    collected after the history retention)."""


class NodeReadOnly(DfsError):
    """the node in {data_dir} is read-only: restore through a node mounted
    read-write."""


class NodeAnswered(DfsError):
    """{message}"""

    exit_code: ClassVar[int] = 1


# -- parsing -----------------------------------------------------------------------


def parse_duration(text: str) -> float:
    """Seconds in `0`, `90s`, `10m`, `12h`, `7d`, `2w`; `BadDuration` otherwise."""
    if text.strip() == "0":
        return 0.0
    m = _DURATION.fullmatch(text.strip())
    if m is None:
        raise BadDuration(text=repr(text))
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_thinning(text: str) -> tuple[tuple[int, int], ...]:
    """`--thin-history`: ((age ms, interval ms), ...); () for `off`."""
    if text.strip().lower() in ("off", "none"):
        return ()
    tiers: list[tuple[int, int]] = []
    try:
        for part in text.split(","):
            age, _, every = part.strip().partition(":")
            tiers.append((round(parse_duration(age) * 1000), round(parse_duration(every) * 1000)))
    except BadDuration:
        raise BadThinning(text=repr(text)) from None
    for (age0, every0), (age1, every1) in itertools.pairwise(tiers):
        if age1 <= age0 or (every0 and (every1 < every0 or every1 % every0)):
            raise BadThinning(text=repr(text))
    if not tiers or tiers[0][0] <= 0:
        raise BadThinning(text=repr(text))
    return tuple(tiers)


def parse_time(text: str, now_s: float) -> int:
    """Unix milliseconds for ISO 8601 (naive means local time), `@UNIX` seconds,
    or `-DURATION` before `now_s`; `BadTime` otherwise."""
    s = text.strip()
    try:
        if s.startswith("@"):
            return round(float(s[1:]) * 1000)
        if s.startswith("-"):
            m = _DURATION.fullmatch(s[1:])
            if m is None:
                raise ValueError(s)
            return round((now_s - float(m.group(1)) * _UNITS[m.group(2)]) * 1000)
        when = dt.datetime.fromisoformat(s)
    except ValueError:
        raise BadTime(text=repr(text)) from None
    if when.tzinfo is None:
        when = when.astimezone()  # a naive time is local time
    return round(when.timestamp() * 1000)


def format_time(ms: int) -> str:
    """ISO 8601 UTC with milliseconds: `2026-11-25T14:00:00.123Z`."""
    when = dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def volume_path(text: str, cwd: str, mountpoint: str) -> bytes:
    """The path inside the volume (`a/b.txt`, `` for the root) that `text` names:
    a path inside the mount (absolute, or relative to a `cwd` inside it), else a
    path relative to the volume root."""
    mount = os.path.normpath(mountpoint)
    inside = os.path.normpath(os.path.join(cwd, text))
    if inside == mount or inside.startswith(mount.rstrip("/") + "/"):
        rel = os.path.relpath(inside, mount)
    elif os.path.isabs(text):
        raise PathOutsideMount(path=text, mountpoint=mountpoint)
    else:
        rel = os.path.normpath(text)
    if rel == "..":
        raise PathOutsideMount(path=text, mountpoint=mountpoint)
    if rel.startswith("../"):
        raise PathOutsideMount(path=text, mountpoint=mountpoint)
    return b"" if rel == "." else os.fsencode(rel)


def show_path(path: bytes) -> str:
    return "/" + os.fsdecode(path)


def _kind_name(kind: str | None) -> str:
    return {"dir": "directory", "symlink": "symbolic link"}.get(kind or "", str(kind))


# -- the past ----------------------------------------------------------------------


def replica_at(store: Store, keys: VolumeKeys, identity: NodeIdentity, until_ms: int) -> Replica:
    """The merged state of the ops this store holds stamped at or before `until_ms`.

    Reads only (the store may be another node's, open read-only); pure CPU and
    SQLite reads, so callers on an event loop run it in a thread."""
    replica = Replica()
    Journal(store, keys, identity, replica).replay(until_ms=until_ms)
    return replica


def resolve(replica: Replica, path: bytes) -> bytes | None:
    """The entry shown at `path` (relative to the root), or None."""
    cur = ROOT
    for name in path.split(b"/"):
        if name in (b"", b"."):
            continue
        found = replica.lookup(cur, name)
        if found is None:
            return None
        cur = found
    return cur


# -- listing -----------------------------------------------------------------------

VersionKind = Literal["write", "delete", "merge"]


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """One content version of a file, as `dfs-peer history` shows it."""

    id: str
    time_ms: int
    node: str
    node_name: str
    size: int
    kind: VersionKind  # a write, a delete, or a merge that resolved a conflict
    current: bool  # the version the file shows now
    conflict: bool  # shown now beside the file as a conflict copy
    available: bool  # every block it needs is held here, and history keeps it

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "time": format_time(self.time_ms),
            "unix": self.time_ms / 1000,
            "node": self.node,
            "node_name": self.node_name,
            "size": self.size,
            "kind": self.kind,
            "current": self.current,
            "conflict": self.conflict,
            "available": self.available,
        }


def file_versions(
    replica: Replica,
    entry: bytes,
    held: Callable[[Iterable[bytes]], set[bytes]],
    kept: Callable[[bytes], set[Hlc]] | None = None,
) -> list[VersionInfo]:
    """Every version of file `entry` that `replica` still holds, oldest first.

    `held(block ids)` says which blocks the store still has: a version some of
    whose blocks were collected is listed as unavailable (and a version whose
    operation was collected is not listed at all); so is one that `kept(entry)`
    (the versions the collector keeps: `Collector.kept_versions`) leaves out,
    thinned out or past the retention, whose blocks go at the next collection."""
    contents = replica.contents
    mine = sorted(contents.of(entry))
    shown = contents.shown(entry)
    live = set(contents.live_heads(entry))
    members = replica.members()
    needs: dict[Hlc, set[bytes]] = {}
    for h in mine:
        if contents.complete(h):
            needs[h] = set(contents.block_map(h).values())
    have = held({b for ids in needs.values() for b in ids})
    keeps = kept(entry) if kept is not None else None
    out = []
    for h in mine:
        v = contents.versions[h]
        kind: VersionKind = "delete" if v.tombstone else "merge" if len(v.bases) > 1 else "write"
        ids = needs.get(h)
        out.append(
            VersionInfo(
                id=h.short(),
                time_ms=h.wall_ms,
                node=h.node[:4].hex(),
                node_name=members.get(h.node, ""),
                size=contents.size(h) if ids is not None else v.size,
                kind=kind,
                current=h == shown,
                conflict=h in live and h != shown,
                available=ids is not None and ids <= have and (keeps is None or h in keeps),
            )
        )
    return out


def history(
    live: Replica,
    path: bytes,
    held: Callable[[Iterable[bytes]], set[bytes]],
    past: Replica | None = None,
    at_ms: int | None = None,
    kept: Callable[[bytes], set[Hlc]] | None = None,
) -> list[VersionInfo]:
    """The versions of the file at `path`: now, or at `at_ms` in `past` (the
    versions listed are all those held, also those after `at_ms`)."""
    where = live if past is None else past
    entry = resolve(where, path)
    if entry is None:
        if past is None or at_ms is None:
            raise NoSuchPath(path=show_path(path))
        raise NotAtTime(path=show_path(path), time=format_time(at_ms))
    if where.kind(entry) != "file":
        raise NotAFile(path=show_path(path), kind=_kind_name(where.kind(entry)))
    copy = where.conflict_source(entry)
    if copy is not None:
        entry = copy[0]  # a conflict copy shows a version of its file
    return file_versions(live, entry, held, kept)


def path_of(replica: Replica, entry: bytes) -> bytes | None:
    """The path (relative to the root) at which `entry` is shown, or None."""
    parts: list[bytes] = []
    cur = entry
    while cur != ROOT:
        view = replica.entry(cur)
        if view is None:
            return None
        parts.append(view.name)
        cur = view.parent
    return b"/".join(reversed(parts))


def conflicts(replica: Replica) -> list[dict[str, Any]]:
    """Every conflict copy shown now, with the file and version it came from,
    sorted by path (for `status` and the status page)."""
    members = replica.members()
    out = []
    for copy, (file, version) in replica.conflict_copies().items():
        path = path_of(replica, copy)
        if path is None:
            continue
        file_path = path_of(replica, file)
        shown = replica.contents.shown(file)
        out.append(
            {
                "path": show_path(path),
                "file": show_path(file_path) if file_path is not None else None,
                "version": version.short(),
                "version_time": format_time(version.wall_ms),
                "version_node": members.get(version.node, version.node[:4].hex()),
                "file_version": shown.short() if shown is not None else None,
                "file_version_time": format_time(shown.wall_ms) if shown is not None else None,
                "file_version_node": (
                    members.get(shown.node, shown.node[:4].hex()) if shown is not None else None
                ),
            }
        )
    return sorted(out, key=lambda c: c["path"])


# -- restoring ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Restore:
    """A restore ready to commit: `make` builds its operations."""

    path: bytes
    version: Hlc | None  # the version brought back (None: an empty file, never written)
    size: int
    created: bool  # the path was gone and is made again
    make: Callable[[Callable[[], Hlc]], Sequence[Op]]

    def to_json(self) -> dict[str, Any]:
        return {
            "path": show_path(self.path),
            "version": self.version.short() if self.version is not None else None,
            "version_time": format_time(self.version.wall_ms) if self.version else None,
            "size": self.size,
            "created": self.created,
        }


def _writes(
    stamp: Callable[[], Hlc],
    entry: bytes,
    bases: tuple[Hlc, ...],
    size: int,
    changes: dict[int, bytes | None],
) -> list[Op]:
    items = sorted(changes.items())
    ops: list[Op] = []
    for start in range(0, max(len(items), 1), MAX_BLOCKS_PER_WRITE):
        w = Write(stamp(), entry, bases, size, tuple(items[start : start + MAX_BLOCKS_PER_WRITE]))
        ops.append(w)
        bases = (w.hlc,)
    return ops


def plan_restore(
    live: Replica,
    past: Replica,
    path: bytes,
    at_ms: int,
    held: Callable[[Iterable[bytes]], set[bytes]],
    new_id: Callable[[], bytes] = lambda: os.urandom(16),
) -> Restore:
    """How to bring back the content `path` showed at `at_ms` (in `past`) as
    a new version in `live`: a write over the file now at `path`, or, if the
    path is gone, a new file there.

    The new version's first base is the version shown now (so it supersedes
    it) plus any dead heads; live conflict copies are left as they are, so a
    restore never hides what someone else wrote."""
    shown_path = show_path(path)
    old = resolve(past, path)
    old_view = past.entry(old) if old is not None else None
    if old_view is None or path.strip(b"/") == b"":
        if old_view is not None:
            raise NotAFile(path=shown_path, kind="directory")
        raise NotAtTime(path=shown_path, time=format_time(at_ms))
    if old_view.kind != "file":
        raise NotAFile(path=shown_path, kind=_kind_name(old_view.kind))
    version = old_view.version
    size = past.version_size(version) if version is not None else 0
    old_map = dict(past.block_map(version)) if version is not None else {}
    if set(old_map.values()) - held(set(old_map.values())):
        raise VersionCollected(path=shown_path, time=format_time(at_ms))

    now = resolve(live, path)
    if now is None:
        parent_path, _, name = path.strip(b"/").rpartition(b"/")
        parent = resolve(live, parent_path)
        if parent is None or live.kind(parent) != "dir":
            raise ParentMissing(path=shown_path, parent=show_path(parent_path))
        entry = new_id()
        view = old_view

        def create(stamp: Callable[[], Hlc]) -> list[Op]:
            made = Create(stamp(), entry, parent, name, "file", view.mode, view.uid, view.gid)
            return [made, *_writes(stamp, entry, (), size, dict(old_map))]

        return Restore(path, version, size, True, create)

    if live.kind(now) != "file":
        raise NotAFile(path=shown_path, kind=_kind_name(live.kind(now)))
    if live.conflict_source(now) is not None:
        raise ConflictCopyInTheWay(path=shown_path)
    shown = live.contents.shown(now)
    live_heads = set(live.contents.live_heads(now))
    bases: tuple[Hlc, ...] = ()
    cur_map: dict[int, bytes] = {}
    if shown is not None:
        bases = (shown, *(h for h in live.heads(now) if h != shown and h not in live_heads))
        cur_map = live.block_map(shown)
    # Only what differs from the version shown now; blocks past `size` are cut.
    limit = blocks_for(size)
    changes: dict[int, bytes | None] = {i: b for i, b in old_map.items() if cur_map.get(i) != b}
    changes.update({i: None for i in cur_map if i not in old_map and i < limit})

    def write(stamp: Callable[[], Hlc]) -> list[Op]:
        return _writes(stamp, now, bases, size, changes)

    return Restore(path, version, size, False, write)
