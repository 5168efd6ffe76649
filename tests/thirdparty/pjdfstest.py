"""Reading pjdfstest's results: prove's summary and the README's known failures.

prove ends with a "Test Summary Report" naming each failing `.t` file, the
assertions that failed (`Failed tests:  3-4, 7`), and any parse error (a file
that stopped before its plan), then `Files=N, Tests=N, ...` and `Result:`.
The README's section "Known pjdfstest failures" lists the failures we accept,
each line a reason followed by the files and assertions it explains:

    - FIFOs are refused with EPERM:
      `mkfifo/00.t` 1-36; `chmod/00.t` 5-8, 21

(`all` in place of the numbers accepts every assertion of that file.)

A test file that prints `Bail out!` (utimensat/09.t does when atime is not
kept) would make prove stop the whole run, leaving later files unrun. prove
runs each file through `EXEC` instead, which turns the bail-out into a failed
assertion of that file (prove then reports a bad plan for it), so one file's
bail-out never hides the others.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

KNOWN_HEADING = "### Known pjdfstest failures"
# link/ tests hard links, which dfs-peer refuses on purpose (README).
IGNORED_DIRS = ("link",)

# prove --exec runs `sh EXEC file.t`: the file's TAP with `Bail out!` made a
# failed assertion.
EXEC = """\
#!/bin/sh
sh "$1" | sed 's/^Bail out!/not ok - the test bailed out:/'
"""

_FILE_LINE = re.compile(
    r"^(?P<path>\S+\.t)\s+\(Wstat: (?P<wstat>\d+)(?: \([^)]*\))? Tests: (?P<tests>\d+) Failed: (?P<failed>\d+)\)"
)
_FIELD = re.compile(r"^\s+(?P<key>[A-Za-z -]+):\s+(?P<value>.*)$")
_SUMMARY = re.compile(r"^Files=(?P<files>\d+), Tests=(?P<tests>\d+),.*$", re.M)
_SPEC = re.compile(r"`(?P<file>[\w./-]+\.t)`\s+(?P<which>all|\d+(?:-\d+)?(?:,\s*\d+(?:-\d+)?)*)")


def parse_numbers(text: str) -> set[int]:
    """`3-4, 7` (prove) or `3-4,7` (README) -> {3, 4, 7}."""
    out: set[int] = set()
    for part in re.split(r"[,\s]+", text.strip()):
        if not part:
            continue
        low, _, high = part.partition("-")
        out.update(range(int(low), int(high or low) + 1))
    return out


def ranges(numbers: Iterable[int], sep: str = ",") -> str:
    """{3, 4, 7} -> `3-4,7`."""
    out: list[str] = []
    run: list[int] = []
    for n in sorted(numbers):
        if run and n == run[-1] + 1:
            run.append(n)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [n]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return sep.join(out)


@dataclass
class FileResult:
    """One failing `.t` file of prove's summary report."""

    name: str  # relative to the tests folder: `chmod/00.t`
    tests: int
    failed: set[int] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)  # parse errors, exit status

    @property
    def directory(self) -> str:
        return self.name.split("/", 1)[0]


@dataclass
class ProveRun:
    summary: str  # `Files=238, Tests=8798, ...`
    files: int
    tests: int
    failing: dict[str, FileResult]

    def failed_assertions(self) -> int:
        return sum(len(f.failed) for f in self.failing.values())


def parse_prove(output: str, tests_dir: Path) -> ProveRun:
    """prove's output -> its summary line and the failing files.

    Raises ValueError if there is no summary line (prove itself failed).
    """
    match = _SUMMARY.search(output)
    if match is None:
        raise ValueError("prove printed no `Files=N, Tests=N` summary line")
    failing: dict[str, FileResult] = {}
    current: FileResult | None = None
    key = ""
    prefix = str(tests_dir).rstrip("/") + "/"
    report = output.split("Test Summary Report", 1)
    for line in report[1].splitlines() if len(report) > 1 else []:
        if m := _FILE_LINE.match(line):
            name = m["path"].removeprefix(prefix)
            current = failing[name] = FileResult(name, int(m["tests"]))
            key = ""
            if m["wstat"] != "0":
                current.problems.append(f"wait status {m['wstat']}")
            continue
        if current is None:
            continue
        if m := _FIELD.match(line):
            key, value = m["key"].strip(), m["value"].strip()
        elif line.startswith(" ") and line.strip():
            value = line.strip()  # a continuation of the field above
        else:
            current, key = None, ""
            continue
        if key in ("Failed tests", "Failed test"):
            current.failed |= parse_numbers(value)
        elif key in ("Parse errors", "Non-zero exit status", "Non-zero wait status"):
            current.problems.append(f"{key.lower()}: {value}")
        # "TODO passed" is not a failure.
    return ProveRun(match.group(0).strip(), int(match["files"]), int(match["tests"]), failing)


@dataclass(frozen=True)
class Known:
    reason: str
    numbers: frozenset[int] | None  # None: every assertion of the file


def known_failures(readme: Path) -> dict[str, list[Known]]:
    """The README's known failures: {file: [Known, ...]}.

    Raises ValueError if the section is missing or an entry has no reason.
    """
    text = readme.read_text()
    start = text.find(KNOWN_HEADING + "\n")
    if start < 0:
        raise ValueError(f"{readme} has no section {KNOWN_HEADING!r}")
    body = text[start + len(KNOWN_HEADING) :]
    end = re.search(r"^#", body, re.M)
    body = body[: end.start()] if end else body
    known: dict[str, list[Known]] = defaultdict(list)
    for block in re.split(r"^- ", body, flags=re.M)[1:]:
        block = block.split("\n\n", 1)[0]  # a bullet ends at a blank line
        first = _SPEC.search(block)
        if first is None:
            continue
        reason = " ".join(block[: first.start()].split()).rstrip(":").strip()
        if not reason:
            raise ValueError(f"known pjdfstest failures without a reason: {block.strip()!r}")
        for spec in _SPEC.finditer(block):
            which = spec["which"]
            numbers = None if which == "all" else frozenset(parse_numbers(which))
            known[spec["file"]].append(Known(reason, numbers))
    return dict(known)


@dataclass
class Verdict:
    unknown: dict[str, set[int]]  # file -> assertions failing without a known reason
    unknown_problems: dict[str, list[str]]  # file -> parse errors etc. not known
    fixed: dict[str, set[int]]  # file -> known failures that passed this time
    ignored: int  # failed assertions in IGNORED_DIRS


def judge(run: ProveRun, known: dict[str, list[Known]]) -> Verdict:
    unknown: dict[str, set[int]] = {}
    problems: dict[str, list[str]] = {}
    ignored = 0
    for name, result in run.failing.items():
        if result.directory in IGNORED_DIRS:
            ignored += len(result.failed)
            continue
        entries = known.get(name, [])
        if any(k.numbers is None for k in entries):
            continue
        accepted: set[int] = set().union(*(k.numbers or () for k in entries))
        if left := result.failed - accepted:
            unknown[name] = left
        # A file that stopped early (a parse error) is known only if listed as `all`.
        if result.problems:
            problems[name] = result.problems
    fixed: dict[str, set[int]] = {}
    for name, entries in known.items():
        listed: set[int] = set().union(*(k.numbers or () for k in entries))
        result = run.failing.get(name)
        gone = listed - (result.failed if result else set())
        if gone:
            fixed[name] = gone
    return Verdict(unknown, problems, fixed, ignored)


def by_directory(run: ProveRun) -> str:
    """Failures grouped by directory, one line each, for the test's output."""
    dirs: dict[str, list[FileResult]] = defaultdict(list)
    for result in run.failing.values():
        dirs[result.directory].append(result)
    lines = []
    for d in sorted(dirs):
        files = sorted(dirs[d], key=lambda r: r.name)
        total = sum(len(r.failed) for r in files)
        detail = "; ".join(
            f"{r.name.split('/', 1)[1]} {ranges(r.failed)}"
            + (f" ({', '.join(r.problems)})" if r.problems else "")
            for r in files
        )
        lines.append(f"  {d}/: {total} failed: {detail}")
    return "\n".join(lines)
