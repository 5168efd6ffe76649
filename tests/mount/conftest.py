"""Fixtures that run real `dfs-peer join` processes on real FUSE mounts.

Every node a test starts is stopped and unmounted in teardown, pass or fail.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from scenarios.harness import NodeProcess, free_port, new_secret

LONE = ["--no-mdns", "--listen", "127.0.0.1:0"]


@pytest.fixture(scope="session")
def secret_text() -> str:
    return new_secret()


@pytest.fixture
def secret_file(tmp_path: Path, secret_text: str) -> Path:
    path = tmp_path / "volume.secret"
    path.write_text(secret_text + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def make_node(tmp_path: Path, secret_file: Path) -> Iterator[Callable[..., NodeProcess]]:
    """Build (not start) nodes; all of them are stopped at teardown."""
    made: list[NodeProcess] = []

    def make(name: str = "alpha", extra: list[str] | None = None) -> NodeProcess:
        node = NodeProcess(
            secret_file=secret_file,
            data_dir=tmp_path / f"{name}-data",
            mountpoint=tmp_path / f"{name}-mnt",
            name=name,
            # One node alone: no multicast, and a free port of its own.
            extra=[*LONE, *(extra or [])],
        )
        made.append(node)
        return node

    yield make
    for node in made:
        node.stop()


@pytest.fixture
def node(make_node: Callable[..., NodeProcess]) -> NodeProcess:
    """One running node with its volume mounted."""
    return make_node().start()


@pytest.fixture
def mnt(node: NodeProcess) -> Path:
    return node.mountpoint


@pytest.fixture
def pair(make_node: Callable[..., NodeProcess]) -> tuple[Path, Path]:
    """Two running nodes of one volume, each the other's static peer on
    loopback: their mount points."""
    pa, pb = free_port(), free_port()
    a = make_node("a", ["--listen", f"127.0.0.1:{pa}", "--peer", f"127.0.0.1:{pb}"])
    b = make_node("b", ["--listen", f"127.0.0.1:{pb}", "--peer", f"127.0.0.1:{pa}"])
    a.start(wait=False)
    b.start()
    a.wait_mounted()
    return a.mountpoint, b.mountpoint
