"""How conftest.py prepares the tests for parallel workers (`make test` runs
pytest-xdist with --dist loadgroup): a module-scoped fixture is built once, a
module that has one must be listed, the slow tests start first."""

from __future__ import annotations

from pathlib import Path

import pytest

CONFTEST = (Path(__file__).parent / "conftest.py").read_text()
LISTED = '"tests/thirdparty/test_fsx.py",\n'
assert LISTED in CONFTEST


@pytest.fixture
def inner(pytester: pytest.Pytester) -> pytest.Pytester:
    """A scratch pytest project that uses our conftest.py."""
    pytester.makeini(
        "[pytest]\nasyncio_default_fixture_loop_scope = function\nmarkers =\n    slow: slow\n"
    )
    # test_shared.py is listed, as tests/thirdparty/test_fsx.py is.
    pytester.makeconftest(CONFTEST.replace(LISTED, LISTED + '"test_shared.py",\n'))
    pytester.makepyfile(__init__="")  # conftest.py insists test folders are packages
    return pytester


def test_a_module_scoped_fixture_is_built_once_across_workers(
    inner: pytest.Pytester, tmp_path: Path
) -> None:
    built = tmp_path / "built"
    inner.makepyfile(
        test_shared=f"""
        import pytest

        @pytest.fixture(scope="module")
        def shared():
            with open({str(built)!r}, "a") as f:
                f.write("built\\n")

        @pytest.mark.parametrize("n", range(8))
        def test_uses_it(shared, n):
            pass
        """,
        test_other="""
        import pytest

        @pytest.mark.parametrize("n", range(8))
        def test_alone(n):
            pass
        """,
    )
    result = inner.runpytest_subprocess("-n", "3", "--dist", "loadgroup", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=16)
    assert built.read_text().splitlines() == ["built"], "each worker built the fixture"


def test_a_module_scoped_fixture_in_an_unlisted_module_fails_its_tests(
    inner: pytest.Pytester,
) -> None:
    inner.makepyfile(
        test_unlisted="""
        import pytest

        @pytest.fixture(scope="module")
        def shared():
            pass

        def test_uses_it(shared):
            pass

        def test_does_not():
            pass
        """
    )
    result = inner.runpytest_subprocess("-n", "2", "--dist", "loadgroup", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)  # failed in its setup
    result.stdout.fnmatch_lines(
        ["*test_unlisted.py has a module-scoped fixture (shared): add the module to*"]
    )


def test_slow_tests_are_collected_first(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        test_a="""
        def test_quick():
            pass
        """,
        test_b="""
        import pytest

        def test_quick_too():
            pass

        @pytest.mark.slow
        def test_long():
            pass
        """,
    )
    result = inner.runpytest_subprocess("--collect-only", "-q", "-p", "no:cacheprovider")
    names = [line.split("::")[-1] for line in result.stdout.lines if "::" in line]
    assert names == ["test_long", "test_quick", "test_quick_too"]
