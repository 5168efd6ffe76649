"""`dfs-peer status` reads at a glance: short aligned lines, one per peer."""

from __future__ import annotations

from typing import Any

from peer.statustext import render

NOW = 1_800_000_000.0


def _status(**over: Any) -> dict[str, Any]:
    status: dict[str, Any] = {
        "node_id": "ab" * 32,
        "short_id": "abababab",
        "name": "alpha",
        "volume": "cd" * 16,
        "mountpoint": "/home/u/shared",
        "data_dir": "/home/u/.local/share/dfs-peer/cdcd",
        "read_only": False,
        "files": 1234,
        "operations": 5678,
        "own_operations": 120,
        "blocks": 300,
        "block_bytes": 1,
        "store_bytes": 47_400_000,
        "cache_bytes": 0,
        "cache_hits": 0,
        "cache_misses": 0,
        "uptime_s": 7380.0,
        "listen": "0.0.0.0:7654",
        "version_vector": {"ab" * 32: 120, "ef" * 32: 50},
        "peers": [
            {
                "id": "ef" * 32,
                "name": "beta",
                "address": "192.168.1.20:7654",
                "source": "mdns",
                "connected": True,
                "version_vector": {"ab" * 32: 118, "ef" * 32: 55},
                "last_seen": NOW - 2,
                "last_error": None,
            },
            {
                "id": None,
                "name": None,
                "address": "10.0.0.5:7654",
                "source": "static",
                "connected": False,
                "version_vector": {},
                "last_seen": None,
                "last_error": "ClientConnectorError: connection refused",
            },
        ],
        "sync": {"operations_behind": 5, "blocks_missing": 0},
        "gc": {
            "held_back_by": [
                {"id": "12" * 32, "name": "gamma", "last_seen": NOW - 3 * 3600, "behind": 40}
            ],
            "last_collection": None,
        },
        "page": "http://127.0.0.1:41234/",
        "catching_up": None,
        "conflicts": [{"path": "/notes.conflict-beta-20261201-101010.txt"}],
    }
    status.update(over)
    return status


def test_status_text_is_short_aligned_lines() -> None:
    text = render(_status(), NOW)
    lines = text.splitlines()
    assert all(len(line) <= 100 for line in lines), max(lines, key=len)
    head = lines[: lines.index("")]
    # The values of the first block start in one column.
    columns = {len(line) - len(line.split("  ", 1)[1].lstrip()) for line in head}
    assert len(columns) == 1, head
    keys = [line.split()[0] for line in head]
    assert keys == [
        "node",
        "mount",
        "data",
        "peers",
        "page",
        "volume",
        "sync",
        "collection",
        "conflicts",
    ]
    assert "/home/u/shared (read-write)" in text
    assert "held back by gamma (40 operations behind, last seen 3h 00m ago)" in text
    assert "1 conflict copy: /notes.conflict-beta-20261201-101010.txt" in text
    assert "behind: 5 operations" in text
    assert "{" not in text, "raw Python reprs in the status text"
    assert "[" not in text, "raw Python reprs in the status text"


def test_status_text_has_one_row_per_peer_with_what_each_lacks() -> None:
    lines = render(_status(), NOW).splitlines()
    beta = next(line for line in lines if line.startswith("beta"))
    assert "efefefef" in beta
    assert "connected" in beta
    assert "2s ago" in beta
    assert "5 ops to get, 2 ops it lacks" in beta
    unreachable = next(line for line in lines if "10.0.0.5:7654" in line and "unreachable" in line)
    assert "never" in unreachable
    assert any("connection refused" in line for line in lines)


def test_status_text_while_catching_up_shows_progress_and_eta() -> None:
    catching = {
        "operations_done": 400,
        "operations_total": 1000,
        "fraction": 0.4,
        "eta_s": 90.0,
        "blocks_fetched": 3,
        "bytes_fetched": 10,
        "seconds": 60.0,
    }
    text = render(_status(catching_up=catching, peers=[]), NOW)
    assert "catching up: 40%, 400 of 1,000 operations, about 1m 30s left" in text
    assert "no peers yet" in text
