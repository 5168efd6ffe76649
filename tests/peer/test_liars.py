"""A member that lies, against real nodes: forged checkpoints, forks, forgets.

The liar is `hostile.HostilePeer`: it has the volume's secret and a node key
of its own and speaks the peer protocol over real HTTP on loopback, signing
with the project's own code, but what it serves is made up. The honest nodes
are the real composition root (`Node`: store, journal, sync) as in
test_sync.py. Each test shows what a member can no longer do: the lie is
refused, logged at WARNING naming the liar, kept as evidence and shown by
`status`, and the honest nodes still converge on every honest write.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import cbor2
import pytest

from crdt.clock import Hlc
from crdt.ops import ROOT, Create, Forget, Member, SetAttr
from peer.identity import NodeIdentity, load_or_create
from peer.keys import VolumeKeys
from peer.node import Node
from peer.sealing import entry_hash, seal
from tests.peer.hostile import HostilePeer, chain_of
from tests.peer.test_gc import make_node, serving
from tests.peer.test_sync import link, read_file, wait_until, write_file

pytestmark = pytest.mark.asyncio

# What honest nodes may log at WARNING while they refuse a liar (which of
# them, and how often, depends on timing); each test also names the one line
# it requires.
REFUSALS = r"lied|peer sent bad data|does not chain|dropped \d+ operation"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def lies(node: Node) -> list[dict[str, object]]:
    return node.statistics().lies


def forged_checkpoint(folder: NodeIdentity, logs: dict[bytes, list[list[bytes]]]) -> bytes:
    """A checkpoint of raw log items, signed by `folder` as a member signs one."""
    body = cbor2.dumps({"v": 2, "logs": logs}, canonical=True)
    sig = folder.sign(b"dfs-peer:v2:checkpoint" + folder.node_id + body)
    return cbor2.dumps([folder.node_id, body, sig], canonical=True)


async def test_a_forged_checkpoint_is_refused_and_the_victims_writes_still_arrive(
    tmp_path: Path, keys: VolumeKeys, expect_logs: Callable[..., None]
) -> None:
    mallory = load_or_create(tmp_path / "mallory")
    expect_logs(rf"node {mallory.short} lied: forged checkpoint", logger="peer.journal")
    expect_logs(REFUSALS)
    victim, target = make_node(tmp_path, "victim", keys), make_node(tmp_path, "target", keys)
    write_file(victim, b"victim.txt", b"the victim's own words")
    v = victim.identity.node_id
    real = list(victim.store.iter_log())
    # Mallory claims to have folded all of the victim's log. It may even hold
    # the victim's last entry (signed heads travel); it does not hold the ones
    # before, so it makes them up (it can seal as the victim: it has the
    # secret), leaving the victim's file out.
    made_up = [[seal(keys.log, b"nothing", v + e.seq.to_bytes(8, "big")), b""] for e in real[:-1]]
    own = chain_of(mallory, keys, [Member(Hlc(now_ms(), 0, mallory.node_id), "mallory")])
    liar = HostilePeer(keys, mallory, log=own)
    liar.checkpoint = forged_checkpoint(
        mallory,
        {
            v: [*made_up, [real[-1].sealed, real[-1].sig]],
            mallory.node_id: [[own[0].sealed, own[0].sig]],
        },
    )
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(liar.serving())
        sv = await stack.enter_async_context(serving(victim))
        st = await stack.enter_async_context(serving(target))
        st.add_peer("127.0.0.1", liar.port, "static")
        await wait_until(
            lambda: any(ev.node == mallory.node_id for ev in target.store.evidence()),
            "the target to refuse Mallory's checkpoint",
        )
        assert target.store.get_checkpoint() is None
        assert target.journal.vv.get(v, 0) == 0
        (shown,) = lies(target)
        assert shown["node"] == mallory.node_id.hex()
        assert shown["kind"] == "forged checkpoint"
        assert "unsigned" in str(shown["detail"]) or "signature" in str(shown["detail"])
        # The victim's real entries still arrive, from the victim.
        link(st, sv)
        await wait_until(
            lambda: read_file(target, b"victim.txt") == b"the victim's own words",
            "the victim's file to reach the target",
        )
        assert target.journal.vv[v] == victim.journal.vv[v]


@pytest.mark.parametrize("after", [0, 3], ids=["heads-at-the-fork", "heads-past-the-fork"])
async def test_equivocation_is_detected_on_both_nodes_and_they_converge(
    tmp_path: Path, keys: VolumeKeys, expect_logs: Callable[..., None], after: int
) -> None:
    """Mallory tells A and B different second entries, then (`after`) goes on
    writing on both stories: the heads A and B compare then differ past the
    fork, and each finds the first entry that differs."""
    mallory = load_or_create(tmp_path / "mallory")
    expect_logs(rf"node {mallory.short} lied: fork at seq 2", logger="peer.journal")
    expect_logs(REFUSALS)
    a, b = make_node(tmp_path, "a", keys), make_node(tmp_path, "b", keys)
    m = mallory.node_id
    t = now_ms()
    member = Member(Hlc(t, 0, m), "mallory")
    # Two different second entries: one for A, one for B.
    to_a = chain_of(
        mallory,
        keys,
        [member, Create(Hlc(t, 1, m), b"x" * 16, ROOT, b"x-side", "dir", 0o755, 0, 0)],
    )
    to_b = [
        to_a[0],
        *chain_of(
            mallory,
            keys,
            [Create(Hlc(t, 1, m), b"y" * 16, ROOT, b"y-side", "dir", 0o755, 0, 0)],
            first=2,
            prev=to_a[1].prev,
        ),
    ]
    for story in (to_a, to_b):
        more = [SetAttr(Hlc(t, 2 + i, m), b"x" * 16, "mode", 0o700 + i) for i in range(after)]
        story += chain_of(mallory, keys, more, first=3, prev=entry_hash(story[-1]))
    liar = HostilePeer(
        keys,
        mallory,
        logs_for={a.identity.node_id: to_a, b.identity.node_id: to_b},
    )
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(liar.serving())
        sa = await stack.enter_async_context(serving(a))
        sb = await stack.enter_async_context(serving(b))
        sa.add_peer("127.0.0.1", liar.port, "static")
        sb.add_peer("127.0.0.1", liar.port, "static")
        await wait_until(
            lambda: (
                a.replica.lookup(ROOT, b"x-side") is not None
                and b.replica.lookup(ROOT, b"y-side") is not None
            ),
            "Mallory's two stories to land",
        )
        await wait_until(
            lambda: a.journal.vv.get(m) == b.journal.vv.get(m) == 2 + after, "all of both stories"
        )  # equal vectors, different entries
        # A and B talk: each sees the other's signed head for (mallory, 2).
        link(sa, sb)
        for node in (a, b):
            await wait_until(
                lambda node=node: any(  # type: ignore[misc]
                    ev.node == m and ev.seq == 2 and ev.kind == "fork"
                    for ev in node.store.evidence()
                ),
                f"{node.config.name} to detect the fork",
            )
        # Both take Mallory's log only up to the fork, and converge.
        await wait_until(
            lambda: a.replica.snapshot() == b.replica.snapshot() and a.journal.vv == b.journal.vv,
            "A and B to converge",
        )
        assert a.journal.vv[m] == 1
        for node in (a, b):
            assert node.replica.lookup(ROOT, b"x-side") is None
            assert node.replica.lookup(ROOT, b"y-side") is None
            shown = [x for x in lies(node) if x["node"] == m.hex()]
            # (first where the heads differed, then where the stories part)
            assert {x["kind"] for x in shown} == {"fork"}
            assert min(int(str(x["seq"])) for x in shown) == 2
        # Honest writes still flow both ways.
        write_file(a, b"after.txt", b"honest")
        await wait_until(lambda: read_file(b, b"after.txt") == b"honest", "B to get A's write")


async def test_a_forget_by_one_member_is_refused_everywhere(
    tmp_path: Path, keys: VolumeKeys, expect_logs: Callable[..., None]
) -> None:
    mallory = load_or_create(tmp_path / "mallory")
    a, t = make_node(tmp_path, "a", keys), make_node(tmp_path, "t", keys)
    m, a_id = mallory.node_id, a.identity.node_id
    stamp = now_ms()
    # Mallory, a member, votes to forget A, who is online.
    votes = chain_of(
        mallory,
        keys,
        [Member(Hlc(stamp, 0, m), "mallory"), Forget(Hlc(stamp, 1, m), a_id, a.journal.vv[a_id])],
    )
    liar = HostilePeer(keys, mallory, log=votes)
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(liar.serving())
        sa = await stack.enter_async_context(serving(a))
        st = await stack.enter_async_context(serving(t))
        for s in (sa, st):
            s.add_peer("127.0.0.1", liar.port, "static")
        link(sa, st)
        await wait_until(
            lambda: all(n.journal.vv.get(m) == 2 and len(n.replica.members()) == 3 for n in (a, t)),
            "Mallory's vote and every member to reach A and T",
        )
        for node in (a, t):
            assert node.replica.forgotten() == {}
            assert node.collector.status()["forget_votes"] == {a_id.hex(): [m.hex()]}
        write_file(a, b"after.txt", b"A is still here")
        await wait_until(
            lambda: read_file(t, b"after.txt") == b"A is still here", "T to take A's write"
        )
        assert t.journal.vv[a_id] == a.journal.vv[a_id]
        # A second vote (T's) makes the majority of A's two others: then A is gone.
        done = t.forget("a")
        assert (done["forgotten"], done["votes"], done["needed"]) == (True, 2, 2)
