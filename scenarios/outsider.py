"""A node with another secret on the same LAN learns nothing and changes nothing.

A and B share a volume holding a few files. O joins the same LAN with a
different secret, with mDNS on and A's address given as a static `--peer`, so
it really tries to sync with A. Expected: O's attempts are refused (a refusal
shows in O's or A's log); O's mount stays empty and it holds no operation from
A or B; A's and B's trees, operation counts and version vectors are unchanged
and they never list O as a connected peer. A and B keep syncing meanwhile.
"""

from __future__ import annotations

import os
import re

from scenarios.cluster import Cluster, ClusterNode
from scenarios.trees import Tree, diff
from scenarios.workload import write_file

NEEDS_REAL_LAN = False
REFUSAL = re.compile(r"\b401\b|\b403\b|refus|reject|unauthori[sz]ed|forbidden|wrong secret", re.I)


def run(c: Cluster) -> None:
    a, b = c.start_nodes("A", "B")
    with c.report.step("A and B connected"):
        c.wait_connected([a, b])
    with c.report.step("A and B share a few files"):
        os.mkdir(a.path("private"))
        for i in range(5):
            write_file(a.path(f"private/note-{i}.txt"), f"secret note {i}\n".encode())
        write_file(b.path("from-b.txt"), b"B's secret\n")
        before = c.wait_converged([a, b])
    ops_before = {n.name: n.status()["operations"] for n in (a, b)}
    vv_before = c.version_vectors([a, b])

    other = c.new_secret_file("outsider")
    outsider = c.add("O", secret_file=other, peers=[a])
    # Refusals are security events: a node may log them as errors.
    for n in (a, b, outsider):
        c.allow_errors(n, REFUSAL.pattern)
    with c.report.step("O started with another secret, A as its static peer"):
        c.start(outsider)

    refusal: list[str] = []

    def refused() -> bool:
        for n in (outsider, a):
            for line in n.process.log_text().splitlines():
                if REFUSAL.search(line):
                    refusal.append(f"{n.name}: {line.strip()}")
                    return True
        return False

    with c.report.step("O's attempt was refused"):
        c.wait_until(
            refused, "a refusal of O in O's or A's log", timeout=30, nodes=[a, b, outsider]
        )
    c.report.note(f"first refusal logged: {refusal[0][:160]}")

    check_nothing_leaked(c, a, b, outsider, before, ops_before, vv_before)

    with c.report.step("A and B still sync (B saw a new file from A); O still sees nothing"):
        write_file(a.path("after.txt"), b"written while O was around\n")
        c.wait_file(b, "after.txt", b"written while O was around\n")
        assert os.listdir(outsider.mount) == [], f"O's mount shows {os.listdir(outsider.mount)}"
    check_not_connected(a, b, outsider)


def check_nothing_leaked(
    c: Cluster,
    a: ClusterNode,
    b: ClusterNode,
    outsider: ClusterNode,
    before: Tree,
    ops_before: dict[str, object],
    vv_before: dict[str, dict[str, int]],
) -> None:
    listing = os.listdir(outsider.mount)
    assert listing == [], f"O's mount shows {listing}: it learned something"
    status = outsider.status()
    leaked = set(status.get("version_vector") or {}) - {outsider.node_id}
    assert not leaked, f"O holds operations of {sorted(leaked)}"
    tree = c.wait_converged([a, b])
    assert tree == before, "A's and B's tree changed while O was around:\n" + diff(
        {"before": before, "now": tree}
    )
    for n in (a, b):
        assert n.status()["operations"] == ops_before[n.name], (
            f"{n.name} now holds {n.status()['operations']} operations, {ops_before[n.name]} before O came"
        )
    vv_after = c.version_vectors([a, b])
    assert vv_after == vv_before, f"version vectors changed: {vv_before} -> {vv_after}"
    c.report.note("O's mount is empty; A's and B's trees, op counts and version vectors unchanged")
    check_not_connected(a, b, outsider)


def check_not_connected(a: ClusterNode, b: ClusterNode, outsider: ClusterNode) -> None:
    for n in (a, b):
        for peer in n.status().get("peers", []):
            assert not (peer.get("id") == outsider.node_id and peer.get("connected")), (
                f"{n.name} lists O as a connected peer: {peer}"
            )
