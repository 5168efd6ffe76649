"""Fixtures for discovery tests: `lan`, three network namespaces on one bridge."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.discovery.lan import Lan, leftovers, make_lan, why_no_namespaces

HOSTS = 3


@pytest.fixture
def lan() -> Iterator[Lan]:
    """Three namespaces (10.231.0.1-3) on a fresh bridge, with `Lan.start` to run
    discovery nodes in them. Afterwards every node is stopped, their warnings
    and errors fail the test unless allowed with `Lan.allow_log`, and nothing
    of the LAN is left behind."""
    if reason := why_no_namespaces():
        pytest.skip(reason)

    def check_logs(problems: list[str]) -> None:
        if problems:
            pytest.fail("\n".join(problems), pytrace=False)

    with make_lan(HOSTS, check_logs=check_logs) as made:
        yield made
    if left := leftovers(made.suffix):
        pytest.fail(f"the LAN fixture left these behind: {left}", pytrace=False)
