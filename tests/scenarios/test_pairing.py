"""Pairing by a one-time code against a real member: real `dfs-peer` processes,
each in its own network namespace as root (on loopback otherwise).

What a stranger on the LAN can do with the pairing endpoint: a wrong code costs
an online attempt and teaches "wrong" in one line; three failures burn the
code; expired and used codes are refused with one clear line; a brute force
gets three guesses however many it sends; and an eavesdropper who records the
whole exchange finds neither the secret nor any key derived from it.
"""

from __future__ import annotations

import io
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from peer.keys import VolumeKeys
from peer.secret import parse_secret
from scenarios.cluster import Cluster, ClusterNode
from scenarios.invites import Invite, Tool, try_join
from scenarios.report import Report

pytestmark = [pytest.mark.scenario, pytest.mark.mount, pytest.mark.slow]

WRONG = "dfs-peer: wrong code: check it with whoever ran `dfs-peer invite` and try again"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One running member, A, that every test invites from."""
    workdir = tmp_path_factory.mktemp("pairing")
    with Cluster(workdir, Report("pairing tests", io.StringIO())) as c:
        a = c.add("A")
        c.start(a)
        yield c


@pytest.fixture
def member(cluster: Cluster) -> ClusterNode:
    return cluster.nodes[0]


_count = iter(range(1, 1000))


def new_host(c: Cluster, label: str) -> ClusterNode:
    """A machine that does not hold the volume (yet)."""
    return c.add(f"{label}{next(_count)}", paired=True, mdns=False, peers=[])


def wrong_words(code: str) -> str:
    """The code with its words changed: the right number, a wrong password."""
    number, first, second = code.split("-")
    return f"{number}-{'apple' if first != 'apple' else 'acorn'}-{second}"


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{text}"
    return lines[0]


def untouched(node: ClusterNode) -> bool:
    data = node.process.data_dir
    return not data.exists() or not any(data.iterdir())


def test_a_wrong_code_fails_with_one_line(cluster: Cluster, member: ClusterNode) -> None:
    joiner = new_host(cluster, "W")
    with Invite(member) as invite:
        code = invite.code()
        out = try_join(cluster, joiner, wrong_words(code), member.host.address)
        assert out.returncode == 2
        assert one_line(out.stderr).startswith(WRONG)
        invite.wait_printed(r"a machine tried a wrong code \(2 of 3 tries left\)")
    assert untouched(joiner), "a failed join left files in the joiner's data dir"


def test_three_wrong_codes_burn_the_code(cluster: Cluster, member: ClusterNode) -> None:
    joiner = new_host(cluster, "B")
    with Invite(member) as invite:
        code = invite.code()
        for _ in range(3):
            out = try_join(cluster, joiner, wrong_words(code), member.host.address)
            assert one_line(out.stderr).startswith(WRONG)
        assert invite.wait() == 1
        last = one_line("\n".join(invite.err.lines))
        assert "three wrong codes were tried, so the code no longer works" in last
        out = try_join(cluster, joiner, code, member.host.address)
        assert "this code no longer works: three wrong codes were tried" in one_line(out.stderr)
    assert untouched(joiner)


def test_an_expired_code_is_refused(cluster: Cluster, member: ClusterNode) -> None:
    joiner = new_host(cluster, "E")
    with Invite(member, ttl="3s") as invite:
        code = invite.code()
        assert invite.wait(timeout=30) == 1
        assert "the code expired before a machine used it" in one_line("\n".join(invite.err.lines))
        out = try_join(cluster, joiner, code, member.host.address)
        assert "this code has expired" in one_line(out.stderr)
    assert untouched(joiner)


def test_ctrl_c_on_invite_cancels_the_code(cluster: Cluster, member: ClusterNode) -> None:
    joiner = new_host(cluster, "C")
    with Invite(member) as invite:
        code = invite.code()
        invite.proc.send_signal(signal.SIGINT)
        invite.wait()
    number = code.split("-")[0]
    cluster.wait_until(
        lambda: f"invitation closed number={number} state=cancelled" in member.process.log_text(),
        "the member to cancel the invitation",
    )
    out = try_join(cluster, joiner, code, member.host.address)
    assert "the invitation was cancelled on the inviting machine" in one_line(out.stderr)
    assert untouched(joiner)


def test_a_brute_force_gets_three_guesses(cluster: Cluster, member: ClusterNode) -> None:
    """However many codes an attacker sends, three are checked; the rest are
    refused before any SPAKE2 runs, and the right code no longer works either."""
    attacker = new_host(cluster, "X")
    joiner = new_host(cluster, "J")
    tries = 40
    with Invite(member) as invite:
        code = invite.code()
        number = code.split("-")[0]
        tool = Tool(
            attacker.host.command_prefix(), "guess", member.host.address, number, str(tries)
        )
        try:
            outcome = tool.result()
        finally:
            tool.close()
        cluster.report.note(f"brute force of {tries} codes: {outcome}")
        assert outcome.get("paired", 0) == 0, outcome
        assert outcome.get("wrong", 0) == 3, f"expected exactly three checked guesses: {outcome}"
        assert outcome.get("burnt", 0) == tries - 3, outcome
        assert invite.wait() == 1
        out = try_join(cluster, joiner, code, member.host.address)
        assert "no longer works" in one_line(out.stderr)


def test_an_eavesdropper_learns_nothing_and_the_code_works_once(
    cluster: Cluster, member: ClusterNode, tmp_path: Path
) -> None:
    """The joiner reaches the member only through a relay that records every
    byte both ways; the recording holds the exchange, but neither the secret
    (in any form), nor a key derived from it, nor the code."""
    relay_host = cluster.lan.add_host(f"R{next(_count)}")
    capture = tmp_path / "capture.bin"
    relay = Tool(
        relay_host.command_prefix(), "relay", relay_host.address, member.host.address, str(capture)
    )
    joiner = new_host(cluster, "J")
    late = new_host(cluster, "L")
    try:
        relay.wait_ready()
        with Invite(member) as invite:
            code = invite.code()
            joiner.process.code = code
            joiner.process.extra = [
                "--listen",
                joiner.host.address,
                "--no-mdns",
                "--peer",
                relay_host.address,
            ]
            joiner.process.start(wait=False)
            joiner.up = True
            cluster.wait_started(joiner)
            invite.wait_printed(rf"paired with `{joiner.name}`")
            assert invite.wait() == 0
        (member.path("note.txt")).write_bytes(b"written after the pairing\n")
        cluster.wait_file(joiner, "note.txt", b"written after the pairing\n")

        out = try_join(cluster, late, code, member.host.address)
        assert "this code was already used" in one_line(out.stderr)
        assert untouched(late)
    finally:
        relay.close()

    recorded = capture.read_bytes()
    assert b"POST /pair/start" in recorded, "the relay did not record the exchange"
    assert b"POST /pair/finish" in recorded, "the relay did not record the exchange"
    secret_text = cluster.secret_file.read_text().strip()
    root = parse_secret(secret_text)
    keys = VolumeKeys.from_root(root)
    needles = {
        "the root": root,
        "the root in hex": root.hex().encode(),
        "the secret text": secret_text.encode(),
        "the secret text without dashes": secret_text.replace("-", "").encode(),
        "the block key": keys.blocks,
        "the log key": keys.log,
        "the block-id key": keys.block_ids,
        "the peer MAC key": keys.peers,
        "the code": code.encode(),
        "the code's words": "-".join(code.split("-")[1:]).encode(),
    }
    found = [what for what, needle in needles.items() if needle in recorded]
    assert not found, f"the recording of {len(recorded)} bytes holds {', '.join(found)}"
    cluster.report.note(f"recorded {len(recorded)} bytes; none of {len(needles)} secrets in them")

    # Nor was the secret shown to anyone: not by invite, not in the joiner's output.
    shown = invite.output() + joiner.process.log_text()
    assert secret_text not in shown
    assert root.hex() not in shown
    assert re.search(r"the volume secret is kept in \S+volume.secret \(mode 0600\)", shown)
