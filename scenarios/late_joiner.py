"""A node joining late catches up with a volume that already holds 2,000 files.

A writes 2,000 files (0-4 KiB each, spread over five directories) through its
mount while B, already a member, syncs along. Then C starts with an empty data
dir. Expected: C's mount becomes identical to A's and B's; the report says how
long C took, from its start to the moment its mount matched (content hashes
and all).
"""

from __future__ import annotations

import time

from scenarios.cluster import Cluster
from scenarios.trees import human_bytes
from scenarios.workload import make_corpus

NEEDS_REAL_LAN = False
FILES = 2000


def run(c: Cluster) -> None:
    a, b = c.add("A"), c.add("B")
    joiner = c.add("C")  # added now, so that on loopback A and B know its address
    with c.report.step("started and mounted A, B"):
        c.start(a, b)
    with c.report.step("A and B connected"):
        c.wait_connected([a, b])
    with c.report.step(f"wrote {FILES:,} files through A's mount") as step:
        corpus = make_corpus(a.mount, FILES, dirs=5, size=-4096, seed=2000)
        step.text = f"wrote {corpus.files:,} files ({human_bytes(corpus.bytes)}) in {corpus.dirs} directories through A's mount"
    with c.report.step("B converged with A"):
        c.wait_converged([a, b], timeout=120)

    with c.report.step("C started (empty data dir) and mounted"):
        started = time.monotonic()
        c.start(joiner)
    with c.report.step("C converged with A and B") as step:
        tree = c.wait_converged([a, b, joiner], timeout=120)
        took = time.monotonic() - started
        step.text = f"C converged with A and B ({len(tree):,} entries)"
    c.report.note(f"C caught up with {FILES:,} files in {took:.2f} s from its start")
    c.report.figure("catch_up_s", took)
    assert len([e for e in tree.values() if e.kind == "file"]) == FILES
