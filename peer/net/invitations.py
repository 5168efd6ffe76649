"""The inviter's side of pairing: open invitations and the `/pair/*` endpoint.

The endpoint is on the peer port and, alone there, answers requests that
carry no volume MAC (a joiner has no secret yet; it proves the code instead,
see `peer.net.pairing`). So it is narrow and hard to lean on:

- With no invitation open (nor one closed in the last hour), the port does
  not route to it at all (`active()` is false): a stranger gets the bare 401
  it gets on any path, and nothing changes.
- Bodies over `pairing.MAX_BODY` are refused unread; a body must arrive
  within `BODY_TIMEOUT_S`.
- Each start is one online guess of the code: at most `MAX_ATTEMPTS` tries
  of an invitation can be under way or failed, and the third failure burns
  it; a try not finished within `SESSION_TTL_S` counts as failed. Across all
  invitations at most `STARTS_PER_WINDOW` starts are served per
  `RATE_WINDOW_S`; beyond that the answer is 429 and no SPAKE2 runs.
- One invitation pairs one machine: it is marked used before the root is
  sealed and sent, so two concurrent finishes cannot both get it.

Invariant: an invitation's state only moves forward, open -> paired | expired
| burnt | cancelled, and each move is reported once to whoever waits on it
(`dfs-peer invite`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from aiohttp import web

from peer.errors import DfsError
from peer.net import pairing

log = logging.getLogger("peer.invitations")

DEFAULT_TTL_S = 600.0
MAX_TTL_S = 600.0
MAX_ATTEMPTS = 3
SESSION_TTL_S = 30.0
BODY_TIMEOUT_S = 5.0
MAX_OPEN = 8
RATE_WINDOW_S = 10.0
STARTS_PER_WINDOW = 10
# Closed invitations are remembered so a late joiner hears "expired" or
# "used" rather than nothing; this many, for this long.
RECENT_MAX = 64
RECENT_S = 3600.0
CBOR = "application/cbor"
POLL_S = 0.5

OPEN = "open"
PAIRED = "paired"
EXPIRED = "expired"
BURNT = "burnt"
CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class Event:
    """Something `dfs-peer invite` tells its user: `kind` is one of trying,
    wrong, paired, expired, burnt, cancelled."""

    kind: str
    name: str = ""
    node: str = ""
    left: int = 0

    @property
    def final(self) -> bool:
        return self.kind in (PAIRED, EXPIRED, BURNT, CANCELLED)

    def to_json(self) -> dict[str, object]:
        return {"event": self.kind, "name": self.name, "node": self.node, "left": self.left}


@dataclass(eq=False)
class Invitation:
    code: pairing.Code
    expires_at: float
    state: str = OPEN
    attempts: int = 0
    failures: int = 0
    # Starts whose SPAKE2 is still being computed: tries under way, like sessions.
    pending: int = 0
    sessions: dict[bytes, tuple[pairing.InviterSide, float]] = field(default_factory=dict)
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)

    @property
    def number(self) -> int:
        return self.code.number


class Invitations:
    """This node's open invitations, and the handler of `/pair/start|finish`."""

    def __init__(
        self,
        root: bytes,
        node_id: bytes,
        name: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._welcome = pairing.Welcome(root, name, node_id)
        self._clock = clock
        self._open: dict[int, Invitation] = {}
        self._recent: OrderedDict[int, tuple[str, float]] = OrderedDict()
        self._starts: deque[float] = deque()
        # SPAKE2 is pure Python (~40 ms a side): one at a time, in a thread.
        self._cpu = asyncio.Lock()

    # --- the inviting side's lifetime (the control socket) ------------------

    def open(self, ttl_s: float = DEFAULT_TTL_S) -> Invitation:
        """A new invitation with a fresh code, valid `ttl_s` (at most 10 minutes)."""
        self._expire()
        if len(self._open) >= MAX_OPEN:
            raise TooManyInvitations(count=MAX_OPEN)
        ttl = min(max(ttl_s, 0.1), MAX_TTL_S) if math.isfinite(ttl_s) else DEFAULT_TTL_S
        taken = set(self._open) | set(self._recent)
        free = [n for n in pairing.NEW_NUMBERS if n not in taken]
        number = secrets.choice(free or [n for n in pairing.NEW_NUMBERS if n not in self._open])
        self._recent.pop(number, None)
        invitation = Invitation(pairing.new_code(number), self._clock() + ttl)
        self._open[number] = invitation
        log.info("invitation opened number=%d ttl_s=%g", number, ttl)
        return invitation

    def close(self, invitation: Invitation, state: str, event: Event | None = None) -> None:
        """Move an open invitation to its final `state` and report it; no-op if closed."""
        if invitation.state != OPEN:
            return
        invitation.state = state
        invitation.sessions.clear()
        if self._open.get(invitation.number) is invitation:
            del self._open[invitation.number]
        self._recent[invitation.number] = (state, self._clock())
        self._recent.move_to_end(invitation.number)
        while len(self._recent) > RECENT_MAX:
            self._recent.popitem(last=False)
        invitation.events.put_nowait(event or Event(state))
        log.info("invitation closed number=%d state=%s", invitation.number, state)

    async def events(
        self, invitation: Invitation, alive: Callable[[], bool] = lambda: True
    ) -> AsyncIterator[Event]:
        """What happens to `invitation`, until its final event (expiry
        included); it is cancelled as soon as `alive()` turns false (checked
        every `POLL_S`: the one waiting went away)."""
        while True:
            remaining = invitation.expires_at - self._clock()
            try:
                async with asyncio.timeout(min(max(remaining, 0.0), POLL_S)):
                    event = await invitation.events.get()
            except TimeoutError:
                if not alive():
                    self.close(invitation, CANCELLED)
                elif self._clock() >= invitation.expires_at:
                    self.close(invitation, EXPIRED)
                continue
            yield event
            if event.final:
                return

    def open_numbers(self) -> list[int]:
        self._expire()
        return sorted(self._open)

    # --- the peer port ------------------------------------------------------

    def active(self) -> bool:
        """Whether `/pair/*` answers at all: an invitation is open, or one was
        closed lately (to tell a late joiner why). Otherwise the port treats
        those paths as any other: a bare 401."""
        self._expire()
        return bool(self._open or self._recent)

    async def handle(self, request: web.Request) -> web.Response:
        """`POST /pair/start` and `POST /pair/finish`, without the volume MAC."""
        if not self.active():
            return web.Response(status=401)  # as to any stranger: nothing here
        if request.method != "POST" or request.path not in pairing.PATHS:
            return web.Response(status=401)
        length = request.content_length
        if length is None:
            return _refusal(411, "length-required")
        if length > pairing.MAX_BODY:
            return _refusal(413, "too-large")
        try:
            async with asyncio.timeout(BODY_TIMEOUT_S):
                body = await request.content.readexactly(length)
        except TimeoutError:
            return _refusal(408, "too-slow")
        except asyncio.IncompleteReadError:
            return _refusal(400, "malformed")
        try:
            if request.path == pairing.START_PATH:
                return await self._start(pairing.decode_start(body), request.remote)
            return await self._finish(pairing.decode_finish(body), request.remote)
        except pairing.BadMessage as exc:
            log.info("malformed pairing request from %s: %s", request.remote, exc)
            return _refusal(400, "malformed")

    async def _start(self, start: pairing.StartRequest, remote: str | None) -> web.Response:
        invitation = self._open.get(start.number)
        if invitation is None:
            closed = self._recent.get(start.number)
            return _refusal(410, closed[0]) if closed else _refusal(404, "no-invitation")
        now = self._clock()
        while self._starts and self._starts[0] <= now - RATE_WINDOW_S:
            self._starts.popleft()
        if len(self._starts) >= STARTS_PER_WINDOW:
            return _refusal(429, "busy")
        self._reap_sessions(invitation, now)
        if invitation.state != OPEN:
            return _refusal(410, invitation.state)
        if invitation.failures + len(invitation.sessions) + invitation.pending >= MAX_ATTEMPTS:
            return _refusal(429, "busy")  # every try left is under way
        self._starts.append(now)
        invitation.attempts += 1
        invitation.pending += 1  # reserved before the first await: no race past the bound
        try:
            async with self._cpu:
                side = await asyncio.to_thread(pairing.InviterSide, invitation.code, start)
        finally:
            invitation.pending -= 1
        if invitation.state != OPEN:
            return _refusal(410, invitation.state)
        invitation.sessions[side.session] = (side, self._clock())
        log.info(
            "pairing attempt number=%d attempt=%d from=%s",
            invitation.number,
            invitation.attempts,
            remote,
        )
        invitation.events.put_nowait(Event("trying", left=MAX_ATTEMPTS - invitation.failures))
        return web.Response(body=side.start_answer(), content_type=CBOR)

    async def _finish(self, finish: pairing.FinishRequest, remote: str | None) -> web.Response:
        found = self._session(finish.session)
        if found is None:
            return _refusal(410, "no-session")
        invitation, side = found
        del invitation.sessions[finish.session]  # a session is finished once, right or wrong
        try:
            joiner = side.joiner(finish)
        except pairing.BadConfirmation:
            self._failed(invitation, remote)
            return _refusal(403, "wrong")
        # Used before the root leaves: a second finish cannot get it too.
        short = joiner.node.hex()[:8]
        self.close(invitation, PAIRED, Event(PAIRED, name=joiner.name, node=joiner.node.hex()))
        log.info(
            "paired number=%d name=%r node=%s from=%s",
            invitation.number,
            joiner.name,
            short,
            remote,
        )
        return web.Response(body=side.finish_answer(self._welcome), content_type=CBOR)

    # --- bookkeeping --------------------------------------------------------

    def _session(self, session: bytes) -> tuple[Invitation, pairing.InviterSide] | None:
        for invitation in self._open.values():
            self._reap_sessions(invitation, self._clock())
            entry = invitation.sessions.get(session)
            if entry is not None:
                return invitation, entry[0]
        return None

    def _failed(self, invitation: Invitation, remote: str | None) -> None:
        invitation.failures += 1
        left = MAX_ATTEMPTS - invitation.failures
        log.warning(
            "wrong pairing code number=%d failures=%d from=%s",
            invitation.number,
            invitation.failures,
            remote,
        )
        if left <= 0:
            self.close(invitation, BURNT)
        else:
            invitation.events.put_nowait(Event("wrong", left=left))

    def _reap_sessions(self, invitation: Invitation, now: float) -> None:
        """Sessions started and not finished in time count as failed tries."""
        for session, (_, started) in list(invitation.sessions.items()):
            if now - started > SESSION_TTL_S and invitation.state == OPEN:
                del invitation.sessions[session]
                self._failed(invitation, "(not finished in time)")

    def _expire(self) -> None:
        now = self._clock()
        for invitation in list(self._open.values()):
            if now >= invitation.expires_at:
                self.close(invitation, EXPIRED)
        while self._recent:
            number, (_, when) = next(iter(self._recent.items()))
            if now - when < RECENT_S:
                break
            del self._recent[number]


class NoInvitations(DfsError):
    """this node cannot invite (it runs read-only from history, or without the
    volume secret)."""


class BadTtl(DfsError):
    """--ttl must be more than 0 and at most 10m."""


class InviteExpired(DfsError):
    """the code expired before a machine used it: run `dfs-peer invite` again
    for a new one."""


class InviteBurnt(DfsError):
    """three wrong codes were tried, so the code no longer works (if nobody
    you know mistyped it, someone else was guessing): run `dfs-peer invite`
    again for a new one."""


class InviteCancelled(DfsError):
    """the invitation was cancelled (the node stopped?)."""


class TooManyInvitations(DfsError):
    """this node already has {count} invitations open: use one of them, or stop
    a `dfs-peer invite` first."""


def _refusal(status: int, reason: str) -> web.Response:
    return web.Response(status=status, body=pairing.encode_refusal(reason), content_type=CBOR)
