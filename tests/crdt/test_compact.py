"""`crdt.compact`: a compacted prefix merges exactly as the ops it replaced.

The property behind checkpoints (`peer.storage.checkpoint`): for random histories made
by simulated nodes, a replica given the compaction of a per-node prefix plus
every other op (in any order) shows what a replica given everything shows, and
so does one given the compaction of everything it held at some point plus ops
that arrive later with older stamps.
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from crdt.clock import Hlc
from crdt.compact import compact
from crdt.merge import Replica
from crdt.ops import ROOT, Member, Op, SetAttr
from tests.crdt.model import SimNode, block


def _history(seed: int) -> list[SimNode]:
    rng = random.Random(seed)
    sims = [SimNode.named(n, 1_704_164_645_000 + i * 7) for i, n in enumerate(("a", "b", "c"))]
    for _ in range(rng.randint(10, 80)):
        sim = rng.choice(sims)
        sim.wall_ms += rng.randint(0, 3)
        entries = [e for e, _, _ in _visible(sim)]
        dirs = [ROOT] + [e for e, _, k in _visible(sim) if k == "dir"]
        roll = rng.random()
        if roll < 0.15 or not entries:
            sim.create(rng.choice(dirs), rng.choice([b"x", b"y", b"z"]))
        elif roll < 0.22:
            sim.mkdir(rng.choice(dirs), rng.choice([b"d", b"e"]))
        elif roll < 0.45:
            entry = rng.choice(entries)
            key = rng.choice(["mode", "uid", "mtime_ns", "xattr:user.t"])
            value: int | bytes | None = rng.randint(0, 0o777)
            if key.startswith("xattr:"):
                value = rng.choice([None, b"1", b"2"])
            sim.set_attr(entry, key, value)
        elif roll < 0.6:
            files = [e for e, _, k in _visible(sim) if k == "file"]
            if files:
                n = rng.randint(0, 9)
                sim.write(rng.choice(files), {n: block(n)}, (n + 1) * 10)
        elif roll < 0.7:
            sim.rename(rng.choice(entries), rng.choice(dirs), rng.choice([b"x", b"w", b"d"]))
        elif roll < 0.78:
            sim.delete(rng.choice(entries))
        elif roll < 0.82:
            sim.commit(Member(sim.stamp(), f"{sim.name}{rng.randint(0, 3)}"))
        else:
            other = rng.choice(sims)
            sim.sync_from(other)
    return sims


def _visible(sim: SimNode) -> list[tuple[bytes, bytes, str]]:
    out = []
    for entry in sim.replica._info:
        view = sim.replica.entry(entry)
        if view is not None and view.conflict_of is None:
            out.append((entry, view.name, view.kind))
    return sorted(out)


def _state(replica: Replica) -> object:
    snap = replica.snapshot()
    return snap, sorted(replica.members().items()), replica.forgotten()


def _everything(sims: list[SimNode]) -> dict[Hlc, Op]:
    ops: dict[Hlc, Op] = {}
    for sim in sims:
        ops.update(sim.held)
    return ops


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32), st.integers(0, 2**32))
def test_compacted_prefix_plus_rest_merges_as_everything(seed: int, cut_seed: int) -> None:
    ops = _everything(_history(seed))
    rng = random.Random(cut_seed)
    # A per-node prefix, as causal stability gives (a node's seqs grow with its stamps).
    stamps: dict[bytes, list[Hlc]] = {}
    for h in sorted(ops):
        stamps.setdefault(h.node, []).append(h)
    prefix = {h for hs in stamps.values() for h in hs[: rng.randint(0, len(hs))]}
    folded = compact(ops[h] for h in prefix)
    rest = [op for h, op in ops.items() if h not in prefix]
    rng.shuffle(rest)
    whole = Replica()
    whole.apply(ops.values())
    mixed = Replica()
    batch = folded + rest
    rng.shuffle(batch)
    mixed.apply(batch)
    assert _state(mixed) == _state(whole)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32))
def test_compaction_drops_only_superseded_attrs_and_members(seed: int) -> None:
    ops = list(_everything(_history(seed)).values())
    kept = compact(ops)
    dropped = {op.hlc for op in ops} - {op.hlc for op in kept}
    for op in ops:
        if op.hlc not in dropped:
            continue
        assert isinstance(op, SetAttr | Member), op
        if isinstance(op, SetAttr):
            assert any(
                isinstance(k, SetAttr) and (k.entry, k.key) == (op.entry, op.key) and k.hlc > op.hlc
                for k in kept
            )
        else:
            assert any(isinstance(k, Member) and k.hlc.node == op.hlc.node for k in kept)
    assert compact(kept) == kept


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32), st.integers(0, 200), st.integers(0, 200))
def test_replay_up_to_any_time_past_the_horizon_is_unchanged(
    seed: int, horizon_off: int, at_off: int
) -> None:
    """`--at` stays exact for times past the horizon given to `compact`."""
    ops = list(_everything(_history(seed)).values())
    first = min(op.hlc.wall_ms for op in ops)
    horizon = first + horizon_off
    at = horizon + at_off
    kept = compact(ops, horizon)
    whole, folded = Replica(), Replica()
    whole.apply(op for op in ops if op.hlc.wall_ms <= at)
    folded.apply(op for op in kept if op.hlc.wall_ms <= at)
    assert _state(folded) == _state(whole)
