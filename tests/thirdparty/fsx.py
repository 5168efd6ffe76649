"""Running xfstests' fsx the way shared/third_party/README.md does, and reading it.

Shared by tests/thirdparty/test_fsx.py (20,000 operations, CI) and
benchmarks/fsx_long.py (100,000).
"""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SEED = 7
FSX_TIMEOUT_S = 900
# name in the mount -> fsx options besides -N/-S/-P
PASSES = {
    "fsx.dat": [],
    "fsx-direct.dat": ["-Z", "-R", "-W", "-r", "4096", "-w", "4096", "-t", "4096"],
}
# The fallocate modes fsx tries at start; each one the file system refuses is
# left out of the run (`main: filesystem does not support fallocate mode X,
# disabling!`), so a clean run would cover less.
FALLOCATE_MODES = (
    "0",
    "FALLOC_FL_KEEP_SIZE",
    "FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE",
    "FALLOC_FL_ZERO_RANGE",
)
_DISABLED = re.compile(r"^main: filesystem does not support (?P<what>.+?),? disabling!$", re.M)


@dataclass
class FsxPass:
    name: str
    returncode: int
    output: str
    seconds: float

    def verdict(self) -> str:
        """fsx's closing line (`All N operations completed A-OK!`), else its last line."""
        lines = self.output.strip().splitlines()
        done = [line for line in lines if "operations completed" in line]
        return (done or lines or ["(no output)"])[-1]

    def disabled(self) -> list[str]:
        return [m["what"] for m in _DISABLED.finditer(self.output)]


def run_fsx(
    fsx: Path,
    target: Path,
    logs: Path,
    options: list[str],
    ops: int,
    timeout: float = FSX_TIMEOUT_S,
) -> FsxPass:
    """One fsx pass of `ops` operations on `target` with the fixed seed."""
    logs.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    out = subprocess.run(
        [str(fsx), "-N", str(ops), "-S", str(SEED), "-P", str(logs), *options, str(target)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return FsxPass(target.name, out.returncode, out.stdout + out.stderr, time.monotonic() - started)


def completed(p: FsxPass, ops: int) -> bool:
    """fsx's own verdict: exit 0 and its closing line."""
    return p.returncode == 0 and f"All {ops} operations completed A-OK!" in p.output
