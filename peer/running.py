"""Which nodes run on this machine, so `status` and the rest find one by themselves.

A node answers on the control socket in its data dir. Data dirs under the
default data home are found by looking there; a node started with
`--data-dir` elsewhere also leaves a small record in a runtime directory
(`$XDG_RUNTIME_DIR/dfs-peer/nodes`, or `/run/dfs-peer/nodes` as root) while it
runs. Invariant: a data dir counts as running only if its control socket
accepts a connection now; a record left by a node that died is ignored and
removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

CONTROL_NAME = "control.sock"  # peer.control.CONTROL_NAME, without importing the node


def data_home() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "dfs-peer"


def runtime_dirs() -> list[Path]:
    """Where running nodes may leave their records, the one they use first.

    A system service runs without $XDG_RUNTIME_DIR (so as root it writes to
    /run/dfs-peer) while a root login shell may have one: the command line
    looks in every one of them. $DFS_PEER_RUNTIME_DIR, if set, is the only one
    (tests use it to see their own nodes alone)."""
    own = os.environ.get("DFS_PEER_RUNTIME_DIR")
    if own:
        return [Path(own)]
    found: list[Path] = []
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and Path(xdg).is_dir():
        found.append(Path(xdg) / "dfs-peer" / "nodes")
    if os.geteuid() == 0:
        found.append(Path("/run/dfs-peer/nodes"))
    found.append(Path(f"/tmp/dfs-peer-{os.getuid()}/nodes"))
    return found


def runtime_dir() -> Path:
    """Where this process's node leaves its record."""
    return runtime_dirs()[0]


def answers(data_dir: Path) -> bool:
    """True if a node listens on the control socket of `data_dir` now."""
    path = data_dir / CONTROL_NAME
    if not path.is_socket():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def _record_path(data_dir: Path) -> Path:
    digest = hashlib.blake2b(os.fsencode(data_dir.resolve()), digest_size=8).hexdigest()
    return runtime_dir() / f"{digest}.json"


@contextlib.contextmanager
def registered(data_dir: Path, mountpoint: Path) -> Iterator[None]:
    """Leave a record that a node runs on `data_dir` while the block runs."""
    record: Path | None = _record_path(data_dir)
    assert record is not None
    try:
        record.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = record.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {"data_dir": str(data_dir), "mountpoint": str(mountpoint), "pid": os.getpid()}
            )
        )
        tmp.replace(record)
    except OSError:
        record = None  # found by the data home only
    try:
        yield
    finally:
        if record is not None:
            with contextlib.suppress(OSError):
                record.unlink()


def running_data_dirs() -> list[Path]:
    """The data dirs of every node that answers now, each once, sorted."""
    found: set[Path] = set()
    home = data_home()
    if home.is_dir():
        found.update(p.parent for p in home.glob(f"*/{CONTROL_NAME}"))
    for records in runtime_dirs():
        if not records.is_dir():
            continue
        for record in records.glob("*.json"):
            try:
                data_dir = Path(json.loads(record.read_text())["data_dir"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if answers(data_dir):
                found.add(data_dir)
            else:
                with contextlib.suppress(OSError):
                    record.unlink()  # its node died without cleaning up
    return sorted(p for p in found if answers(p))
