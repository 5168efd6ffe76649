"""Pairing by a one-time code: the code, the messages, and both sides' crypto.

A member runs `dfs-peer invite` and gets a code such as `7-orbit-lantern`: the
number selects the invitation (several can be open; mDNS advertises the
number, never the words), the two words are a one-time password. The new
machine runs `dfs-peer join --code 7-orbit-lantern`; both run SPAKE2 (the
`spake2` package, as magic-wormhole does) with the whole code as password,
confirm the key they derived, and only then does the inviter send the volume
root, sealed under that key.

The exchange, two HTTP round trips on the inviter's peer port (served by
`peer.net.invitations`, driven by `peer.net.joining`):

    joiner  -> inviter  POST /pair/start   {v, n, pake}          (SPAKE2 side A)
    inviter -> joiner                      {v, session, pake}    (SPAKE2 side B)
    joiner  -> inviter  POST /pair/finish  {v, session, confirm, sealed}
    inviter -> joiner                      {v, confirm, sealed}

Invariants:
- The words never travel, nor anything an eavesdropper could test guesses
  against offline: SPAKE2 gives a passive observer nothing, and an active one
  one guess per exchange it starts (the inviter allows three).
- Each side checks the other's key confirmation (a MAC over the whole
  transcript under a key only the SPAKE2 result gives) before it opens or
  sends anything sealed: the inviter seals the root only after the joiner's
  confirmation holds; the joiner opens the root only after the inviter's does.
- Everything sealed is sealed with PyNaCl's SecretBox (XSalsa20-Poly1305,
  random nonces) under a key derived for that direction alone.
- `decode_*` return well-formed messages within the sizes below or raise
  `BadMessage`: nothing a stranger sends reaches anything else.

This module does no I/O and keeps no state beyond one exchange's objects.
"""

from __future__ import annotations

import hmac
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

import cbor2
import nacl.encoding
import nacl.exceptions
import nacl.hash
import nacl.secret

from peer.errors import DfsError
from peer.net.wordlist import WORDS

VERSION = 1
START_PATH = "/pair/start"
FINISH_PATH = "/pair/finish"
PATHS = frozenset({START_PATH, FINISH_PATH})

# Sizes: a SPAKE2 message on Ed25519 is 33 bytes, a session id 16, a MAC 32,
# a sealed payload (a name of at most MAX_NAME bytes, ids, the root) < 512.
PAKE_BYTES = 33
SESSION_BYTES = 16
CONFIRM_BYTES = 32
MAX_SEALED = 512
MAX_NAME = 128
NODE_BYTES = 32
ROOT_BYTES = 32
# Bodies of both requests and answers stay under this: refused unread above it.
MAX_BODY = 1024
# But the inviter's last answer also carries every key epoch's secret
# (`peer.epochs`), 35 bytes each: up to MAX_EPOCHS of them.
MAX_EPOCHS = 1024
MAX_ANSWER = MAX_BODY + 36 * MAX_EPOCHS

# Codes: `<number>-<word>-<word>`. New numbers are two digits at most (short
# to read out); any number up to MAX_NUMBER is read.
NEW_NUMBERS = range(1, 100)
MAX_NUMBER = 9999

_WORD_SET = frozenset(WORDS)
_ID_JOINER = b"dfs-peer:v1:pair:joiner"
_ID_INVITER = b"dfs-peer:v1:pair:inviter"
_PERSON = b"dfs-peer:v1:pair"  # BLAKE2b personalization: at most 16 bytes
_TRANSCRIPT = b"dfs-peer:v1:pair-transcript\x00"
_CONFIRM_JOINER = b"confirm-joiner"
_CONFIRM_INVITER = b"confirm-inviter"
_SEAL_JOINER = b"seal-joiner"
_SEAL_INVITER = b"seal-inviter"


class BadMessage(Exception):
    """A pairing message that is not well formed."""


class BadConfirmation(Exception):
    """The other side's key confirmation does not hold: it used another code."""


# --- errors the user sees -----------------------------------------------------


class BadCode(DfsError):
    """`{code}` is not a pairing code: a code looks like 7-orbit-lantern (a
    number and two words, as `dfs-peer invite` printed it)."""


class UnknownWord(DfsError):
    """`{word}` is not one of the words pairing codes are made of: check the
    code (it looks like 7-orbit-lantern)."""


class CodeWithSecret(DfsError):
    """--code takes the place of a secret: give --code or a secret, not both
    (and no --at: a new machine has no history yet)."""


class WrongCode(DfsError):
    """wrong code: check it with whoever ran `dfs-peer invite` and try again
    (after three wrong tries the code stops working)."""

    exit_code = 2


class CodeExpired(DfsError):
    """this code has expired (a code works for 10 minutes): run `dfs-peer
    invite` on a member again for a new one."""


class CodeUsed(DfsError):
    """this code was already used (a code pairs one machine): run `dfs-peer
    invite` on a member again for a new one."""


class CodeBurnt(DfsError):
    """this code no longer works: three wrong codes were tried with it. Run
    `dfs-peer invite` on a member again for a new one."""


class CodeCancelled(DfsError):
    """the invitation was cancelled on the inviting machine: ask for a new
    code."""


class InviterBusy(DfsError):
    """the inviting machine is busy with other tries of this code: wait a
    minute and try again."""


class InviterNotProven(DfsError):
    """the machine at {address} did not prove that it knows the code (an
    impostor?): nothing it sent was used. Pair with a member you trust."""


class PairingFailed(DfsError):
    """pairing with {address} failed: {detail}."""


# --- the code -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Code:
    """A one-time pairing code: the invitation's number and two words."""

    number: int
    words: tuple[str, str] = field(repr=False)

    def __str__(self) -> str:
        return f"{self.number}-{self.words[0]}-{self.words[1]}"

    @property
    def password(self) -> bytes:
        """What SPAKE2 runs with: the whole code, number included, so a code's
        words are bound to its invitation."""
        return str(self).encode("ascii")


def new_code(number: int) -> Code:
    return Code(number, (secrets.choice(WORDS), secrets.choice(WORDS)))


def parse_code(text: str) -> Code:
    """The code `text` spells, forgiving case, spaces and extra dashes.

    `BadCode` if it is not shaped like one, `UnknownWord` for a word not on
    the list: both cost no attempt, since nothing is sent.
    """
    parts = [p for p in re.split(r"[\s\-]+", text.strip().lower()) if p]
    if len(parts) != 3 or not parts[0].isascii() or not parts[0].isdigit():
        raise BadCode(code=text.strip())
    number = int(parts[0])
    if not 1 <= number <= MAX_NUMBER:
        raise BadCode(code=text.strip())
    for word in parts[1:]:
        if word not in _WORD_SET:
            raise UnknownWord(word=word)
    return Code(number, (parts[1], parts[2]))


# --- keys ---------------------------------------------------------------------


def _derive(key: bytes, purpose: bytes) -> bytes:
    return nacl.hash.blake2b(
        purpose, digest_size=32, key=key, person=_PERSON, encoder=nacl.encoding.RawEncoder
    )


def _transcript(number: int, session: bytes, pake_a: bytes, pake_b: bytes) -> bytes:
    return nacl.hash.blake2b(
        _TRANSCRIPT + number.to_bytes(4, "big") + session + pake_a + pake_b,
        digest_size=32,
        encoder=nacl.encoding.RawEncoder,
    )


def _mac(key: bytes, data: bytes) -> bytes:
    return nacl.hash.blake2b(
        data, digest_size=CONFIRM_BYTES, key=key, encoder=nacl.encoding.RawEncoder
    )


@dataclass(frozen=True, slots=True)
class _Keys:
    """What one exchange's SPAKE2 key gives: a confirmation key and a sealing
    key per direction, and the transcript both confirmations cover."""

    transcript: bytes
    confirm_joiner: bytes = field(repr=False)
    confirm_inviter: bytes = field(repr=False)
    seal_joiner: bytes = field(repr=False)
    seal_inviter: bytes = field(repr=False)

    @classmethod
    def derive(cls, shared: bytes, transcript: bytes) -> _Keys:
        return cls(
            transcript,
            _derive(shared, _CONFIRM_JOINER),
            _derive(shared, _CONFIRM_INVITER),
            _derive(shared, _SEAL_JOINER),
            _derive(shared, _SEAL_INVITER),
        )

    def joiner_confirmation(self) -> bytes:
        return _mac(self.confirm_joiner, b"joiner\x00" + self.transcript)

    def inviter_confirmation(self) -> bytes:
        return _mac(self.confirm_inviter, b"inviter\x00" + self.transcript)


def _check(expected: bytes, got: bytes) -> None:
    if not hmac.compare_digest(expected, got):
        raise BadConfirmation()


def _seal(key: bytes, payload: dict[str, Any]) -> bytes:
    return bytes(nacl.secret.SecretBox(key).encrypt(cbor2.dumps(payload, canonical=True)))


def _open(key: bytes, sealed: bytes) -> dict[str, Any]:
    try:
        plain = nacl.secret.SecretBox(key).decrypt(sealed)
    except nacl.exceptions.CryptoError:
        raise BadMessage("sealed payload does not open") from None
    return _map(_load(plain))


# --- payloads -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Joiner:
    """Who is joining, as the joiner says (sealed, after confirmation)."""

    name: str
    node: bytes


@dataclass(frozen=True, slots=True)
class Welcome:
    """What the inviter hands over: the volume root, who it is, and the
    secret of every later key epoch (`peer.epochs`), so the new machine reads
    all history. `epochs` travels only when there are any, so an older
    joiner still pairs with a volume whose keys never rotated."""

    root: bytes = field(repr=False)
    name: str
    node: bytes
    epochs: tuple[bytes, ...] = field(default=(), repr=False)


def _name(obj: Any) -> str:
    if not isinstance(obj, str) or len(obj.encode("utf-8", "replace")) > MAX_NAME:
        raise BadMessage("bad name")
    return obj


# --- the two sides ------------------------------------------------------------


class JoinerSide:
    """The joiner's half of one exchange: start, then finish with the answer."""

    def __init__(self, code: Code) -> None:
        from spake2 import SPAKE2_A  # (7 MiB of tables: loaded by a pairing only)

        self.code = code
        self._spake = SPAKE2_A(code.password, idA=_ID_JOINER, idB=_ID_INVITER)
        self.pake = bytes(self._spake.start())
        self._keys: _Keys | None = None

    def start_message(self) -> bytes:
        return encode({"v": VERSION, "n": self.code.number, "pake": self.pake})

    def finish_message(self, started: bytes, me: Joiner) -> bytes:
        """From the inviter's answer to start: our confirmation and who we are."""
        m = _map(_load(started), {"v", "session", "pake"})
        session = _bytes(m["session"], SESSION_BYTES)
        pake_b = _bytes(m["pake"], PAKE_BYTES)
        from spake2 import SPAKEError

        try:
            shared = self._spake.finish(pake_b)
        except (SPAKEError, ValueError) as exc:
            raise BadMessage(f"bad SPAKE2 message: {exc}") from None
        keys = _Keys.derive(shared, _transcript(self.code.number, session, self.pake, pake_b))
        self._keys = keys
        sealed = _seal(keys.seal_joiner, {"name": me.name, "node": me.node})
        return encode(
            {
                "v": VERSION,
                "session": session,
                "confirm": keys.joiner_confirmation(),
                "sealed": sealed,
            }
        )

    def welcome(self, finished: bytes) -> Welcome:
        """The root, once the inviter's confirmation holds; `BadConfirmation` if not."""
        assert self._keys is not None, "finish_message first"
        m = _map(_load(finished, MAX_ANSWER), {"v", "confirm", "sealed"})
        _check(self._keys.inviter_confirmation(), _bytes(m["confirm"], CONFIRM_BYTES))
        payload = _open(self._keys.seal_inviter, _bytes(m["sealed"], limit=MAX_ANSWER))
        if isinstance(payload, dict) and "epochs" in payload:
            payload = _map(payload, {"root", "name", "node", "epochs"})
            raw = payload["epochs"]
            if not isinstance(raw, list) or not 0 < len(raw) <= MAX_EPOCHS:
                raise BadMessage("bad epoch list")
            secrets = tuple(_bytes(e, ROOT_BYTES) for e in raw)
        else:
            payload = _map(payload, {"root", "name", "node"})
            secrets = ()
        return Welcome(
            _bytes(payload["root"], ROOT_BYTES),
            _name(payload["name"]),
            _bytes(payload["node"], NODE_BYTES),
            secrets,
        )


@dataclass(frozen=True, slots=True)
class StartRequest:
    number: int
    pake: bytes


@dataclass(frozen=True, slots=True)
class FinishRequest:
    session: bytes
    confirm: bytes
    sealed: bytes


def decode_start(body: bytes) -> StartRequest:
    m = _map(_load(body), {"v", "n", "pake"})
    number = m["n"]
    if not isinstance(number, int) or isinstance(number, bool) or not 1 <= number <= MAX_NUMBER:
        raise BadMessage("bad invitation number")
    return StartRequest(number, _bytes(m["pake"], PAKE_BYTES))


def decode_finish(body: bytes) -> FinishRequest:
    m = _map(_load(body), {"v", "session", "confirm", "sealed"})
    return FinishRequest(
        _bytes(m["session"], SESSION_BYTES),
        _bytes(m["confirm"], CONFIRM_BYTES),
        _bytes(m["sealed"], limit=MAX_SEALED),
    )


class InviterSide:
    """The inviter's half of one exchange, made from a start request."""

    def __init__(self, code: Code, start: StartRequest) -> None:
        from spake2 import SPAKE2_B, SPAKEError  # (as in `JoinerSide`)

        spake = SPAKE2_B(code.password, idA=_ID_JOINER, idB=_ID_INVITER)
        self.session = secrets.token_bytes(SESSION_BYTES)
        self.pake = bytes(spake.start())
        try:
            shared = spake.finish(start.pake)
        except (SPAKEError, ValueError) as exc:
            raise BadMessage(f"bad SPAKE2 message: {exc}") from None
        self._keys = _Keys.derive(
            shared, _transcript(code.number, self.session, start.pake, self.pake)
        )

    def start_answer(self) -> bytes:
        return encode({"v": VERSION, "session": self.session, "pake": self.pake})

    def joiner(self, finish: FinishRequest) -> Joiner:
        """Who joins, once its confirmation holds; `BadConfirmation` if not
        (it used another code), `BadMessage` if it confirmed but sent garbage."""
        _check(self._keys.joiner_confirmation(), finish.confirm)
        payload = _map(_open(self._keys.seal_joiner, finish.sealed), {"name", "node"})
        return Joiner(_name(payload["name"]), _bytes(payload["node"], NODE_BYTES))

    def finish_answer(self, welcome: Welcome) -> bytes:
        """Our confirmation and the sealed root: only after `joiner` succeeded."""
        payload: dict[str, Any] = {"root": welcome.root, "name": welcome.name, "node": welcome.node}
        if welcome.epochs:
            payload["epochs"] = list(welcome.epochs)
        sealed = _seal(self._keys.seal_inviter, payload)
        return encode(
            {"v": VERSION, "confirm": self._keys.inviter_confirmation(), "sealed": sealed}
        )


# --- encoding -----------------------------------------------------------------


def encode(obj: dict[str, Any]) -> bytes:
    return cbor2.dumps(obj, canonical=True)


def encode_refusal(reason: str) -> bytes:
    """The body of a refusal: a reason word the joiner turns into a sentence."""
    return encode({"v": VERSION, "reason": reason})


def decode_refusal(body: bytes) -> str:
    try:
        m = _map(_load(body), {"v", "reason"})
    except BadMessage:
        return ""
    reason = m["reason"]
    return reason if isinstance(reason, str) and len(reason) <= 32 else ""


def _load(body: bytes, limit: int = MAX_BODY) -> Any:
    if len(body) > limit:
        raise BadMessage("message too large")
    try:
        return cbor2.loads(body)
    except (cbor2.CBORDecodeError, ValueError, TypeError, RecursionError):
        raise BadMessage("not CBOR") from None


def _map(obj: Any, keys: set[str] | None = None) -> dict[str, Any]:
    if not isinstance(obj, dict) or (keys is not None and set(obj) != keys):
        raise BadMessage("unexpected fields")
    if "v" in obj and obj["v"] != VERSION:
        raise BadMessage(f"pairing version {obj['v']!r}, this node speaks {VERSION}")
    return obj


def _bytes(obj: Any, size: int | None = None, limit: int = MAX_BODY) -> bytes:
    if not isinstance(obj, bytes) or (size is not None and len(obj) != size) or len(obj) > limit:
        raise BadMessage("bad field")
    return obj
