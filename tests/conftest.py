"""Settings and fixtures shared by every test.

- Hypothesis profiles: `dev` (the default) and `ci`, chosen by HYPOTHESIS_PROFILE.
- Silent errors are bugs: a test fails if anything logged at WARNING or worse
  while it ran, unless the test declared that record with `expect_logs`
  (modelled on pyfuse3's test/pytest_checklogs.py).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import settings

pytest_plugins = ["pytester"]  # tests/test_checklogs.py runs pytest inside pytest

settings.register_profile("dev", max_examples=100)
# More examples, no per-example deadline (a shared CI machine has noisy timing),
# and the reproduction blob printed, since the example database stays behind.
settings.register_profile("ci", max_examples=300, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def pytest_configure(config: pytest.Config) -> None:
    _require_test_packages(Path(__file__).parent)


def _require_test_packages(tests: Path) -> None:
    """Every folder of tests must be a package (hold an `__init__.py`).

    Why: tests/peer/ without one would be imported as a top-level `peer` and
    shadow the real package, and pytest would report that as a baffling
    `No module named 'peer.errors'`.
    """
    loose = sorted(
        str(folder.relative_to(tests.parent))
        for folder in [tests, *tests.rglob("*")]
        if folder.is_dir()
        and folder.name != "__pycache__"
        and any(folder.glob("*.py"))
        and not (folder / "__init__.py").exists()
    )
    if loose:
        raise pytest.UsageError(
            f"test folders without an __init__.py: {', '.join(loose)} (add an empty one)"
        )


# --- Running in parallel (`make test`: pytest-xdist, --dist loadgroup) ------
#
# Most tests wait on real processes, mounts and sockets, so several workers
# share two cores well. Every test makes its own names (tmp_path, free ports,
# random namespace and bridge names, a runtime dir of its own where it counts
# nodes), so tests can overlap. Two things are arranged here:
#
# - The tests of a module with a module-scoped fixture run on one worker, or
#   each worker would build the fixture again (fsx twice). xdist's own
#   `xdist_group` marks do not work with this pytest (xdist 3.8 renames the
#   test ids through an attribute pytest 9.2 no longer reads), so the scheduler
#   below groups the modules listed here instead; collection fails if a module
#   with such a fixture is missing from the list.
# - The longest tests start first, so that none of them begins last and keeps
#   one worker busy after the others are done: the `slow` ones, and of those
#   the files in LONGEST_FIRST (measured: pjdfstest ~2 min, the demo ~1 min).
SHARED_FIXTURE_MODULES = frozenset(
    {
        "tests/peer/test_fuzz_protocol.py",
        "tests/scenarios/test_pairing.py",
        "tests/thirdparty/test_fsx.py",
    }
)
LONGEST_FIRST = ("tests/thirdparty/test_pjdfstest.py", "tests/scenarios/test_demo.py")
_SHARED_SCOPES = {"module", "package"}
_UNLISTED = pytest.StashKey[str]()


def _module_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = _module_of(item.nodeid)
        if (name := _shared_fixture(item)) and module not in SHARED_FIXTURE_MODULES:
            item.stash[_UNLISTED] = (
                f"{module} has a module-scoped fixture ({name}): add the module to "
                "SHARED_FIXTURE_MODULES in tests/conftest.py, so that its tests share one worker"
            )

    def first(item: pytest.Item) -> tuple[bool, bool]:
        slow = item.get_closest_marker("slow") is not None
        return (not slow, _module_of(item.nodeid) not in LONGEST_FIRST)

    items.sort(key=first)  # stable: otherwise in the order collected


def pytest_runtest_setup(item: pytest.Item) -> None:
    # Failed here, not at collection: xdist does not show a worker's usage error.
    if problem := item.stash.get(_UNLISTED, None):
        pytest.fail(problem, pytrace=False)


def _shared_fixture(item: pytest.Item) -> str | None:
    """A module- or package-scoped fixture the test uses, if any (pytest's own,
    named with a leading underscore, are not worth sharing)."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return None
    for name, defs in info.name2fixturedefs.items():
        if not name.startswith("_") and defs[-1].scope in _SHARED_SCOPES:
            return name
    return None


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """For --dist loadgroup: one test at a time, except the modules in
    SHARED_FIXTURE_MODULES, each sent whole to one worker."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = _module_of(nodeid)
            return module if module in SHARED_FIXTURE_MODULES else nodeid

    return ModuleGroups(config, log)


# --- Logs at WARNING or worse fail the test unless expected ------------------


@dataclass(slots=True)
class ExpectedLog:
    """A record a test said it expects: `pattern` searched in the formatted
    message, at exactly `level`, from `logger` or its children if given."""

    pattern: re.Pattern[str]
    level: int
    logger: str | None
    seen: int = 0

    def matches(self, record: logging.LogRecord) -> bool:
        return (
            record.levelno == self.level
            and (
                self.logger is None
                or record.name == self.logger
                or record.name.startswith(self.logger + ".")
            )
            and self.pattern.search(record.getMessage()) is not None
        )


class LogCheck(logging.Handler):
    """A handler on the root logger that keeps every WARNING-or-worse record.

    Records from loggers with `propagate = False`, and anything a subprocess
    writes, never reach it: mount fixtures check their daemon's stderr themselves.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []
        self.expected: list[ExpectedLog] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def expect(
        self, pattern: str, level: int = logging.WARNING, *, logger: str | None = None
    ) -> None:
        """Allow records matching `pattern` (a regex); at least one must come."""
        self.expected.append(ExpectedLog(re.compile(pattern), level, logger))

    def problems(self) -> list[str]:
        """What went wrong: unexpected records, then expectations never met."""
        found = []
        for record in self.records:
            allowed = [e for e in self.expected if e.matches(record)]
            for e in allowed:
                e.seen += 1
            if not allowed:
                found.append(
                    f"unexpected log: {record.levelname} {record.name}: {record.getMessage()}"
                )
        found.extend(
            f"expected a {logging.getLevelName(e.level)} log matching {e.pattern.pattern!r}"
            + (f" from {e.logger}" if e.logger else "")
            + ", but none came"
            for e in self.expected
            if e.seen == 0
        )
        return found


# Autouse fixtures are set up before the ones a test asks for, and torn down
# after them, so this also sees what other fixtures log in setup and teardown.
@pytest.fixture(autouse=True)
def _check_logs() -> Iterator[LogCheck]:
    check = LogCheck()
    root = logging.getLogger()
    root.addHandler(check)
    try:
        yield check
    finally:
        root.removeHandler(check)
    if problems := check.problems():
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture
def expect_logs(_check_logs: LogCheck) -> Callable[..., None]:
    r"""Declare a warning the test means to cause, so it does not fail the test.

    `expect_logs(regex, level=logging.WARNING, logger=None)`; each declared
    pattern must then be logged at least once, or the test fails::

        def test_rejects_wrong_key(expect_logs):
            expect_logs(r"peer \w+ rejected", logger="peer.sync")
            ...
    """
    return _check_logs.expect
