"""The systemd units shipped with the package, and sd_notify."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from peer import service
from scenarios.harness import dfs_peer_command

needs_systemd = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze missing (.ci/setup installs it)",
)


def _write_unit(tmp_path: Path, user: bool) -> Path:
    folder = tmp_path / ("user" if user else "system")
    out = subprocess.run(
        [*dfs_peer_command(), "units", *(["--user"] if user else []), "--write", str(folder)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    unit = folder / "dfs-peer@.service"
    assert f"wrote {unit}" in out.stdout
    return unit


@needs_systemd
@pytest.mark.parametrize("user", [False, True], ids=["system", "user"])
def test_units_pass_systemd_analyze_verify(tmp_path: Path, user: bool) -> None:
    unit = _write_unit(tmp_path, user)
    text = unit.read_text()
    lines = text.splitlines()
    assert "Type=notify" in lines
    assert "Restart=on-failure" in lines
    assert "ExecStopPost=-fusermount3 -u -z ${MOUNTPOINT}" in lines
    assert "KillSignal=SIGTERM" in lines
    start = next(line for line in lines if line.startswith("ExecStart="))
    executable = start.split("=", 1)[1].split()[0]
    assert os.path.isabs(executable)
    assert os.access(executable, os.X_OK)
    assert "WantedBy=default.target" in lines if user else "WantedBy=multi-user.target" in lines
    # An instance, as systemctl would load it (verify also checks ExecStart exists).
    instance = unit.with_name("dfs-peer@shared.service")
    instance.write_text(text)
    runtime = tmp_path / "runtime"  # the user manager wants one
    runtime.mkdir(mode=0o700)
    env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime), SYSTEMD_LOG_LEVEL="notice")
    for path in (unit, instance):
        out = subprocess.run(
            ["systemd-analyze", *(["--user"] if user else []), "verify", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert out.returncode == 0, out.stderr
        # Verify only warns about some mistakes (an unknown Type=): none allowed.
        assert out.stderr.strip() == "", out.stderr
        assert out.stdout.strip() == "", out.stdout


@needs_systemd
def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a unit whose command is missing is refused."""
    unit = _write_unit(tmp_path, False)
    text = unit.read_text()
    start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    broken = unit.with_name("dfs-peer@broken.service")
    broken.write_text(text.replace(start.split()[0], "ExecStart=/nonexistent/dfs-peer"))
    out = subprocess.run(
        ["systemd-analyze", "verify", str(broken)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0
    assert "/nonexistent/dfs-peer" in out.stderr


def test_units_without_write_prints_the_unit() -> None:
    out = subprocess.run(
        [*dfs_peer_command(), "units"], capture_output=True, text=True, timeout=30, check=True
    )
    assert out.stdout == service.unit_text(user=False, executable=service.this_executable())
    assert "EnvironmentFile=%E/dfs-peer/%i.conf" in out.stdout


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notify_sends_one_datagram_to_notify_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, abstract: bool
) -> None:
    name = f"@dfs-peer-test-{os.getpid()}" if abstract else str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name[1:] if abstract else name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", name)
        assert service.notify("READY=1\nSTATUS=mounted")
        assert sock.recv(4096) == b"READY=1\nSTATUS=mounted"


def test_notify_without_a_service_manager_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert service.notify("READY=1") is False
