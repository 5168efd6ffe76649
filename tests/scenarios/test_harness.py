"""The scenario harness's own parts, without nodes: tree diffs, log checks, the LAN."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from scenarios.cluster import is_bad_record, log_records
from scenarios.harness import _die_with_parent, wait_for
from scenarios.network import BridgeLan, can_use_namespaces
from scenarios.trees import diff, snapshot


def test_snapshot_records_what_a_user_sees(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir(mode=0o750)
    (tmp_path / "d" / "f").write_bytes(b"abc")
    os.chmod(tmp_path / "d", 0o750)
    os.symlink("d/f", tmp_path / "link")
    tree = snapshot(tmp_path)
    assert tree["d"].kind == "dir"
    assert tree["d"].mode == 0o750
    assert tree["d/f"].size == 3
    assert tree["d/f"].sha256 == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert tree["link"].target == "d/f"
    assert snapshot(tmp_path, contents=False)["d/f"].sha256 is None


def test_diff_says_what_differs_and_where(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        root.mkdir()
        (root / "same").write_text("x")
    (a / "only-a").write_text("1")
    (a / "changed").write_text("old")
    (b / "changed").write_text("new!")
    text = diff({"A": snapshot(a), "B": snapshot(b)})
    assert "only on A: only-a" in text
    assert "changed: A file 0644 3 B" in text
    assert "| B file 0644 4 B" in text
    assert "same" not in text
    assert diff({"A": snapshot(a), "A2": snapshot(a)}) == ""


def test_log_check_groups_a_traceback_with_its_record() -> None:
    log = (
        "2026-11-26 01:00:00,000 INFO peer.node: started\n"
        "dfs-peer: node mounted\n"
        "2026-11-26 01:00:01,000 WARNING zeroconf: Error with socket: Network is unreachable\n"
        "Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n'
        "OSError: [Errno 101] Network is unreachable\n"
        "2026-11-26 01:00:02,000 ERROR peer.server: error serving a peer\n"
        "2026-11-26 01:00:03,000 WARNING peer.sync: peer unreachable\n"
    )
    records = log_records(log)
    assert len(records) == 4
    assert "OSError" in records[1]
    assert [is_bad_record(r) for r in records] == [False, True, True, False]


def test_what_the_harness_starts_takes_ctrl_c_even_if_the_runner_ignores_it() -> None:
    """A shell runs background jobs (`make test &`) with SIGINT ignored, which
    every child inherits; `dfs-peer invite` and the demo must still stop on Ctrl-C."""
    show = "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        plain = subprocess.run([sys.executable, "-c", show], capture_output=True, text=True)
        ours = subprocess.run(
            [sys.executable, "-c", show],
            capture_output=True,
            text=True,
            preexec_fn=_die_with_parent,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    assert plain.stdout.strip() == "False"  # what the inherited SIG_IGN does
    assert ours.stdout.strip() == "True"


@pytest.mark.skipif(not can_use_namespaces()[0], reason=can_use_namespaces()[1])
def test_bridge_lan_connects_cuts_and_leaves_nothing(tmp_path: Path) -> None:
    lan = BridgeLan(tmp_path)
    server: subprocess.Popen[bytes] | None = None
    try:
        a, b = lan.add_host("A"), lan.add_host("B")
        listen = "import socket, sys\ns = socket.create_server((sys.argv[1], 7000))\nwhile True: s.accept()[0].close()"
        server = subprocess.Popen([*b.command_prefix(), sys.executable, "-c", listen, b.ip])
        connect = "import socket, sys; socket.create_connection((sys.argv[1], 7000), timeout=1)"

        def reaches_b() -> bool:
            cmd = [*a.command_prefix(), sys.executable, "-c", connect, b.ip]
            return subprocess.run(cmd, capture_output=True, check=False).returncode == 0

        wait_for(reaches_b, 10, "A to reach B")
        lan.cut(b)
        assert not reaches_b()
        lan.heal(b)
        wait_for(reaches_b, 10, "A to reach B again after the heal")
        assert lan.counters(a).total > 0
    finally:
        if server is not None:
            server.kill()
            server.wait()
        lan.close()
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    assert lan.prefix not in names
    assert lan.prefix not in links
