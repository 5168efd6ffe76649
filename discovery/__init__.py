"""Find the other nodes of a volume: mDNS advertise and browse, plus static and
remembered peers. Yields peer addresses and knows nothing of sync.

Imports only the standard library and zeroconf (DESIGN §2): the node in `peer/`
uses this package, never the other way round.
"""

from discovery.address import PeerAddress, format_hostport, parse_hostport
from discovery.peers import Discovery
from discovery.txt import SERVICE_TYPE

__all__ = ["SERVICE_TYPE", "Discovery", "PeerAddress", "format_hostport", "parse_hostport"]
