"""Every scenario by name, and how to run one: a fresh cluster, a report, teardown.

A scenario is a module with a docstring (what it shows, what outcome to
expect), `NEEDS_REAL_LAN` (it needs namespaces: mDNS or partitions), and
`run(cluster)`, which raises (an AssertionError saying what differed) if the
outcome is not the expected one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TextIO

from scenarios import (
    forget_member,
    gc_safety,
    history,
    late_joiner,
    mdns_three,
    outsider,
    pairing,
    partition_heal,
    remove_member,
    restart,
    two_nodes,
)
from scenarios.cluster import Cluster
from scenarios.network import can_use_namespaces
from scenarios.report import Report


class ScenarioSkipped(Exception):
    """The scenario cannot run here (it needs root for network namespaces)."""


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    doc: str
    needs_real_lan: bool
    run: Callable[[Cluster], None]

    @property
    def summary(self) -> str:
        return self.doc.strip().splitlines()[0]

    @classmethod
    def from_module(cls, module: ModuleType) -> Scenario:
        return cls(
            name=module.__name__.rsplit(".", 1)[1],
            doc=module.__doc__ or "",
            needs_real_lan=bool(module.NEEDS_REAL_LAN),
            run=module.run,
        )


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in map(
        Scenario.from_module,
        [
            two_nodes,
            mdns_three,
            partition_heal,
            late_joiner,
            restart,
            outsider,
            history,
            gc_safety,
            forget_member,
            pairing,
            remove_member,
        ],
    )
}


def skip_reason(scenario: Scenario, loopback: bool = False) -> str | None:
    """Why `scenario` cannot run here, or None."""
    if not scenario.needs_real_lan:
        return None
    if loopback:
        return "needs network namespaces (not with --loopback)"
    ok, why = can_use_namespaces()
    return None if ok else why


def run_scenario(
    scenario: Scenario, workdir: Path, *, loopback: bool = False, stream: TextIO | None = None
) -> Report:
    """Run one scenario in a fresh cluster under `workdir`; raise if it failed.

    Everything the cluster made is torn down before this returns or raises.
    """
    if (why := skip_reason(scenario, loopback)) is not None:
        raise ScenarioSkipped(f"{scenario.name}: {why}")
    report = Report(f"{scenario.name}: {scenario.summary}", stream)
    with Cluster(workdir, report, loopback=loopback) as cluster:
        report.note(f"LAN: {cluster.lan.description}; work dir {workdir}")
        scenario.run(cluster)
    report.timed(f"{scenario.name} passed (teardown included)", report.elapsed())
    return report
