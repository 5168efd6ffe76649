"""The volume secret: made, shown as text, read back, or stretched from a passphrase.

Invariant: every machine given the same secret text, or the same passphrase,
derives the same 32-byte root; secret text with a typo in it is refused with
`BadSecretText` (a 32-bit checksum), never silently turned into another volume.

Text form: `dfs1-` then RFC 4648 base32 (lowercase, no padding) of the 32 raw
bytes and a 4-byte checksum, in groups of five joined by dashes. Reading is
forgiving about case, whitespace and dashes. Anything not starting with `dfs1`
is a human passphrase, which needs a volume name as well: the name salts
the stretching (as a Wi-Fi network's name salts its passphrase), so every
machine given the same name and passphrase derives the same root while no
precomputed dictionary serves against two volumes of different names.
"""

from __future__ import annotations

import base64
import binascii
import re
import unicodedata
from collections.abc import Mapping
from pathlib import Path

import nacl.encoding
import nacl.hash
import nacl.pwhash.argon2id
import nacl.utils

from peer.errors import (
    BadSecretText,
    PassphraseNeedsName,
    PassphraseTooShort,
    SecretFileUnreadable,
    SecretMissing,
)

SECRET_BYTES = 32
PREFIX = "dfs1"
CHECKSUM_BYTES = 4
GROUP = 5
MIN_PASSPHRASE_CHARS = 12
ENV_VAR = "DFS_PEER_SECRET"
NAME_ENV_VAR = "DFS_PEER_VOLUME_NAME"

_CHECKSUM_PERSON = b"dfs-peer:v1:chk"
# Base32 length of raw + checksum without padding: ceil(36 * 8 / 5) = 58.
_BODY_CHARS = -(-(SECRET_BYTES + CHECKSUM_BYTES) * 8 // 5)
_B32_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyz234567")
_DASHED_SHAPE = re.compile(
    rf"[a-z0-9]{{{len(PREFIX)}}}"
    rf"(?:-[a-z2-7]{{{GROUP}}}){{{_BODY_CHARS // GROUP}}}"
    rf"-[a-z2-7]{{{_BODY_CHARS % GROUP}}}"
)

_SALT_PERSON = b"dfs-peer:v2:salt"
# MODERATE: 3 passes over 256 MiB (about 0.4 s on a fast core, 3 s on our
# shared test machine), paid at every `join` with a passphrase. A guess costs
# an attacker the same, per volume name.
_OPSLIMIT = nacl.pwhash.argon2id.OPSLIMIT_MODERATE
_MEMLIMIT = nacl.pwhash.argon2id.MEMLIMIT_MODERATE


def new_secret() -> bytes:
    """A fresh random volume root (32 bytes)."""
    return nacl.utils.random(SECRET_BYTES)


def _checksum(raw: bytes) -> bytes:
    return nacl.hash.blake2b(
        raw,
        digest_size=CHECKSUM_BYTES,
        person=_CHECKSUM_PERSON,
        encoder=nacl.encoding.RawEncoder,
    )


def _body(raw: bytes) -> str:
    encoded = base64.b32encode(raw + _checksum(raw)).decode("ascii")
    return encoded.rstrip("=").lower()


def format_secret(raw: bytes) -> str:
    """The text form of a volume root, as `dfs-peer init` prints it."""
    if len(raw) != SECRET_BYTES:
        raise ValueError(f"a volume secret is {SECRET_BYTES} bytes, not {len(raw)}")
    body = _body(raw)
    groups = [body[i : i + GROUP] for i in range(0, len(body), GROUP)]
    return "-".join([PREFIX, *groups])


def _looks_like_secret_text(compact: str) -> bool:
    """Whether `compact` (lowercase, no whitespace) is meant as secret text.

    Errs towards "yes": secret text mistaken for a passphrase would silently
    name another, empty volume, while the reverse is only a refusal.
    """
    if compact.startswith(PREFIX + "-"):
        return True
    # Someone who dropped every dash still typed secret text, not a passphrase.
    rest = compact[len(PREFIX) :].replace("-", "")
    if compact.startswith(PREFIX) and len(rest) == _BODY_CHARS and set(rest) <= _B32_ALPHABET:
        return True
    # The exact dashed shape with a typo in the prefix.
    return _DASHED_SHAPE.fullmatch(compact) is not None


def _parse_secret_text(compact: str) -> bytes:
    body = compact[len(PREFIX) :].replace("-", "")
    if not compact.startswith(PREFIX) or len(body) != _BODY_CHARS:
        raise BadSecretText()
    padded = body.upper() + "=" * (-len(body) % 8)
    try:
        decoded = base64.b32decode(padded)
    except (binascii.Error, ValueError):
        raise BadSecretText() from None
    raw, checksum = decoded[:SECRET_BYTES], decoded[SECRET_BYTES:]
    # Comparing the canonical re-encoding also catches a typo in the unused low
    # bits of the last character, which decoding alone would ignore.
    if checksum != _checksum(raw) or _body(raw) != body:
        raise BadSecretText()
    return raw


def passphrase_salt(volume_name: str) -> bytes:
    """The Argon2id salt of a passphrase volume: a hash of its name (NFC)."""
    return nacl.hash.blake2b(
        unicodedata.normalize("NFC", volume_name.strip()).encode("utf-8"),
        digest_size=nacl.pwhash.argon2id.SALTBYTES,
        person=_SALT_PERSON,
        encoder=nacl.encoding.RawEncoder,
    )


def _stretch_passphrase(passphrase: str, volume_name: str | None) -> bytes:
    # NFC so that the same passphrase typed with different input methods (one
    # code point or a base letter plus a combining accent) gives the same root.
    normalized = unicodedata.normalize("NFC", passphrase)
    if len(normalized) < MIN_PASSPHRASE_CHARS:
        raise PassphraseTooShort(minimum=MIN_PASSPHRASE_CHARS)
    if not volume_name or not volume_name.strip():
        raise PassphraseNeedsName()
    return nacl.pwhash.argon2id.kdf(
        SECRET_BYTES,
        normalized.encode("utf-8"),
        passphrase_salt(volume_name),
        opslimit=_OPSLIMIT,
        memlimit=_MEMLIMIT,
    )


def parse_secret(text: str, volume_name: str | None = None) -> bytes:
    """The 32-byte volume root named by secret text or by a passphrase (with
    the volume's name, which salts it).

    Raises `BadSecretText` for mistyped secret text, `PassphraseTooShort` for
    a passphrase under `MIN_PASSPHRASE_CHARS` characters and
    `PassphraseNeedsName` for a passphrase without a volume name.
    """
    stripped = text.strip()
    compact = "".join(stripped.split()).lower()
    if _looks_like_secret_text(compact):
        return _parse_secret_text(compact)
    # A passphrase keeps its inner spaces and its case: they are part of it.
    return _stretch_passphrase(stripped, volume_name)


def read_secret(
    secret: str | None,
    secret_file: Path | None,
    env: Mapping[str, str],
    volume_name: str | None = None,
) -> bytes:
    """The volume root from --secret, else --secret-file, else DFS_PEER_SECRET;
    a passphrase's volume name from `volume_name`, else DFS_PEER_VOLUME_NAME."""
    name = volume_name if volume_name is not None else env.get(NAME_ENV_VAR)
    if secret is not None:
        return parse_secret(secret, name)
    if secret_file is not None:
        try:
            text = secret_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            detail = exc.strerror or str(exc) if isinstance(exc, OSError) else "not UTF-8"
            raise SecretFileUnreadable(path=secret_file, detail=detail) from exc
        if not text.strip():
            raise SecretFileUnreadable(path=secret_file, detail="it is empty")
        return parse_secret(text, name)
    from_env = env.get(ENV_VAR)
    if from_env:
        return parse_secret(from_env, name)
    raise SecretMissing()
