"""`dfs-peer remove NODE`: forget a member and rotate the volume's keys.

Invariant: the `Forget` vote and the `Rotate` (`peer.epochs`) enter the log
in one transaction, sealed under the epoch the rotation follows; once it is
committed this node writes, seals and MACs under the new epoch only. The
merge rotation after two rotations made apart is made here too
(`watch_epochs`), by the rule `peer.epochs` states.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from crdt.clock import Hlc
from crdt.ops import Forget, Op, Rotate
from fuse.errors import NoSpace
from peer import epochs
from peer.errors import DfsError
from peer.keys import EpochKeys
from peer.storage import gc

if TYPE_CHECKING:
    from peer.node import Node

log = logging.getLogger(__name__)

# How often a node looks whether a merge rotation is due.
WATCH_EPOCHS_S = 2.0


class CannotRemoveSelf(DfsError):
    """{text} is this node itself: run `dfs-peer remove` on another member."""


class AlreadyRemoved(DfsError):
    """{text} ({short}) is already removed from this volume."""


class RemoveReadOnly(DfsError):
    """the node in {data_dir} is read-only: run `dfs-peer remove` on a node
    mounted read-write."""


class RemovedHere(DfsError):
    """this node was itself removed from the volume: it cannot remove others."""


def resolve(node: Node, text: str) -> bytes:
    """The member `text` names (its name or a prefix of its id), which this
    node may remove; one-line errors otherwise."""
    keys = node.keys
    if keys.me_removed():
        raise RemovedHere()
    target = gc.find_member(node.stability, text)
    if target == node.identity.node_id:
        raise CannotRemoveSelf(text=text)
    if target in keys.removed:
        raise AlreadyRemoved(text=text, short=target.hex()[:8])
    return target


def _members(node: Node) -> set[bytes]:
    """Who the new epoch is sealed to: every member announced, less the
    forgotten and the removed (this node included by `make_rotation`)."""
    forgotten = node.replica.forgotten()
    return {m for m in node.replica.members() if m not in forgotten} - node.keys.removed


def _commit_rotation(
    node: Node,
    prev: EpochKeys,
    removed: set[bytes],
    members: set[bytes],
    forget: list[tuple[bytes, int]],
) -> Rotate:
    """Commit the `Forget` votes and the rotation in one transaction, sealed
    under `prev`; the journal takes the rotation as it commits it."""
    me = node.identity.node_id
    made: list[Rotate] = []

    def ops(stamp: Callable[[], Hlc]) -> list[Op]:
        out: list[Op] = [Forget(stamp(), n, cut) for n, cut in forget]
        rotation = epochs.make_rotation(prev, me, removed, members, stamp())
        made.append(rotation)
        out.append(rotation)
        return out

    with node.keys.under(prev):
        node.journal.commit(ops)
    return made[0]


def remove(node: Node, text: str) -> dict[str, Any]:
    """Forget the member `text` names and rotate the keys (`dfs-peer remove`)."""
    if node.config.read_only:
        raise RemoveReadOnly(data_dir=node.config.data_dir)
    target = resolve(node, text)
    name = node.replica.members().get(target, "?")
    cut = gc.forget_cut(node.stability, target)
    voted = node.identity.node_id in node.replica.forget_votes().get(target, {})
    forget = [] if voted or target in node.replica.forgotten() else [(target, cut)]
    prev = node.keys.current
    members = _members(node) - {target}
    t0 = time.monotonic()
    rotation = _commit_rotation(node, prev, {target}, members, forget)
    seconds = time.monotonic() - t0
    current = node.keys.current
    log.info(
        "removed member node=%s name=%s: key epoch %d (%s) sealed to %d member(s); "
        "its forget vote upto=%d",
        target.hex()[:8],
        name,
        current.number,
        current.id.hex()[:8],
        len(rotation.members),
        cut,
    )
    return {
        "id": target.hex(),
        "name": name,
        "upto": cut,
        "epoch": current.number,
        "epoch_id": current.id.hex(),
        "members": len(rotation.members),
        "forgotten": target in node.replica.forgotten(),
        "seconds": round(seconds, 3),
    }


def merge_rotate(node: Node) -> bool:
    """Make the merge rotation now if one is still needed; True if made."""
    target = epochs.merge_target(node.keys)
    if target is None or epochs.merge_rotation_due(node.keys, node.identity.node_id) is None:
        return False
    prev, removed, members = target
    rotation = _commit_rotation(node, prev, removed, members, [])
    log.warning(
        "two key rotations were made apart: merged them into key epoch %d sealed to %d member(s)",
        rotation.number,
        len(rotation.members),
    )
    return True


def vote_forget_removed(node: Node) -> list[bytes]:
    """Vote to forget every node a rotation removed that this node has not
    voted on yet: removal is final, so each member that takes it adds its
    vote, and the removed node stops holding collection back once more than
    half of the others did (`Replica.forgotten`). Returns the nodes voted on."""
    keys = node.keys
    me = node.identity.node_id
    if node.config.read_only or keys.me_removed():
        return []
    forgotten = node.replica.forgotten()
    votes = node.replica.forget_votes()
    due = sorted(n for n in keys.removed if n not in forgotten and me not in votes.get(n, {}))
    if not due:
        return []
    # The cut the remover voted (what it knew of the node when it removed
    # it), not what this node knows now: entries the removed node wrote
    # later, under keys it kept, must not come to count through this vote.
    cuts: list[tuple[bytes, int]] = []
    for n in due:
        voted = votes.get(n, {})
        cuts.append((n, max(voted.values()) if voted else gc.forget_cut(node.stability, n)))
    node.journal.commit(lambda stamp: [Forget(stamp(), n, cut) for n, cut in cuts])
    for n, cut in cuts:
        log.info("voted to forget removed node=%s upto=%d", n.hex()[:8], cut)
    return due


async def watch_epochs(node: Node, every_s: float = WATCH_EPOCHS_S) -> None:
    """Make a merge rotation when one is due (`peer.epochs`): at once if this
    node is the smallest member the greatest epoch keeps, after the grace
    time otherwise; and vote to forget the nodes rotations removed."""
    since: float | None = None
    while True:
        await asyncio.sleep(every_s)
        if node.config.read_only:
            continue
        try:
            vote_forget_removed(node)
        except (DfsError, NoSpace) as exc:  # a full disk: tried again later
            log.info("could not vote to forget a removed node: %s", exc)
        due = epochs.merge_rotation_due(node.keys, node.identity.node_id)
        if due is None:
            since = None
            continue
        now = time.monotonic()
        since = now if since is None else since
        if now - since >= due:
            try:
                merge_rotate(node)
            except (DfsError, NoSpace) as exc:
                log.warning("could not make the merge rotation: %s", exc)
            since = None
