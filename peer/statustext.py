"""`dfs-peer status` as a person reads it: a few aligned lines, then one per peer.

Works on the JSON the control API answers (what `status --json` prints), so
the text and the JSON never disagree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from peer.progress import format_duration

MIB = 2**20


def _mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _count(n: int, what: str) -> str:
    return f"{n:,} {what}" if n == 1 else f"{n:,} {what}s"


def ago(when: float | None, now: float) -> str:
    if not when:
        return "never"
    return f"{format_duration(now - when)} ago"


def lacking(theirs: Mapping[str, int], ours: Mapping[str, int]) -> int:
    """How many operations `theirs` holds that `ours` does not."""
    return sum(max(0, seq - ours.get(node, 0)) for node, seq in theirs.items())


def peer_sync(peer: Mapping[str, Any], ours: Mapping[str, int]) -> str:
    """Who lacks what, between this node and `peer`, in words."""
    if not peer.get("id"):
        return "-"
    theirs = peer.get("version_vector") or {}
    we, they = lacking(theirs, ours), lacking(ours, theirs)
    if not we and not they:
        return "up to date"
    parts = []
    if we:
        parts.append(f"{we:,} ops to get")
    if they:
        parts.append(f"{they:,} ops it lacks")
    return ", ".join(parts)


def render(status: Mapping[str, Any], now: float) -> str:
    """The whole `status` text, ending with a newline."""
    rows: list[tuple[str, str]] = []
    mode = "read-only" if status.get("read_only") else "read-write"
    rows.append(
        (
            "node",
            f"{status['short_id']} {status['name']}, up {format_duration(status['uptime_s'])}, "
            f"volume {status['volume'][:16]}",
        )
    )
    rows.append(("mount", f"{status['mountpoint']} ({mode})"))
    rows.append(("data dir", str(status["data_dir"])))
    rows.append(("peers at", status.get("listen") or "-"))
    if status.get("page"):
        rows.append(("page", f"{status['page']} (dfs-peer open)"))
    rows.append(
        (
            "volume",
            f"{_count(status['files'], 'file')}, {_count(status['operations'], 'operation')} "
            f"({status['own_operations']:,} from here), {_count(status['blocks'], 'block')}, "
            f"store {_mib(status['store_bytes'])}",
        )
    )
    rows.append(("sync", _sync_line(status)))
    rows.append(("collection", _gc_line(status.get("gc") or {}, now)))
    keys = status.get("keys") or {}
    if keys.get("removed_here"):
        rows.append(("keys", "this node was removed from the volume: members refuse it"))
    elif keys.get("epoch"):
        removed = ", ".join(f"{r['name']} ({r['id'][:8]})" for r in keys.get("removed", []))
        rows.append(("keys", f"epoch {keys['epoch']} ({keys['epoch_id'][:8]}); removed: {removed}"))
    conflicts = status.get("conflicts") or []
    if conflicts:
        shown = ", ".join(c["path"] for c in conflicts[:3])
        more = f" and {len(conflicts) - 3} more" if len(conflicts) > 3 else ""
        rows.append(
            (
                "conflicts",
                f"{len(conflicts):,} conflict {'copy' if len(conflicts) == 1 else 'copies'}: {shown}{more}",
            )
        )
    else:
        rows.append(("conflicts", "none"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]

    peers = status.get("peers") or []
    if peers:
        ours = status.get("version_vector") or {}
        table = [("PEER", "ID", "ADDRESS", "STATE", "LAST SEEN", "SYNC")]
        errors: list[str] = []
        for p in sorted(peers, key=lambda p: (not p["connected"], p.get("name") or "")):
            state = "connected" if p["connected"] else "unreachable"
            table.append(
                (
                    p.get("name") or "?",
                    (p.get("id") or "-")[:8],
                    p["address"],
                    state,
                    ago(p.get("last_seen"), now),
                    peer_sync(p, ours),
                )
            )
            if not p["connected"] and p.get("last_error"):
                errors.append(_clip(f"  {p['address']}: {p['last_error']}", 100))
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        lines.append("")
        for row in table:
            lines.append("  ".join(f"{c:<{w}}" for c, w in zip(row, widths, strict=True)).rstrip())
        lines.extend(errors)
    else:
        lines.append("")
        lines.append("no peers yet (mDNS finds those on the LAN; --peer HOST:PORT names others)")
    return "\n".join(lines) + "\n"


def _sync_line(status: Mapping[str, Any]) -> str:
    catching = status.get("catching_up")
    if catching:
        eta = catching.get("eta_s")
        left = f", about {format_duration(eta)} left" if eta is not None else ""
        return (
            f"catching up: {catching['fraction']:.0%}, {catching['operations_done']:,} of "
            f"{catching['operations_total']:,} operations{left}"
        )
    peers = status.get("peers") or []
    connected = sum(1 for p in peers if p["connected"])
    sync = status.get("sync") or {}
    if sync.get("operations_behind") or sync.get("blocks_missing"):
        return (
            f"behind: {sync.get('operations_behind', 0):,} operations, "
            f"{sync.get('blocks_missing', 0):,} blocks to fetch"
        )
    if not peers:
        return "alone (no peer known)"
    if not connected:
        return f"no peer connected ({_count(len(peers), 'known peer')})"
    return f"up to date with {_count(connected, 'connected peer')} ({len(peers)} known)"


def _gc_line(gc: Mapping[str, Any], now: float) -> str:
    held = gc.get("held_back_by") or []
    if held:
        who = "; ".join(
            f"{m['name']} ({m['behind']:,} operations behind, last seen "
            f"{ago(m.get('last_seen'), now)})"
            for m in held
        )
        text = f"held back by {who}"
    else:
        text = "not held back"
    last = gc.get("last_collection")
    if last and last.get("ran"):
        text += (
            f"; last run {ago(last['at'], now)} freed {last['blocks_freed']:,} blocks "
            f"({_mib(last['bytes_freed'])})"
        )
    return text
