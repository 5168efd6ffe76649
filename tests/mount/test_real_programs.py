"""Real programs on one mount and across two nodes: they must not notice.

git (clone of a repository with history, gc, fsck), SQLite (two writer
processes at once, integrity_check), rsync -a (in and back out, modes and
times compared), tar x, and an editor's save (temporary file, fsync, rename
over) taking turns between two nodes. Each one's result must also reach the
other node whole.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from scenarios.harness import wait_for
from scenarios.trees import Tree, diff, snapshot

pytestmark = pytest.mark.mount

CONVERGE_S = 60.0
GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.invalid",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.invalid",
    "GIT_CONFIG_NOSYSTEM": "1",
}


def run(*cmd: str | Path, cwd: Path | None = None, home: Path | None = None) -> str:
    env = dict(os.environ, **GIT_ENV, HOME=str(home or cwd or "/nonexistent"))
    out = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def converged(a: Path, b: Path) -> None:
    """Wait until `b` shows exactly the tree `a` shows (kinds, modes, contents)."""
    seen: dict[str, Tree] = {}

    def same() -> bool:
        try:
            seen["a"], seen["b"] = snapshot(a), snapshot(b)
        except OSError:
            return False  # an entry changed under the walk: look again
        return seen["a"] == seen["b"]

    try:
        wait_for(same, CONVERGE_S, f"{b} to show what {a} shows", interval=0.2)
    except AssertionError:
        pytest.fail(diff(seen) or "trees never readable", pytrace=False)


def times_and_modes(root: Path) -> dict[str, tuple[int, int, int]]:
    """path -> (st_mode, mtime in ns, size) for everything under `root`."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath, name)
            st = os.lstat(path)
            size = st.st_size if stat.S_ISREG(st.st_mode) else 0
            out[str(path.relative_to(root))] = (st.st_mode, st.st_mtime_ns, size)
    return out


def sample_tree(root: Path) -> None:
    """Files of several sizes, modes and times, nested dirs, a symlink, an empty dir."""
    (root / "src" / "deep" / "er").mkdir(parents=True)
    (root / "empty").mkdir()
    for i in range(12):
        (root / "src" / f"f{i}.txt").write_text(f"line {i}\n" * (i * 37 + 1))
    (root / "src" / "deep" / "big.bin").write_bytes(os.urandom(400_000))
    (root / "src" / "deep" / "er" / "exact.bin").write_bytes(os.urandom(128 * 1024))
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(root / "run.sh", 0o755)
    os.chmod(root / "src" / "f3.txt", 0o600)
    os.chmod(root / "src" / "deep", 0o750)
    os.symlink("src/f1.txt", root / "link")
    # Times in the past: rsync compares whole seconds, so a symlink made in the
    # same second as its copy would keep the copy's own time.
    for i, path in enumerate(sorted(root.rglob("*"))):
        ns = (1_600_000_000_000_000_000 + i, 1_600_000_000_123_456_789 + i * 1000)
        os.utime(path, ns=ns, follow_symlinks=False)
    os.utime(root, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))


# -- git -------------------------------------------------------------------------------


def make_history(repo: Path) -> int:
    """A repository on local disk with branches, merges, renames and a binary file."""
    repo.mkdir()
    run("git", "init", "-q", "-b", "main", cwd=repo)
    commits = 0
    for i in range(15):
        (repo / f"file{i % 5}.txt").write_text(f"revision {i}\n" * (i + 1))
        if i == 4:
            (repo / "data.bin").write_bytes(os.urandom(200_000))
        if i == 8:
            run("git", "mv", "file0.txt", "renamed.txt", cwd=repo)
        run("git", "add", "-A", cwd=repo)
        run("git", "commit", "-q", "-m", f"commit {i}", cwd=repo)
        commits += 1
    run("git", "checkout", "-q", "-b", "side", "HEAD~3", cwd=repo)
    (repo / "side.txt").write_text("side\n")
    run("git", "add", "side.txt", cwd=repo)
    run("git", "commit", "-q", "-m", "side", cwd=repo)
    run("git", "checkout", "-q", "main", cwd=repo)
    run("git", "merge", "-q", "--no-edit", "side", cwd=repo)
    return commits + 2  # the side commit and the merge


def test_git_clone_gc_fsck_on_one_node_and_on_the_other(
    pair: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = pair
    commits = make_history(tmp_path / "origin")
    run("git", "clone", "-q", "--no-hardlinks", tmp_path / "origin", a / "clone", cwd=tmp_path)
    clone_a = a / "clone"
    run("git", "gc", "-q", "--prune=now", cwd=clone_a)
    run("git", "fsck", "--full", "--strict", "--no-progress", cwd=clone_a)
    assert run("git", "rev-list", "--count", "HEAD", cwd=clone_a).strip() == str(commits)
    assert run("git", "status", "--porcelain", cwd=clone_a) == ""

    converged(a / "clone", b / "clone")
    clone_b = b / "clone"
    run("git", "fsck", "--full", "--strict", "--no-progress", cwd=clone_b)
    assert run("git", "status", "--porcelain", cwd=clone_b) == ""
    # and back: B commits and repacks, A checks
    (clone_b / "from-b.txt").write_text("b\n")
    run("git", "add", "from-b.txt", cwd=clone_b)
    run("git", "commit", "-q", "-m", "from b", cwd=clone_b)
    run("git", "gc", "-q", "--prune=now", cwd=clone_b)
    converged(b / "clone", a / "clone")
    run("git", "fsck", "--full", "--strict", "--no-progress", cwd=clone_a)
    assert run("git", "rev-list", "--count", "HEAD", cwd=clone_a).strip() == str(commits + 1)


# -- SQLite ------------------------------------------------------------------------------

WRITER = """
import sqlite3, sys
db, who, rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
con = sqlite3.connect(db, timeout=60)
con.execute("PRAGMA journal_mode=" + sys.argv[4])
for i in range(rows):
    with con:
        con.execute("INSERT INTO t (who, n, pad) VALUES (?, ?, ?)", (who, i, "x" * (i % 700)))
con.close()
"""


@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_sqlite_two_concurrent_writers_then_integrity_on_both_nodes(
    pair: tuple[Path, Path], journal: str
) -> None:
    a, b = pair
    db = a / "app.db"
    con = sqlite3.connect(db)
    con.execute(f"PRAGMA journal_mode={journal}")
    con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, who TEXT, n INTEGER, pad TEXT)")
    con.commit()
    con.close()
    rows = 300
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(db), who, str(rows), journal])
        for who in ("p", "q")
    ]
    assert [w.wait(timeout=300) for w in writers] == [0, 0]
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert con.execute("SELECT who, count(*) FROM t GROUP BY who ORDER BY who").fetchall() == [
        ("p", rows),
        ("q", rows),
    ]
    if journal == "wal":
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()  # the last connection: SQLite folds the WAL back and removes it

    def whole_on_b() -> bool:
        try:
            con_b = sqlite3.connect(f"file:{b / 'app.db'}?mode=ro", uri=True)
            try:
                ok = con_b.execute("PRAGMA integrity_check").fetchone() == ("ok",)
                return ok and con_b.execute("SELECT count(*) FROM t").fetchone() == (2 * rows,)
            finally:
                con_b.close()
        except sqlite3.DatabaseError:
            return False

    wait_for(whole_on_b, CONVERGE_S, "B to hold the whole database", interval=0.2)


# -- rsync and tar -----------------------------------------------------------------------


def test_rsync_in_and_back_out_keeps_modes_and_times_on_both_nodes(
    pair: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = pair
    src = tmp_path / "src"
    src.mkdir()
    sample_tree(src)
    want = times_and_modes(src)
    run("rsync", "-a", f"{src}/", f"{a / 'copy'}/")
    assert times_and_modes(a / "copy") == want
    converged(a / "copy", b / "copy")
    for name, mount in (("a", a), ("b", b)):
        back = tmp_path / f"back-{name}"
        run("rsync", "-a", f"{mount / 'copy'}/", f"{back}/")
        assert times_and_modes(back) == want, f"rsync back out of node {name}"
        assert snapshot(back) == snapshot(src), diff({"src": snapshot(src), name: snapshot(back)})
    # A second rsync finds nothing to send: sizes and times match exactly.
    out = run("rsync", "-a", "--itemize-changes", f"{src}/", f"{b / 'copy'}/")
    assert out == "", f"rsync found differences on node b:\n{out}"


def test_tar_x_on_one_node_shows_whole_on_the_other(
    pair: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = pair
    src = tmp_path / "src"
    src.mkdir()
    sample_tree(src)
    archive = tmp_path / "x.tar"
    run("tar", "--format=posix", "-C", src, "-cf", archive, ".")  # pax: times in ns
    (a / "x").mkdir()
    run("tar", "-C", a / "x", "-xpf", archive)
    want = times_and_modes(src)
    assert times_and_modes(a / "x") == want
    converged(a / "x", b / "x")
    assert times_and_modes(b / "x") == want
    assert snapshot(b / "x") == snapshot(src)


# -- an editor's save, taking turns ---------------------------------------------------------


def editor_save(path: Path, text: str) -> None:
    """Write a temporary file beside `path`, fsync it, rename it over `path`."""
    tmp = path.with_name(f".{path.name}.swp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def test_editor_saves_taking_turns_between_two_nodes(pair: tuple[Path, Path]) -> None:
    a, b = pair
    (a / "notes.txt").write_text("version 0\n")
    wait_for(lambda: (b / "notes.txt").exists(), CONVERGE_S, "B to see the file")
    text = "version 0\n"
    for turn in range(1, 9):
        here, there = (a, b) if turn % 2 else (b, a)
        # The editor reads the file as it is now on its node, then saves.
        assert (here / "notes.txt").read_text() == text
        text += f"version {turn} from {here.name}\n"
        editor_save(here / "notes.txt", text)

        def arrived(there: Path = there, text: str = text) -> bool:
            try:
                return (there / "notes.txt").read_text() == text
            except FileNotFoundError:
                return False

        wait_for(arrived, 15, f"save {turn} to reach {there.name}", interval=0.05)
    assert sorted(os.listdir(a)) == ["notes.txt"]
    assert sorted(os.listdir(b)) == ["notes.txt"]
