"""Find the other nodes of a volume: mDNS advertise and browse, plus static and
remembered peers. Yields peer addresses and knows nothing of sync.

Imports only the standard library and zeroconf (DESIGN §2): the node in `peer/`
uses this package, never the other way round.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from discovery.address import PeerAddress, format_hostport, parse_hostport
from discovery.txt import SERVICE_TYPE

if TYPE_CHECKING:
    from discovery.peers import Discovery

__all__ = ["SERVICE_TYPE", "Discovery", "PeerAddress", "format_hostport", "parse_hostport"]


def __getattr__(name: str) -> Any:
    # zeroconf (3.6 MiB resident) is loaded when mDNS is used, not by every
    # import of this package: a node with static peers only never needs it.
    if name == "Discovery":
        from discovery.peers import Discovery

        return Discovery
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
