"""`status` and the other commands find the running node by themselves."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from scenarios.harness import NodeProcess, dfs_peer_command

pytestmark = pytest.mark.mount


@pytest.fixture(autouse=True)
def own_homes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A data home and a runtime dir of this test's own: nodes of other tests
    (or of the machine) must not count."""
    for var, name in (("XDG_DATA_HOME", "home"), ("DFS_PEER_RUNTIME_DIR", "run")):
        (tmp_path / name).mkdir(mode=0o700)
        monkeypatch.setenv(var, str(tmp_path / name))


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*dfs_peer_command(), *args], capture_output=True, text=True, timeout=60)


def test_status_finds_the_only_running_node_and_reads_at_a_glance(
    node: NodeProcess,
) -> None:
    (node.mountpoint / "f").write_text("x")
    out = _run("status")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"node        {node.status()['short_id']} alpha, up ")
    assert f"mount       {node.mountpoint} (read-write)" in lines
    assert all(len(line) <= 120 for line in lines), out.stdout
    assert "{" not in out.stdout, out.stdout
    assert "conflicts   none" in lines
    # The other commands find it the same way.
    gc = _run("gc", "--json")
    assert gc.returncode == 0, gc.stderr
    assert "blocks_freed" in json.loads(gc.stdout)
    history = _run("history", str(node.mountpoint / "f"))
    assert history.returncode == 0, history.stderr
    assert "1 version(s)" in history.stdout


def test_status_with_several_nodes_says_which_data_dir_to_pass(
    make_node: Callable[..., NodeProcess],
) -> None:
    a = make_node("alpha").start()
    b = make_node("beta").start()
    out = _run("status")
    assert out.returncode != 0
    assert out.stderr.count("\n") == 1, out.stderr
    assert f"--data-dir {a.data_dir}" in out.stderr
    assert f"--data-dir {b.data_dir}" in out.stderr
    chosen = _run("status", "--json", "--data-dir", str(b.data_dir))
    assert json.loads(chosen.stdout)["name"] == "beta"


def test_a_node_under_the_data_home_is_found_without_a_record(
    make_node: Callable[..., NodeProcess], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = make_node()
    # A short tag: the control socket's path must fit in 107 bytes, and under
    # xdist tmp_path is longer by popen-gwN/.
    node.data_dir = tmp_path / "home" / "dfs-peer" / "tag"
    node.start()
    # No record: another runtime dir than the node's.
    (tmp_path / "run2").mkdir()
    monkeypatch.setenv("DFS_PEER_RUNTIME_DIR", str(tmp_path / "run2"))
    out = _run("status", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["data_dir"] == str(node.data_dir)


def test_status_without_a_node_says_what_to_do(tmp_path: Path) -> None:
    out = _run("status")
    assert out.returncode != 0
    assert out.stderr.strip() == (
        "dfs-peer: no dfs-peer node is running here: start one with `dfs-peer join`, "
        "or name the data dir of one with --data-dir."
    )


def test_a_record_left_by_a_killed_node_is_ignored(node: NodeProcess) -> None:
    records = list(Path(os.environ["DFS_PEER_RUNTIME_DIR"]).glob("*.json"))
    assert len(records) == 1
    node.kill()
    out = _run("status")
    assert out.returncode != 0
    assert "no dfs-peer node is running here" in out.stderr
    assert not records[0].exists()
