"""fsx (xfstests' file system exerciser) on a live mount, then on a second node.

Two passes with a fixed seed, as shared/third_party/README.md runs them: a
normal one (buffered and mmap I/O, truncates, fallocate, copy_file_range) and
an O_DIRECT one. fsx checks every read against its own copy of the file and
exits non-zero at the first difference; then the second node, a real peer on
loopback, must hold both files byte for byte. The full 100,000-operation run
is `python -m benchmarks.fsx_long`, not CI.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from scenarios.harness import NodeProcess, free_port, new_secret, wait_for
from tests.thirdparty.conftest import Suites, allow_long_run
from tests.thirdparty.fsx import FALLOCATE_MODES, FSX_TIMEOUT_S, PASSES, FsxPass, completed, run_fsx

pytestmark = [pytest.mark.mount, pytest.mark.slow]

OPS = 20_000
REPLICATE_TIMEOUT_S = 60.0


@dataclass
class FsxRun:
    a: NodeProcess
    b: NodeProcess
    passes: list[FsxPass]


@pytest.fixture(scope="module")
def fsx_run(suites: Suites, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FsxRun]:
    """Both passes on node A's mount; node B is its peer on loopback."""
    base = tmp_path_factory.mktemp("fsx")
    secret = base / "volume.secret"
    secret.write_text(new_secret() + "\n")
    secret.chmod(0o600)
    pa, pb = free_port(), free_port()

    def node(name: str, port: int, peer: int) -> NodeProcess:
        return NodeProcess(
            secret_file=secret,
            data_dir=base / f"{name}-data",
            mountpoint=base / f"{name}-mnt",
            name=name,
            extra=["--no-mdns", "--listen", f"127.0.0.1:{port}", "--peer", f"127.0.0.1:{peer}"],
        )

    a, b = node("a", pa, pb), node("b", pb, pa)
    allow_long_run(2 * FSX_TIMEOUT_S + 120)
    try:
        a.start(wait=False)
        b.start()
        a.wait_mounted()
        passes = [
            run_fsx(suites.fsx, a.mountpoint / name, base / "logs", options, OPS)
            for name, options in PASSES.items()
        ]
        yield FsxRun(a, b, passes)
    finally:
        a.stop()
        b.stop()


@pytest.mark.timeout(2 * FSX_TIMEOUT_S + 180)
def test_fsx_passes_without_corruption_and_reaches_a_second_node(fsx_run: FsxRun) -> None:
    for p in fsx_run.passes:
        print(f"\nfsx {p.name}: {p.seconds:.0f} s, exit {p.returncode}: {p.verdict()}")
        print(f"  disabled: {', '.join(p.disabled()) or 'nothing'}")
        assert completed(p, OPS), f"fsx {p.name} failed:\n{p.output[-6000:]}"

    for p in fsx_run.passes:
        want = (fsx_run.a.mountpoint / p.name).read_bytes()
        theirs = fsx_run.b.mountpoint / p.name

        def arrived(theirs: Path = theirs, want: bytes = want) -> bool:
            try:
                return theirs.read_bytes() == want
            except FileNotFoundError:
                return False

        try:
            wait_for(arrived, REPLICATE_TIMEOUT_S, f"{p.name} on node b", interval=0.2)
        except AssertionError:
            got = theirs.read_bytes() if theirs.exists() else None
            digest = hashlib.sha256(got).hexdigest()[:16] if got is not None else "missing"
            pytest.fail(
                f"{p.name} differs on node b: {len(want)} bytes "
                f"{hashlib.sha256(want).hexdigest()[:16]} on a, "
                f"{len(got) if got is not None else 0} bytes {digest} on b",
                pytrace=False,
            )


def test_fsx_keeps_fallocate_punch_hole_and_zero_range(fsx_run: FsxRun) -> None:
    for p in fsx_run.passes:
        disabled = [m for m in FALLOCATE_MODES if f"fallocate mode {m}" in p.disabled()]
        assert not disabled, f"fsx {p.name} turned off fallocate modes: {', '.join(disabled)}"
