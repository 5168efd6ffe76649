"""Compaction: the operations of a set that can never matter again, removed.

Invariant: for every set of operations `S` and every set `R` (ops that may
still arrive, with any stamps), a `Replica` given `compact(S) | R` answers every
query as one given `S | R` does (`Replica.counts` aside: it counts ops held).

Only what last-writer-wins makes provably redundant is dropped (crdt.merge):

- a `SetAttr` on (entry, key) when `S` holds a later one on the same (entry,
  key). `_set_attr` keeps only the latest per (entry, key), whatever arrives
  later: an op with a lower stamp loses to the later one as it lost to the
  dropped one. Its other effects are maxima over stamps (`_touched`, the ctime;
  `_latest`), which the later op, being greater, keeps the same.
- a `Member` of a node when `S` holds a later `Member` of the same node
  (`_lww_member` keeps the latest; membership itself only needs one).

Each node's newest op always stays, whatever overrides it: a node restores
its clock from its own newest stamp, and checks that a peer's next entry
stamps above that peer's newest (`peer.storage.journal`).

With `horizon_ms`, only an op stamped at or before that wall time counts as
overriding, so a replay up to any time past the horizon (`--at`) still sees
what it saw with every op.

Everything else stays: `Create` and `Move` drive the move-op tree, which undoes
and redoes around a late op with an older stamp; `Write` and deleting `Move`s
form content lineage (bases, `seen`); `Forget` cuts are a maximum but tiny.
A `SetAttr` is never dropped for a `Create` (which also sets mode, uid and gid):
`_Info` keeps a Create's kind and target by the *earliest* stamp, so the pair
does not reduce to one op.
"""

from __future__ import annotations

from collections.abc import Iterable

from crdt.clock import Hlc
from crdt.ops import Member, Op, SetAttr


def compact(ops: Iterable[Op], horizon_ms: int | None = None) -> list[Op]:
    """`ops` (duplicates removed) without the redundant ones, in stamp order."""
    unique: dict[Hlc, Op] = {}
    for op in ops:
        unique[op.hlc] = op
    last_attr: dict[tuple[bytes, str], Hlc] = {}
    last_member: dict[bytes, Hlc] = {}
    for op in unique.values():
        if horizon_ms is not None and op.hlc.wall_ms > horizon_ms:
            continue  # overrides nothing yet: `--at` may stop before it
        if isinstance(op, SetAttr):
            key = (op.entry, op.key)
            cur = last_attr.get(key)
            if cur is None or op.hlc > cur:
                last_attr[key] = op.hlc
        elif isinstance(op, Member):
            node = op.hlc.node
            had = last_member.get(node)
            if had is None or op.hlc > had:
                last_member[node] = op.hlc
    newest: dict[bytes, Hlc] = {}
    for h in unique:
        cur = newest.get(h.node)
        if cur is None or h > cur:
            newest[h.node] = h
    out: list[Op] = []
    for h in sorted(unique):
        op = unique[h]
        if newest[h.node] != h:
            if isinstance(op, SetAttr) and h < last_attr.get((op.entry, op.key), h):
                continue
            if isinstance(op, Member) and h < last_member.get(op.hlc.node, h):
                continue
        out.append(op)
    return out
