"""The advertisement in our TXT record, and the service instance name."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from zeroconf import ServiceInfo, instance_name_from_service_info

from discovery import SERVICE_TYPE
from discovery.txt import Advert, MalformedTxt, decode_txt, encode_txt, instance_name

TAG = "ab" * 16
NODE = "0123456789abcdef" * 2


def as_zeroconf_reads_it(properties: dict[str, str]) -> dict[bytes, bytes | None]:
    """Encode the way zeroconf does (ServiceInfo packs the TXT strings), then
    parse the wire bytes back as a browsing node would."""
    sent = ServiceInfo(SERVICE_TYPE, f"x.{SERVICE_TYPE}", port=1, properties=properties)
    received = ServiceInfo(SERVICE_TYPE, f"x.{SERVICE_TYPE}", port=1, properties=sent.text)
    return received.properties


hex_ids = st.binary(min_size=1, max_size=64).map(bytes.hex)


@given(
    version=st.integers(0, 10**9 - 1),
    tag=hex_ids,
    node_id=hex_ids,
    name=st.text(max_size=60),
)
def test_decode_reads_what_encode_writes(version: int, tag: str, node_id: str, name: str) -> None:
    advert = Advert(version, tag, node_id, name)
    assert decode_txt(as_zeroconf_reads_it(encode_txt(advert))) == advert


def test_a_long_name_is_cut_to_fit_one_txt_string() -> None:
    advert = Advert(1, TAG, NODE, "é" * 300)
    decoded = decode_txt(as_zeroconf_reads_it(encode_txt(advert)))
    assert decoded.name == "é" * 125  # 250 bytes: 255 less "name="


def test_hex_is_read_in_lowercase() -> None:
    properties = {b"v": b"1", b"tag": TAG.upper().encode(), b"id": NODE.upper().encode()}
    assert decode_txt(properties) == Advert(1, TAG, NODE, "")


GOOD: dict[bytes, bytes | None] = {b"v": b"1", b"tag": TAG.encode(), b"id": NODE.encode()}


def without(key: bytes) -> dict[bytes, bytes | None]:
    return {k: v for k, v in GOOD.items() if k != key}


@pytest.mark.parametrize(
    ("properties", "message"),
    [
        (without(b"v"), "no 'v'"),
        (without(b"tag"), "no 'tag'"),
        (without(b"id"), "no 'id'"),
        (GOOD | {b"id": None}, "no 'id'"),  # a key with no "=": present, no value
        (GOOD | {b"v": b""}, "protocol version '' is not a number"),
        (GOOD | {b"v": b"1.0"}, "protocol version '1.0' is not a number"),
        (GOOD | {b"v": b"-1"}, "is not a number"),
        (GOOD | {b"v": b"1" * 10}, "is not a number"),
        (GOOD | {b"v": "\u0661".encode()}, "is not a number"),  # an Arabic-Indic 1
        (GOOD | {b"tag": b""}, "tag must be 1 to 128 hex digits"),
        (GOOD | {b"id": b"xyz"}, "id must be 1 to 128 hex digits"),
        (GOOD | {b"id": b"ab" * 65}, "id must be 1 to 128 hex digits"),
        (GOOD | {b"id": b"\xff\xfe"}, "'id' in the TXT record is not UTF-8"),
        (GOOD | {b"name": b"\xff"}, "'name' in the TXT record is not UTF-8"),
    ],
)
def test_malformed_txt_says_what_is_wrong(
    properties: dict[bytes, bytes | None], message: str
) -> None:
    with pytest.raises(MalformedTxt, match=re.escape(message)):
        decode_txt(properties)


def test_instance_names_differ_per_node_and_fit_a_label() -> None:
    a = instance_name("laptop", "aaaaaaaa" + "0" * 24)
    b = instance_name("laptop", "bbbbbbbb" + "0" * 24)
    assert a == f"laptop-aaaaaaaa.{SERVICE_TYPE}"
    assert a != b


@pytest.mark.parametrize(
    ("name", "display"),
    [
        ("", "dfs-peer"),
        ("  ", "dfs-peer"),
        ("my.box.local", "my-box-local"),
        ("tab\there\nnul\x00del\x7f", "tab here nul del"),
        ("Café ☕ 東京", "Café ☕ 東京"),
    ],
)
def test_instance_name_keeps_what_dns_sd_allows(name: str, display: str) -> None:
    assert instance_name(name, NODE) == f"{display}-01234567.{SERVICE_TYPE}"


@given(name=st.text(max_size=200))
def test_zeroconf_accepts_every_instance_name(name: str) -> None:
    full = instance_name(name, NODE)
    label = full.removesuffix("." + SERVICE_TYPE)
    assert len(label.encode()) <= 63
    info = ServiceInfo(SERVICE_TYPE, full, port=1, properties={})
    assert instance_name_from_service_info(info, strict=True) == label
