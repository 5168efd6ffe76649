"""A live three-node volume to play with: `python -m scenarios.demo`.

Starts nodes A, B and C of one new volume (as root each in its own network
namespace on one bridge, finding each other by mDNS; otherwise on loopback
with static peers), each with its own mount, writes a welcome file on A, waits
until all three mounts show it, prints where the mounts are, and keeps running
until Ctrl-C, which stops every node and removes everything it made. Change a
file in one mount and watch it appear in the others; `dfs-peer status
--data-dir DIR` shows each node.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from scenarios.cluster import Cluster
from scenarios.network import can_use_namespaces
from scenarios.report import Report
from scenarios.workload import write_file

WELCOME = b"""Welcome to a dfs-peer volume with three nodes.

Every mount shows the same tree: write, rename or delete something in one of
them and look at the others. Ctrl-C in the demo's terminal stops all nodes.
"""


def _stop(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scenarios.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--nodes", type=int, default=3, help="how many nodes (default 3)")
    args = parser.parse_args(argv)
    names = [chr(ord("A") + i) for i in range(max(2, min(args.nodes, 8)))]
    signal.signal(signal.SIGTERM, _stop)
    workdir = Path(tempfile.mkdtemp(prefix="dfs-peer-demo-"))
    namespaces, _ = can_use_namespaces()
    report = Report(f"dfs-peer demo: {len(names)} nodes of one volume")
    try:
        with Cluster(workdir, report, loopback=not namespaces) as cluster:
            report.note(f"LAN: {cluster.lan.description}")
            nodes = cluster.start_nodes(*names)
            with report.step("every node shows the welcome file written on A"):
                write_file(nodes[0].path("WELCOME.txt"), WELCOME)
                for node in nodes[1:]:
                    cluster.wait_file(node, "WELCOME.txt", WELCOME)
            print()
            for node in nodes:
                print(f"  node {node.name}: mount {node.mount}   data {node.process.data_dir}")
            print(
                f"\n  Try:  echo hi > {nodes[0].mount}/hi.txt; cat {nodes[-1].mount}/hi.txt"
                f"\n        .venv/bin/dfs-peer status --data-dir {nodes[-1].process.data_dir}"
                "\n\n  Ctrl-C stops the nodes and removes the demo.\n",
                flush=True,
            )
            while all(node.running() for node in nodes):
                time.sleep(0.5)
            print("a node stopped: ending the demo", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        print("stopped every node; removed the demo", flush=True)
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
