"""Type=notify: READY=1 reaches the service manager once the mount answers,
STOPPING=1 when it stops; the node unmounts cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from scenarios.harness import NodeProcess, is_mounted

pytestmark = pytest.mark.mount


def test_ready_is_sent_once_the_mount_answers(
    make_node: Callable[..., NodeProcess], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(str(tmp_path / "notify"))
        manager.settimeout(30)
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        node = make_node().start(wait=False)
        message = manager.recv(4096).decode()
        assert message.splitlines()[0] == "READY=1"
        assert f"STATUS=mounted at {node.mountpoint}" in message
        # By then the mount is there and answers.
        assert is_mounted(node.mountpoint)
        assert os.listdir(node.mountpoint) == []
        assert node.stop(signal.SIGTERM) == 0
        assert manager.recv(4096) == b"STOPPING=1"
        assert not is_mounted(node.mountpoint)
