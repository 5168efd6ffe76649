"""The volume secret: made, shown as text, read back, or stretched from a passphrase.

Invariant: every machine given the same secret text, or the same passphrase,
derives the same 32-byte root; secret text with a typo in it is refused with
`BadSecretText` (a 32-bit checksum), never silently turned into another volume.

Text form: `dfs1-` then RFC 4648 base32 (lowercase, no padding) of the 32 raw
bytes and a 4-byte checksum, in groups of five joined by dashes. Reading is
forgiving about case, whitespace and dashes. Anything not starting with `dfs1`
is a human passphrase.
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

_CHECKSUM_PERSON = b"dfs-peer:v1:chk"
# Base32 length of raw + checksum without padding: ceil(36 * 8 / 5) = 58.
_BODY_CHARS = -(-(SECRET_BYTES + CHECKSUM_BYTES) * 8 // 5)
_B32_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyz234567")
_DASHED_SHAPE = re.compile(
    rf"[a-z0-9]{{{len(PREFIX)}}}"
    rf"(?:-[a-z2-7]{{{GROUP}}}){{{_BODY_CHARS // GROUP}}}"
    rf"-[a-z2-7]{{{_BODY_CHARS % GROUP}}}"
)

# Argon2id needs a salt, but every machine must derive the same root from the
# same passphrase with nothing else shared, so the salt is a constant (derived
# from a versioned purpose string). The cost is the price of that: one
# precomputation per guessed passphrase serves every dfs-peer volume.
_PASSPHRASE_SALT = nacl.hash.blake2b(
    b"dfs-peer:v1:passphrase-salt",
    digest_size=nacl.pwhash.argon2id.SALTBYTES,
    encoder=nacl.encoding.RawEncoder,
)
# INTERACTIVE (2 passes, 64 MiB) rather than MODERATE (3 passes, 256 MiB):
# `join` stretches the passphrase at every start and every CLI call that needs
# the key, and MODERATE needs a quarter GiB and ~6x the time (measured here:
# 0.07 s vs 0.44 s, on a fast machine). Passphrases are the convenience path; the secret from `dfs-peer init`
# is 256 random bits and needs no stretching at all.
_OPSLIMIT = nacl.pwhash.argon2id.OPSLIMIT_INTERACTIVE
_MEMLIMIT = nacl.pwhash.argon2id.MEMLIMIT_INTERACTIVE


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


def _stretch_passphrase(passphrase: str) -> bytes:
    # NFC so that the same passphrase typed with different input methods (one
    # code point or a base letter plus a combining accent) gives the same root.
    normalized = unicodedata.normalize("NFC", passphrase)
    if len(normalized) < MIN_PASSPHRASE_CHARS:
        raise PassphraseTooShort(minimum=MIN_PASSPHRASE_CHARS)
    return nacl.pwhash.argon2id.kdf(
        SECRET_BYTES,
        normalized.encode("utf-8"),
        _PASSPHRASE_SALT,
        opslimit=_OPSLIMIT,
        memlimit=_MEMLIMIT,
    )


def parse_secret(text: str) -> bytes:
    """The 32-byte volume root named by secret text or by a passphrase.

    Raises `BadSecretText` for mistyped secret text and `PassphraseTooShort`
    for a passphrase under `MIN_PASSPHRASE_CHARS` characters.
    """
    stripped = text.strip()
    compact = "".join(stripped.split()).lower()
    if _looks_like_secret_text(compact):
        return _parse_secret_text(compact)
    # A passphrase keeps its inner spaces and its case: they are part of it.
    return _stretch_passphrase(stripped)


def read_secret(secret: str | None, secret_file: Path | None, env: Mapping[str, str]) -> bytes:
    """The volume root from --secret, else --secret-file, else DFS_PEER_SECRET."""
    if secret is not None:
        return parse_secret(secret)
    if secret_file is not None:
        try:
            text = secret_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            detail = exc.strerror or str(exc) if isinstance(exc, OSError) else "not UTF-8"
            raise SecretFileUnreadable(path=secret_file, detail=detail) from exc
        if not text.strip():
            raise SecretFileUnreadable(path=secret_file, detail="it is empty")
        return parse_secret(text)
    from_env = env.get(ENV_VAR)
    if from_env:
        return parse_secret(from_env)
    raise SecretMissing()
