"""The autouse log check in conftest.py: silent warnings fail a test, declared ones don't."""

from __future__ import annotations

from pathlib import Path

import pytest

CONFTEST = (Path(__file__).parent / "conftest.py").read_text()


@pytest.fixture
def inner(pytester: pytest.Pytester) -> pytest.Pytester:
    """A scratch pytest project that uses our conftest.py, run in a subprocess
    so that its logs cannot reach this test's own log check."""
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(__init__="")  # conftest.py insists test folders are packages
    return pytester


def test_undeclared_warning_fails_the_test(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        """
        import logging
        def test_it():
            logging.getLogger("peer.sync").warning("peer %s rejected", "ab12cd34")
        """
    )
    result = inner.runpytest_subprocess()
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*unexpected log: WARNING peer.sync: peer ab12cd34 rejected*"])


def test_declared_warning_passes(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        """
        import logging
        def test_it(expect_logs):
            expect_logs(r"peer \\w+ rejected", logger="peer")
            logging.getLogger("peer.sync").warning("peer %s rejected", "ab12cd34")
        """
    )
    inner.runpytest_subprocess().assert_outcomes(passed=1)


def test_declared_warning_that_never_comes_fails(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        """
        def test_it(expect_logs):
            expect_logs("peer .* rejected")
        """
    )
    result = inner.runpytest_subprocess()
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*expected a WARNING log matching 'peer .* rejected'*none came*"])


def test_declaration_does_not_cover_a_worse_level(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        """
        import logging
        def test_it(expect_logs):
            expect_logs("disk full")
            logging.getLogger("peer.store").warning("disk full")
            logging.getLogger("peer.store").error("disk full")
        """
    )
    result = inner.runpytest_subprocess()
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*unexpected log: ERROR peer.store: disk full*"])


def test_info_is_not_checked(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        """
        import logging
        def test_it():
            logging.getLogger("peer").info("mounted")
        """
    )
    inner.runpytest_subprocess().assert_outcomes(passed=1)
