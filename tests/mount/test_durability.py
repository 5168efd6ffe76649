"""What a user wrote survives restarts and crashes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
from pathlib import Path

import pytest

from scenarios.harness import NodeProcess

pytestmark = pytest.mark.mount


def _tree(root: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = os.lstat(p)
            if os.path.islink(p):
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", st.st_mode & 0o7777)
            else:
                out[rel] = ("file", st.st_mode & 0o7777, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def test_restart_shows_the_same_tree(node: NodeProcess) -> None:
    mnt = node.mountpoint
    (mnt / "docs" / "deep").mkdir(parents=True)
    (mnt / "docs" / "deep" / "a.txt").write_text("alpha\n")
    (mnt / "docs" / "b.bin").write_bytes(os.urandom(400_000))
    os.symlink("docs/deep/a.txt", mnt / "shortcut")
    os.chmod(mnt / "docs" / "b.bin", 0o600)
    os.setxattr(mnt / "docs" / "b.bin", "user.tag", b"kept")
    (mnt / "gone").write_text("bye")
    (mnt / "gone").unlink()
    before = _tree(mnt)
    assert node.stop() == 0
    node.start()
    assert _tree(mnt) == before
    assert os.getxattr(mnt / "docs" / "b.bin", "user.tag") == b"kept"


def test_sigint_flushes_unmounts_and_exits_zero(node: NodeProcess) -> None:
    f = open(node.mountpoint / "open.txt", "wb")  # noqa: SIM115 - kept open across the stop
    f.write(b"buffered but not closed")
    f.flush()
    code = node.stop(signal.SIGINT)
    with contextlib.suppress(OSError):
        f.close()  # the mount is gone; the handle died with it
    assert code == 0
    node.start()
    assert (node.mountpoint / "open.txt").read_bytes() == b"buffered but not closed"


def test_kill_9_after_fsync_keeps_the_data(node: NodeProcess) -> None:
    path = node.mountpoint / "durable.bin"
    payload = os.urandom(1_000_000)
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, payload)
    os.fsync(fd)
    node.kill()  # SIGKILL right after fsync returned: no flush, no unmount
    with contextlib.suppress(OSError):
        os.close(fd)  # the file system is gone under this descriptor
    node.start()
    assert path.read_bytes() == payload


@pytest.mark.slow
def test_200_mib_file_round_trips_by_hash(node: NodeProcess) -> None:
    path = node.mountpoint / "big.bin"
    h = hashlib.sha256()
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for i in range(200):
            piece = chunk[i:] + chunk[:i]
            h.update(piece)
            f.write(piece)
    assert path.stat().st_size == 200 << 20
    node.stop()
    node.start()  # read after a restart: nothing comes from a page cache
    r = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(1 << 20):
            r.update(piece)
    assert r.hexdigest() == h.hexdigest()


def test_data_dir_holds_no_plaintext_name_or_content(node: NodeProcess) -> None:
    name = "very-secret-file-name-4f1c"
    content = b"the quarterly numbers are 4f1c-8a7e-plaintext " * 1000
    (node.mountpoint / "project-x-4f1c").mkdir()
    (node.mountpoint / "project-x-4f1c" / name).write_bytes(content)
    os.setxattr(node.mountpoint / "project-x-4f1c" / name, "user.label", b"xattr-4f1c-value")
    node.stop()
    needles = [name.encode(), b"project-x-4f1c", content[:40], b"xattr-4f1c-value", b"user.label"]
    for p in node.data_dir.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            for needle in needles:
                assert needle not in data, f"{needle!r} found in plaintext in {p}"
