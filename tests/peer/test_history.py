"""History in one process: a file's versions, the volume at a time, restores.

Real nodes (store, journal, volume, sync) over real HTTP on loopback, driven
through their Volumes as the FUSE adapter would; each node's clock is set by the
test, so every version has a known time.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from crdt.ops import ROOT
from fuse.errors import ReadOnly
from peer import cli
from peer.control import ask_node, control_server
from peer.fs.volume import ROOT_INODE
from peer.identity import load_or_create
from peer.keys import VolumeKeys
from peer.node import Node, NodeConfig
from peer.storage import history
from peer.storage.store import ReadOnlyStore
from tests.peer.test_sync import CALLER, link, read_file, running, wait_until, write_file

# 2023-11-14T22:13:20Z, and one version a minute after it: well in the past of
# the real clock, so a restore (stamped by the real clock) sorts after them.
T0 = 1_700_000_000_000
MINUTE = 60_000
KEEP_ALL_S = 20 * 365 * 86400.0


class FakeClock:
    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def make_node(tmp: Path, name: str, keys: VolumeKeys, clock_ms: int | None = T0 - 1) -> Node:
    """A node (as tests/peer/test_sync.py makes them) whose clock reads
    `clock_ms` until changed (None: the real clock) from its first op on: an
    HLC never goes back, so the clock is set before the node starts."""
    data = tmp / f"{name}-data"
    data.mkdir()
    # T0 is years back: retention long enough and no thinning, so the listing
    # and restores here see every version (thinning: tests/peer/test_thinning.py).
    config = NodeConfig(
        mountpoint=tmp / f"{name}-mnt",
        data_dir=data,
        name=name,
        mdns=False,
        keep_history_s=KEEP_ALL_S,
        thin_history=(),
    )
    node = Node(config, keys, load_or_create(data))
    if clock_ms is not None:
        node.journal._now = FakeClock(clock_ms)
    node.start()
    return node


def set_clock(node: Node, ms: int) -> FakeClock:
    clock = node.journal._now
    assert isinstance(clock, FakeClock)
    clock.ms = ms
    return clock


def overwrite(node: Node, name: bytes, data: bytes) -> None:
    """Write `data` at offset 0 of an existing file (one new version if it grows)."""
    vol = node.volume
    inode = vol.lookup(ROOT_INODE, name).inode
    fh = vol.open(inode, os.O_RDWR, CALLER)
    vol.write(fh, 0, data)
    vol.release(fh)


def unlink(node: Node, name: bytes) -> None:
    node.volume.unlink(ROOT_INODE, name)


def write_versions(node: Node) -> FakeClock:
    """notes.txt: 'one' at T0, 'two!!' at T0+1m, 'three-3' at T0+2m; gone.txt
    made at T0 and deleted at T0+2m; later.txt made at T0+2m."""
    clock = set_clock(node, T0)
    write_file(node, b"notes.txt", b"one")
    write_file(node, b"gone.txt", b"deleted later")
    clock.ms = T0 + MINUTE
    overwrite(node, b"notes.txt", b"two!!")
    clock.ms = T0 + 2 * MINUTE
    overwrite(node, b"notes.txt", b"three-3")
    unlink(node, b"gone.txt")
    write_file(node, b"later.txt", b"made later")
    return clock


@pytest.fixture
def a(tmp_path: Path, keys: VolumeKeys) -> Iterator[Node]:
    """Node "a" after `write_versions`; closed at teardown."""
    node = make_node(tmp_path, "a", keys)
    try:
        write_versions(node)
        yield node
    finally:
        node.close()


def test_history_lists_every_version_with_time_node_and_size(a: Node) -> None:
    versions = history.history(a.replica, b"notes.txt", a.store.has_blocks)
    # a create alone makes no version: the file's first write does
    assert [(v.time_ms, v.size, v.kind) for v in versions] == [
        (T0, 3, "write"),
        (T0 + MINUTE, 5, "write"),
        (T0 + 2 * MINUTE, 7, "write"),
    ]
    assert {(v.node, v.node_name) for v in versions} == {(a.identity.short, "a")}
    assert [v.current for v in versions] == [False, False, True]
    assert all(v.available and not v.conflict for v in versions)
    assert versions[0].to_json()["time"] == "2023-11-14T22:13:20.000Z"
    assert versions[0].to_json()["unix"] == T0 / 1000


def test_history_of_a_deleted_file_needs_a_time_it_existed(a: Node) -> None:
    with pytest.raises(history.NoSuchPath, match=r"/gone\.txt does not exist"):
        history.history(a.replica, b"gone.txt", a.store.has_blocks)
    past = history.replica_at(a.store, a.keys, a.identity, T0 + MINUTE)
    versions = history.history(a.replica, b"gone.txt", a.store.has_blocks, past, T0 + MINUTE)
    assert [(v.kind, v.size) for v in versions] == [("write", 13), ("delete", 13)]
    with pytest.raises(history.NotAFile, match="is a directory"):
        history.history(a.replica, b"", a.store.has_blocks)


def test_a_version_whose_blocks_are_gone_is_marked_unavailable(a: Node) -> None:
    entry = history.resolve(a.replica, b"notes.txt")
    assert entry is not None
    v1 = min(h for h, v in a.replica.contents.versions.items() if v.entry == entry)
    collected = a.replica.block_map(v1)[0]

    def held(ids: Iterable[bytes]) -> set[bytes]:
        return a.store.has_blocks(ids) - {collected}

    versions = history.history(a.replica, b"notes.txt", held)
    assert [v.available for v in versions] == [False, True, True]


def test_the_past_replica_holds_exactly_the_ops_up_to_the_time(a: Node) -> None:
    past = history.replica_at(a.store, a.keys, a.identity, T0 + MINUTE + 30_000)
    names = {name for name, _ in past.listing(ROOT)}
    assert names == {b"notes.txt", b"gone.txt"}  # later.txt not yet, gone.txt not yet gone
    notes = history.resolve(past, b"notes.txt")
    assert notes is not None
    view = past.entry(notes)
    assert view is not None
    assert (view.size, view.version and view.version.wall_ms) == (5, T0 + MINUTE)
    # the same as a replica given those ops and no others
    assert history.replica_at(a.store, a.keys, a.identity, 10**15).snapshot() == (
        a.replica.snapshot()
    )
    assert history.replica_at(a.store, a.keys, a.identity, T0 - 1).snapshot() == {}


def test_an_at_node_shows_the_past_read_only_and_writes_nothing(a: Node, keys: VolumeKeys) -> None:
    config = replace(a.config, read_only=True, at_ms=T0 + 30_000)
    past = Node(config, keys, load_or_create(a.config.data_dir))
    try:
        assert isinstance(past.store, ReadOnlyStore)
        past.start()
        assert read_file(past, b"notes.txt") == b"one"
        assert read_file(past, b"gone.txt") == b"deleted later"
        assert read_file(past, b"later.txt") is None
        with pytest.raises(ReadOnly):
            past.volume.create(ROOT_INODE, b"new", 0o644, os.O_RDWR, CALLER)
        # the live node beside it goes on writing, the past stays put
        overwrite(a, b"notes.txt", b"four-4-4")
        assert read_file(a, b"notes.txt") == b"four-4-4"
        assert read_file(past, b"notes.txt") == b"one"
    finally:
        past.close()
    assert a.replica.members() == {a.identity.node_id: "a"}  # no member op from the past


def test_an_at_node_leaves_the_store_bytes_unchanged(tmp_path: Path, keys: VolumeKeys) -> None:
    a = make_node(tmp_path, "a", keys)
    write_versions(a)
    a.close()
    files = sorted(p for p in a.config.data_dir.iterdir() if p.is_file())
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    config = replace(a.config, read_only=True, at_ms=T0 + MINUTE)
    past = Node(config, keys, load_or_create(a.config.data_dir))
    try:
        past.start()
        assert read_file(past, b"notes.txt") == b"two!!"
        for name in (b"gone.txt", b"later.txt", b"new-name"):
            read_file(past, name)  # lookups hand out inode numbers: in memory only
    finally:
        past.close()
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    assert after == before


@pytest.mark.asyncio
async def test_restore_on_another_node_brings_back_the_old_content_everywhere(
    tmp_path: Path, keys: VolumeKeys
) -> None:
    a, b = make_node(tmp_path, "a", keys), make_node(tmp_path, "b", keys, clock_ms=None)
    async with running(a, b) as (sa, sb), control_server(b):
        # A writes its history first: once A sees B's (real-time) stamps its
        # clock would follow them
        big = os.urandom(300_000)  # three blocks; the restore must reuse them
        set_clock(a, T0)
        write_file(a, b"big.bin", big)
        write_versions(a)
        set_clock(a, T0 + 3 * MINUTE)
        overwrite(a, b"big.bin", b"small now")
        # A's clock back to the present: it takes no op stamped further
        # ahead of it than crdt.clock.MAX_AHEAD_MS (B's are real-time).
        set_clock(a, time.time_ns() // 1_000_000)
        link(sb, sa)
        await wait_until(lambda: read_file(b, b"later.txt") == b"made later", "B to sync")
        await wait_until(lambda: read_file(b, b"big.bin") == b"small now" + big[9:], "B big")

        # B lists A's versions
        listed = await ask_node(b.config.data_dir, "GET", "/history", params=_q("notes.txt"))
        assert [v["size"] for v in listed["versions"]] == [3, 5, 7]
        assert {v["node_name"] for v in listed["versions"]} == {"a"}

        blocks_before = b.store.stats().blocks
        answer = await ask_node(
            b.config.data_dir, "POST", "/restore", body=_body("notes.txt", T0 + 30_000)
        )
        assert answer["created"] is False
        assert answer["size"] == 3
        assert read_file(b, b"notes.txt") == b"one"
        await wait_until(lambda: read_file(a, b"notes.txt") == b"one", "A to see the restore")
        await ask_node(b.config.data_dir, "POST", "/restore", body=_body("big.bin", T0))
        assert read_file(b, b"big.bin") == big
        assert b.store.stats().blocks == blocks_before  # the same blocks, no copies
        await wait_until(lambda: read_file(a, b"big.bin") == big, "A to see big.bin back")

        # a deleted file comes back at its path, as a new file
        answer = await ask_node(
            b.config.data_dir, "POST", "/restore", body=_body("gone.txt", T0 + MINUTE)
        )
        assert answer["created"] is True
        await wait_until(lambda: read_file(a, b"gone.txt") == b"deleted later", "A gone.txt")

        # the history now ends with the restore, a version by B
        listed = await ask_node(b.config.data_dir, "GET", "/history", params=_q("notes.txt"))
        last = listed["versions"][-1]
        assert (last["size"], last["node_name"], last["current"]) == (3, "b", True)
        assert a.journal.vv == b.journal.vv


@pytest.mark.asyncio
async def test_restore_refuses_what_it_cannot_do_with_one_clear_line(
    tmp_path: Path, keys: VolumeKeys
) -> None:
    a = make_node(tmp_path, "a", keys)
    async with running(a), control_server(a):
        write_versions(a)
        a.volume.mkdir(ROOT_INODE, b"dir", 0o755, CALLER)
        d = a.config.data_dir
        cases = {
            ("notes.txt", T0 - 1): "nothing was at /notes.txt at 2023-11-14T22:13:19.999Z",
            ("later.txt", T0 + MINUTE): "nothing was at /later.txt",
            ("dir", 10**13): "/dir is a directory: history and restore work on files only",
            ("/elsewhere/x", T0): "/elsewhere/x is not inside the mount",
        }
        for (path, at), message in cases.items():
            with pytest.raises(history.NodeAnswered, match=re.escape(message)):
                await ask_node(d, "POST", "/restore", body=_body(path, at))
        with pytest.raises(history.NodeAnswered, match="/nope does not exist in the volume now"):
            await ask_node(d, "GET", "/history", params=_q("nope"))


@pytest.mark.asyncio
async def test_paths_inside_the_mount_name_files_of_the_volume(
    tmp_path: Path, keys: VolumeKeys
) -> None:
    a = make_node(tmp_path, "a", keys)
    async with running(a), control_server(a):
        write_versions(a)
        mount = str(a.config.mountpoint)
        for path, cwd in (
            (f"{mount}/notes.txt", "/"),
            ("notes.txt", mount),
            ("notes.txt", "/somewhere/else"),
            ("./x/../notes.txt", "/"),
        ):
            params = {"path": path, "cwd": cwd}
            listed = await ask_node(a.config.data_dir, "GET", "/history", params=params)
            assert listed["path"] == "/notes.txt", (path, cwd)


@pytest.mark.asyncio
async def test_cli_history_and_restore_print_a_table_json_and_one_line(
    tmp_path: Path,
    keys: VolumeKeys,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a = make_node(tmp_path, "a", keys)
    monkeypatch.chdir(tmp_path)
    async with running(a), control_server(a):
        write_versions(a)
        d = str(a.config.data_dir)
        assert await asyncio.to_thread(cli.main, ["history", "notes.txt", "--data-dir", d]) == 0
        lines = capfd.readouterr().out.splitlines()
        assert lines[0] == "/notes.txt: 3 version(s), oldest first"
        assert lines[1].split() == ["TIME", "(UTC)", "NODE", "BYTES", "WHAT"]
        assert lines[2].split() == ["2023-11-14T22:13:20.000Z", a.identity.short, "a", "3", "write"]
        assert lines[4].split()[-2:] == ["write,", "current"]

        assert (
            await asyncio.to_thread(cli.main, ["history", "notes.txt", "--json", "--data-dir", d])
            == 0
        )
        listed = json.loads(capfd.readouterr().out)
        assert [v["size"] for v in listed] == [3, 5, 7]

        at = "2023-11-14T22:14:00Z"
        assert (
            await asyncio.to_thread(cli.main, ["restore", "notes.txt", "--at", at, "--data-dir", d])
            == 0
        )
        assert capfd.readouterr().out == (
            "dfs-peer: restored /notes.txt with its content of 2023-11-14T22:13:20.000Z (3 bytes)\n"
        )
        assert read_file(a, b"notes.txt") == b"one"

        code = await asyncio.to_thread(cli.main, ["restore", "dir", "--at", "@0", "--data-dir", d])
        assert code == 1
        assert capfd.readouterr().err == (
            "dfs-peer: nothing was at /dir at 1970-01-01T00:00:00.000Z: check the path and "
            "the time (`dfs-peer history` lists a file's versions).\n"
        )
        code = await asyncio.to_thread(
            cli.main, ["restore", "x", "--at", "yesterday", "--data-dir", d]
        )
        assert code == 1
        assert capfd.readouterr().err.startswith(
            "dfs-peer: 'yesterday' is not a time: use ISO 8601"
        )
    code = await asyncio.to_thread(cli.main, ["history", "notes.txt", "--data-dir", d])
    assert code == 1
    assert capfd.readouterr().err.startswith(f"dfs-peer: no dfs-peer node is running for {d}")


def _q(path: str) -> dict[str, str]:
    return {"path": path, "cwd": "/"}


def _body(path: str, at_ms: int) -> dict[str, object]:
    return {"path": path, "cwd": "/", "at_ms": at_ms}


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0", 0), ("90s", 90), ("10m", 600), ("12h", 43200), ("7d", 604800), ("2w", 1209600)],
)
def test_keep_history_durations(text: str, seconds: float) -> None:
    assert history.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "7", "-1d", "7 days", "1y", "d"])
def test_bad_durations_say_what_is_accepted(text: str) -> None:
    with pytest.raises(history.BadDuration, match=r"use 0 .* 90s, 10m, 12h, 7d, 2w"):
        history.parse_duration(text)


NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("2026-11-25T14:00:00Z", 1_795_615_200_000),
        ("2026-11-25T15:00:00+01:00", 1_795_615_200_000),
        ("2026-11-25T14:00:00.250Z", 1_795_615_200_250),
        ("@1795615200", 1_795_615_200_000),
        ("@1795615200.5", 1_795_615_200_500),
        ("-10m", 1_800_000_000_000 - 600_000),
        ("-2h", 1_800_000_000_000 - 7_200_000),
        ("-1d", 1_800_000_000_000 - 86_400_000),
    ],
)
def test_times(text: str, ms: int) -> None:
    assert history.parse_time(text, NOW) == ms


def test_a_time_without_zone_is_local_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    try:
        assert history.parse_time("2026-11-25T15:00:00", NOW) == 1_795_615_200_000
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.parametrize("text", ["yesterday", "", "-10", "@x", "2026-13-01"])
def test_bad_times_say_what_is_accepted(text: str) -> None:
    with pytest.raises(history.BadTime, match="is not a time: use ISO 8601"):
        history.parse_time(text, NOW)


def test_cli_refuses_at_without_read_only(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "m").mkdir()
    code = cli.main(["join", "--secret", "x", "--at", "-1h", str(tmp_path / "m")])
    assert code == 1
    assert capfd.readouterr().err == (
        "dfs-peer: --at mounts the volume as it was, which cannot be written: add --read-only.\n"
    )
    code = cli.main(["join", "--secret", "x", "--keep-history", "1y", str(tmp_path / "m")])
    assert code == 1
    assert "--keep-history '1y': not a duration" in capfd.readouterr().err
