"""The joiner's side of pairing: find the inviter, run the exchange, keep the root.

Invariants:
- Nothing is written anywhere until the inviter has proved it knows the code
  (its key confirmation holds) and handed over a root (the node key the
  inviter is told of is made in memory first); then the root is written once, to `volume.secret` in the data dir (mode 0600 from its
  creation, fsync'd, never replacing an existing file).
- The code's words never leave this process (see `peer.net.pairing`).
- Nothing is checked after the code is spent that could have been checked
  before: the mount point, the FUSE device and the data dir are checked
  first, so a mistake there does not waste the code.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from peer import node
from peer.errors import DfsError
from peer.identity import NodeIdentity, load_or_create
from peer.keys import VolumeKeys
from peer.net import pairing
from peer.secret import format_secret, parse_secret

log = logging.getLogger("peer.joining")

SECRET_NAME = "volume.secret"
# How long to look for the invitation on the LAN by mDNS.
FIND_TIMEOUT_S = 15.0
# One request; the inviter runs SPAKE2 in pure Python, one at a time.
REQUEST_TIMEOUT_S = 20.0
CONNECT_TIMEOUT_S = 5.0

Say = Callable[[str], None]


class InvitationNotFound(DfsError):
    """found no open invitation {number} {where}: check the code, and that
    `dfs-peer invite` still runs on the member."""


class SecretAlreadyStored(DfsError):
    """{data_dir} already holds a volume: start that node with `dfs-peer join
    --data-dir {data_dir} MOUNTPOINT`, or pair into another --data-dir."""


class _NotHere(Exception):
    """The address has no such invitation open."""


@dataclass(frozen=True, slots=True)
class Paired:
    """A successful exchange: the root, and who handed it over from where."""

    root: bytes = field(repr=False)
    inviter_name: str
    inviter_node: bytes
    host: str
    port: int


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def pair_with(code: pairing.Code, host: str, port: int, me: pairing.Joiner) -> Paired:
    """Run the exchange with the node at host:port."""
    address = _where(host, port)
    side = await asyncio.to_thread(pairing.JoinerSide, code)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S, sock_connect=CONNECT_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        started = await _post(session, address, pairing.START_PATH, side.start_message())
        try:
            finish = await asyncio.to_thread(side.finish_message, started, me)
        except pairing.BadMessage as exc:
            raise pairing.PairingFailed(
                address=address, detail=f"a malformed answer ({exc})"
            ) from None
        finished = await _post(session, address, pairing.FINISH_PATH, finish)
    try:
        welcome = side.welcome(finished)
    except pairing.BadConfirmation:
        raise pairing.InviterNotProven(address=address) from None
    except pairing.BadMessage as exc:
        raise pairing.PairingFailed(address=address, detail=f"a malformed answer ({exc})") from None
    return Paired(welcome.root, welcome.name, welcome.node, host, port)


_REFUSED: dict[str, type[DfsError]] = {
    "expired": pairing.CodeExpired,
    "paired": pairing.CodeUsed,
    "burnt": pairing.CodeBurnt,
    "cancelled": pairing.CodeCancelled,
}


async def _read_at_most(stream: aiohttp.StreamReader, limit: int) -> bytes:
    """The body, or its first `limit` bytes if it is longer (then refused)."""
    body = b""
    while len(body) < limit:
        part = await stream.read(limit - len(body))
        if not part:
            break
        body += part
    return body


async def _post(session: aiohttp.ClientSession, address: str, path: str, body: bytes) -> bytes:
    url = f"http://{address}{path}"
    try:
        async with session.post(
            url, data=body, headers={"Content-Type": "application/cbor"}
        ) as resp:
            answer = await _read_at_most(resp.content, pairing.MAX_BODY + 1)
            status = resp.status
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        detail = str(exc) or type(exc).__name__
        raise pairing.PairingFailed(address=address, detail=f"cannot reach it ({detail})") from None
    if status == 200 and len(answer) <= pairing.MAX_BODY:
        return answer
    reason = pairing.decode_refusal(answer)
    if status in (401, 404):
        raise _NotHere()
    if status == 403 and reason == "wrong":
        raise pairing.WrongCode()
    if status == 410 and reason in _REFUSED:
        raise _REFUSED[reason]()
    if status == 410 and reason == "no-session":
        detail = "it forgot this try (it took too long); try again"
        raise pairing.PairingFailed(address=address, detail=detail)
    if status == 429:
        raise pairing.InviterBusy()
    raise pairing.PairingFailed(
        address=address, detail=f"it answered HTTP {status} {reason}".strip()
    )


async def find_and_pair(
    code: pairing.Code,
    peers: Sequence[tuple[str, int]],
    mdns: bool,
    protocol: int,
    me: pairing.Joiner,
    say: Say,
) -> Paired:
    """Pair with the first of `peers` (or, without any, the hosts mDNS finds
    advertising the code's invitation) that has it open."""
    if peers:
        where = "at " + ", ".join(_where(h, p) for h, p in peers)
        candidates = list(peers)
    elif mdns:
        from discovery.invites import find_invitation

        where = "on this network (for a member on another network, give --peer HOST:PORT)"
        say(f"looking for invitation {code.number} on the local network…")
        candidates = await find_invitation(code.number, protocol, FIND_TIMEOUT_S)
    else:
        where = "(with --no-mdns, give the member's address with --peer HOST:PORT)"
        candidates = []
    for host, port in candidates:
        found = "asking" if peers else "found invitation {code.number} at"
        say(f"{found.format(code=code)} {_where(host, port)}; checking the code…")
        try:
            return await pair_with(code, host, port, me)
        except _NotHere:
            log.debug("no invitation %d at %s", code.number, _where(host, port))
    raise InvitationNotFound(number=code.number, where=where)


# --- the secret in the data dir ------------------------------------------------


def stored_secret(data_dir: Path) -> bytes | None:
    """The root pairing stored in `data_dir`, or None if it holds none."""
    path = data_dir / SECRET_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    return parse_secret(text)


def store_secret(data_dir: Path, root: bytes) -> Path:
    """Write `root` as `volume.secret` in `data_dir` (0600, durable); refuse to
    replace another."""
    path = data_dir / SECRET_NAME
    tmp = data_dir / f"{SECRET_NAME}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.write(fd, (format_secret(root) + "\n").encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            if stored_secret(data_dir) != root:
                raise SecretAlreadyStored(data_dir=data_dir) from None
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


@dataclass(frozen=True, slots=True)
class Joined:
    """Where pairing left the new node: its root, data dir and first peer."""

    root: bytes = field(repr=False)
    keys: VolumeKeys = field(repr=False)
    data_dir: Path
    inviter: tuple[str, int]


async def join_by_code(
    code: pairing.Code,
    mountpoint: Path,
    data_dir: Path | None,
    name: str,
    peers: Sequence[tuple[str, int]],
    mdns: bool,
    protocol: int,
    say: Say,
) -> Joined:
    """Check what can be checked, pair, and store the root in the data dir
    (`data_dir`, or the volume's default one, known only once paired)."""
    node.check_fuse_device()
    node.check_mountpoint(mountpoint)
    if data_dir is not None and (
        (data_dir / SECRET_NAME).exists() or (data_dir / node.CHECK_NAME).exists()
    ):
        raise SecretAlreadyStored(data_dir=data_dir)
    identity = NodeIdentity.generate()
    me = pairing.Joiner(name, identity.node_id)
    paired = await find_and_pair(code, peers, mdns, protocol, me, say)
    keys = VolumeKeys.from_root(paired.root)
    target = data_dir if data_dir is not None else node.default_data_dir(keys)
    kept = load_or_create(target, identity)
    if kept.node_id != identity.node_id:
        log.info("the data dir already had a node key; keeping it node=%s", kept.short)
    path = store_secret(target, paired.root)
    say(
        f"paired with `{paired.inviter_name}` (node {paired.inviter_node.hex()[:8]}) at "
        f"{_where(paired.host, paired.port)}; the volume secret is kept in {path} (mode 0600)"
    )
    return Joined(paired.root, keys, target, (paired.host, paired.port))
