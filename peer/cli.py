"""The `dfs-peer` command line.

Every error a user can cause prints one line, `dfs-peer: <what happened and
what to do>`, and exits with that error's stable code; tracebacks only with
`--debug`.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from peer.errors import BadPeerAddress, DfsError, NodeNotRunning
from peer.keys import VolumeKeys
from peer.secret import format_secret, new_secret, read_secret

log = logging.getLogger("peer.cli")

DEFAULT_PORT = 7654  # peer.node.DEFAULT_PORT, without importing the node here

DESCRIPTION = """\
dfs-peer: a peer-to-peer, end-to-end encrypted, replicated file system.

  dfs-peer init > volume.secret                       make a new volume secret
  dfs-peer join --secret-file volume.secret ~/shared  run a node and mount it
  dfs-peer status                                     ask the running node
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dfs-peer",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--debug", action="store_true", help="log details; show tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser(
        "init",
        help="print a new volume secret",
        description="Print a new random volume secret (one line). Keep it safe: anyone "
        "who has it can read and change the volume; without it nobody can.",
    )

    j = sub.add_parser(
        "join",
        help="run a node in the foreground and mount the volume",
        description="Run a node of the volume in the foreground and mount it at MOUNTPOINT "
        "(an existing empty directory). Ctrl-C (or SIGTERM) flushes, unmounts and exits 0.",
    )
    j.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path)
    j.add_argument("--secret", help="the volume secret (visible in `ps`; prefer --secret-file)")
    j.add_argument("--secret-file", type=Path, help="read the volume secret from this file")
    j.add_argument(
        "--data-dir",
        type=Path,
        help="where this node keeps its store (default: $XDG_DATA_HOME/dfs-peer/<volume tag>)",
    )
    j.add_argument("--name", help="this node's display name (default: the host name)")
    j.add_argument(
        "--listen",
        metavar="HOST:PORT",
        default=f"0.0.0.0:{DEFAULT_PORT}",
        help=f"where to serve peers (default 0.0.0.0:{DEFAULT_PORT}; port 0 picks a free one)",
    )
    j.add_argument(
        "--peer",
        metavar="HOST:PORT",
        action="append",
        default=[],
        help="a peer to sync with besides those mDNS finds (repeatable)",
    )
    j.add_argument(
        "--no-mdns",
        action="store_true",
        help="neither advertise nor browse on the LAN (use --peer)",
    )
    j.add_argument("--read-only", action="store_true", help="mount read-only")
    j.add_argument("--debug-fuse", action="store_true", help="log every FUSE request")

    s = sub.add_parser(
        "status",
        help="show the running node's status",
        description="Ask a running node (through its control socket) for its status.",
    )
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--data-dir", type=Path, help="the node to ask (default: the only one running)")
    return p


def _init() -> int:
    print(format_secret(new_secret()))
    return 0


def _join(args: argparse.Namespace) -> int:
    from peer import node

    listen = _address(args.listen, "--listen")
    root = read_secret(args.secret, args.secret_file, os.environ)
    keys = VolumeKeys.from_root(root)
    data_dir = args.data_dir or node.default_data_dir(keys)
    config = node.NodeConfig(
        mountpoint=args.mountpoint.resolve(),
        data_dir=data_dir.resolve(),
        name=args.name or node.default_name(),
        read_only=args.read_only,
        debug_fuse=args.debug_fuse,
        listen_host=listen[0],
        listen_port=listen[1],
        peers=tuple(_address(text, "--peer") for text in args.peer),
        mdns=not args.no_mdns,
    )
    asyncio.run(node.run(config, keys))
    return 0


def _address(text: str, option: str) -> tuple[str, int]:
    from discovery import parse_hostport

    try:
        return parse_hostport(text, any_port=option == "--listen")
    except ValueError as exc:
        raise BadPeerAddress(detail=f"{option} {text!r}: {exc}") from None


def _running_data_dirs() -> list[Path]:
    from peer import node

    home = node.default_data_home()
    if not home.is_dir():
        return []
    return sorted(p.parent for p in home.glob(f"*/{node.CONTROL_NAME}") if p.is_socket())


def _status(args: argparse.Namespace) -> int:
    from peer import node

    if args.data_dir is not None:
        data_dir = args.data_dir
    else:
        running = _running_data_dirs()
        if len(running) != 1:
            raise NodeNotRunning(
                data_dir="(none given)" if not running else "several; use --data-dir"
            )
        data_dir = running[0]
    try:
        status = asyncio.run(node.query_status(data_dir))
    except OSError:
        raise NodeNotRunning(data_dir=data_dir) from None
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        width = max(len(k) for k in status)
        for key, value in status.items():
            print(f"{key:<{width}}  {value}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    profile = os.environ.get("DFS_PEER_PROFILE")
    if profile:
        # For benchmarks: profile this whole process into <path>.<pid>.
        import cProfile

        profiler = cProfile.Profile()
        try:
            return profiler.runcall(_main, argv)
        finally:
            profiler.dump_stats(f"{profile}.{os.getpid()}")
    return _main(argv)


def _main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    faulthandler.enable()
    try:
        if args.command == "init":
            return _init()
        if args.command == "join":
            return _join(args)
        return _status(args)
    except DfsError as exc:
        if args.debug:
            log.exception("failed")
        print(f"dfs-peer: {exc.message()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
