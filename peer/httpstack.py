"""aiohttp, imported without reading the system's CA certificates.

aiohttp builds two TLS client contexts when it is imported, and each loads the
system's CA bundle: ~80 ms of a node's start and a few MiB of its memory on the
test machine. dfs-peer never speaks TLS: peers talk plain HTTP in which every
request and answer carries a MAC (`peer.net.auth`), and the status page and
control socket answer on 127.0.0.1 and a Unix socket. `load` imports aiohttp
with OpenSSL pointed at an empty CA file (`SSL_CERT_FILE`, read when a context
loads its defaults) and then puts the environment back as it was, so nothing
started later sees the change. The contexts still exist and still verify: an
https request made with them would be refused for want of a trusted
certificate, never let through unchecked.
"""

from __future__ import annotations

import os
import sys

_CA_FILE = "SSL_CERT_FILE"


def load() -> None:
    """Import aiohttp (once) without loading the CA bundle; see the module's docstring."""
    if "aiohttp.connector" in sys.modules:
        return
    saved = os.environ.get(_CA_FILE)
    os.environ[_CA_FILE] = os.devnull
    try:
        import aiohttp.connector  # noqa: F401  (imported here for its side effect)
    finally:
        if saved is None:
            del os.environ[_CA_FILE]
        else:
            os.environ[_CA_FILE] = saved
