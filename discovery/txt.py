"""What a node puts in its mDNS advertisement, and how we read others'.

Invariant: `decode_txt(encode_txt(a)) == a` for every advertisement we build,
and `decode_txt` either returns a fully checked `Advert` or raises
`MalformedTxt`; it never lets anything else out, whatever bytes arrive (anyone
on the LAN can advertise anything under our service type).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

SERVICE_TYPE = "_dfs-peer._tcp.local."

# A DNS label (the instance name is one) holds at most 63 bytes, and one TXT
# string at most 255 (RFC 6763 §6.1), key and "=" included.
_MAX_LABEL = 63
_MAX_TXT_STRING = 255
# Node ids and volume tags are hex digests; 128 hex digits is a 64-byte hash,
# more than either uses, and bounds what a stranger can make us keep.
_MAX_HEX = 128
_ID_PREFIX = 8


class MalformedTxt(ValueError):
    """A TXT record under our service type that is not a dfs-peer advertisement."""


@dataclass(frozen=True, slots=True)
class Advert:
    """One node's advertisement: protocol version, volume tag, node id, name.

    `tag` and `node_id` are lowercase hex; `name` is for display only.
    """

    version: int
    tag: str
    node_id: str
    name: str


def check_hex(what: str, value: str) -> str:
    """`value` in lowercase, or ValueError if it is not non-empty hex."""
    lowered = value.lower()
    if not lowered or len(lowered) > _MAX_HEX or lowered.strip("0123456789abcdef"):
        raise ValueError(f"{what} must be 1 to {_MAX_HEX} hex digits, not {value!r}")
    return lowered


def encode_txt(advert: Advert) -> dict[str, str]:
    """The TXT properties for `advert` (the display name cut to fit one TXT string)."""
    return {
        "v": str(advert.version),
        "tag": advert.tag,
        "id": advert.node_id,
        "name": _truncate_utf8(advert.name, _MAX_TXT_STRING - len("name=")),
    }


def decode_txt(properties: Mapping[bytes, bytes | None]) -> Advert:
    """Read an advertisement from TXT properties as zeroconf parses them.

    Raises MalformedTxt (saying what is wrong) for a missing or invalid field.
    """
    fields: dict[str, str] = {}
    for key in (b"v", b"tag", b"id", b"name"):
        value = properties.get(key)
        if value is None:
            if key == b"name":
                continue  # optional: a display nicety
            raise MalformedTxt(f"no {key.decode()!r} in the TXT record")
        try:
            fields[key.decode()] = value.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedTxt(f"{key.decode()!r} in the TXT record is not UTF-8") from None
    version = fields["v"]
    if not version.isascii() or not version.isdigit() or len(version) > 9:
        raise MalformedTxt(f"protocol version {version!r} is not a number")
    try:
        tag = check_hex("tag", fields["tag"])
        node_id = check_hex("id", fields["id"])
    except ValueError as e:
        raise MalformedTxt(str(e)) from None
    return Advert(int(version), tag, node_id, fields.get("name", ""))


def instance_name(name: str, node_id: str) -> str:
    """This node's service instance name: `<display name>-<id prefix>.<type>`.

    The id prefix makes it unique per node (two machines may share a display
    name); dots would read as label separators and are replaced, control
    characters (not allowed, RFC 6763 §4.1.1) become spaces, and the display
    part is cut so the label fits in 63 bytes.
    """
    suffix = "-" + node_id[:_ID_PREFIX]
    printable = "".join(ch if ch.isprintable() else " " for ch in name)
    display = " ".join(printable.replace(".", "-").split()) or "dfs-peer"
    display = _truncate_utf8(display, _MAX_LABEL - len(suffix))
    return f"{display}{suffix}.{SERVICE_TYPE}"


def server_name(node_id: str) -> str:
    """The host name our address records hang on: one per node, never the
    machine's own (which avahi may already own and defend)."""
    return f"dfs-peer-{node_id[:16]}.local."


def _truncate_utf8(text: str, limit: int) -> str:
    return text.encode("utf-8")[:limit].decode("utf-8", "ignore")
