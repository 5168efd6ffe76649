"""How far a node is in catching up with its peers, as a person reads it.

Invariant: within one catch-up, what is shown only moves forward: the counts
done never fall, the total never shrinks, and the fraction done never goes
back, although what sync reports (operations behind, the blocks of the piece
being fetched) rises and falls as pieces start and end.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CatchUpStatus:
    """One look at a catch-up in progress (`status` and the progress lines)."""

    operations_done: int
    operations_total: int
    blocks_fetched: int
    bytes_fetched: int
    fraction: float  # 0..1, never decreasing within one catch-up
    seconds: float  # since it started
    eta_s: float | None  # None until there is a rate to go by

    def line(self) -> str:
        eta = f", about {format_duration(self.eta_s)} left" if self.eta_s is not None else ""
        return (
            f"catching up: {self.fraction:.0%}, {self.operations_done:,} of "
            f"{self.operations_total:,} operations; {self.blocks_fetched:,} blocks, "
            f"{self.bytes_fetched / 2**20:.1f} MiB received{eta}"
        )


def format_duration(seconds: float) -> str:
    """`45s`, `3m 05s`, `2h 10m`, `3d 4h`: two units at most."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    hours = s % 86400 // 3600
    return f"{s // 86400}d {hours}h" if hours else f"{s // 86400}d"


class CatchUp:
    """Turns sync's counters, sampled now and then, into forward-only progress."""

    def __init__(self) -> None:
        self.active = False
        self._t0 = 0.0
        self._ops0 = self._blocks0 = self._bytes0 = 0
        self._total = 0
        self._fraction = 0.0
        self.last: CatchUpStatus | None = None

    def update(
        self,
        now: float,
        *,
        operations_received: int,
        blocks_received: int,
        bytes_received: int,
        operations_behind: int,
        blocks_missing: int,
    ) -> CatchUpStatus | None:
        """The progress now, or None when not behind (then a new catch-up
        starts from zero the next time this node falls behind)."""
        behind = operations_behind > 0 or blocks_missing > 0
        if not behind:
            self.active = False
            self.last = None
            return None
        if not self.active:
            self.active = True
            self._t0 = now
            self._ops0, self._blocks0 = operations_received, blocks_received
            self._bytes0 = bytes_received
            self._total = 0
            self._fraction = 0.0
        done = max(0, operations_received - self._ops0)
        self._total = max(self._total, done + operations_behind)
        fraction = done / self._total if self._total else 0.0
        # Behind means not done: 100% only once nothing is left.
        self._fraction = max(self._fraction, min(fraction, 0.99))
        elapsed = now - self._t0
        eta = None
        if done > 0 and elapsed >= 1.0:
            eta = elapsed * (self._total - done) / done
        self.last = CatchUpStatus(
            operations_done=done,
            operations_total=self._total,
            blocks_fetched=max(0, blocks_received - self._blocks0),
            bytes_fetched=max(0, bytes_received - self._bytes0),
            fraction=self._fraction,
            seconds=elapsed,
            eta_s=eta,
        )
        return self.last
