"""Discovery with mDNS off, in this process: static and remembered peers only,
the lifecycle, argument checks, and callbacks that fail.

With mDNS off nothing touches the network, so these need no namespaces; that
nothing is sent is checked over a real LAN in test_lan_discovery.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from discovery import Discovery, PeerAddress

pytestmark = pytest.mark.asyncio

TAG = "ab" * 16
NODE = "cd" * 16


def quiet(**overrides: object) -> Discovery:
    settings: dict[str, object] = {
        "volume_tag": TAG,
        "node_id": NODE,
        "name": "test",
        "port": 7654,
        "protocol": 1,
        "mdns": False,
    }
    return Discovery(**(settings | overrides))  # type: ignore[arg-type]


async def test_start_reports_static_then_remembered_peers_at_once() -> None:
    found: list[PeerAddress] = []
    discovery = quiet(
        static=[("10.0.0.2", 7654), ("nas.local", 80), ("0::1", 9)],
        # The same address again (however spelled) is reported once, as static.
        remembered=[("10.0.0.3", 7654), ("10.0.0.2", 7654), ("NAS.local.", 80), ("::1", 9)],
        on_found=found.append,
    )
    assert discovery.peers() == []
    await discovery.start()
    expected = [
        PeerAddress("10.0.0.2", 7654, None, "static"),
        PeerAddress("nas.local", 80, None, "static"),
        PeerAddress("::1", 9, None, "static"),
        PeerAddress("10.0.0.3", 7654, None, "remembered"),
    ]
    assert found == expected
    assert discovery.peers() == expected
    await discovery.close()
    assert discovery.peers() == []


async def test_close_is_idempotent_and_start_runs_once() -> None:
    lost: list[PeerAddress] = []
    discovery = quiet(static=[("10.0.0.2", 1)], on_lost=lost.append)
    await discovery.close()  # before start: nothing to do
    with pytest.raises(RuntimeError, match="closed Discovery"):
        await discovery.start()

    async with quiet() as running:
        with pytest.raises(RuntimeError, match="started Discovery"):
            await running.start()
    await running.close()
    assert lost == [], "static peers are never lost"


async def test_a_failing_callback_is_logged_and_the_rest_still_reported(
    expect_logs: Callable[..., None],
) -> None:
    expect_logs(r"^a discovery callback failed", logging.ERROR, logger="discovery.peers")
    found: list[PeerAddress] = []

    def fragile(peer: PeerAddress) -> None:
        found.append(peer)
        raise RuntimeError("the caller's bug")

    discovery = quiet(static=[("10.0.0.2", 1), ("10.0.0.3", 1)], on_found=fragile)
    await discovery.start()
    assert [p.host for p in found] == ["10.0.0.2", "10.0.0.3"]
    await discovery.close()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"volume_tag": "not hex"}, "volume_tag must be 1 to 128 hex digits"),
        ({"node_id": ""}, "node_id must be 1 to 128 hex digits"),
        ({"port": 0}, "port must be from 1 to 65535, not 0"),
        ({"port": 70000}, "port must be from 1 to 65535"),
        ({"protocol": -1}, "protocol version must not be negative"),
        ({"addresses": ["nas.local"]}, "addresses must be IP addresses, not 'nas.local'"),
        ({"addresses": []}, "addresses is empty"),
        ({"static": [("10.0.0.2", 0)]}, "static peer address '10.0.0.2' port 0 is not valid"),
        ({"remembered": [("", 1)]}, "remembered peer address '' port 1 is not valid"),
    ],
)
async def test_bad_arguments_are_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        quiet(**overrides)


async def test_addresses_must_be_a_list_not_one_string() -> None:
    with pytest.raises(TypeError, match="not one string"):
        quiet(addresses="10.0.0.1")
