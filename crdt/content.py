"""Content versions of files: a DAG through `bases`, and block maps.

Invariant: everything here is a function of the *set* of versions held (and
of the stamps `placed` was given), never of the order they arrived in. A version
is *complete* when its content lineage (`bases[0]`, recursively) is all known;
only complete versions take part. The *heads* of a file are its complete
versions that no complete version of the same file names as a base. A
*tombstone* is the version a delete makes (its bases are the versions the
deleting node saw). It is *in force* unless a later move (by HLC) put the file
outside the trash again: a rename that sorted after the delete, which the tree
obeys, so the file stayed in view and was edited like any other. A version is
*dead* if it is a tombstone or its content lineage passes through a tombstone in
force (writes through a handle still open on a deleted file). A file with a live
head has content someone wrote that no delete saw: rule 4 of the design brings
such a file back.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from crdt.clock import Hlc
from crdt.ops import BLOCK_SIZE

BlockMap = dict[int, bytes]

# A file's versions are kept as the bare stamp when there is one (the usual
# case), in a tuple until there are more than this many, then in a set (216
# bytes even for one, but constant-time adds).
SMALL_VERSIONS = 8

# Materialised block maps kept for reuse; a new version usually extends a
# cached one (its base), so a small cache avoids walking long lineages.
MAP_CACHE_SIZE = 512


@dataclass(frozen=True, slots=True)
class Version:
    hlc: Hlc
    entry: bytes
    bases: tuple[Hlc, ...]
    size: int
    blocks: tuple[tuple[int, bytes | None], ...]
    tombstone: bool


def blocks_for(size: int) -> int:
    """How many blocks a file of `size` bytes spans."""
    return (size + BLOCK_SIZE - 1) // BLOCK_SIZE


class Contents:
    """All content versions known to a replica."""

    def __init__(self) -> None:
        self.versions: dict[Hlc, Version] = {}
        self._by_entry: dict[bytes, Hlc | tuple[Hlc, ...] | set[Hlc]] = {}
        self._complete: set[Hlc] = set()
        # version -> whether its lineage passes through a tombstone in force
        self._doomed: dict[Hlc, bool] = {}
        # file -> the newest stamp of a move that put it outside the trash
        self._placed: dict[bytes, Hlc] = {}
        self._heads: dict[bytes, tuple[Hlc, ...]] = {}
        # Stamps named as a base by a held version before they arrived
        # (out-of-order delivery): their arrival may complete others.
        self._awaited: set[Hlc] = set()
        # Versions whose file's heads were recomputed in full / updated.
        self.head_scans = 0
        self.head_updates = 0
        self._maps: OrderedDict[Hlc, BlockMap] = OrderedDict()

    def add(self, version: Version) -> None:
        if version.hlc in self.versions:
            return
        self.versions[version.hlc] = version
        mine = self._by_entry.get(version.entry)
        if mine is None:
            self._by_entry[version.entry] = version.hlc
        elif isinstance(mine, Hlc):
            self._by_entry[version.entry] = (mine, version.hlc)
        elif isinstance(mine, set):
            mine.add(version.hlc)
        elif len(mine) < SMALL_VERSIONS:
            self._by_entry[version.entry] = (*mine, version.hlc)
        else:
            self._by_entry[version.entry] = {*mine, version.hlc}
        self._update_heads(version)
        for base in version.bases:
            if base not in self.versions:
                self._awaited.add(base)

    def _update_heads(self, version: Version) -> None:
        """Keep a file's cached heads up to date for a new version, in time
        proportional to the heads, not to the file's versions: a complete
        version that no held version names as a base supersedes its bases and
        is a head; an incomplete one changes nothing. Anything else (it
        completes versions that arrived before it) recomputes from scratch."""
        self.head_updates += 1
        entry = version.entry
        cached = self._heads.get(entry)
        if cached is None or version.hlc in self._awaited:
            self._awaited.discard(version.hlc)
            self._heads.pop(entry, None)
            return
        if not self.complete(version.hlc):
            return
        bases = set(version.bases)
        kept = [h for h in cached if h not in bases]
        self._heads[entry] = tuple(sorted((*kept, version.hlc), reverse=True))

    def entries(self) -> set[bytes]:
        return set(self._by_entry)

    def of(self, entry: bytes) -> frozenset[Hlc]:
        """Every version of `entry` held, complete or not."""
        return frozenset(self._held(entry))

    def _held(self, entry: bytes) -> tuple[Hlc, ...] | set[Hlc]:
        mine = self._by_entry.get(entry, ())
        return (mine,) if isinstance(mine, Hlc) else mine

    def placed(self, entry: bytes, hlc: Hlc) -> bool:
        """Note a move (or the creation) of `entry` outside the trash; True if
        it may have changed which of the entry's versions are dead."""
        cur = self._placed.get(entry)
        if cur is not None and cur >= hlc:
            return False
        self._placed[entry] = hlc
        for h in self._held(entry):
            self._doomed.pop(h, None)
        return True

    def in_force(self, tombstone: Version) -> bool:
        placed = self._placed.get(tombstone.entry)
        return placed is None or placed < tombstone.hlc

    # -- lineage ---------------------------------------------------------------
    def complete(self, hlc: Hlc) -> bool:
        v = self.versions.get(hlc)
        if v is not None and not v.bases:
            return True  # its own whole lineage; not cached, to keep the set small
        chain: list[Hlc] = []
        cur: Hlc | None = hlc
        entry = self.versions[hlc].entry if hlc in self.versions else None
        while cur is not None and cur not in self._complete:
            v = self.versions.get(cur)
            if v is None or v.entry != entry or len(chain) > len(self.versions):
                return False
            chain.append(cur)
            cur = v.bases[0] if v.bases else None
        self._complete.update(chain)
        return True

    def dead(self, hlc: Hlc) -> bool:
        """True for a tombstone, or a complete version written on top of one in force."""
        v = self.versions[hlc]
        if v.tombstone:
            return True
        if not v.bases:
            return False  # no lineage to pass through a tombstone; not cached
        chain: list[Hlc] = []
        cur: Hlc | None = hlc
        result = False
        while cur is not None:
            known = self._doomed.get(cur)
            if known is not None:
                result = known
                break
            v = self.versions[cur]
            chain.append(cur)
            if v.tombstone and self.in_force(v):
                result = True
                break
            cur = v.bases[0] if v.bases else None
        for h in chain:
            self._doomed[h] = result
        return result

    def heads(self, entry: bytes) -> tuple[Hlc, ...]:
        """Complete versions of `entry` that nothing supersedes, newest first."""
        cached = self._heads.get(entry)
        if cached is not None:
            return cached
        held = self._by_entry.get(entry, ())
        if isinstance(held, Hlc):
            # its one version: not cached (~100 bytes a file)
            return (held,) if self.complete(held) else ()
        self.head_scans += len(held)
        mine = [h for h in held if self.complete(h)]
        superseded = {b for h in mine for b in self.versions[h].bases}
        heads = tuple(sorted((h for h in mine if h not in superseded), reverse=True))
        self._heads[entry] = heads
        return heads

    def live_heads(self, entry: bytes) -> tuple[Hlc, ...]:
        heads = self.heads(entry)
        if len(heads) == 1:
            return () if self.dead(heads[0]) else heads
        return tuple(h for h in heads if not self.dead(h))

    def shown(self, entry: bytes) -> Hlc | None:
        """The version a file shows: its newest live head, else its newest head."""
        if entry not in self._by_entry:
            return None  # never written (a listing asks this of every file)
        live = self.live_heads(entry)
        if live:
            return live[0]
        heads = self.heads(entry)
        return heads[0] if heads else None

    # -- content -----------------------------------------------------------------
    def size(self, hlc: Hlc) -> int:
        v = self.versions[hlc]
        if v.tombstone:
            return self.size(v.bases[0]) if v.bases and v.bases[0] in self.versions else 0
        return v.size

    def block_map(self, hlc: Hlc) -> BlockMap:
        """Block index -> block id for a complete version (holes are absent).

        The returned dict is shared with the cache: callers must not mutate it.
        """
        chain: list[Version] = []
        cur: Hlc | None = hlc
        base: BlockMap = {}
        while cur is not None:
            cached = self._maps.get(cur)
            if cached is not None:
                self._maps.move_to_end(cur)
                base = cached
                break
            v = self.versions[cur]
            chain.append(v)
            cur = v.bases[0] if v.bases else None
        result = base
        for v in reversed(chain):
            if v.tombstone:
                continue  # a tombstone shows its first base's content unchanged
            result = dict(result)
            for index, block in v.blocks:
                if block is None:
                    result.pop(index, None)
                else:
                    result[index] = block
            limit = blocks_for(v.size)
            if any(i >= limit for i in result):
                result = {i: b for i, b in result.items() if i < limit}
        if chain:
            self._maps[hlc] = result
            while len(self._maps) > MAP_CACHE_SIZE:
                self._maps.popitem(last=False)
        return result
