"""Real programs on the mount: they must not notice it is special."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from scenarios.harness import NodeProcess

pytestmark = pytest.mark.mount


def _git(cwd: Path, *args: str) -> str:
    env = dict(
        os.environ,
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@example.invalid",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@example.invalid",
        GIT_CONFIG_NOSYSTEM="1",
        HOME=str(cwd),
    )
    out = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, f"git {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_init_add_commit_then_fsck(mnt: Path) -> None:
    repo = mnt / "repo"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    for i in range(20):
        (repo / f"file{i}.txt").write_text(f"line {i}\n" * (i + 1))
    (repo / "sub").mkdir()
    (repo / "sub" / "deep.bin").write_bytes(os.urandom(300_000))
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "first")
    (repo / "file3.txt").write_text("changed\n")
    _git(repo, "commit", "-q", "-am", "second")
    _git(repo, "fsck", "--full", "--strict")
    assert _git(repo, "log", "--oneline").count("\n") == 2
    assert _git(repo, "status", "--porcelain") == ""


def test_sqlite_database_survives_restart_with_integrity(
    node: NodeProcess,
) -> None:
    db = node.mountpoint / "app.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    for batch in range(20):
        with con:
            con.executemany(
                "INSERT INTO t (v) VALUES (?)", [(f"row-{batch}-{i}" * 5,) for i in range(200)]
            )
    with con:
        con.execute("DELETE FROM t WHERE id % 3 = 0")
        con.execute("CREATE INDEX t_v ON t (v)")
    con.close()
    assert node.stop() == 0
    node.start()
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert con.execute("SELECT count(*) FROM t").fetchone() == (4000 - 4000 // 3,)
    con.close()


def test_editor_style_save_replaces_file_atomically(mnt: Path) -> None:
    target = mnt / "notes.txt"
    target.write_text("version 1\n")
    for version in range(2, 6):
        tmp = mnt / f".notes.txt.swp{version}"
        with open(tmp, "w") as f:
            f.write(f"version {version}\n")
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, target)
        assert target.read_text() == f"version {version}\n"
    assert sorted(os.listdir(mnt)) == ["notes.txt"]


def test_tar_round_trip(mnt: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "f").write_bytes(os.urandom(200_000))
    (src / "top").write_text("top\n")
    os.symlink("top", src / "link")
    os.chmod(src / "top", 0o640)
    subprocess.run(["tar", "-C", str(src), "-cf", str(tmp_path / "x.tar"), "."], check=True)
    subprocess.run(["tar", "-C", str(mnt), "-xf", str(tmp_path / "x.tar")], check=True)
    assert (mnt / "a" / "b" / "f").read_bytes() == (src / "a" / "b" / "f").read_bytes()
    assert os.readlink(mnt / "link") == "top"
    assert (mnt / "top").stat().st_mode & 0o777 == 0o640
    out = subprocess.run(
        ["tar", "-C", str(mnt), "-cf", str(tmp_path / "y.tar"), "."], capture_output=True
    )
    assert out.returncode == 0, out.stderr
