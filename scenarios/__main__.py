"""Run scenarios from the command line.

    python -m scenarios --list
    python -m scenarios two_nodes [partition_heal ...]
    python -m scenarios all
    python -m scenarios --cleanup     remove what runs killed outright left behind

Exit status: 0 all passed; 1 a scenario failed; 77 none failed but some were
skipped (they need root for network namespaces); 2 a usage error.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import FrameType

from scenarios.catalog import SCENARIOS, ScenarioSkipped, run_scenario
from scenarios.harness import HarnessError, mount_points
from scenarios.network import can_use_namespaces, remove_stale
from scenarios.report import duration

EXIT_FAILED = 1
EXIT_SKIPPED = 77


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m scenarios",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("names", nargs="*", metavar="NAME", help="scenarios to run, or `all`")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    p.add_argument(
        "--loopback",
        action="store_true",
        help="run on loopback with static peers even as root (skips those needing a real LAN)",
    )
    p.add_argument(
        "--keep", action="store_true", help="keep the work dir (data, logs) after a pass too"
    )
    p.add_argument(
        "--cleanup",
        action="store_true",
        help="remove namespaces, links and mounts left by runs that were killed outright",
    )
    return p


def _terminate(signum: int, frame: FrameType | None) -> None:
    # SIGTERM unwinds like Ctrl-C, through every teardown.
    raise KeyboardInterrupt


def _mounted_under(path: Path) -> bool:
    prefix = str(path.resolve()).rstrip("/") + "/"
    return any(mount.startswith(prefix) for mount in mount_points())


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.list:
        width = max(map(len, SCENARIOS))
        for s in SCENARIOS.values():
            needs = "  (needs root: namespaces)" if s.needs_real_lan else ""
            print(f"{s.name:<{width}}  {s.summary}{needs}")
        return 0
    if args.cleanup:
        if not can_use_namespaces()[0]:
            print("nothing to clean up without root")
            return 0
        removed = remove_stale()
        print("\n".join(removed) if removed else "nothing left behind by dead runs")
        return 0
    names = list(SCENARIOS) if args.names == ["all"] else args.names
    unknown = [n for n in names if n not in SCENARIOS]
    if not names or unknown:
        print(
            f"{'unknown scenario: ' + ', '.join(unknown) if unknown else 'name a scenario'} "
            f"(one of: {', '.join(SCENARIOS)}, or all)",
            file=sys.stderr,
        )
        return 2

    signal.signal(signal.SIGTERM, _terminate)
    results: list[tuple[str, str, float]] = []
    try:
        for name in names:
            results.append(_run_one(name, args.loopback, args.keep))
    except KeyboardInterrupt:
        print("\ninterrupted: everything started was stopped and removed", file=sys.stderr)
        return 130
    if len(results) > 1:
        print("\nsummary")
        for name, outcome, seconds in results:
            print(f"  {name:<16} {outcome:<8} {duration(seconds):>9}")
    outcomes = {outcome for _, outcome, _ in results}
    if "FAILED" in outcomes:
        return EXIT_FAILED
    if "SKIPPED" in outcomes:
        return EXIT_SKIPPED
    return 0


def _run_one(name: str, loopback: bool, keep: bool) -> tuple[str, str, float]:
    scenario = SCENARIOS[name]
    workdir = Path(tempfile.mkdtemp(prefix=f"dfs-scenario-{name}-"))
    started = time.monotonic()
    outcome = "FAILED"
    try:
        run_scenario(scenario, workdir, loopback=loopback)
        outcome = "passed"
    except ScenarioSkipped as exc:
        outcome = "SKIPPED"
        print(f"{name}: SKIPPED: {exc}")
    except HarnessError as exc:
        print(f"{name}: FAILED: {exc}")
    except AssertionError as exc:
        where = traceback.extract_tb(exc.__traceback__)[-1]
        print(f"{name}: FAILED: {exc}\n  (at {where.filename}:{where.lineno}: {where.line})")
    except Exception:
        print(f"{name}: FAILED with an unexpected error:\n{traceback.format_exc()}")
    finally:
        seconds = time.monotonic() - started
        if (outcome != "FAILED" and not keep) and not _mounted_under(workdir):
            shutil.rmtree(workdir, ignore_errors=True)
        elif outcome == "FAILED" or keep:
            print(f"{name}: node logs and data kept in {workdir}")
    return name, outcome, seconds


if __name__ == "__main__":
    sys.exit(main())
