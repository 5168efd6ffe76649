"""The `scenario` marker: `pytest -m scenario` runs only the multi-node scenarios,
`-m "not scenario"` everything else. Registered here because the scenarios own
this folder; pyproject's `markers` list could hold it as well."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "scenario: a multi-node scenario (real processes, mounts, namespaces)"
    )
