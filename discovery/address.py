"""Peer addresses: what discovery yields, and the HOST:PORT text users type.

Invariant: `parse_hostport` accepts exactly what `format_hostport` writes (plus a
bare host when a default port is given), and every host it returns is an IP
literal or a syntactically valid host name, without brackets.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

Source = Literal["mdns", "static", "remembered"]

# RFC 1123 labels: letters, digits and inner hyphens. Underscores are not valid
# in host names, but they turn up in real LANs (Windows machine names), and
# rejecting them helps nobody.
_LABEL = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")


@dataclass(frozen=True, slots=True)
class PeerAddress:
    """Where a peer can be reached, and how we learned of it.

    `host` is an IPv4 or IPv6 literal (an IPv6 link-local one may carry a
    `%scope`) or a host name; `node_id` is the hex node id from the peer's TXT
    record, None for static and remembered addresses until something learns it.
    """

    host: str
    port: int
    node_id: str | None
    source: Source


def format_hostport(host: str, port: int) -> str:
    """`host:port`, with brackets around an IPv6 literal: the form to persist."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_hostport(
    text: str, default_port: int | None = None, *, any_port: bool = False
) -> tuple[str, int]:
    """'10.0.0.2:7654', '[fe80::1]:7654', 'host:7654' -> (host, port).

    A bare host (no port) is accepted only when `default_port` is given; port 0
    ("any free port", for a listening address) only with `any_port`. Raises
    ValueError with a message that names the bad input and shows the right form.
    """
    stripped = text.strip()
    if not stripped:
        raise ValueError("empty peer address (expected HOST:PORT, e.g. 192.168.1.20:7654)")
    if "://" in stripped or "/" in stripped:
        raise ValueError(f"{text!r} is not HOST:PORT (give e.g. 192.168.1.20:7654, not a URL)")

    port_text: str | None
    if stripped.startswith("["):
        end = stripped.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: missing ']' after the IPv6 address")
        host, rest = stripped[1:end], stripped[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"{text!r}: expected ':PORT' after ']'")
        port_text = rest[1:] if rest else None
        if not _is_ipv6(host):
            raise ValueError(f"{text!r}: {host!r} in brackets is not an IPv6 address")
    elif stripped.count(":") > 1:
        # An IPv6 literal without brackets: the last group could be a port or
        # part of the address, so only take it whole, as a host with no port.
        if not _is_ipv6(stripped) or default_port is None:
            raise ValueError(
                f"{text!r} is not HOST:PORT (an IPv6 address needs brackets: [fe80::1]:7654)"
            )
        host, port_text = stripped, None
    else:
        host, sep, port_text_or_empty = stripped.partition(":")
        port_text = port_text_or_empty if sep else None
        if not host:
            raise ValueError(f"{text!r}: the host is missing (expected HOST:PORT)")
        _check_host(text, host)

    if port_text is None:
        if default_port is None:
            raise ValueError(f"{text!r}: the port is missing (expected HOST:PORT)")
        return host, _check_port(text, str(default_port))
    if any_port and port_text == "0":
        return host, 0
    return host, _check_port(text, port_text)


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _check_host(text: str, host: str) -> None:
    labels = host.removesuffix(".").split(".")
    if all(label.isdigit() for label in labels):
        # All-numeric is an IPv4 address or nothing: "10.0.0.256" must not be
        # taken for a host name and looked up.
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not a valid IPv4 address") from None
        return
    if len(host) > 253 or not all(_LABEL.match(label) for label in labels):
        raise ValueError(f"{text!r}: {host!r} is not a valid host name or IP address")


def _check_port(text: str, port_text: str) -> int:
    if not port_text.isascii() or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535, not {port_text!r}")
    return int(port_text)
