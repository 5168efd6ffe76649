"""pjdfstest, in full, on a live mount of a real node started as CI starts it.

As root, `dfs-peer join` mounts with `allow_other,default_permissions` (see
fuse/mount.py), which is what pjdfstest needs: it switches to other uids and
checks the kernel's permission decisions against the modes we report. The test
fails on any failing assertion outside `link/` (hard links are refused on
purpose) that the README's "Known pjdfstest failures" does not list with its
reason, and on any file that stopped early. Known failures that now pass are
printed, so the list can be shortened.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from scenarios.harness import NodeProcess
from tests.thirdparty.conftest import REPO, Suites, allow_long_run
from tests.thirdparty.pjdfstest import (
    EXEC,
    IGNORED_DIRS,
    by_directory,
    judge,
    known_failures,
    parse_prove,
    ranges,
)

pytestmark = [pytest.mark.mount, pytest.mark.slow]

README = REPO / "README.md"
# Two test files at a time: each file works in names of its own (random), so
# the results are those of a serial run (checked once: same failures with -j1),
# in about half the time.
JOBS = 2
PROVE_TIMEOUT_S = 1800


def _mounted_mode(node: NodeProcess) -> str:
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if fields[1] == os.path.realpath(node.mountpoint):
                return fields[3]
    raise AssertionError(f"{node.mountpoint} is not mounted")


def _verbose(tests: Path, names: list[str], cwd: Path) -> str:
    """The `not ok` lines of a few files, run again one by one, for the report."""
    out = subprocess.run(
        ["prove", "-v", *(str(tests / n) for n in names)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return "\n".join(line for line in out.stdout.splitlines() if line.startswith(("not ok", "/")))


@pytest.mark.timeout(PROVE_TIMEOUT_S + 120)
def test_pjdfstest_in_full_has_only_known_failures(
    suites: Suites, as_root: None, make_node: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    known = known_failures(README)  # before the long run: a malformed list fails at once
    allow_long_run(PROVE_TIMEOUT_S + 60)
    node = make_node("pjd").start()
    options = _mounted_mode(node).split(",")
    assert "allow_other" in options, options
    assert "default_permissions" in options, options
    work = node.mountpoint / "pjd"
    work.mkdir(mode=0o755)
    work.chmod(0o755)  # whatever the umask

    runner = tmp_path / "pjdfstest-exec.sh"
    runner.write_text(EXEC)
    started = time.monotonic()
    out = subprocess.run(
        ["prove", "-r", f"-j{JOBS}", "--exec", f"sh {runner}", str(suites.pjdfstest_tests)],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=PROVE_TIMEOUT_S,
    )
    took = time.monotonic() - started
    try:
        run = parse_prove(out.stdout, suites.pjdfstest_tests)
    except ValueError as exc:
        pytest.fail(f"{exc}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}", pytrace=False)
    verdict = judge(run, known)

    n_files = sum(1 for _ in suites.pjdfstest_tests.rglob("*.t"))
    outside = sum(len(r.failed) for r in run.failing.values() if r.directory not in IGNORED_DIRS)
    print(f"\npjdfstest ({took:.0f} s, prove -j{JOBS}): {run.summary}")
    print(f"failed: {run.failed_assertions()} ({outside} outside {', '.join(IGNORED_DIRS)}/)")
    print(by_directory(run) or "  none")
    if verdict.fixed:
        print(
            "known failures that passed (remove them from the README): "
            + "; ".join(f"{n} {ranges(v)}" for n, v in sorted(verdict.fixed.items()))
        )

    assert run.files == n_files, f"prove ran {run.files} of {n_files} test files"
    problems = [
        f"`{name}` {ranges(nums, ', ')}: failing, not in the README's known pjdfstest failures"
        for name, nums in sorted(verdict.unknown.items())
    ] + [f"{name}: {', '.join(p)}" for name, p in sorted(verdict.unknown_problems.items())]
    if problems:
        detail = _verbose(suites.pjdfstest_tests, sorted(verdict.unknown)[:10], work)
        pytest.fail("\n".join([*problems, "", detail]), pytrace=False)
