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
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peer.errors import (
    BadPeerAddress,
    DfsError,
    NodeNotRunning,
    NoNodeRunning,
    NoPage,
    SecretMissing,
    SeveralNodesRunning,
)
from peer.keys import VolumeKeys
from peer.net.auth import PROTOCOL
from peer.secret import format_secret, new_secret, read_secret

log = logging.getLogger("peer.cli")

DEFAULT_PORT = 7654  # peer.node.DEFAULT_PORT, without importing the node here

DESCRIPTION = """\
dfs-peer: a peer-to-peer, end-to-end encrypted, replicated file system.

  dfs-peer init > volume.secret                       make a new volume secret
  dfs-peer join --secret-file volume.secret ~/shared  run a node and mount it
  dfs-peer invite                                     a one-time code for a new machine
  dfs-peer join --code 7-orbit-lantern ~/shared       pair a new machine by that code
  dfs-peer status                                     ask the running node
  dfs-peer open                                       its status page (and /metrics)
  dfs-peer history ~/shared/notes.txt                 list a file's versions
  dfs-peer restore ~/shared/notes.txt --at -2h        bring back its content of 2 h ago
  dfs-peer gc                                         collect unused blocks now
  dfs-peer forget NODE                                a member is gone for good
  dfs-peer remove NODE                                shut a lost or stolen machine out
"""

TIME_HELP = (
    "ISO 8601 (2026-11-25T14:00:00Z; without Z: local time), @UNIX seconds, "
    "or how long ago: -90s, -10m, -2h, -3d, -1w"
)


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
        "--code",
        help="join by the one-time code `dfs-peer invite` printed on a member, instead of "
        "a secret; the secret it receives is kept in the data dir, so later starts need "
        "neither",
    )
    j.add_argument(
        "--volume-name",
        metavar="NAME",
        help="with a passphrase instead of a generated secret: the volume's name, the same "
        "on every machine (it salts the passphrase; default $DFS_PEER_VOLUME_NAME)",
    )
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
    j.add_argument(
        "--at",
        metavar="TIME",
        help="with --read-only: mount the volume as it was at TIME, from this data dir's "
        "history, beside or instead of the live node (no sync, nothing written). "
        "TIME: " + TIME_HELP,
    )
    j.add_argument(
        "--keep-history",
        metavar="DURATION",
        default="7d",
        help="how long old versions stay for --at, history and restore "
        "(default 7d; 0 keeps none; units s, m, h, d, w)",
    )
    j.add_argument(
        "--thin-history",
        metavar="AGE:EVERY,...",
        default="1m:0,1h:30s,1d:1h,30d:1d",
        help="how history thins out with age: up to each AGE, one version per EVERY "
        "(0: all), buckets aligned to the clock (default 1m:0,1h:30s,1d:1h,30d:1d; "
        "off keeps every version until --keep-history)",
    )
    j.add_argument(
        "--page-port",
        metavar="PORT",
        default="0",
        help="the port of the status page and /metrics, on 127.0.0.1 only (default 0: "
        "any free one, shown by `status`; `off`: none)",
    )
    j.add_argument("--debug-fuse", action="store_true", help="log every FUSE request")

    i = sub.add_parser(
        "invite",
        help="print a one-time code that lets a new machine join",
        description="Print a one-time code (like 7-orbit-lantern) for a new machine to "
        "join the volume with `dfs-peer join --code CODE MOUNTPOINT`, then wait for it. "
        "The code works once, for 10 minutes; three wrong tries cancel it; Ctrl-C "
        "cancels it. No secret is shown or copied: the new machine receives it sealed.",
    )
    i.add_argument(
        "--ttl",
        metavar="DURATION",
        default="10m",
        help="how long the code works (default and at most 10m; units s, m)",
    )
    _asks_node(i)

    s = sub.add_parser(
        "status",
        help="show the running node's status",
        description="Ask a running node (through its control socket) for its status.",
    )
    s.add_argument("--json", action="store_true", help="machine-readable output")
    _asks_node(s)

    h = sub.add_parser(
        "history",
        help="list the versions of a file",
        description="List the versions of the file at PATH that the running node still "
        "holds (time, node, size), oldest first. PATH is a path inside the mount, or "
        "relative to the volume root.",
    )
    h.add_argument("path", metavar="PATH")
    h.add_argument("--json", action="store_true", help="machine-readable output (a list)")
    h.add_argument(
        "--at", metavar="TIME", help="the file that was at PATH at TIME (e.g. since deleted)"
    )
    _asks_node(h)

    r = sub.add_parser(
        "restore",
        help="bring back the content a file had at a time",
        description="Bring back the content the file at PATH had at TIME, as a new "
        "version (it syncs like any write; the versions in between stay in the history). "
        "A file deleted since is made again at PATH. Files only.",
    )
    r.add_argument("path", metavar="PATH")
    r.add_argument("--at", metavar="TIME", required=True, help="TIME: " + TIME_HELP)
    _asks_node(r)

    g = sub.add_parser(
        "gc",
        help="collect unused blocks now",
        description="Ask the running node to collect now (it also does so by itself): "
        "blocks no kept version references are deleted once what superseded them is "
        "stable (every member has it) and past the history retention. Prints what was "
        "freed and which members hold collection back.",
    )
    g.add_argument("--json", action="store_true", help="machine-readable output")
    _asks_node(g)

    f = sub.add_parser(
        "forget",
        help="vote that a member is gone for good",
        description="Vote, as an operation every node learns, that member NODE (its "
        "name or the start of its id) is gone for good. It is forgotten once it voted "
        "itself out or more than half of the other members voted: then it stops "
        "holding back collection, its writes after the cut are refused, and it must "
        "join again with a fresh data dir.",
    )
    f.add_argument("node", metavar="NODE")
    _asks_node(f)

    r = sub.add_parser(
        "remove",
        help="shut a machine out for good (forget it and rotate the keys)",
        description="Shut member NODE (its name or the start of its id) out for good, "
        "as for a lost or stolen laptop: this node votes to forget it (as `forget` "
        "does) and, in the same step, makes new volume keys sealed to every other "
        "member. From then on every member writes, encrypts and authenticates "
        "under the new keys as soon as it hears of them (a member that is away "
        "catches up when it returns): NODE can no longer connect to any member, "
        "and what is written from now on is unreadable to it, even from captured "
        "traffic. What NODE already held (everything up to now) stays readable to "
        "it: removal protects the future, not the past.",
    )
    r.add_argument("node", metavar="NODE", help="a member's name, or the start of its id")
    _asks_node(r)

    o = sub.add_parser(
        "open",
        help="open the running node's status page",
        description="Print the address of the running node's status page, with the token "
        "that lets you in (kept in its data dir), and open it in a browser if there is a "
        "display. The page and /metrics answer on 127.0.0.1 only.",
    )
    o.add_argument("--print", action="store_true", help="only print the address")
    _asks_node(o)

    u = sub.add_parser(
        "units",
        help="print or install the systemd unit",
        description="Print the systemd unit that runs a node per volume (dfs-peer@NAME: "
        "secret in /etc/dfs-peer/NAME.secret, MOUNTPOINT=... in /etc/dfs-peer/NAME.conf; "
        "with --user, under ~/.config/dfs-peer/), with ExecStart naming this dfs-peer; "
        "--write DIR writes it there instead (/etc/systemd/system, ~/.config/systemd/user).",
    )
    u.add_argument("--user", action="store_true", help="the unit for your user manager")
    u.add_argument("--write", metavar="DIR", type=Path, help="write dfs-peer@.service into DIR")
    return p


def _asks_node(sub: argparse.ArgumentParser) -> None:
    """The option of every subcommand that talks to a running node."""
    sub.add_argument(
        "--data-dir", type=Path, help="the node to ask (default: the only one running)"
    )


def _init() -> int:
    print(format_secret(new_secret()))
    return 0


def _join(args: argparse.Namespace) -> int:
    from peer import httpstack

    httpstack.load()  # before anything imports aiohttp: a faster start, less memory
    from peer import node
    from peer.storage import history

    listen = _address(args.listen, "--listen")
    keep_history_s = history.parse_duration(args.keep_history)
    thin_history = history.parse_thinning(args.thin_history)
    at_ms = None
    if args.at is not None:
        if not args.read_only:
            raise history.AtNeedsReadOnly()
        at_ms = history.parse_time(args.at, time.time())
    peers = [_address(text, "--peer") for text in args.peer]
    if args.code is not None:
        from peer.net import joining, pairing

        if args.secret is not None or args.secret_file is not None or at_ms is not None:
            raise pairing.CodeWithSecret()
        code = pairing.parse_code(args.code)
        name = args.name or node.default_name()
        joined = asyncio.run(
            joining.join_by_code(
                code,
                args.mountpoint.resolve(),
                args.data_dir.resolve() if args.data_dir else None,
                name,
                peers,
                not args.no_mdns,
                PROTOCOL,
                _say,
            )
        )
        root, keys, data_dir = joined.root, joined.keys, joined.data_dir
        if joined.inviter not in peers:
            peers.append(joined.inviter)
    else:
        root = _read_root(args)
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
        peers=tuple(peers),
        mdns=not args.no_mdns,
        keep_history_s=keep_history_s,
        thin_history=thin_history,
        at_ms=at_ms,
        page_port=_page_port(args.page_port),
    )
    held = _HoldBack.install(enabled=not args.debug)
    try:
        asyncio.run(node.run(config, keys, on_ready=held.release, root=root))
    finally:
        held.drop()
    return 0


class _HoldBack(logging.Filter):
    """Hold INFO records back until the mount is ready, then let them through
    in order: the first line a node prints says when its mount is ready. A
    start that fails drops them (its one error line says what happened)."""

    def __init__(self, handler: logging.Handler) -> None:
        super().__init__()
        self.handler = handler
        self.held: list[logging.LogRecord] = []
        self.holding = True

    @classmethod
    def install(cls, *, enabled: bool) -> _HoldBack:
        handler = logging.getLogger().handlers[0]
        hold = cls(handler)
        hold.holding = enabled
        handler.addFilter(hold)
        return hold

    def filter(self, record: logging.LogRecord) -> bool:
        if self.holding and record.levelno < logging.WARNING:
            self.held.append(record)
            return False
        return True

    def release(self) -> None:
        self.holding = False
        held, self.held = self.held, []
        for record in held:
            self.handler.handle(record)

    def drop(self) -> None:
        self.holding = False
        self.held.clear()
        self.handler.removeFilter(self)


def _page_port(text: str) -> int | None:
    if text == "off":
        return None
    if text.isdigit() and int(text) < 65536:
        return int(text)
    raise BadPeerAddress(detail=f"--page-port {text!r}: a port number, 0 or off")


def _open(args: argparse.Namespace) -> int:
    from peer import statuspage

    data_dir = _node_data_dir(args)
    status = _ask(data_dir, "GET", "/status", timeout_s=10)
    token = statuspage.read_token(data_dir)
    if not status.get("page") or token is None:
        raise NoPage(data_dir=data_dir)
    url = f"{status['page']}?token={token}"
    print(url)
    if not args.print and (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        import webbrowser

        webbrowser.open(url)
    return 0


def _units(args: argparse.Namespace) -> int:
    from peer import service

    text = service.unit_text(user=args.user, executable=service.this_executable())
    if args.write is None:
        sys.stdout.write(text)
        return 0
    args.write.mkdir(parents=True, exist_ok=True)
    path = args.write / service.UNIT
    path.write_text(text)
    manager = "systemctl --user" if args.user else "systemctl"
    print(f"dfs-peer: wrote {path}; now run {manager} daemon-reload")
    return 0


def _say(line: str) -> None:
    print(f"dfs-peer: {line}", flush=True)


def _read_root(args: argparse.Namespace) -> bytes:
    """The volume root from --secret, --secret-file or DFS_PEER_SECRET, else
    the one pairing stored in the data dir (--data-dir, or the only one)."""
    from peer import node
    from peer.net import joining

    try:
        return read_secret(args.secret, args.secret_file, os.environ, args.volume_name)
    except SecretMissing:
        if args.data_dir is not None:
            stored = joining.stored_secret(args.data_dir)
        else:
            home = node.default_data_home()
            found = sorted(home.glob(f"*/{joining.SECRET_NAME}")) if home.is_dir() else []
            stored = joining.stored_secret(found[0].parent) if len(found) == 1 else None
        if stored is None:
            raise
        return stored


def _address(text: str, option: str) -> tuple[str, int]:
    from discovery import parse_hostport

    try:
        return parse_hostport(text, any_port=option == "--listen")
    except ValueError as exc:
        raise BadPeerAddress(detail=f"{option} {text!r}: {exc}") from None


def _status(args: argparse.Namespace) -> int:
    from peer import statustext

    status = _ask(_node_data_dir(args), "GET", "/status", timeout_s=10)
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        sys.stdout.write(statustext.render(status, time.time()))
    return 0


def _glue_times(argv: Sequence[str]) -> list[str]:
    """`--at -2h` as `--at=-2h`: argparse takes a value that starts with `-`
    for an option, and "two hours ago" is the time people type most."""
    out: list[str] = []
    glue = False
    for arg in argv:
        if glue and arg.startswith("-"):
            out[-1] += "=" + arg
        else:
            out.append(arg)
        glue = arg == "--at"
    return out


def _node_data_dir(args: argparse.Namespace) -> Path:
    """The data dir of the node to ask: --data-dir, else the only one running."""
    from peer import running

    if args.data_dir is not None:
        return Path(args.data_dir)
    found = running.running_data_dirs()
    if not found:
        raise NoNodeRunning()
    if len(found) > 1:
        raise SeveralNodesRunning(choices=" or ".join(f"--data-dir {d}" for d in found))
    return found[0]


def _ask(
    data_dir: Path,
    method: str,
    path: str,
    *,
    params: dict[str, str] | None = None,
    body: dict[str, object] | None = None,
    timeout_s: float = 120,
) -> dict[str, Any]:
    """Call the running node's control API; `NodeNotRunning` if it is not there."""
    from peer import control

    try:
        return asyncio.run(
            control.ask_node(data_dir, method, path, params=params, body=body, timeout_s=timeout_s)
        )
    except OSError:
        raise NodeNotRunning(data_dir=data_dir) from None


def _history(args: argparse.Namespace) -> int:
    from peer.storage import history

    params = {"path": args.path, "cwd": os.getcwd()}
    if args.at is not None:
        params["at_ms"] = str(history.parse_time(args.at, time.time()))
    answer = _ask(_node_data_dir(args), "GET", "/history", params=params)
    versions = answer["versions"]
    if args.json:
        print(json.dumps(versions, indent=2))
        return 0
    print(f"{answer['path']}: {len(versions)} version(s), oldest first")
    print(f"{'TIME (UTC)':<24}  {'NODE':<24}  {'BYTES':>12}  WHAT")
    for v in versions:
        notes = [str(v["kind"])]
        if v["current"]:
            notes.append("current")
        if v["conflict"]:
            notes.append("conflict copy")
        if not v["available"]:
            notes.append("unavailable (thinned out or collected)")
        node = f"{v['node']} {v['node_name']}".strip()
        print(f"{v['time']:<24}  {node:<24}  {v['size']:>12}  {', '.join(notes)}")
    return 0


def _restore(args: argparse.Namespace) -> int:
    from peer.storage import history

    at_ms = history.parse_time(args.at, time.time())
    body = {"path": args.path, "cwd": os.getcwd(), "at_ms": at_ms}
    answer = _ask(_node_data_dir(args), "POST", "/restore", body=body)
    what = "made again" if answer["created"] else "restored"
    when = answer["version_time"] or "(never written: empty)"
    print(f"dfs-peer: {what} {answer['path']} with its content of {when} ({answer['size']} bytes)")
    return 0


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _gc(args: argparse.Namespace) -> int:
    answer = _ask(_node_data_dir(args), "POST", "/gc")
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
        return 0
    print(
        f"dfs-peer: freed {answer['blocks_freed']} blocks ({_mib(answer['bytes_freed'])}); "
        f"kept {answer['blocks_kept']} blocks; store {_mib(answer['store_bytes_before'])} -> "
        f"{_mib(answer['store_bytes_after'])}; log entries folded: "
        f"{answer['log_entries_folded']}"
    )
    held = answer["held_back_by"]
    if held:
        for m in held:
            seen = m["last_seen"]
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seen)) if seen else "never"
            print(
                f"  held back by {m['name']} ({m['id'][:8]}): {m['behind']} operations "
                f"behind, last seen {when}"
            )
    if answer["versions_unstable"]:
        print(f"  {answer['versions_unstable']} old versions wait for every member to catch up")
    if answer["versions_in_retention"]:
        print(
            f"  {answer['versions_in_retention']} old versions kept as history "
            f"(--keep-history {answer['keep_history_s']:g}s)"
        )
    return 0


def _invite(args: argparse.Namespace) -> int:
    from peer.net import invitations
    from peer.storage import history

    ttl_s = history.parse_duration(args.ttl)
    if not 0 < ttl_s <= invitations.MAX_TTL_S:
        raise invitations.BadTtl()
    return asyncio.run(_invite_and_wait(_node_data_dir(args), ttl_s))


async def _invite_and_wait(data_dir: Path, ttl_s: float) -> int:
    """Print the code, then what happens, until the new machine is paired."""
    from peer import control
    from peer.net import invitations

    final: dict[str, type[DfsError]] = {
        invitations.EXPIRED: invitations.InviteExpired,
        invitations.BURNT: invitations.InviteBurnt,
        invitations.CANCELLED: invitations.InviteCancelled,
    }
    try:
        async for event in control.stream_node(data_dir, "/invite", {"ttl_s": ttl_s}):
            kind = event["event"]
            if kind == "open":
                code = event["code"]
                minutes = event["ttl_s"] / 60
                valid = f"{minutes:g} minutes" if minutes >= 1 else f"{event['ttl_s']:g} seconds"
                _say(f"invitation code: {code}")
                _say(f"on the new machine, run: dfs-peer join --code {code} MOUNTPOINT")
                if not event["mdns"]:
                    _say(
                        f"(this node does not use mDNS: add --peer with its address, port {event['listen'].rsplit(':', 1)[-1]})"
                    )
                _say(f"the code works once, for the next {valid}; Ctrl-C cancels it")
                _say("waiting for the new machine…")
            elif kind == "trying":
                _say("a machine is trying the code…")
            elif kind == "wrong":
                _say(f"a machine tried a wrong code ({event['left']} of 3 tries left)")
            elif kind == invitations.PAIRED:
                _say(
                    f"paired with `{event['name']}` (node {event['node'][:8]}); "
                    "it is fetching the volume now"
                )
                return 0
            elif kind in final:
                raise final[kind]()
    except OSError:
        raise NodeNotRunning(data_dir=data_dir) from None
    raise invitations.InviteCancelled()


def _forget(args: argparse.Namespace) -> int:
    answer = _ask(_node_data_dir(args), "POST", "/forget", body={"node": args.node})
    who = f"{answer['name']} ({answer['id'][:8]})"
    if answer.get("forgotten", True):
        print(
            f"dfs-peer: forgot {who}; its log counts up to "
            f"entry {answer['upto']}, later writes from it are refused"
        )
    else:
        print(
            f"dfs-peer: voted to forget {who}: {answer['votes']} of the {answer['needed']} "
            "votes of other members it takes; run `dfs-peer forget` on another member too"
        )
    return 0


def _remove(args: argparse.Namespace) -> int:
    answer = _ask(_node_data_dir(args), "POST", "/remove", body={"node": args.node})
    print(
        f"dfs-peer: removed {answer['name']} ({answer['id'][:8]}): new keys (epoch "
        f"{answer['epoch']}) sealed to {answer['members']} member(s); it can no longer "
        "connect, and cannot read what is written from now on"
    )
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
    args = _parser().parse_args(_glue_times(sys.argv[1:] if argv is None else argv))
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
        if args.command == "history":
            return _history(args)
        if args.command == "restore":
            return _restore(args)
        if args.command == "gc":
            return _gc(args)
        if args.command == "forget":
            return _forget(args)
        if args.command == "remove":
            return _remove(args)
        if args.command == "invite":
            return _invite(args)
        if args.command == "open":
            return _open(args)
        if args.command == "units":
            return _units(args)
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
