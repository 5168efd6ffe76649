"""Collection never deletes what an absent member still needs; it converges on return.

A, B and C (all with `--keep-history 0`) hold a 20 MiB file. C stops. A and B
overwrite the file ten times between them (200 MiB of new blocks) and run
`dfs-peer gc`. Expected while C is away: nothing is freed, because every
overwrite came after C's version vector, so none is stable; `gc` names C as
what holds collection back, and A and B still hold all eleven versions. Then C
starts again on its data dir. Expected: C converges with A and B (every byte
verified) with no missing block; once every node knows C caught up, `gc` on
each frees the ten old versions and each store shrinks to about the one
current version. The report gives the store sizes before and after.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

from scenarios.cluster import Cluster, ClusterNode
from scenarios.harness import HarnessError, dfs_peer_command
from scenarios.trees import human_bytes
from scenarios.workload import write_large

NEEDS_REAL_LAN = False
SIZE = 20 << 20
BLOCK = 128 << 10
OVERWRITES = 10


def start_nodes(c: Cluster, *names: str) -> list[ClusterNode]:
    """Add and start nodes that keep no history, so collection shows at once."""
    args = c.join_args
    c.join_args = lambda node: [*args(node), "--keep-history", "0"]  # type: ignore[method-assign]
    nodes = [c.add(name) for name in names]
    c.start(*nodes)
    return nodes


def cli(node: ClusterNode, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `dfs-peer ARGS --data-dir <node's>`, as a user on that machine would."""
    return subprocess.run(
        [*dfs_peer_command(), *args, "--data-dir", str(node.process.data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def gc(node: ClusterNode) -> dict[str, Any]:
    done = cli(node, "gc", "--json")
    if done.returncode != 0:
        raise HarnessError(f"dfs-peer gc on {node.name} failed: {done.stderr.strip()}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def held_back_by(node: ClusterNode) -> list[str]:
    return [str(m["name"]) for m in node.status()["gc"]["held_back_by"]]


def store(node: ClusterNode) -> tuple[int, int]:
    status = node.status()
    return int(status["blocks"]), int(status["store_bytes"])


def run(c: Cluster) -> None:
    with c.report.step("start A, B, C (--keep-history 0)"):
        a, b, nc = start_nodes(c, "A", "B", "C")
        c.wait_connected([a, b, nc])
    with c.report.step(f"A wrote big.bin ({human_bytes(SIZE)}); all three converged"):
        write_large(a.path("big.bin"), SIZE, seed="gc-0")
        c.wait_converged([a, b, nc], timeout=120)
    per_version = SIZE // BLOCK

    with c.report.step("C stopped"):
        c.stop(nc)

    with c.report.step(f"A and B overwrote big.bin {OVERWRITES} times, taking turns") as step:
        for i in range(1, OVERWRITES + 1):
            writer = a if i % 2 else b
            write_large(writer.path("big.bin"), SIZE, seed=f"gc-{i}")
            c.wait_converged([a, b], timeout=120)
        step.text = (
            f"A and B overwrote big.bin {OVERWRITES} times ({human_bytes(OVERWRITES * SIZE)} new)"
        )

    with c.report.step("A and B know that C is the one behind"):
        c.wait_until(
            lambda: held_back_by(a) == ["C"] and held_back_by(b) == ["C"],
            "A and B to name C as holding collection back",
            detail=lambda: f"  A: {held_back_by(a)}  B: {held_back_by(b)}",
        )
    with c.report.step("gc on A and B while C is away freed nothing") as step:
        away = {n.name: gc(n) for n in (a, b)}
        for name, result in away.items():
            held = [m["name"] for m in result["held_back_by"]]
            assert result["blocks_freed"] == 0, f"{name} freed blocks while C is away: {result}"
            assert held == ["C"], f"{name}'s gc says collection is held back by {held}"
        held_blocks = {n.name: store(n)[0] for n in (a, b)}
        for name, blocks in held_blocks.items():
            assert blocks >= (OVERWRITES + 1) * per_version, (
                f"{name} holds {blocks} blocks, fewer than the {OVERWRITES + 1} versions"
            )
        step.text = (
            "gc on A and B while C is away freed nothing (held back by C); they hold "
            + ", ".join(
                f"{n.name} {store(n)[0]} blocks in {human_bytes(store(n)[1])}" for n in (a, b)
            )
        )
    before = {n.name: store(n)[1] for n in (a, b)}

    with c.report.step("C restarted on its data dir and converged with A and B") as step:
        c.restart(nc)
        tree = c.wait_converged([a, b, nc], timeout=180)
        received = int(nc.status()["sync"]["blocks_received"])
        step.text = (
            f"C restarted and converged with A and B ({len(tree)} entries, bytes verified; "
            f"it fetched {received} blocks: the current version, not the history)"
        )
    assert received <= per_version, f"C fetched {received} blocks for one {per_version}-block file"
    with c.report.step("every node knows that every member caught up"):
        c.wait_until(
            lambda: not any(held_back_by(n) for n in (a, b, nc)),
            "no member to hold collection back",
            timeout=60,
            detail=lambda: "\n".join(f"  {n.name}: {held_back_by(n)}" for n in (a, b, nc)),
        )
    with c.report.step("gc on every node freed the old versions") as step:
        results = {n.name: gc(n) for n in (a, b, nc)}
        lines = []
        for n in (a, b, nc):
            blocks, size = store(n)
            freed = results[n.name]
            lines.append(
                f"{n.name}: freed {freed['blocks_freed']} blocks "
                f"({human_bytes(freed['bytes_freed'])}), store "
                f"{human_bytes(before.get(n.name, freed['store_bytes_before']))} -> "
                f"{human_bytes(size)}"
            )
            assert blocks == per_version, f"{n.name} holds {blocks} blocks, not {per_version}"
            assert size < SIZE * 1.3, f"{n.name}'s store is still {human_bytes(size)}"
            c.report.figure(f"store_bytes_after_{n.name}", size)
        step.text = "gc on every node freed the old versions: " + "; ".join(lines)
    for name, size in before.items():
        c.report.figure(f"store_bytes_before_{name}", size)
    c.wait_converged([a, b, nc], timeout=60)
