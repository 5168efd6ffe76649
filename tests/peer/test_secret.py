"""The volume secret's text form, passphrases, key derivation and user errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import nacl.pwhash.argon2id
import pytest

from peer import secret as secret_module
from peer.errors import (
    BadSecretText,
    CorruptStore,
    DfsError,
    PassphraseNeedsName,
    PassphraseTooShort,
    SecretFileUnreadable,
    SecretMissing,
    WrongSecret,
)
from peer.keys import VolumeKeys, derive_key
from peer.secret import (
    ENV_VAR,
    format_secret,
    new_secret,
    parse_secret,
    passphrase_salt,
    read_secret,
)

RAW = bytes(range(32))
_B32 = "abcdefghijklmnopqrstuvwxyz234567"


def test_secret_text_round_trips() -> None:
    for raw in (RAW, new_secret(), bytes(32), b"\xff" * 32):
        assert parse_secret(format_secret(raw)) == raw


def test_secret_text_shape() -> None:
    text = format_secret(RAW)
    prefix, *groups = text.split("-")
    assert prefix == "dfs1"
    assert all(len(g) == 5 for g in groups[:-1])
    assert 1 <= len(groups[-1]) <= 5
    assert text == text.lower()
    assert "=" not in text


def test_new_secrets_differ() -> None:
    assert len(new_secret()) == 32
    assert new_secret() != new_secret()


def test_secret_text_forgives_case_whitespace_and_missing_dashes() -> None:
    text = format_secret(RAW)
    assert parse_secret(f"  {text.upper()}\n") == RAW
    assert parse_secret(text.replace("-", "")) == RAW
    assert parse_secret("dfs1-" + text[5:].replace("-", "")) == RAW
    assert parse_secret(text.replace("-", " - ")) == RAW


def test_every_single_character_typo_is_caught() -> None:
    text = format_secret(RAW)
    for i, char in enumerate(text):
        if char == "-" or i < 5:
            continue
        wrong = _B32[(_B32.index(char) + 1) % len(_B32)]
        with pytest.raises(BadSecretText):
            parse_secret(text[:i] + wrong + text[i + 1 :])


@pytest.mark.parametrize(
    "mangled",
    [
        lambda t: t[:-1],  # a character lost
        lambda t: t + "a",  # a character too many
        lambda t: t[:10] + "1" + t[11:],  # not in the base32 alphabet
        lambda t: "dfs1-",
        lambda t: "dfs2" + t[4:],  # a typo in the prefix is not a passphrase
        lambda t: "DSF1" + t[4:],
    ],
)
def test_secret_text_of_wrong_length_or_alphabet_is_refused(
    mangled: Callable[[str], str],
) -> None:
    with pytest.raises(BadSecretText):
        parse_secret(mangled(format_secret(RAW)))


def test_passphrase_gives_the_same_root_everywhere() -> None:
    phrase = "correct horse battery staple"
    root = parse_secret(phrase, "photos")
    assert len(root) == 32
    assert parse_secret(f"  {phrase}\n", " photos ") == root
    assert parse_secret("Correct horse battery staple", "photos") != root
    # The same text typed precomposed or with a combining accent is one passphrase.
    assert parse_secret("caf\u00e9 au lait noir", "v") == parse_secret(
        "cafe\u0301 au lait noir", "v"
    )


def test_one_passphrase_names_a_different_volume_under_each_name() -> None:
    """The salt is per volume: a dictionary computed for one name is useless
    against another."""
    phrase = "correct horse battery staple"
    assert parse_secret(phrase, "photos") != parse_secret(phrase, "music")
    assert passphrase_salt("photos") != passphrase_salt("music")
    assert secret_module._OPSLIMIT >= nacl.pwhash.argon2id.OPSLIMIT_MODERATE
    assert secret_module._MEMLIMIT >= nacl.pwhash.argon2id.MEMLIMIT_MODERATE


def test_a_passphrase_without_a_volume_name_is_refused() -> None:
    with pytest.raises(PassphraseNeedsName) as caught:
        parse_secret("correct horse battery staple")
    assert "--volume-name" in caught.value.message()
    with pytest.raises(PassphraseNeedsName):
        read_secret("correct horse battery staple", None, {"DFS_PEER_VOLUME_NAME": " "})
    assert read_secret("correct horse battery staple", None, {"DFS_PEER_VOLUME_NAME": "x"}) == (
        parse_secret("correct horse battery staple", "x")
    )


def test_too_short_passphrase_is_refused_with_its_reason() -> None:
    with pytest.raises(PassphraseTooShort) as caught:
        parse_secret("hunter2hunt")
    assert isinstance(caught.value, BadSecretText)
    assert "at least 12 characters" in caught.value.message()


def test_read_secret_precedence(tmp_path: Path) -> None:
    other = bytes(reversed(RAW))
    secret_file = tmp_path / "secret"
    secret_file.write_text(format_secret(other) + "\n")
    env = {ENV_VAR: format_secret(b"\x07" * 32)}
    assert read_secret(format_secret(RAW), secret_file, env) == RAW
    assert read_secret(None, secret_file, env) == other
    assert read_secret(None, None, env) == b"\x07" * 32


def test_read_secret_without_any_source_says_how_to_give_one() -> None:
    with pytest.raises(SecretMissing) as caught:
        read_secret(None, None, {})
    assert "DFS_PEER_SECRET" in caught.value.message()


def test_read_secret_from_missing_or_empty_file_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(SecretFileUnreadable, match="nope"):
        read_secret(None, missing, {})
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(SecretFileUnreadable, match="empty"):
        read_secret(None, empty, {})


def test_keys_differ_per_purpose_and_per_root() -> None:
    a = VolumeKeys.from_root(RAW)
    b = VolumeKeys.from_root(new_secret())
    keys_a = [a.blocks, a.log, a.block_ids, a.peers, a.tag]
    keys_b = [b.blocks, b.log, b.block_ids, b.peers, b.tag]
    assert all(len(k) == 32 for k in keys_a)
    assert len(set(keys_a)) == 5
    assert not set(keys_a) & set(keys_b)
    assert RAW not in keys_a


def test_keys_are_deterministic_and_tag_is_short_hex() -> None:
    a, b = VolumeKeys.from_root(RAW), VolumeKeys.from_root(bytes(RAW))
    assert a == b
    assert derive_key(RAW, b"log") == a.log
    assert len(a.tag_hex) == 16
    assert int(a.tag_hex, 16) >= 0
    assert a.tag_hex == a.tag.hex()[:16]


def test_keys_never_appear_in_repr() -> None:
    keys = VolumeKeys.from_root(RAW)
    assert keys.blocks.hex() not in repr(keys)
    assert str(keys.blocks) not in repr(keys)


def test_user_errors_read_as_one_line_with_fields() -> None:
    err = WrongSecret(data_dir=Path("/var/lib/dfs-peer/ab12"))
    assert err.message() == (
        "the secret does not open the volume in /var/lib/dfs-peer/ab12 (wrong secret?)."
    )
    assert str(err) == err.message()
    assert err.exit_code == 2
    assert DfsError.exit_code == 1
    store_err = CorruptStore(path="/x/node.db", detail="it is {odd}")
    assert "\n" not in store_err.message()
    assert store_err.message() == "cannot use the store /x/node.db: it is {odd}."


def test_user_error_refuses_missing_or_unknown_fields() -> None:
    with pytest.raises(TypeError):
        WrongSecret()
    with pytest.raises(TypeError):
        WrongSecret(data_dir="/x", extra=1)
