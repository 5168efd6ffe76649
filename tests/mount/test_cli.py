"""User errors give one clear line, a non-zero exit, and change nothing on disk."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from scenarios.harness import NodeProcess, dfs_peer_command, is_mounted

pytestmark = pytest.mark.mount


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*dfs_peer_command(), *args], capture_output=True, text=True, timeout=60, env=env
    )


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "lock"
    }


def test_init_prints_one_secret_line_that_join_accepts(tmp_path: Path) -> None:
    out = _run("init")
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("dfs1-")


def test_help_explains_commands() -> None:
    out = _run("--help")
    assert out.returncode == 0
    for word in ("init", "join", "status"):
        assert word in out.stdout
    join = _run("join", "--help")
    assert "--secret-file" in join.stdout
    assert "--data-dir" in join.stdout


def test_remove_help_says_what_the_machine_keeps_and_loses(tmp_path: Path) -> None:
    out = _run("remove", "--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for words in ("name or the start of its id", "new volume keys", "stays readable"):
        assert words in text, text
    assert "remove NODE" in _run("--help").stdout
    alone = _run("remove", "laptop", "--data-dir", str(tmp_path))
    assert alone.returncode != 0
    assert len(alone.stderr.strip().splitlines()) == 1, alone.stderr


def test_wrong_secret_is_refused_and_changes_nothing(node: NodeProcess, tmp_path: Path) -> None:
    (node.mountpoint / "f").write_text("x")
    node.stop()
    before = _snapshot(node.data_dir)
    other = tmp_path / "other.secret"
    other.write_text(_run("init").stdout)
    out = _run(
        "join", "--secret-file", str(other), "--data-dir", str(node.data_dir), str(node.mountpoint)
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"dfs-peer: the secret does not open the volume in {node.data_dir} (wrong secret?)."
    ]
    assert not is_mounted(node.mountpoint)
    assert _snapshot(node.data_dir) == before


def test_mistyped_secret_is_caught(tmp_path: Path) -> None:
    text = _run("init").stdout.strip()
    typo = text[:-3] + ("a" if text[-3] != "a" else "b") + text[-2:]
    (tmp_path / "m").mkdir()
    out = _run("join", "--secret", typo, "--data-dir", str(tmp_path / "d"), str(tmp_path / "m"))
    assert out.returncode != 0
    assert out.stderr.startswith("dfs-peer: the secret text is mistyped")
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("case", ["missing", "not-empty", "file"])
def test_bad_mountpoint_is_refused(tmp_path: Path, secret_file: Path, case: str) -> None:
    mp = tmp_path / "mp"
    if case == "not-empty":
        mp.mkdir()
        (mp / "something").write_text("x")
    elif case == "file":
        mp.write_text("x")
    data = tmp_path / "data"
    out = _run("join", "--secret-file", str(secret_file), "--data-dir", str(data), str(mp))
    assert out.returncode != 0
    assert out.stderr.startswith("dfs-peer: ")
    assert len(out.stderr.strip().splitlines()) == 1
    assert str(mp) in out.stderr
    assert not data.exists()


def test_already_mounted_mountpoint_is_refused(node: NodeProcess, tmp_path: Path) -> None:
    out = _run(
        "join",
        "--secret-file",
        str(node.secret_file),
        "--data-dir",
        str(tmp_path / "d2"),
        str(node.mountpoint),
    )
    assert out.returncode != 0
    assert "already" in out.stderr
    assert not (tmp_path / "d2").exists()
    assert node.running()


def test_missing_fuse_device_is_reported(tmp_path: Path, secret_file: Path) -> None:
    # A private mount namespace where /dev/fuse is hidden by an empty tmpfs.
    (tmp_path / "mp").mkdir()
    script = (
        "mount -t tmpfs none /dev && "
        + " ".join(dfs_peer_command())
        + f" join --secret-file {secret_file} --data-dir {tmp_path / 'd'} {tmp_path / 'mp'}"
    )
    out = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "unshare failed" in out.stderr or "Operation not permitted" in out.stderr:
        pytest.skip(f"cannot make a mount namespace here: {out.stderr.strip()}")
    assert out.returncode != 0
    assert (
        out.stderr.strip().splitlines()
        == ["dfs-peer: /dev/fuse is missing: install fuse3 / load the fuse module"]
        or "/dev/fuse" in out.stderr
    )
    assert not (tmp_path / "d").exists()


def test_status_json_reports_the_node(node: NodeProcess) -> None:
    import json

    (node.mountpoint / "a").write_bytes(os.urandom(300_000))  # three distinct blocks
    out = _run("status", "--json", "--data-dir", str(node.data_dir))
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["name"] == node.name
    assert status["mountpoint"] == str(node.mountpoint)
    assert len(status["node_id"]) == 64
    assert status["files"] >= 1
    assert status["blocks"] >= 3
    assert status["operations"] >= 2
    assert status["store_bytes"] > 0


def test_status_without_a_running_node_says_so(tmp_path: Path) -> None:
    # Its own data home and record of running nodes: a node some other
    # program runs on this machine is not this test's business.
    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path), DFS_PEER_RUNTIME_DIR=str(tmp_path / "run"))
    out = _run("status", env=env)
    assert out.returncode != 0
    assert out.stderr.startswith("dfs-peer: ")


@pytest.mark.parametrize(
    ("code", "says"),
    [
        ("7-orbit", "is not a pairing code"),
        ("7-orbit-lanternn", "`lanternn` is not one of the words"),
    ],
)
def test_a_mistyped_code_is_caught_before_anything_is_sent(
    tmp_path: Path, code: str, says: str
) -> None:
    (tmp_path / "m").mkdir()
    out = _run(
        "join",
        "--code",
        code,
        "--peer",
        "127.0.0.1:9",
        "--data-dir",
        str(tmp_path / "d"),
        str(tmp_path / "m"),
    )
    assert out.returncode != 0
    assert len(out.stderr.splitlines()) == 1, out.stderr
    assert says in out.stderr
    assert not (tmp_path / "d").exists()


def test_a_code_takes_the_place_of_a_secret(tmp_path: Path, secret_file: Path) -> None:
    (tmp_path / "m").mkdir()
    out = _run(
        "join", "--code", "7-orbit-lantern", "--secret-file", str(secret_file), str(tmp_path / "m")
    )
    assert out.returncode != 0
    assert out.stderr.startswith("dfs-peer: --code takes the place of a secret")


def test_a_code_is_not_spent_on_a_busy_mountpoint(tmp_path: Path) -> None:
    """The mount point is checked before the inviter is contacted (none listens here)."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "f").write_text("x")
    out = _run("join", "--code", "7-orbit-lantern", "--peer", "127.0.0.1:9", str(tmp_path / "m"))
    assert out.returncode != 0
    assert "is not empty" in out.stderr


def test_invite_without_a_running_node_says_so(tmp_path: Path) -> None:
    out = _run("invite", "--data-dir", str(tmp_path))
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == [
        f"dfs-peer: no dfs-peer node is running for {tmp_path}: start one with `dfs-peer join`."
    ]
