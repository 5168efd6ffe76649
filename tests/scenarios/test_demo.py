"""`make demo` (python -m scenarios.demo): three live nodes until Ctrl-C, then nothing left."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scenarios.harness import _die_with_parent, is_mounted

pytestmark = [pytest.mark.scenario, pytest.mark.mount, pytest.mark.slow]


def test_demo_runs_three_synced_mounts_until_ctrl_c_then_removes_everything() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "scenarios.demo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_die_with_parent,  # Ctrl-C reaches it even if pytest ignores SIGINT
    )
    out: list[str] = []
    mounts: list[Path] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            out.append(line)
            if m := re.search(r"node [A-Z]: mount (\S+)", line):
                mounts.append(Path(m.group(1)))
            if "Ctrl-C stops the nodes" in line:
                break
            assert time.monotonic() < deadline, "".join(out)
        assert len(mounts) == 3, "".join(out)
        (mounts[0] / "from-a.txt").write_text("written on A")
        deadline = time.monotonic() + 10
        shown = mounts[2] / "from-a.txt"
        while not (shown.exists() and shown.read_text() == "written on A"):
            assert time.monotonic() < deadline, "C never showed A's file"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, "".join(out) + rest
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(60)
    for mount in mounts:
        assert not is_mounted(mount)
        assert not os.path.exists(mount.parent.parent), "the demo's work dir was left behind"
