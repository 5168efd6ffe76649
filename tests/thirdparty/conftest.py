"""Where the public file system suites are, built by .ci/setup.

`.ci/setup` builds pjdfstest and fsx out of tree, from the read-only sources in
`../shared/third_party` (or `$DFS_PEER_THIRD_PARTY`), into
`.build/third_party`. A checkout without those sources cannot run them: the
tests then say so and skip, except in CI (`CI` set), where that is a failure,
so CI never passes without having run them.
"""

from __future__ import annotations

import faulthandler
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

# Real nodes as the mount tests start them (one node alone, no mDNS).
from tests.mount.conftest import make_node, secret_file, secret_text

__all__ = ["make_node", "secret_file", "secret_text"]

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / ".build" / "third_party"


def sources() -> Path:
    return Path(os.environ.get("DFS_PEER_THIRD_PARTY") or REPO.parent / "shared" / "third_party")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def unavailable(reason: str) -> None:
    """Skip with `reason` on a developer's machine; fail in CI."""
    if in_ci():
        pytest.fail(f"{reason} (CI must run the public suites)", pytrace=False)
    pytest.skip(reason)


@dataclass(frozen=True)
class Suites:
    pjdfstest_tests: Path  # prove -r this folder
    fsx: Path


@pytest.fixture(scope="session")
def suites() -> Suites:
    built = Suites(BUILD / "pjdfstest" / "tests", BUILD / "fsx" / "fsx")
    if (built.pjdfstest_tests.parent / "pjdfstest").exists() and built.fsx.exists():
        return built
    src = sources()
    if not (src / "build.sh").exists():
        unavailable(
            f"the public suites' sources are not at {src} (shared/third_party beside the "
            "checkout, or set DFS_PEER_THIRD_PARTY), so pjdfstest and fsx cannot be built"
        )
    pytest.fail(
        f"pjdfstest and fsx are not built in {BUILD}: run .ci/setup (it runs {src}/build.sh)",
        pytrace=False,
    )
    raise AssertionError("unreachable")


@pytest.fixture
def as_root() -> None:
    """pjdfstest switches to other uids and gids: it needs root."""
    if os.geteuid() != 0:
        unavailable("pjdfstest needs root (it switches uids); CI runs as root")


def allow_long_run(seconds: float) -> None:
    """This test runs longer than pyproject's `faulthandler_timeout`: dump the
    stacks only if it is still running after `seconds` (pytest cancels it at the end)."""
    faulthandler.cancel_dump_traceback_later()
    faulthandler.dump_traceback_later(seconds, file=sys.stderr)
