"""Catch-up progress only moves forward, with a total and an estimate of the time left."""

from __future__ import annotations

from peer.progress import CatchUp, format_duration


def test_progress_never_goes_back_while_sync_figures_jump() -> None:
    # What sync reported in the issue: blocks to fetch 455 -> 0 -> 400 -> 336,
    # while operations were merged piece by piece.
    samples = [
        # (received ops, received blocks, behind ops, blocks of the piece)
        (0, 0, 1000, 455),
        (0, 455, 1000, 0),
        (300, 455, 700, 400),
        (300, 519, 700, 336),
        (650, 855, 350, 120),
        (900, 975, 100, 0),
    ]
    catch_up = CatchUp()
    shown = []
    for t, (ops, blocks, behind, missing) in enumerate(samples):
        got = catch_up.update(
            float(t),
            operations_received=ops,
            blocks_received=blocks,
            bytes_received=blocks * 131072,
            operations_behind=behind,
            blocks_missing=missing,
        )
        assert got is not None
        shown.append(got)
    fractions = [s.fraction for s in shown]
    assert fractions == sorted(fractions), f"progress went back: {fractions}"
    assert [s.operations_done for s in shown] == sorted(s.operations_done for s in shown)
    assert [s.blocks_fetched for s in shown] == sorted(s.blocks_fetched for s in shown)
    totals = [s.operations_total for s in shown]
    assert totals == sorted(totals)
    assert shown[-1].operations_total == 1000
    assert shown[0].eta_s is None  # no rate yet
    assert shown[-1].eta_s is not None
    assert 0 < shown[-1].eta_s < 5
    assert "of 1,000 operations" in shown[-1].line()
    assert "left" in shown[-1].line()


def test_progress_ends_when_nothing_is_behind_and_restarts_from_zero() -> None:
    catch_up = CatchUp()
    kw = {"blocks_received": 0, "bytes_received": 0, "blocks_missing": 0}
    assert catch_up.update(0.0, operations_received=0, operations_behind=10, **kw) is not None
    assert catch_up.update(1.0, operations_received=10, operations_behind=0, **kw) is None
    again = catch_up.update(2.0, operations_received=10, operations_behind=4, **kw)
    assert again is not None
    assert (again.operations_done, again.operations_total, again.fraction) == (0, 4, 0.0)


def test_durations_read_in_two_units() -> None:
    assert format_duration(5) == "5s"
    assert format_duration(185) == "3m 05s"
    assert format_duration(7800) == "2h 10m"
    assert format_duration(3 * 86400 + 4 * 3600 + 5) == "3d 4h"
