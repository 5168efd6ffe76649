"""Discovery over real multicast: nodes in network namespaces on one bridge.

Each node is a subprocess (tests/discovery/node_main.py) running a real
`Discovery` with real zeroconf; the tests read what it reports.
"""

from __future__ import annotations

import re

from tests.discovery.lan import Lan, Node

TAG = "a1" * 16
OTHER_TAG = "b2" * 16
# Starting a node (interpreter, imports, probing its name) takes about 1.3 s.
# Once two nodes have started, each has the other within a fraction of a
# second; a node that closes says goodbye and is dropped as that arrives.
START_S = 10.0
FIND_S = 3.0
LOST_S = 2.0


def node_id(n: int) -> str:
    return f"{n:02x}" * 16


def service(name: str, n: int) -> str:
    return re.escape(f"'{name}-{node_id(n)[:8]}._dfs-peer._tcp.local.'")


def start(lan: Lan, host: int, name: str, n: int, **config: object) -> Node:
    """Node `name` with id `n` on host `host`, bound to its bridge address."""
    config.setdefault("addresses", [lan.hosts[host].address])
    config.setdefault("tag", TAG)
    return lan.start(host, name=name, node_id=node_id(n), port=7000 + n, **config)


def started(*nodes: Node) -> None:
    for node in nodes:
        node.wait_for("started", START_S)


def test_nodes_of_one_volume_find_each_other(lan: Lan) -> None:
    # Each host also has an interface off the bridge: a node given its address
    # advertises only that one; a node left to choose advertises all of them.
    lan.add_side_interface(0, "10.232.0.1")
    lan.add_side_interface(1, "10.232.0.2")
    a = start(lan, 0, "a", 1)
    b = start(lan, 1, "b", 2, addresses=None)
    started(a, b)

    found = b.wait_for("found", FIND_S, node_id=node_id(1))
    assert {k: v for k, v in found.items() if k != "t"} == {
        "event": "found",
        "host": "10.231.0.1",
        "port": 7001,
        "node_id": node_id(1),
        "source": "mdns",
    }
    for host in ("10.231.0.2", "10.232.0.2"):
        a.wait_for("found", FIND_S, node_id=node_id(2), host=host, port=7002, source="mdns")

    a.send("peers")
    b.send("peers")
    assert sorted(p["host"] for p in a.wait_for("peers", FIND_S)["peers"]) == [
        "10.231.0.2",
        "10.232.0.2",
    ]
    assert [p["host"] for p in b.wait_for("peers", FIND_S)["peers"]] == ["10.231.0.1"]
    assert len(b.of("found")) == 1, "a advertised more than the address it was given"
    assert not a.of("found", node_id=node_id(1)), "a reported itself"
    assert not b.of("found", node_id=node_id(2)), "b reported itself"
    assert not a.of("lost")
    assert not b.of("lost")


def test_other_volumes_and_malformed_adverts_are_never_reported(lan: Lan) -> None:
    a = start(lan, 0, "a", 1)
    other = start(lan, 1, "other", 2, tag=OTHER_TAG)
    # Our service type and tag, but an id that is not even UTF-8: a stranger's
    # or a broken advert, sent with bare zeroconf.
    txt = [b"v=1", b"tag=" + TAG.encode(), b"id=\xffnot-hex", b"name=junk"]
    junk = lan.start(
        2,
        name="junk",
        port=7003,
        addresses=["10.231.0.3"],
        raw_txt_hex=b"".join(bytes([len(s)]) + s for s in txt).hex(),
    )
    started(a, other, junk)

    # Evidence that both adverts reached `a` and were turned down, not lost on
    # the way: without it, "never reported" would prove nothing.
    a.wait_for_log(f"ignoring service={service('other', 2)} reason='another volume'", FIND_S)
    a.wait_for_log(
        r"ignoring service='junk\._dfs-peer\._tcp\.local\.' reason=.malformed TXT: 'id' .* not UTF-8",
        FIND_S,
    )
    other.wait_for_log(f"ignoring service={service('a', 1)} reason='another volume'", FIND_S)

    a.send("peers")
    assert a.wait_for("peers", FIND_S)["peers"] == []
    assert not a.of("found"), "a node of another volume, or a malformed one, was reported"
    assert not other.of("found"), "a node of another volume was reported"
    assert not a.of("incompatible")
    assert not other.of("incompatible")


def test_another_protocol_version_is_reported_as_incompatible(lan: Lan) -> None:
    a = start(lan, 0, "a", 1, protocol=1)
    # No on_incompatible callback on `b`: discovery itself warns.
    b = start(lan, 1, "b", 2, protocol=2, report_incompatible=False)
    lan.allow_log(r"^node 01010101 at 10\.231\.0\.1 speaks protocol version 1, this node 2:")
    started(a, b)

    seen = a.wait_for("incompatible", FIND_S, node_id=node_id(2))
    assert (seen["host"], seen["port"], seen["version"]) == ("10.231.0.2", 7002, 2)
    b.wait_for_log(r"^node 01010101 .* speaks protocol version 1", FIND_S, level="WARNING")
    assert not a.of("found"), "a node speaking another protocol was reported found"
    assert not b.of("found"), "a node speaking another protocol was reported found"
    a.send("peers")
    assert a.wait_for("peers", FIND_S)["peers"] == []
    assert len(a.of("incompatible")) == 1, "the same incompatible node was reported twice"


def test_a_node_that_closes_is_reported_lost_and_found_again(lan: Lan) -> None:
    # `a`'s callbacks raise after recording each event: discovery must log
    # that and go on reporting.
    lan.allow_log(r"^a discovery callback failed")
    a = start(lan, 0, "a", 1, raise_in_callbacks=True)
    b = start(lan, 1, "b", 2)
    c = start(lan, 2, "c", 3)
    started(a, b, c)
    for node, peers in ((a, (2, 3)), (b, (1, 3)), (c, (1, 2))):
        for peer in peers:
            node.wait_for("found", FIND_S, node_id=node_id(peer))

    b.send("close")
    closed = b.wait_for("closed", LOST_S)
    for node in (a, c):
        lost = node.wait_for("lost", LOST_S, node_id=node_id(2))
        assert (lost["host"], lost["port"], lost["source"]) == ("10.231.0.2", 7002, "mdns")
        assert lost["t"] - closed["t"] < LOST_S, f"{node.label} saw b go only after {LOST_S} s"
    assert not a.of("lost", node_id=node_id(3)), "a lost c, which is still there"
    assert not c.of("lost", node_id=node_id(1)), "c lost a, which is still there"
    a.wait_for_log(r"^a discovery callback failed", FIND_S, level="ERROR")

    # The same node back, as after a restart: found again by both.
    b.stop()
    started(start(lan, 1, "b", 2))
    a.wait_for("found", FIND_S, count=2, node_id=node_id(2))
    c.wait_for("found", FIND_S, count=2, node_id=node_id(2))


def test_without_mdns_only_static_peers_and_no_packets(lan: Lan) -> None:
    before = lan.udp_datagrams_sent(1)
    quiet = start(
        lan,
        1,
        "quiet",
        2,
        mdns=False,
        static=[["10.231.0.1", 7001]],
        remembered=[["10.231.0.3", 7003], ["10.231.0.1", 7001]],
    )
    quiet.wait_for("started", START_S)
    assert [(e["host"], e["port"], e["node_id"], e["source"]) for e in quiet.of("found")] == [
        ("10.231.0.1", 7001, None, "static"),
        ("10.231.0.3", 7003, None, "remembered"),
    ]
    # Two mDNS nodes on the same LAN, meanwhile: they find each other (so
    # multicast works here), and neither ever hears of `quiet`.
    a = start(lan, 0, "a", 1)
    c = start(lan, 2, "c", 3)
    started(a, c)
    a.wait_for("found", FIND_S, node_id=node_id(3))
    c.wait_for("found", FIND_S, node_id=node_id(1))

    quiet.send("peers")
    assert len(quiet.wait_for("peers", FIND_S)["peers"]) == 2
    assert len(quiet.of("found")) == 2, "discovery with mDNS off reported an mDNS peer"
    assert not a.of("found", node_id=node_id(2)), "a found the node that has mDNS off"
    assert not c.of("found", node_id=node_id(2)), "c found the node that has mDNS off"
    sent = lan.udp_datagrams_sent(1) - before
    assert sent == 0, f"{sent} UDP datagrams left the namespace of the node with mDNS off"


def test_an_address_on_no_interface_fails_start_clearly(lan: Lan) -> None:
    node = start(lan, 0, "a", 1, addresses=["10.231.9.9"])
    error = node.wait_for("error", START_S)
    assert error["message"] == "[Errno 19] cannot start mDNS on 10.231.9.9: No such device"
    node.wait_for("closed", START_S)
