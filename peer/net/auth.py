"""Mutual, replay-protected authentication of peer requests and responses.

Invariant: a request is accepted only if it carries a MAC, under the
secret-derived peer key, over its method, path, sender, timestamp, a fresh
random nonce and a hash of its body; the hash travels in a header too, so
the MAC is checked before any body byte is read (a stranger cannot make the
node buffer bodies), and the body must then match it; the timestamp is within `WINDOW_MS` of the
receiver's clock and the nonce has not been seen in that window. A response is
accepted only if its MAC covers the request's nonce, its status and a hash of
its body, so a response cannot be forged, swapped between requests or replayed.
Anyone without the secret can compute none of these, so the peer port tells
them nothing and accepts nothing from them.

The MAC is keyed BLAKE2b (PyNaCl's `generichash` with a key), which is a MAC
by design; compared in constant time with `hmac.compare_digest`.

Clocks of machines differ. A request outside the window gets an authenticated
401 carrying the server's time; the client keeps a per-peer offset and retries,
so skewed clocks cost one round trip, not the connection.
"""

from __future__ import annotations

import hmac
import os
import time
from collections import OrderedDict
from dataclasses import dataclass

import nacl.encoding
import nacl.hash

# 2: chained log entries, signed heads and fork proofs (`peer.storage.chain`), checkpoint format 2.
# 3: log entries hold ops of format 2 (`crdt.ops.COMPACT_VERSION`), which nodes
# speaking 2 would refuse as malformed.
PROTOCOL = 3

HEADER_NODE = "X-Dfs-Node"
HEADER_TIME = "X-Dfs-Time"
HEADER_NONCE = "X-Dfs-Nonce"
HEADER_PROTOCOL = "X-Dfs-Protocol"
HEADER_MAC = "X-Dfs-Mac"
HEADER_BODY = "X-Dfs-Body"
HEADER_SERVER_TIME = "X-Dfs-Server-Time"

WINDOW_MS = 120_000
NONCE_BYTES = 16
MAC_BYTES = 32
# Nonces remembered (per window) to refuse replays; beyond this many requests
# in one window, the oldest are dropped and their timestamps refused instead.
MAX_NONCES = 200_000

_REQUEST = b"dfs-peer:v1:request\x00"
_RESPONSE = b"dfs-peer:v1:response\x00"


class AuthFailed(Exception):
    """A request or response whose authentication does not hold."""


def _digest(data: bytes) -> bytes:
    return nacl.hash.blake2b(data, digest_size=32, encoder=nacl.encoding.RawEncoder)


def _mac(key: bytes, message: bytes) -> bytes:
    return nacl.hash.blake2b(
        message, digest_size=MAC_BYTES, key=key, encoder=nacl.encoding.RawEncoder
    )


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class RequestAuth:
    """The authentication headers of one request."""

    node: str  # hex node id of the sender
    time_ms: int
    nonce: bytes
    protocol: int
    mac: bytes
    body_hash: bytes = b""  # the BLAKE2b-256 of the body the MAC covers

    def headers(self) -> dict[str, str]:
        return {
            HEADER_NODE: self.node,
            HEADER_TIME: str(self.time_ms),
            HEADER_NONCE: self.nonce.hex(),
            HEADER_PROTOCOL: str(self.protocol),
            HEADER_MAC: self.mac.hex(),
            HEADER_BODY: self.body_hash.hex(),
        }


def _request_message(
    method: str, path: str, node: str, time_ms: int, nonce: bytes, protocol: int, body_hash: bytes
) -> bytes:
    fields = [method.upper(), path, node, str(time_ms), nonce.hex(), str(protocol)]
    return _REQUEST + "\x00".join(fields).encode() + b"\x00" + body_hash


def _response_message(nonce: bytes, status: int, extra: str, body: bytes) -> bytes:
    return _RESPONSE + nonce + f"\x00{status}\x00{extra}\x00".encode() + _digest(body)


def sign_request(
    key: bytes,
    method: str,
    path: str,
    node: str,
    body: bytes,
    *,
    time_ms: int,
    protocol: int = PROTOCOL,
) -> RequestAuth:
    """Headers for a request of `method` on `path` (with its query) carrying `body`."""
    nonce = os.urandom(NONCE_BYTES)
    body_hash = _digest(body)
    mac = _mac(key, _request_message(method, path, node, time_ms, nonce, protocol, body_hash))
    return RequestAuth(node, time_ms, nonce, protocol, mac, body_hash)


def parse_request(headers: dict[str, str] | object) -> RequestAuth:
    """The authentication headers of a request; `AuthFailed` if absent or malformed."""
    get = getattr(headers, "get", None)
    if get is None:
        raise AuthFailed("no headers")
    try:
        node = str(get(HEADER_NODE))
        time_ms = int(str(get(HEADER_TIME)))
        nonce = bytes.fromhex(str(get(HEADER_NONCE)))
        protocol = int(str(get(HEADER_PROTOCOL)))
        mac = bytes.fromhex(str(get(HEADER_MAC)))
        body_hash = bytes.fromhex(str(get(HEADER_BODY)))
    except (TypeError, ValueError):
        raise AuthFailed("missing or malformed authentication headers") from None
    if (
        len(nonce) != NONCE_BYTES
        or len(mac) != MAC_BYTES
        or len(body_hash) != 32
        or len(node) != 64
    ):
        raise AuthFailed("malformed authentication headers")
    try:
        bytes.fromhex(node)
    except ValueError:
        raise AuthFailed("malformed node id") from None
    return RequestAuth(node, time_ms, nonce, protocol, mac, body_hash)


class ReplayGuard:
    """Remembers the nonces of the current window and refuses them a second time."""

    def __init__(self, window_ms: int = WINDOW_MS, max_nonces: int = MAX_NONCES) -> None:
        self.window_ms = window_ms
        self.max_nonces = max_nonces
        self._seen: OrderedDict[bytes, int] = OrderedDict()
        # Requests older than this were forgotten early (too many nonces) and are refused.
        self._floor_ms = 0

    def check(self, auth: RequestAuth, now_ms: int) -> None:
        """Raise `AuthFailed` if `auth` is a replay or outside the window; else note it."""
        if abs(auth.time_ms - now_ms) > self.window_ms:
            raise StaleRequest(now_ms)
        if auth.time_ms <= self._floor_ms:
            raise AuthFailed("request too old")
        if auth.nonce in self._seen:
            raise AuthFailed("replayed request")
        self._expire(now_ms)
        self._seen[auth.nonce] = auth.time_ms

    def _expire(self, now_ms: int) -> None:
        horizon = now_ms - self.window_ms
        # Insertion order is roughly time order; stop at the first one still live.
        while self._seen:
            _, stamp = next(iter(self._seen.items()))
            if stamp >= horizon and len(self._seen) < self.max_nonces:
                break
            self._seen.popitem(last=False)
            if stamp >= horizon:
                self._floor_ms = max(self._floor_ms, stamp)


class StaleRequest(AuthFailed):
    """A request whose timestamp is outside the window (clock skew, or a replay)."""

    def __init__(self, server_ms: int) -> None:
        super().__init__("request timestamp outside the window")
        self.server_ms = server_ms


def verify_request_head(key: bytes, method: str, path: str, auth: RequestAuth) -> None:
    """`AuthFailed` unless `auth` is a valid MAC under `key` for this request
    with the body `auth` declares; checked before the body is read."""
    message = _request_message(
        method, path, auth.node, auth.time_ms, auth.nonce, auth.protocol, auth.body_hash
    )
    if not hmac.compare_digest(_mac(key, message), auth.mac):
        raise AuthFailed("bad request MAC")


def verify_body(auth: RequestAuth, body: bytes) -> None:
    """`AuthFailed` unless `body` is the one the (verified) head declares."""
    if not hmac.compare_digest(_digest(body), auth.body_hash):
        raise AuthFailed("body does not match its MAC")


def verify_request(key: bytes, method: str, path: str, auth: RequestAuth, body: bytes) -> None:
    """`AuthFailed` unless `auth` is a valid MAC for this request under `key`."""
    verify_request_head(key, method, path, auth)
    verify_body(auth, body)


def sign_response(key: bytes, nonce: bytes, status: int, body: bytes, extra: str = "") -> str:
    """The MAC header value of a response to the request with `nonce`.

    `extra` is any header value the response's meaning depends on (the server
    time of a 401 for a stale request)."""
    return _mac(key, _response_message(nonce, status, extra, body)).hex()


def verify_response(
    key: bytes, nonce: bytes, status: int, body: bytes, mac_hex: str | None, extra: str = ""
) -> None:
    """`AuthFailed` unless `mac_hex` authenticates this response to our request."""
    if not mac_hex:
        raise AuthFailed(f"unauthenticated response (HTTP {status})")
    try:
        mac = bytes.fromhex(mac_hex)
    except ValueError:
        raise AuthFailed("malformed response MAC") from None
    expected = _mac(key, _response_message(nonce, status, extra, body))
    if not hmac.compare_digest(expected, mac):
        raise AuthFailed(f"bad response MAC (HTTP {status})")
