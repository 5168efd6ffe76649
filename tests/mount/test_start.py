"""Starting a node: the first line says the mount is ready; a refused start
creates and changes nothing."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from scenarios.harness import NodeProcess, dfs_peer_command, is_mounted, wait_for

pytestmark = pytest.mark.mount


def _tree(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every file under `root` (the lock too): size, mtime, mode."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_mode)
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture
def taken_port() -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock, sock.getsockname()[1]
    sock.close()


def _join_on(
    port: int, secret_file: Path, data: Path, mnt: Path
) -> subprocess.CompletedProcess[str]:
    mnt.mkdir(exist_ok=True)
    return subprocess.run(
        [
            *dfs_peer_command(),
            "join",
            "--secret-file",
            str(secret_file),
            "--data-dir",
            str(data),
            "--no-mdns",
            "--listen",
            f"127.0.0.1:{port}",
            str(mnt),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_port_in_use_on_a_new_data_dir_creates_nothing(
    tmp_path: Path, secret_file: Path, taken_port: tuple[socket.socket, int]
) -> None:
    _, port = taken_port
    data = tmp_path / "new-data"
    out = _join_on(port, secret_file, data, tmp_path / "mnt")
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == [
        f"dfs-peer: the peer address 127.0.0.1:{port} is already in use (another node on "
        "this machine?): choose another with --listen HOST:PORT."
    ]
    assert not data.exists(), sorted(p.name for p in data.rglob("*"))
    assert not is_mounted(tmp_path / "mnt")


def test_port_in_use_on_an_existing_data_dir_changes_nothing(
    make_node: Callable[..., NodeProcess], taken_port: tuple[socket.socket, int]
) -> None:
    node = make_node().start()
    (node.mountpoint / "f").write_text("kept")
    ops = node.status()["operations"]
    node.stop()
    before = _tree(node.data_dir)
    _, port = taken_port
    out = _join_on(port, node.secret_file, node.data_dir, node.mountpoint)
    assert out.returncode != 0
    assert "in use" in out.stderr
    assert _tree(node.data_dir) == before
    # And the log holds no operation of the refused start.
    node.start()
    assert node.status()["operations"] == ops
    assert f"replayed ops={ops} " in node.log_text()


def test_first_line_a_node_prints_says_its_mount_is_ready(
    make_node: Callable[..., NodeProcess],
) -> None:
    node = make_node().start()
    wait_for(lambda: "replayed ops=" in node.log_text(), 10, "the held-back start-up log")
    lines = node.log_text().splitlines()
    assert lines[0].startswith("dfs-peer: node "), lines[:5]
    assert "mounted volume" in lines[0]
    assert str(node.mountpoint) in lines[0]
    # The start-up story follows it, in order.
    assert any(" INFO peer.node: replayed ops=" in line for line in lines[1:])
