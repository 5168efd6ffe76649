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
