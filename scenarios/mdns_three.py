"""Three nodes with no static peers find each other by mDNS alone.

Each node runs in its own network namespace on one bridge, advertising and
browsing `_dfs-peer._tcp.local.`; none is given a `--peer`. Expected: every
node lists the other two as connected peers, and a file written on each node
shows on all three, with identical mounts at the end.
"""

from __future__ import annotations

import time

from scenarios.cluster import Cluster
from scenarios.report import duration
from scenarios.workload import write_file

NEEDS_REAL_LAN = True


def run(c: Cluster) -> None:
    started = time.monotonic()
    nodes = c.start_nodes("A", "B", "C", mdns=True, peers=[])
    with c.report.step("A, B and C found each other by mDNS") as step:
        c.wait_connected(nodes)
        step.text += f" ({duration(time.monotonic() - started)} after they were started)"

    for writer in nodes:
        rel = f"from-{writer.name}.txt"
        data = f"written on {writer.name}\n".encode()
        others = [n for n in nodes if n is not writer]
        with c.report.step(f"{' and '.join(n.name for n in others)} saw {writer.name}'s file"):
            write_file(writer.path(rel), data)
            for other in others:
                c.wait_file(other, rel, data)

    with c.report.step("A, B and C converged") as step:
        tree = c.wait_converged(nodes)
        step.text = f"A, B and C converged ({len(tree)} entries)"
    assert sorted(tree) == ["from-A.txt", "from-B.txt", "from-C.txt"], sorted(tree)
