"""fsx's full run: 100,000 operations per pass on a live mount, then a second node.

The same two passes as tests/thirdparty/test_fsx.py (a normal one and an
O_DIRECT one, fixed seed), five times as long: too long for CI. Prints each
pass's time, fsx's closing line and what it turned off, then how long the
files took to reach node B byte for byte. Exits 1 if fsx found corruption or
B's copy differs.

    python -m benchmarks.fsx_long [--ops 100000] [--seed 7]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from scenarios.harness import NodeProcess, free_port, new_secret, wait_for
from tests.thirdparty.conftest import BUILD
from tests.thirdparty.fsx import PASSES, completed, run_fsx

REPLICATE_TIMEOUT_S = 300.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=100_000)
    args = parser.parse_args()
    fsx = BUILD / "fsx" / "fsx"
    if not fsx.exists():
        print(f"no {fsx}: run .ci/setup (it builds the public suites)", file=sys.stderr)
        return 2
    ok = True
    with tempfile.TemporaryDirectory(prefix="dfs-fsx-") as tmp:
        base = Path(tmp)
        secret = base / "volume.secret"
        secret.write_text(new_secret() + "\n")
        secret.chmod(0o600)
        pa, pb = free_port(), free_port()
        nodes = [
            NodeProcess(
                secret_file=secret,
                data_dir=base / f"{name}-data",
                mountpoint=base / f"{name}-mnt",
                name=name,
                extra=["--no-mdns", "--listen", f"127.0.0.1:{me}", "--peer", f"127.0.0.1:{peer}"],
            )
            for name, me, peer in (("a", pa, pb), ("b", pb, pa))
        ]
        a, b = nodes
        try:
            a.start(wait=False)
            b.start()
            a.wait_mounted()
            for name, options in PASSES.items():
                p = run_fsx(fsx, a.mountpoint / name, base / "logs", options, args.ops, 4 * 3600)
                print(f"fsx {name}: {args.ops} ops in {p.seconds:.0f} s, exit {p.returncode}")
                print(f"  {p.verdict()}")
                print(f"  turned off: {', '.join(p.disabled()) or 'nothing'}")
                if not completed(p, args.ops):
                    print(p.output[-4000:])
                    ok = False
                    continue
                want = (a.mountpoint / name).read_bytes()
                started = time.monotonic()
                try:
                    wait_for(
                        lambda name=name, want=want: (
                            (b.mountpoint / name).exists()
                            and (b.mountpoint / name).read_bytes() == want
                        ),
                        REPLICATE_TIMEOUT_S,
                        f"{name} on node b",
                        interval=0.2,
                    )
                    print(f"  on node b byte for byte after {time.monotonic() - started:.1f} s")
                except AssertionError as exc:
                    print(f"  NOT on node b: {exc}")
                    ok = False
        finally:
            for node in nodes:
                node.stop()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
