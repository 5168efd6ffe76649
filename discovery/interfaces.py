"""This host's addresses, as the kernel reports them: what we advertise by default.

Why not zeroconf: its `get_all_addresses` is deprecated in favour of `ifaddr`,
and discovery imports only the standard library and zeroconf (DESIGN §2). The
Linux ioctls below are what `ifconfig` uses; they report each interface's
primary IPv4 address, which is the one a peer on that link should dial.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct

# From <linux/sockios.h> and <net/if.h>.
_SIOCGIFFLAGS = 0x8913
_SIOCGIFADDR = 0x8915
_IFF_UP = 0x1
_IFF_LOOPBACK = 0x8
# struct ifreq: a 16-byte name, then a union (flags: short; addr: sockaddr_in,
# whose IPv4 address sits 4 bytes in). 40 bytes on 64-bit Linux.
_IFREQ = struct.Struct("16s24s")
_IFNAMSIZ = 16


def host_ipv4_addresses() -> list[str]:
    """The primary IPv4 address of every interface that is up, loopback excluded.

    Interfaces without an IPv4 address, or that vanish while we look, are
    skipped; the result may be empty (a machine with no network).
    """
    found: list[str] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _index, ifname in socket.if_nameindex():
            request = _IFREQ.pack(ifname.encode()[: _IFNAMSIZ - 1], b"")
            try:
                flags = struct.unpack_from("H", fcntl.ioctl(sock, _SIOCGIFFLAGS, request), 16)[0]
                if not flags & _IFF_UP or flags & _IFF_LOOPBACK:
                    continue
                reply = fcntl.ioctl(sock, _SIOCGIFADDR, request)
            except OSError:
                continue  # EADDRNOTAVAIL: no IPv4 address; ENODEV: gone meanwhile
            address = socket.inet_ntoa(reply[20:24])
            if not ipaddress.IPv4Address(address).is_loopback and address not in found:
                found.append(address)
    return found
