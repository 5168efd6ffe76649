"""The suites' harness itself: prove's report and the README's known list are
read right, and a missing suite skips only outside CI."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.thirdparty.conftest import REPO, unavailable
from tests.thirdparty.pjdfstest import by_directory, judge, known_failures, parse_prove, ranges

TESTS = Path("/build/pjdfstest/tests")

PROVE = f"""\
{TESTS}/chmod/00.t ......... ok
Test Summary Report
-------------------
{TESTS}/chmod/00.t          (Wstat: 0 Tests: 119 Failed: 5)
  Failed tests:  22-24, 26
                 108
{TESTS}/unlink/14.t         (Wstat: 0 Tests: 7 Failed: 1)
  Failed test:  6
{TESTS}/chown/00.t          (Wstat: 0 Tests: 1280 Failed: 0)
  TODO passed:   1054, 1058
{TESTS}/utimensat/09.t      (Wstat: 0 Tests: 2 Failed: 1)
  Failed test:  2
  Parse errors: Bad plan.  You planned 7 tests but ran 2.
{TESTS}/link/00.t           (Wstat: 0 Tests: 202 Failed: 2)
  Failed tests:  4-5
Files=238, Tests=8793, 394 wallclock secs ( 1.23 usr  0.44 sys + 64.09 cusr = 84.67 CPU)
Result: FAIL
"""

README = """\
# x

### Known pjdfstest failures

Text before the list.

- FIFOs are refused
  with EPERM:
  `chmod/00.t` 22-24,
  26; `mkfifo/00.t` 1-3
- atime is not kept: `utimensat/09.t` all
- Unlinked files read empty: `unlink/14.t` 6

## Next section

- not part of it: `open/00.t` 1
"""


def test_prove_report_is_read_with_continuations_singular_and_parse_errors() -> None:
    run = parse_prove(PROVE, TESTS)
    assert (run.files, run.tests) == (238, 8793)
    assert run.summary.startswith("Files=238, Tests=8793,")
    assert run.failing["chmod/00.t"].failed == {22, 23, 24, 26, 108}
    assert run.failing["unlink/14.t"].failed == {6}
    assert run.failing["chown/00.t"].failed == set()  # TODO passed is no failure
    assert run.failing["utimensat/09.t"].problems == [
        "parse errors: Bad plan.  You planned 7 tests but ran 2."
    ]
    assert run.failed_assertions() == 5 + 1 + 1 + 2
    assert "chmod/: 5 failed: 00.t 22-24,26,108" in by_directory(run)


def test_prove_without_summary_is_an_error() -> None:
    with pytest.raises(ValueError, match="summary"):
        parse_prove("Bailout called.\n", TESTS)


def test_known_list_is_read_from_its_section_only(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(README)
    known = known_failures(readme)
    assert set(known) == {"chmod/00.t", "mkfifo/00.t", "utimensat/09.t", "unlink/14.t"}
    assert known["chmod/00.t"][0].numbers == {22, 23, 24, 26}
    assert known["chmod/00.t"][0].reason == "FIFOs are refused with EPERM"
    assert known["utimensat/09.t"][0].numbers is None


def test_only_unlisted_failures_outside_link_count(tmp_path: Path) -> None:
    run = parse_prove(PROVE, TESTS)
    readme = tmp_path / "README.md"
    readme.write_text(README)
    verdict = judge(run, known_failures(readme))
    assert verdict.unknown == {"chmod/00.t": {108}}
    assert verdict.unknown_problems == {}  # utimensat/09.t is listed as `all`
    assert verdict.ignored == 2  # link/
    assert verdict.fixed == {"mkfifo/00.t": {1, 2, 3}}
    readme.write_text(README.replace("`utimensat/09.t` all", "`utimensat/09.t` 2"))
    verdict = judge(run, known_failures(readme))
    assert verdict.unknown_problems == {
        "utimensat/09.t": [run.failing["utimensat/09.t"].problems[0]]
    }


def test_the_readme_has_a_valid_known_list() -> None:
    known = known_failures(REPO / "README.md")
    assert all(k.reason for entries in known.values() for k in entries)
    assert not any(name.startswith("link/") for name in known)


def test_ranges_round_trip() -> None:
    assert ranges({1, 2, 3, 5, 7, 8}) == "1-3,5,7-8"
    assert ranges({1, 2, 3, 5}, ", ") == "1-3, 5"


@pytest.mark.parametrize(("ci", "outcome"), [("true", "failed"), ("", "skipped")])
def test_a_missing_suite_fails_in_ci_and_skips_elsewhere(
    monkeypatch: pytest.MonkeyPatch, ci: str, outcome: str
) -> None:
    monkeypatch.setenv("CI", ci)
    expected = pytest.fail.Exception if outcome == "failed" else pytest.skip.Exception
    with pytest.raises(expected, match="no suite here"):
        unavailable("no suite here")
