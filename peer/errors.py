"""Errors: the ones a user can cause, and the internal ones we catch ourselves.

Invariant: every `DfsError` subclass's docstring is the one sentence the user sees
(the CLI prints `dfs-peer: <message>` and exits with `exit_code`), and a subclass
can only be built with exactly the fields its docstring names, so a message can
never fail to format at the moment it is shown.
"""

from __future__ import annotations

import string
from textwrap import dedent
from typing import ClassVar


def _one_line(doc: str | None) -> str:
    return " ".join(dedent(doc or "").split())


def _field_names(template: str) -> frozenset[str]:
    return frozenset(name for _, name, _, _ in string.Formatter().parse(template) if name)


class DfsError(Exception):
    """dfs-peer failed."""

    exit_code: ClassVar[int] = 1
    _template: ClassVar[str] = "dfs-peer failed."
    _fields: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        cls._template = _one_line(cls.__doc__)
        cls._fields = _field_names(cls._template)

    def __init__(self, **fields: object) -> None:
        given = frozenset(fields)
        if given != self._fields:
            raise TypeError(
                f"{type(self).__name__} takes fields {sorted(self._fields)}, got {sorted(given)}"
            )
        self.fields = fields
        super().__init__(self.message())

    def message(self) -> str:
        """The sentence the user sees, with the fields filled in."""
        return self._template.format(**self.fields)

    def __str__(self) -> str:
        return self.message()


class SecretMissing(DfsError):
    """no volume secret given: pass --secret or --secret-file, or set
    DFS_PEER_SECRET (`dfs-peer init` makes a new one)."""


class SecretFileUnreadable(DfsError):
    """cannot read the secret file {path} ({detail}): check the path and its
    permissions."""


class BadSecretText(DfsError):
    """the secret text is mistyped (its checksum or length is wrong): copy it
    again exactly as `dfs-peer init` printed it."""


class PassphraseTooShort(BadSecretText):
    """the passphrase is too short: use at least {minimum} characters, or a
    secret made by `dfs-peer init`."""


class LostOnExit(DfsError):
    """stopped, but the disk holding the data dir is full: the unsaved writes
    of {files} file(s) ({mib} MiB) could not be saved and are lost; everything
    else is saved."""


class StoreFull(DfsError):
    """the disk holding the data dir is full ({detail}): delete files or free
    space on that disk, then try again."""


class PassphraseNeedsName(DfsError):
    """a passphrase needs the volume's name too: pass --volume-name NAME (or
    set DFS_PEER_VOLUME_NAME), the same on every machine; it salts the
    passphrase so no one dictionary serves against every volume."""


class WrongSecret(DfsError):
    """the secret does not open the volume in {data_dir} (wrong secret?)."""

    exit_code: ClassVar[int] = 2


class DataDirLocked(DfsError):
    """another dfs-peer node is already using {data_dir}: stop it first, or
    choose another --data-dir."""


class MountpointMissing(DfsError):
    """the mount point {path} does not exist: create it with `mkdir` first."""


class MountpointNotDirectory(DfsError):
    """the mount point {path} is not a directory: choose an empty directory."""


class MountpointNotEmpty(DfsError):
    """the mount point {path} is not empty: choose an empty directory."""


class MountpointBusy(DfsError):
    """{path} is already a mount point: unmount it (`fusermount3 -u {path}`)
    or choose another directory."""


class MountRefused(DfsError):
    """the kernel refused to mount {path} ({reason}): check that fuse3 is
    installed and that you may use /dev/fuse."""


class PortInUse(DfsError):
    """the peer address {address} is already in use (another node on this
    machine?): choose another with --listen HOST:PORT."""


class ListenFailed(DfsError):
    """cannot listen for peers on {address} ({detail}): choose another address
    with --listen HOST:PORT."""


class BadPeerAddress(DfsError):
    """{detail}"""


class NoFuseDevice(DfsError):
    """/dev/fuse is missing: install fuse3 / load the fuse module
    (`modprobe fuse`)."""


class NodeNotRunning(DfsError):
    """no dfs-peer node is running for {data_dir}: start one with
    `dfs-peer join`."""


class PagePortInUse(DfsError):
    """the status page port {address} is already in use: choose another with
    --page-port PORT (0 picks a free one)."""


class NoPage(DfsError):
    """the node in {data_dir} serves no status page (started with --page-port
    off)."""


class NoNodeRunning(DfsError):
    """no dfs-peer node is running here: start one with `dfs-peer join`, or
    name the data dir of one with --data-dir."""


class SeveralNodesRunning(DfsError):
    """several dfs-peer nodes are running; choose one with {choices}."""


class CorruptStore(DfsError):
    """cannot use the store {path}: {detail}."""


class CorruptBlock(Exception):
    """A block whose MAC fails or whose plaintext does not hash to its id.

    `bid`, where known: the block found corrupt (for a patch, perhaps its base)."""

    def __init__(self, message: str, bid: bytes | None = None) -> None:
        super().__init__(message)
        self.bid = bid


class CorruptEntry(Exception):
    """A log entry with a bad signature, a bad MAC, or a malformed operation."""
