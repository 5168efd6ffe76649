"""Every scenario in `scenarios/`, under pytest: real nodes, mounts and, as root,
network namespaces. A scenario that needs namespaces is skipped without root
(and never in CI, which runs as root). The report of a failed scenario (each
step with its timing, the diff of the trees, the node logs) is in its output.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from scenarios.catalog import SCENARIOS, run_scenario, skip_reason

pytestmark = [pytest.mark.scenario, pytest.mark.mount, pytest.mark.slow]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario(name: str, tmp_path: Path) -> None:
    scenario = SCENARIOS[name]
    if (why := skip_reason(scenario)) is not None:
        pytest.skip(why)
    run_scenario(scenario, tmp_path)
