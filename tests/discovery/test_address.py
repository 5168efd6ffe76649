"""HOST:PORT text as users type it after `--peer`, and back."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from discovery import format_hostport, parse_hostport


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.2:7654", ("10.0.0.2", 7654)),
        ("  10.0.0.2:7654\n", ("10.0.0.2", 7654)),
        ("[fe80::1]:7654", ("fe80::1", 7654)),
        ("[fe80::1%eth0]:1", ("fe80::1%eth0", 1)),
        ("[::]:65535", ("::", 65535)),
        ("host:7654", ("host", 7654)),
        ("nas.local:80", ("nas.local", 80)),
        ("my-box.example.org.:443", ("my-box.example.org.", 443)),
        ("WIN_PC:7654", ("WIN_PC", 7654)),
    ],
)
def test_parses_host_and_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.2", ("10.0.0.2", 7654)),
        ("host", ("host", 7654)),
        ("[fe80::1]", ("fe80::1", 7654)),
        ("fe80::1", ("fe80::1", 7654)),  # unambiguous only because no port may follow
        ("host:80", ("host", 80)),
    ],
)
def test_default_port_fills_a_missing_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text, default_port=7654) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty peer address"),
        ("   ", "empty peer address"),
        ("host", "the port is missing"),
        ("10.0.0.2:", "port must be a number from 1 to 65535, not ''"),
        ("host:0", "port must be a number from 1 to 65535, not '0'"),
        ("host:65536", "not '65536'"),
        ("host:-1", "not '-1'"),
        ("host:12ab", "not '12ab'"),
        ("host:\u0661\u0662", "port must be a number"),  # Arabic-Indic digits
        (":7654", "the host is missing"),
        ("fe80::1:7654", "an IPv6 address needs brackets"),
        ("fe80::zz", "an IPv6 address needs brackets"),
        ("[fe80::1", "missing ']'"),
        ("[fe80::1]7654", "expected ':PORT' after ']'"),
        ("[10.0.0.1]:7654", "is not an IPv6 address"),
        ("10.0.0.256:7654", "is not a valid IPv4 address"),
        ("1.2.3:7654", "is not a valid IPv4 address"),
        ("bad host:7654", "is not a valid host name"),
        ("-lead.example:7654", "is not a valid host name"),
        ("a..b:7654", "is not a valid host name"),
        ("http://10.0.0.2:7654", "not a URL"),
        ("10.0.0.2:7654/sync", "not a URL"),
        ("x" * 64 + ".example:1", "is not a valid host name"),
    ],
)
def test_rejects_bad_text_saying_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_hostport(text)


@given(
    host=st.one_of(
        st.ip_addresses().map(str),
        st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z]{1,10}){0,3}\Z"),
    ),
    port=st.integers(1, 65535),
)
def test_parse_reads_what_format_writes(host: str, port: int) -> None:
    if host.replace(".", "").isdigit() and host.count(".") != 3:
        return  # all digits but not an IPv4 address: rejected on purpose
    assert parse_hostport(format_hostport(host, port)) == (host, port)


def test_port_zero_only_for_a_listening_address() -> None:
    assert parse_hostport("127.0.0.1:0", any_port=True) == ("127.0.0.1", 0)
    with pytest.raises(ValueError, match="port must be a number from 1 to 65535"):
        parse_hostport("127.0.0.1:0")


def test_a_node_without_mdns_does_not_load_zeroconf() -> None:
    """zeroconf is 3.6 MiB of a node's resident memory: a node started with
    `--no-mdns` and `--listen HOST:PORT` (static peers) does not load it."""
    code = (
        "import sys, peer.cli, peer.node; "
        "peer.cli._address('127.0.0.1:0', '--listen'); "
        "peer.cli._address('10.0.0.2:7070', '--peer'); "
        "print('zeroconf' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False", done.stdout
