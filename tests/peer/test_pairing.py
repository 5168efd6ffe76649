"""Pairing by a one-time code: both sides of the exchange in memory, and the
inviter's endpoint on a real peer port (loopback HTTP, the real middleware)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import cbor2
import pytest

from peer.identity import NodeIdentity
from peer.keys import VolumeKeys
from peer.net import invitations, pairing
from peer.net.joining import _NotHere, pair_with
from peer.node import Node
from peer.secret import new_secret
from tests.peer.test_sync import make_node, running

ME = pairing.Joiner("laptop", NodeIdentity.generate().node_id)


def exchange(
    joiner_code: pairing.Code, inviter_code: pairing.Code, root: bytes
) -> tuple[pairing.JoinerSide, pairing.InviterSide, bytes]:
    """Run start and finish in memory; the finish request the joiner sent."""
    joiner = pairing.JoinerSide(joiner_code)
    inviter = pairing.InviterSide(inviter_code, pairing.decode_start(joiner.start_message()))
    return joiner, inviter, joiner.finish_message(inviter.start_answer(), ME)


# --- codes ------------------------------------------------------------------------


def test_codes_are_read_forgivingly() -> None:
    assert pairing.parse_code(" 7-Orbit-LANTERN\n") == pairing.Code(7, ("orbit", "lantern"))
    assert pairing.parse_code("7 orbit  lantern") == pairing.Code(7, ("orbit", "lantern"))
    assert str(pairing.parse_code("7--orbit--lantern")) == "7-orbit-lantern"


@pytest.mark.parametrize(
    "text", ["", "7", "7-orbit", "seven-orbit-lantern", "0-orbit-lantern", "7-a-b-c"]
)
def test_what_is_not_a_code_is_refused_before_anything_is_sent(text: str) -> None:
    with pytest.raises(pairing.BadCode):
        pairing.parse_code(text)


def test_a_word_off_the_list_is_named() -> None:
    with pytest.raises(pairing.UnknownWord, match="`orbitt`"):
        pairing.parse_code("7-orbitt-lantern")


def test_new_codes_are_a_number_and_two_listed_words() -> None:
    codes = {str(pairing.new_code(42)) for _ in range(50)}
    assert len(codes) > 40, "codes repeat far more than 16 bits allow"
    for text in codes:
        assert pairing.parse_code(text).number == 42


# --- the exchange -----------------------------------------------------------------


def test_the_right_code_hands_over_the_root() -> None:
    code, root = pairing.new_code(7), new_secret()
    inviter_id = NodeIdentity.generate().node_id
    joiner, inviter, finish = exchange(code, code, root)
    assert inviter.joiner(pairing.decode_finish(finish)) == ME
    welcome = joiner.welcome(inviter.finish_answer(pairing.Welcome(root, "desk", inviter_id)))
    assert welcome == pairing.Welcome(root, "desk", inviter_id)


def test_a_wrong_code_fails_the_inviters_check() -> None:
    code = pairing.parse_code("7-orbit-lantern")
    _, inviter, finish = exchange(pairing.parse_code("7-orbit-lemon"), code, new_secret())
    with pytest.raises(pairing.BadConfirmation):
        inviter.joiner(pairing.decode_finish(finish))


def test_an_impostor_inviter_is_caught_before_its_root_is_used() -> None:
    """An inviter that does not know the code cannot make a confirmation the
    joiner accepts, even if it skips its own check and answers anyway."""
    code = pairing.parse_code("7-orbit-lantern")
    joiner, impostor, _ = exchange(code, pairing.parse_code("7-orbit-lemon"), new_secret())
    forged = impostor.finish_answer(pairing.Welcome(new_secret(), "evil", bytes(32)))
    with pytest.raises(pairing.BadConfirmation):
        joiner.welcome(forged)


def test_the_confirmation_covers_the_transcript() -> None:
    """A session id swapped on the way changes the transcript: no confirmation holds."""
    code = pairing.new_code(3)
    joiner = pairing.JoinerSide(code)
    inviter = pairing.InviterSide(code, pairing.decode_start(joiner.start_message()))
    answer = cbor2.loads(inviter.start_answer())
    answer["session"] = bytes(16)
    finish = pairing.decode_finish(joiner.finish_message(cbor2.dumps(answer), ME))
    with pytest.raises(pairing.BadConfirmation):
        inviter.joiner(pairing.FinishRequest(inviter.session, finish.confirm, finish.sealed))


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xff" * 10,
        cbor2.dumps([1, 2]),
        cbor2.dumps({"v": 1, "n": 7}),
        cbor2.dumps({"v": 2, "n": 7, "pake": b"B" * 33}),
        cbor2.dumps({"v": 1, "n": 0, "pake": b"A" * 33}),
        cbor2.dumps({"v": 1, "n": True, "pake": b"A" * 33}),
        cbor2.dumps({"v": 1, "n": 7, "pake": b"A" * 34}),
        cbor2.dumps({"v": 1, "n": 7, "pake": "A" * 33}),
        cbor2.dumps({"v": 1, "n": 7, "pake": b"A" * 33, "x": 1}),
        cbor2.dumps({"v": 1, "n": 7, "pake": b"A" * 2000}),
    ],
)
def test_malformed_starts_are_refused(body: bytes) -> None:
    with pytest.raises(pairing.BadMessage):
        pairing.decode_start(body)


def test_a_start_that_is_no_curve_point_is_refused() -> None:
    start = pairing.StartRequest(7, b"A" + b"\xff" * 32)
    with pytest.raises(pairing.BadMessage):
        pairing.InviterSide(pairing.new_code(7), start)


# --- the endpoint on the peer port -------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@contextlib.asynccontextmanager
async def inviting(
    tmp_path: Path, clock: FakeClock | None = None
) -> AsyncIterator[tuple[Node, int]]:
    root = new_secret()
    node = make_node(tmp_path, "A", VolumeKeys.from_root(root))
    node.allow_invitations(root)
    if clock is not None:
        node.invitations = invitations.Invitations(root, node.identity.node_id, "A", clock)
        node.sync.pairing = node.invitations
    async with running(node) as (sync,):
        yield node, sync.port


async def post(port: int, path: str, body: bytes) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://127.0.0.1:{port}{path}", data=body) as resp,
    ):
        return resp.status, await resp.read()


def drain(invitation: invitations.Invitation) -> list[str]:
    kinds = []
    while not invitation.events.empty():
        kinds.append(invitation.events.get_nowait().kind)
    return kinds


@pytest.mark.asyncio
async def test_without_an_invitation_the_endpoint_is_a_bare_401(
    tmp_path: Path, expect_logs: pytest.FixtureRequest
) -> None:
    """It answers as the port answers any stranger: nothing tells it exists."""
    expect_logs(r"refused a peer request", logger="peer.sync")
    async with inviting(tmp_path) as (node, port):
        start = pairing.JoinerSide(pairing.new_code(7)).start_message()
        assert await post(port, pairing.START_PATH, start) == (401, b"")
        assert await post(port, "/no-such-path", start) == (401, b"")
        assert node.invitations is not None
        assert node.invitations.open_numbers() == []
        assert node.sync.statistics().refused_requests == 2


@pytest.mark.asyncio
async def test_a_code_pairs_one_machine_over_the_peer_port(tmp_path: Path) -> None:
    async with inviting(tmp_path) as (node, port):
        assert node.invitations is not None
        invitation = node.invitations.open()
        paired = await pair_with(invitation.code, "127.0.0.1", port, ME)
        assert VolumeKeys.from_root(paired.root) == node.keys
        assert paired.inviter_node == node.identity.node_id
        assert paired.inviter_name == "A"
        assert drain(invitation) == ["trying", "paired"]
        with pytest.raises(pairing.CodeUsed):
            await pair_with(invitation.code, "127.0.0.1", port, ME)


@pytest.mark.asyncio
async def test_another_number_is_not_here(tmp_path: Path) -> None:
    async with inviting(tmp_path) as (node, port):
        assert node.invitations is not None
        invitation = node.invitations.open()
        other = pairing.Code(invitation.number % 99 + 1, invitation.code.words)
        with pytest.raises(_NotHere):
            await pair_with(other, "127.0.0.1", port, ME)
        assert invitation.attempts == 0


@pytest.mark.asyncio
async def test_three_wrong_codes_burn_the_invitation(
    tmp_path: Path, expect_logs: pytest.FixtureRequest
) -> None:
    expect_logs(r"wrong pairing code", logger="peer.invitations")
    async with inviting(tmp_path) as (node, port):
        assert node.invitations is not None
        invitation = node.invitations.open()
        wrong = pairing.Code(invitation.number, ("apple", "apple"))
        if wrong == invitation.code:
            wrong = pairing.Code(invitation.number, ("acorn", "acorn"))
        for _ in range(3):
            with pytest.raises(pairing.WrongCode):
                await pair_with(wrong, "127.0.0.1", port, ME)
        with pytest.raises(pairing.CodeBurnt):
            await pair_with(invitation.code, "127.0.0.1", port, ME)
        assert drain(invitation) == ["trying", "wrong", "trying", "wrong", "trying", "burnt"]


@pytest.mark.asyncio
async def test_unfinished_tries_count_as_failures(
    tmp_path: Path, expect_logs: pytest.FixtureRequest
) -> None:
    """Starting without finishing is still a guess: three at once use every try,
    and once they time out the code is burnt."""
    expect_logs(r"wrong pairing code", logger="peer.invitations")
    clock = FakeClock()
    async with inviting(tmp_path, clock) as (node, port):
        assert node.invitations is not None
        invitation = node.invitations.open()
        for _ in range(3):
            status, _ = await post(
                port, pairing.START_PATH, pairing.JoinerSide(invitation.code).start_message()
            )
            assert status == 200
        status, body = await post(
            port, pairing.START_PATH, pairing.JoinerSide(invitation.code).start_message()
        )
        assert (status, pairing.decode_refusal(body)) == (429, "busy")
        clock.now += invitations.SESSION_TTL_S + 1
        with pytest.raises(pairing.CodeBurnt):
            await pair_with(invitation.code, "127.0.0.1", port, ME)
        assert invitation.state == invitations.BURNT


@pytest.mark.asyncio
async def test_concurrent_starts_get_three_tries_in_all(tmp_path: Path) -> None:
    """Starts that race each other still get three tries: the bound holds
    while the SPAKE2 of earlier ones is being computed."""
    async with inviting(tmp_path) as (node, port):
        assert node.invitations is not None
        invitation = node.invitations.open()
        starts = [pairing.JoinerSide(invitation.code).start_message() for _ in range(8)]
        answers = await asyncio.gather(*(post(port, pairing.START_PATH, s) for s in starts))
        statuses = sorted(status for status, _ in answers)
        assert statuses == [200] * invitations.MAX_ATTEMPTS + [429] * (8 - invitations.MAX_ATTEMPTS)


@pytest.mark.asyncio
async def test_an_expired_code_is_refused(tmp_path: Path) -> None:
    clock = FakeClock()
    async with inviting(tmp_path, clock) as (node, port):
        assert node.invitations is not None
        invitation = node.invitations.open(ttl_s=60)
        clock.now += 61
        with pytest.raises(pairing.CodeExpired):
            await pair_with(invitation.code, "127.0.0.1", port, ME)
        assert drain(invitation) == ["expired"]


@pytest.mark.asyncio
async def test_starts_are_rate_limited_across_invitations(tmp_path: Path) -> None:
    clock = FakeClock()
    async with inviting(tmp_path, clock) as (node, port):
        assert node.invitations is not None
        opened = [node.invitations.open() for _ in range(4)]
        statuses = []
        for i in range(invitations.STARTS_PER_WINDOW + 1):
            code = opened[i // invitations.MAX_ATTEMPTS].code
            status, _ = await post(
                port, pairing.START_PATH, pairing.JoinerSide(code).start_message()
            )
            statuses.append(status)
        assert statuses == [200] * invitations.STARTS_PER_WINDOW + [429]
        clock.now += invitations.RATE_WINDOW_S
        status, _ = await post(
            port, pairing.START_PATH, pairing.JoinerSide(opened[3].code).start_message()
        )
        assert status == 200


@pytest.mark.asyncio
async def test_oversized_and_malformed_requests_change_nothing(tmp_path: Path) -> None:
    async with inviting(tmp_path) as (node, port):
        assert node.invitations is not None
        invitation = node.invitations.open()
        start = pairing.JoinerSide(invitation.code).start_message()
        status, _ = await post(port, pairing.START_PATH, start + b"\0" * pairing.MAX_BODY)
        assert status == 413
        status, body = await post(port, pairing.START_PATH, b"\xff\xfe")
        assert (status, pairing.decode_refusal(body)) == (400, "malformed")
        status, body = await post(port, pairing.FINISH_PATH, cbor2.dumps({"v": 1}))
        assert status == 400
        assert invitation.attempts == 0
        assert invitation.state == invitations.OPEN
        await asyncio.sleep(0)
        assert drain(invitation) == []


async def raw_post(port: int, body: bytes, send: int, pause_s: float) -> bytes:
    """POST /pair/start by hand: the headers and `send` bytes of `body`, a
    pause, then the rest (if any was meant to come); the raw answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        f"POST {pairing.START_PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    writer.write(head.encode() + body[:send])
    await writer.drain()
    await asyncio.sleep(pause_s)
    if send < len(body):
        writer.write(body[send:])
        await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return answer


@pytest.mark.asyncio
async def test_a_body_in_pieces_is_read_whole(tmp_path: Path) -> None:
    async with inviting(tmp_path) as (node, port):
        assert node.invitations is not None
        invitation = node.invitations.open()
        body = pairing.JoinerSide(invitation.code).start_message()
        answer = await raw_post(port, body, send=10, pause_s=0.2)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:80]


@pytest.mark.asyncio
async def test_a_body_that_never_comes_is_given_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(invitations, "BODY_TIMEOUT_S", 0.3)
    async with inviting(tmp_path) as (node, port):
        assert node.invitations is not None
        invitation = node.invitations.open()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = f"POST {pairing.START_PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: 60\r\n\r\n"
        writer.write(head.encode() + b"\xa3")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(200), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 408"), answer[:80]
        assert invitation.attempts == 0


def test_a_node_that_pairs_nobody_does_not_load_spake2() -> None:
    """SPAKE2's tables are 7 MiB of a node's resident memory: loaded by a
    pairing only, not by a node that runs, serves peers and mounts."""
    code = (
        "import sys, peer.cli, peer.node, peer.net.invitations, peer.net.joining; "
        "print('spake2' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False", done.stdout
